"""Ingest telemetry exports into the HDF5 store, streaming (one node, or one file chunk, at a time).

``data.format`` picks the reader: ``wide`` (below), ``ldms`` (LDMS CSV stores, hpcad.data.ldms) or
``long`` (one row per sample, hpcad.data.longformat); the last two pivot out of core (hpcad.data.grid).
Whatever the format, counters become rates, ``data.labels`` labels the rows from a file of intervals
(hpcad.data.labelfile) and ``data.jobs`` adds the job per row (hpcad.data.jobs).

Accepted ``data.source`` for the wide format (docs/data.md):
- a directory of per-node ``*.csv``, ``*.csv.gz`` or ``*.parquet`` files (file stem = node name), or
  of files of many nodes with a node column (daily exports of the cluster: read like one file); a
  directory without such files: those of its subfolders (one per day, a folder per node, Hive-style
  partition folders: hpcad/data/nodefiles.py);
- a glob pattern (``/exports/*/2025-01-*.csv``): the files it matches, read as a directory's;
- one CSV/Parquet file with a node column (read in chunks, staged per node on disk), or without
  one: a single node named after the file stem (the seed lecture's CSV);
- an existing hpcad HDF5 store (used in place);
- nothing: the synthetic cluster generator (the embedded default).

This module ingests in one process; under several ranks hpcad/data/ranks.py shares the work out
(a folder's node files; the pivot of LDMS and long exports). A node's table becomes NodeData in
hpcad/data/convert.py; files of many nodes' rows are staged by node in hpcad/data/rows.py.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from hpcad.data import synthetic
from hpcad.data.convert import FrameConverter, counted, guarded
from hpcad.data.counters import counter_columns, to_rates
from hpcad.data.grid import GridStager
from hpcad.data.h5 import open_h5
from hpcad.data.jobs import JobTable, read_jobs
from hpcad.data.labelfile import LabelTable, read_labels
from hpcad.data.nodenames import NodeRenamer, check_unique
from hpcad.data.ldms import stage_ldms
from hpcad.data.longformat import stage_long
from hpcad.data.rows import has_node_column, iter_node_rows
from hpcad.data.store import (TelemetryStore, check_node_name, drop_parts, is_store_path, missing_parts,
                               write_store)
from hpcad.data.node import NodeData
from hpcad.data.nodefiles import folder_files, folder_of, node_files, node_frame, node_groups, where
from hpcad.data.notes import InputWarnings, input_warnings
from hpcad.data.paths import is_pattern, is_table, pattern_files, source_exists, visible_files
from hpcad.data.tables import columns
from hpcad.data.timestamps import zone
from hpcad.dist import CLUSTER_WIDE
from hpcad.errors import ConfigError, InputError

log = logging.getLogger(__name__)
FORMATS = {"wide": None, "ldms": stage_ldms, "long": stage_long}
_SAID_UP_TO_DATE: set[Path] = set()


def source_signature(source: Path, fmt: str = "wide") -> str:
    """A cheap fingerprint of the input (paths, sizes, mtimes) so a rerun can skip re-ingesting: of
    the files the reader of ``data.format=fmt`` takes from a folder (wide: the CSV/Parquet files in it;
    long: those below it; ldms: every file below it, side files included), so that nothing else there
    (a log, notes, a run folder made inside it) makes the input look changed."""
    if is_pattern(source):
        files = pattern_files(source)
    elif not source.is_dir():
        files = [source]
    elif fmt == "ldms":
        files = visible_files(source)
    elif fmt == "long":
        files = [p for p in visible_files(source) if is_table(p)]
    else:
        files = folder_files(source)
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def plan_metrics(files: list[Path], data_cfg, skip_bad: bool = False) -> list[str]:
    """The store's metric list from the node files' headers (no rows read): their union
    (``data.on_missing_metric=union``), the metrics every file has (``drop``) or the first file's
    (``error``: a node with others is refused when read), in first-seen order.
    ``skip_bad``: a file whose header cannot be read is left out here (the node is then skipped and
    recorded when it is read)."""
    skip = {data_cfg.node_column, data_cfg.timestamp_column, data_cfg.label_column, *data_cfg.ignore_columns}
    order: dict[str, int] = {}
    sets = []
    for path in files:
        try:
            header = columns(path)
        except InputError:
            if skip_bad:
                continue
            raise
        cols = [c for c in header if c not in skip and not c.startswith("__index_level_")]
        sets.append(set(cols))
        for c in cols:
            order.setdefault(c, len(order))
    names = list(order)
    if data_cfg.on_missing_metric == "error":  # the first file's; a node that differs is refused when read
        return [c for c in names if c in sets[0]] if sets else []
    if data_cfg.on_missing_metric == "drop":
        common = set.intersection(*sets) if sets else set()
        gone = [c for c in names if c not in common]
        if gone:
            log.warning("data.on_missing_metric=drop: dropping %d metric(s) missing on some nodes: %s", len(gone),
                        gone[:20])
        names = [c for c in names if c in common]
        if not names:
            raise InputError(f"{folder_of(files)}: no metric is present in every node file")
    elif len({frozenset(s) for s in sets}) > 1:
        log.warning("%s: nodes report different metrics (%d in all, %d to %d per file); each node is trained "
                    "on its own (data.on_missing_metric=union)", folder_of(files), len(names),
                    min(map(len, sets)), max(map(len, sets)))
    return names


def iter_files(files: list[Path], conv: FrameConverter, skipped: list | None = None,
               progress: bool = True, skipped_files: list | None = None) -> Iterator[NodeData]:
    """The nodes of a folder's node files (or a rank's share of them), one node at a time: its file, or
    its files of several subfolders joined (hpcad/data/nodefiles.py). ``skipped``/``skipped_files``
    (``data.on_bad_node=skip``): bad nodes, and bad files of a node that has others, recorded."""
    groups = node_groups(files, conv.cfg.node_column)

    def read(name: str, paths: list[Path]) -> NodeData | None:
        node = check_node_name(name, str(paths[0]))
        return guarded(lambda: conv(node_frame(paths, conv, node, skipped_files), node, where(paths)), node, skipped)

    yield from counted(itertools.starmap(read, groups.items()), len(groups), progress)


def source_view(data_cfg) -> dict | None:
    """How a wide-format folder or pattern (``data.source``) will be read, from its listing and the
    first readable header, no rows (``hpcad preflight``): its files, and its nodes with one file's
    node as an example; files of many nodes' rows are counted only. None for other inputs. A layout
    whose nodes cannot be told (part files no folder names, files named for a day in a folder of a
    day) is the ``InputError`` the ingest would stop with."""
    src = data_cfg.source
    if src is None or data_cfg.format != "wide" or is_store_path(src):
        return None
    path = Path(src).expanduser()
    if not (path.is_dir() or is_pattern(path)):
        return None
    files = node_files(path, data_cfg.node_column)
    if has_node_column(files, data_cfg):
        return {"files": len(files), "nodes": None, "how": f"files of many nodes' rows ({data_cfg.node_column!r} "
                                                           f"column)"}
    groups = node_groups(files, data_cfg.node_column)
    node, first = next(iter(groups.items()))
    return {"files": len(files), "nodes": len(groups), "how": f"{first[0].relative_to(folder_of(files))} -> node {node}"}


def check_data_options(data_cfg) -> None:
    """The ingest's numbers, checked before any file is read (a row period of 0 or a scratch of 0
    buckets had been taken)."""
    if not int(data_cfg.period_s) >= 1:
        raise ConfigError(f"data.period_s={data_cfg.period_s}: must be >= 1 (seconds between rows)")
    if data_cfg.resample_s is not None and not int(data_cfg.resample_s) >= 1:
        raise ConfigError(f"data.resample_s={data_cfg.resample_s}: must be >= 1 (seconds)")
    if not int(data_cfg.scratch_buckets) >= 1:
        raise ConfigError(f"data.scratch_buckets={data_cfg.scratch_buckets}: must be >= 1")
    zone(data_cfg.timezone, "data.timezone")  # before, an unknown one surfaced as naive times that cannot be placed


def check_inputs(data_cfg) -> None:
    """``data.source``, ``data.labels`` and ``data.jobs`` exist on this node (the preflight asks every
    rank that will read them: hpcad/data/ranks.py), else ``InputError`` naming the option."""
    for option, value in (("data.source", data_cfg.source), ("data.labels", data_cfg.labels),
                          ("data.jobs", data_cfg.jobs), ("data.node_names", data_cfg.node_names)):
        if value is None:
            continue
        path = Path(value).expanduser()
        if option == "data.source" and is_pattern(path):
            if not source_exists(path):
                raise InputError(f"data.source: the pattern {path} matches no *.csv, *.csv.gz or *.parquet file")
        elif not path.exists():
            raise InputError(f"{option}: {path.resolve()} does not exist")


def ingest(data_cfg, store_path: Path, progress: bool = True) -> Path:
    """Make sure a store for ``data_cfg.source`` exists; return its path (an input store is used as is).
    ``progress``: a bar or periodic log lines while the nodes are read (``compute.progress``)."""
    source = data_cfg.source
    read_with = (("data.labels", data_cfg.labels, "labels"), ("data.jobs", data_cfg.jobs, "job records"),
                 ("data.node_names", data_cfg.node_names, "node renames"))
    for option, value, what in read_with:  # (jobs and renames had been ignored without a word)
        if value is not None and (source is None or is_store_path(source)):
            raise InputError(f"{option}={value}: {what} are read while telemetry exports are ingested, but "
                             f"data.source is " + ("an hpcad store, used as it is" if source else
                                                   "unset (the synthetic cluster, made by its generator)"))
    if is_store_path(source):
        path = Path(source)
        TelemetryStore(path)  # validates layout, names the file on error
        log.info("using existing store %s", path, extra=CLUSTER_WIDE)
        return path
    if source is None:
        s = data_cfg.synthetic
        sig = synthetic_signature(s)
        if up_to_date(store_path, sig):
            return store_path
        nodes = synthetic.generate_cluster(s.nodes, s.rows, s.seed, s.profile, s.clean_fraction,
                                           s.anomaly_fraction, None if s.kinds is None else list(s.kinds))
        n = write_store(store_path, synthetic.metric_names(s.profile), nodes, "synthetic", signature=sig)
        log.info("generated the synthetic cluster (profile %s): %d nodes -> %s", s.profile, n, store_path)
        return store_path
    todo = to_ingest(data_cfg, store_path)
    if todo is None:
        return store_path
    with input_warnings() as said:
        n, skipped, skipped_files = _read_and_write(data_cfg, store_path, progress, todo, said)
    # drops parts of an ingest over ranks
    wrote(store_path, [], n, todo[0], f"{data_cfg.format} format", skipped, skipped_files)
    return store_path


def _read_and_write(data_cfg, store_path: Path, progress: bool, todo: tuple,
                    said: InputWarnings) -> tuple[int, list | None, list | None]:
    """``ingest``'s reading and writing (the readers' warnings collected in ``said``): the number of
    nodes written, the nodes and files skipped (None without ``data.on_bad_node=skip``)."""
    src, jobs_path, sig = todo
    fmt = data_cfg.format
    jobs = read_jobs(jobs_path, data_cfg.timezone) if jobs_path else None
    labels = read_labels(data_cfg.labels, data_cfg) if data_cfg.labels else None
    skipped: list | None = [] if data_cfg.on_bad_node == "skip" else None
    skipped_files: list | None = [] if skipped is not None else None  # a folder's files (many nodes', a node's days)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    stager = None
    try:
        if fmt == "wide":
            conv = FrameConverter(data_cfg)
            many = src.is_dir() or is_pattern(src)  # a folder's files, or a pattern's
            files = node_files(src, data_cfg.node_column) if many else [src]
            if many and not has_node_column(files, data_cfg):
                conv.metrics = plan_metrics(files, data_cfg, skip_bad=skipped is not None)  # as ranks share it out
                stream = iter_files(files, conv, skipped, progress, skipped_files)
            elif many or is_table(src):
                stream = iter_node_rows(files, conv, store_path.parent, skipped, progress, skipped_files)
            else:
                raise InputError(f"data.source: {src} is not a directory, CSV/Parquet file or .h5 store")
            first = next(stream, None)  # the first node fixes the metric list the store is written with
            if first is None:
                raise InputError(f"{src}: no usable node ({len(skipped)} skipped for bad input, the first: "
                                 f"{skipped[0][0]}: {skipped[0][1]})" if skipped else f"{src}: no nodes found")
            metrics, stream = list(conv.metrics or []), itertools.chain([first], stream)
        else:
            stager, keep = stage_grid(data_cfg, src, store_path.parent)
            metrics = [stager.metric_names[c] for c in keep]
            stream = counted(stager.iter_nodes(keep), len(stager.node_names), progress)
        n = write_store(store_path, metrics, finish_nodes(stream, metrics, data_cfg, jobs, labels, whole=True),
                        str(src), signature=sig, skipped=skipped, jobs=jobs, skipped_files=skipped_files,
                        warnings=said)
    finally:
        if stager is not None:
            stager.close()
    return n, skipped, skipped_files


def check_tables(nodes: list[str], data_cfg, jobs: JobTable | None, labels: LabelTable | None) -> None:
    """Before a store of ``nodes`` is written (so that a rerun does not find it up to date): a job or
    labels file naming none of them is an error, one naming others is logged."""
    check_unique(nodes, data_cfg.node_names)
    if jobs is not None:
        jobs.check_nodes(nodes, str(jobs_file(data_cfg)))
    if labels is not None:
        labels.check_nodes(nodes)


def wrote(store_path: Path, parts: list[str], n: int, src: Path, how: str, skipped: list | None,
          skipped_files: list | None = None) -> None:
    """After a store was written (by one process, or as an index over ``parts``): the part files it
    does not use go, and the log says what was done."""
    drop_parts(store_path, parts)
    log.info("ingested %d nodes from %s (%s) -> %s", n, src, how, store_path)
    if skipped:
        log.error("%d node(s) skipped for bad input (recorded in the store and the report): %s",
                  len(skipped), ", ".join(n for n, _ in skipped))
    if skipped_files:  # every node's rows of those files are missing
        log.error("%d input file(s) skipped for bad input (recorded in the store and the report): %s",
                  len(skipped_files), ", ".join(Path(p).name for p, _ in skipped_files))


def synthetic_signature(s) -> str:
    """The signature of a store of the synthetic cluster (``data.synthetic``)."""
    return f"synthetic:{s.profile}:{s.nodes}:{s.rows}:{s.seed}:{s.clean_fraction}:{s.anomaly_fraction}:{s.kinds}"


def wanted_signature(data_cfg) -> str:
    """The signature of the store the ``data.*`` options give, without ingesting anything (an input
    store: its own): what a stage compares with the signature its inputs were made from."""
    source = data_cfg.source
    if source is None:
        return synthetic_signature(data_cfg.synthetic)
    if is_store_path(source):
        return TelemetryStore(Path(source)).signature
    check_inputs(data_cfg)
    return signature(Path(source).expanduser().resolve(), jobs_file(data_cfg), data_cfg)


def jobs_file(data_cfg) -> Path | None:
    """``data.jobs`` as an absolute path, or None."""
    return Path(data_cfg.jobs).expanduser().resolve() if data_cfg.jobs else None


def to_ingest(data_cfg, store_path: Path) -> tuple[Path, Path | None, str] | None:
    """For ``data.source`` (files, not a store): None when ``store_path`` is up to date with it (said
    once), else the input, the job file and the input's signature, after checking the options."""
    sig = wanted_signature(data_cfg)  # checks that the inputs exist first
    src, jobs_path = Path(data_cfg.source).expanduser().resolve(), jobs_file(data_cfg)
    if data_cfg.format not in FORMATS:
        raise InputError(f"data.format={data_cfg.format!r}: one of {list(FORMATS)}")
    if data_cfg.format == "ldms" and is_pattern(src):
        raise InputError(f"data.source={data_cfg.source}: a pattern of files is read in the wide and long formats; "
                         f"an LDMS store is read as its folder")
    if up_to_date(store_path, sig):
        said_up_to_date(store_path, src)
        return None
    if data_cfg.on_bad_node not in ("error", "skip"):
        raise InputError(f"data.on_bad_node={data_cfg.on_bad_node!r}: error or skip")
    return src, jobs_path, sig


def stage_grid(data_cfg, src: Path, scratch_dir: Path) -> tuple[GridStager, list[int]]:
    """Pass 1 of an LDMS or long-format ingest (hpcad/data/grid.py): the stager, its scratch files
    in ``scratch_dir``, and the codes of the metrics the store keeps. The caller closes the stager."""
    stager = GridStager(scratch_dir, data_cfg.period_s, data_cfg.scratch_buckets, data_cfg.label_column)
    try:
        FORMATS[data_cfg.format](src, data_cfg, stager)
        if stager.infinite:
            log.warning("%s: %d infinite values read as missing (NaN)", src, stager.infinite)
        keep = stager.metric_plan(data_cfg.on_missing_metric, str(src))
    except BaseException:
        stager.close()
        raise
    log.info("%s: %.4g samples of %d nodes x %d metrics staged; pivoting per node", src, stager.records,
             len(stager.node_names), len(keep))
    return stager, keep


def said_up_to_date(store_path: Path, src: Path) -> None:
    """Log that the store needs no ingest, once per run (every stage checks)."""
    if store_path not in _SAID_UP_TO_DATE:
        _SAID_UP_TO_DATE.add(store_path)
        log.info("store %s is up to date with %s", store_path, src, extra=CLUSTER_WIDE)


def finish_nodes(stream: Iterator[NodeData], metrics: list[str], data_cfg, jobs: JobTable | None,
                 labels: LabelTable | None = None, whole: bool = False) -> Iterator[NodeData]:
    """Per node, whatever the format: counters into rates, labels from ``data.labels``, job per row.
    ``whole``: the stream is the whole store (one process), so the job and labels files are checked
    against its nodes at its end (over ranks: by rank 0 before the index, hpcad/data/ranks.py)."""
    counters = counter_columns(metrics, list(data_cfg.counters))
    period = labels_period(data_cfg)
    rename = NodeRenamer(data_cfg.node_names)
    names = []
    for nd in stream:
        nd.name = rename(nd.name)  # SLURM's name where the telemetry's differs: the jobs and labels use it
        nd = to_rates(nd, counters, metrics)
        if labels is not None:
            if nd.labels is not None:
                col = data_cfg.label_column
                raise InputError(f"node {nd.name}: its telemetry has a label column ({col!r}) and data.labels gives "
                                 f"labels too; use one (data.ignore_columns=[{col}] drops the column)")
            nd.labels = labels.assign(nd, period)
        if jobs is not None:
            nd.job = jobs.assign(nd)
        names.append(nd.name)
        yield nd
    if labels is not None:
        labels.log_uncovered()
    if whole and names:  # no node at all: the store's own error says so (and how many were skipped)
        check_tables(names, data_cfg, jobs, labels)


def labels_period(data_cfg) -> int:
    """Seconds a row stands for, for ``data.labels``: the grid's period (LDMS, long), the resampling
    period (``data.resample_s``), else 0 (a row is its timestamp)."""
    if str(data_cfg.format) != "wide":
        return int(data_cfg.period_s)
    return int(data_cfg.resample_s or 0)


def signature(src: Path, jobs: Path | None, data_cfg) -> str:
    """Input files plus every option that changes what the store holds."""
    opts = {k: str(getattr(data_cfg, k)) for k in (
        "format", "node_column", "timestamp_column", "label_column", "metric_column", "value_column",
        "period_s", "timezone", "epoch_unit", "counters", "on_missing_metric", "ignore_columns",
        "sort_timestamps", "on_bad_node")}
    if data_cfg.resample_s is not None:  # unset, earlier stores keep their signature
        opts["resample_s"] = str(data_cfg.resample_s)
    if data_cfg.label_names:  # unset, earlier stores keep their signature
        opts["label_names"] = json.dumps([str(x) for x in data_cfg.label_names])
    if data_cfg.dayfirst is not None:  # unset, dates read as the column shows: earlier stores keep their signature
        opts["dayfirst"] = str(data_cfg.dayfirst)
    for key, default in (("duplicates", "identical"), ("blank_labels", "error")):  # at their defaults, earlier
        if str(getattr(data_cfg, key)) != default:  # stores keep their signatures (their input had neither)
            opts[key] = str(getattr(data_cfg, key))
    parts = [source_signature(src, str(data_cfg.format)), source_signature(jobs) if jobs else "",
             json.dumps(opts, sort_keys=True)]
    if data_cfg.labels:  # unset, earlier stores keep their signature
        parts.append(source_signature(Path(data_cfg.labels).expanduser().resolve()))
    if data_cfg.node_names:  # unset, earlier stores keep their signature
        parts.append("names:" + source_signature(Path(data_cfg.node_names).expanduser().resolve()))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def up_to_date(store_path: Path, sig: str) -> bool:
    """Whether ``store_path`` holds the input that ``sig`` describes (and every part it links to)."""
    if not store_path.exists():
        return False
    try:
        with open_h5(store_path) as f:
            return str(f.attrs.get("source_signature", "")) == sig and not missing_parts(store_path, f)
    except Exception:
        return False
