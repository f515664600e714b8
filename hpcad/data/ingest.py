"""Ingest telemetry exports into the HDF5 store, streaming (one node, or one file chunk, at a time).

``data.format`` picks the reader: ``wide`` (below), ``ldms`` (LDMS CSV stores, hpcad.data.ldms) or
``long`` (one row per sample, hpcad.data.longformat); the last two pivot out of core (hpcad.data.grid).
Whatever the format, counters become rates and ``data.jobs`` adds the job per row (hpcad.data.jobs).

Accepted ``data.source`` for the wide format (docs/data.md):
- a directory of per-node ``*.csv``, ``*.csv.gz`` or ``*.parquet`` files (file stem = node name), or
  of files of many nodes with a node column (daily exports of the cluster: read like one file);
- one CSV/Parquet file with a node column (read in chunks, staged per node on disk), or without
  one: a single node named after the file stem (the seed lecture's CSV);
- an existing hpcad HDF5 store (used in place);
- nothing: the synthetic cluster generator (the embedded default).

This module ingests in one process; under several ranks hpcad/data/ranks.py shares the work out
(a folder's node files; the pivot of LDMS and long exports).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from hpcad.data import synthetic
from hpcad.data.counters import counter_columns, to_rates
from hpcad.data.grid import MISSING_METRIC_POLICIES, GridStager
from hpcad.data.jobs import JobTable, read_jobs
from hpcad.data.ldms import stage_ldms
from hpcad.data.longformat import stage_long
from hpcad.data.h5 import h5_file, h5_writing, open_h5
from hpcad.data.store import TelemetryStore, check_node_name, drop_parts, missing_parts, write_store
from hpcad.data.node import NodeData
from hpcad.data.tables import (DIALECT_ROWS, columns, is_table, iter_table_chunks, looks_decimal_comma, read_table,
                               stem)
from hpcad.data.timestamps import to_epoch_seconds
from hpcad.dist import CLUSTER_WIDE
from hpcad.errors import InputError
from hpcad.progress import Progress

if TYPE_CHECKING:
    import pandas as pd  # imported where frames are converted: a stage whose store is up to date needs none

log = logging.getLogger(__name__)
FORMATS = {"wide": None, "ldms": stage_ldms, "long": stage_long}
_SAID_UP_TO_DATE: set[Path] = set()


class FrameConverter:
    """Validate one node's table and turn it into :class:`NodeData` in the store's metric order.

    ``metrics`` is the store's metric list: given (from the files' headers, :func:`plan_metrics`), or
    fixed by the first node. ``data.on_missing_metric`` says what a node without some of them gets:
    ``union`` (default) all-NaN columns, the metric is *absent* on that node (its model leaves it
    out); ``drop`` cannot happen (the list is the common set); ``error`` refuses the node."""

    def __init__(self, data_cfg, metrics: list[str] | None = None) -> None:
        self.cfg = data_cfg
        self.metrics = metrics
        self.labelled: bool | None = None
        self.policy = str(data_cfg.on_missing_metric)
        if self.policy not in MISSING_METRIC_POLICIES:
            raise InputError(f"data.on_missing_metric={self.policy!r}: one of {', '.join(MISSING_METRIC_POLICIES)}")

    def __call__(self, df: pd.DataFrame, node: str, where: str) -> NodeData:
        import pandas as pd

        cfg = self.cfg
        where = f"{where} (node {node})"
        if len(df) == 0:
            raise InputError(f"{where}: no rows (empty node)")
        df = df.drop(columns=[c for c in (cfg.node_column, *cfg.ignore_columns) if c in df.columns])
        has_ts = cfg.timestamp_column in df.columns
        has_lab = cfg.label_column in df.columns
        metric_cols = [c for c in df.columns if c not in (cfg.timestamp_column, cfg.label_column)]
        bad = [c for c in metric_cols if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            examples = {c: str(df[c][pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()].iloc[0])
                        for c in bad[:3] if (pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()).any()}
            comma = any(looks_decimal_comma(v) for v in examples.values())
            raise InputError(f"{where}: non-numeric metric columns {bad[:10]} (e.g. {examples}); "
                             + (f"numbers with a decimal comma are read as such where the fields are separated "
                                f"by ';', tab or '|' and one shows in the first {DIALECT_ROWS} rows (docs/data.md)"
                                if comma else "fix the export or list them in data.ignore_columns"))
        if not metric_cols:
            raise InputError(f"{where}: no metric columns besides {cfg.timestamp_column!r}/{cfg.label_column!r}")
        if self.labelled is None:
            self.labelled = has_lab
        if self.metrics is None:
            self.metrics = [str(c) for c in metric_cols]
        elif set(map(str, metric_cols)) != set(self.metrics) and self.policy == "error":
            missing = sorted(set(self.metrics) - set(map(str, metric_cols)))
            extra = sorted(set(map(str, metric_cols)) - set(self.metrics))
            raise InputError(f"{where}: metric set differs from the first node's: missing {missing[:10]}, "
                             f"extra {extra[:10]} (data.on_missing_metric=error; union keeps each node's "
                             f"own metrics, drop the common ones)")
        df.columns = [str(c) for c in df.columns]
        values = df.reindex(columns=self.metrics).to_numpy(dtype=np.float32)
        infinite = np.isinf(values)
        if infinite.any():  # e.g. a derived metric divided by zero: a missing sample, said once per node
            cols = [self.metrics[i] for i in np.flatnonzero(infinite.any(axis=0))[:10]]
            log.warning("%s: %d infinite values in metric columns %s read as missing (NaN)", where,
                        int(infinite.sum()), cols)
            values[infinite] = np.nan
        all_nan = np.isnan(values).all(axis=0)
        if all_nan.any():
            cols = [self.metrics[i] for i in np.flatnonzero(all_nan)[:10]]
            if self.policy != "union":
                raise InputError(f"{where}: metric columns {cols} hold no value at all (data.on_missing_metric="
                                 f"{self.policy}; union ingests them as absent on this node)")
            log.info("%s: %d metric(s) absent on this node (no value): %s", where, int(all_nan.sum()), cols)
        if has_ts:
            ts = to_epoch_seconds(df[cfg.timestamp_column], where, cfg.timestamp_column, cfg.timezone, cfg.epoch_unit,
                                  dayfirst=cfg.dayfirst)
            unit = "s"
        else:
            ts, unit = np.arange(len(df), dtype=np.int64), "row"
        labels = None
        if has_lab:
            lab = pd.to_numeric(df[cfg.label_column], errors="coerce")
            if lab.isna().any() or (lab != lab.round()).any():
                row = int(np.flatnonzero((lab.isna() | (lab != lab.round())).to_numpy())[0])
                raise InputError(f"{where}: label column {cfg.label_column!r} must hold integers "
                                 f"(0 normal, other = anomaly class); row {row} holds {df[cfg.label_column].iloc[row]!r}")
            labels = lab.to_numpy().astype(np.int8)
        order_ok = np.all(np.diff(ts) > 0)
        if not order_ok:
            dup = np.flatnonzero(np.diff(np.sort(ts)) == 0)
            if dup.size:
                t = np.sort(ts)[dup[0]]
                raise InputError(f"{where}: duplicated timestamp {t} in column {cfg.timestamp_column!r} "
                                 f"({dup.size} duplicates)")
            if not cfg.sort_timestamps:
                row = int(np.flatnonzero(np.diff(ts) <= 0)[0]) + 1
                raise InputError(f"{where}: timestamps not increasing at row {row} of column "
                                 f"{cfg.timestamp_column!r}; sort the export or set data.sort_timestamps=true")
            order = np.argsort(ts, kind="stable")
            ts, values = ts[order], values[order]
            labels = labels[order] if labels is not None else None
        return NodeData(node, ts, values, labels, unit)


def source_signature(source: Path) -> str:
    """A cheap fingerprint of the input (paths, sizes, mtimes) so a rerun can skip re-ingesting."""
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _guarded(make, node: str, skipped: list | None) -> NodeData | None:
    """Build one node's data; with ``data.on_bad_node=skip`` a bad node is logged and recorded."""
    try:
        return make()
    except InputError as exc:
        if skipped is None:
            raise
        log.error("skipping node %s: %s", node, exc)
        skipped.append([node, str(exc)])
        return None


def node_files(source: Path) -> list[Path]:
    """A folder's node files (one per node, named after it), sorted."""
    files = sorted(p for p in source.iterdir() if is_table(p))
    if not files:
        raise InputError(f"{source}: no *.csv or *.parquet files in the directory")
    stems = [stem(p) for p in files]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise InputError(f"{source}: several files for nodes {sorted(dup)} (e.g. both CSV and Parquet)")
    return files


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
            raise InputError(f"{files[0].parent}: no metric is present in every node file")
    elif len({frozenset(s) for s in sets}) > 1:
        log.warning("%s: nodes report different metrics (%d in all, %d to %d per node); each node is trained "
                    "on its own (data.on_missing_metric=union)", files[0].parent, len(names),
                    min(map(len, sets)), max(map(len, sets)))
    return names


def iter_files(files: list[Path], conv: FrameConverter, skipped: list | None = None,
               progress: bool = True) -> Iterator[NodeData]:
    """The nodes of a folder's node files (or a rank's share of them), one file at a time."""
    def read(path: Path) -> NodeData | None:
        node = check_node_name(stem(path), str(path))
        return _guarded(lambda: conv(read_table(path), node, str(path)), node, skipped)

    yield from counted(map(read, files), len(files), progress)


def has_node_column(files: list[Path], data_cfg) -> bool:
    """Whether a folder's files hold rows of many nodes (``data.node_column`` in the first readable
    header: daily or monthly exports of the whole cluster) rather than one node each. A file whose
    header cannot be read decides nothing: it is skipped or named when its rows are read."""
    for path in files:
        try:
            return data_cfg.node_column in columns(path)
        except InputError:
            continue
    return False


def row_columns(files: list[Path], cfg) -> list[str] | None:
    """The columns a folder of many nodes' files is staged with: the union of the files' headers
    (less the node column and ``data.ignore_columns``), in first-seen order; None for one file (its
    first chunk's columns)."""
    if len(files) < 2:
        return None
    skip = {cfg.node_column, *cfg.ignore_columns}
    return list(dict.fromkeys(c for path in files for c in columns(path) if c not in skip))


def stage_rows(files: list[Path], cfg, names: list[str] | None, scratch: Path,
               first: Path | None = None) -> tuple[list[str], dict[str, int]]:
    """Pass 1 over files of many nodes' rows into the HDF5 file ``scratch``: each chunk's rows, grouped
    by node (file order kept within a node), appended to one row log (``/rows``: the values as the
    store keeps them, float32; ``/timestamps``: epoch seconds, int64), and each node's segment of it
    recorded (``/segments``: node, first row, rows; ``/node_names``). One write per
    chunk whatever the number of nodes: a dataset per node cost a read-modify-write of its last
    chunk per append (10 ms at 4,000 nodes, and the chunks' space: 21 GB of scratch for 770 MB of
    rows). Returns the columns (``names``, or the first chunk's) and the rows staged per node. Memory
    holds one input chunk and the segment table. ``first``: the folder's first file, named when
    another lacks the node column."""
    import pandas as pd

    ids: dict[str, int] = {}
    segments: list[np.ndarray] = []
    with h5_writing(scratch) as f:
        log_ = None
        for path in files:
            read = dropped = 0  # this file's rows so far; of them, rows without a node value
            first_dropped = 0
            for chunk in iter_table_chunks(path):
                read += len(chunk)
                if cfg.node_column not in chunk.columns:
                    if names is not None:  # a folder's file
                        raise InputError(f"{path}: no {cfg.node_column!r} column, unlike {(first or files[0]).name}: a "
                                         f"folder holds one file per node, or files of many nodes that all "
                                         f"have the node column (data.node_column; docs/data.md)")
                    node = pd.Series(check_node_name(stem(path), str(path)), index=chunk.index,
                                     name=cfg.node_column)  # one node's file (e.g. the lecture's CSV)
                    chunk = pd.concat([chunk, node], axis=1)  # not chunk[...] = ...: pandas warns on wide frames
                ignored = [c for c in cfg.ignore_columns if c in chunk.columns]
                if ignored:  # (each step copies the chunk: only where needed)
                    chunk = chunk.drop(columns=ignored)
                missing = chunk[cfg.node_column].isna().to_numpy()
                if missing.any():  # a row without a node belongs to none: dropped, and said (below)
                    first_dropped = first_dropped or read - len(chunk) + int(np.argmax(missing)) + 1
                    dropped += int(missing.sum())
                    chunk = chunk[~missing]
                if cfg.timestamp_column in chunk.columns:
                    chunk[cfg.timestamp_column] = to_epoch_seconds(chunk[cfg.timestamp_column], str(path),
                                                                     cfg.timestamp_column, cfg.timezone,
                                                                     cfg.epoch_unit, dayfirst=cfg.dayfirst)
                if names is None:
                    names = [c for c in chunk.columns if c != cfg.node_column]
                bad = [c for c in names if c in chunk.columns and not pd.api.types.is_numeric_dtype(chunk[c])]
                if bad:
                    raise InputError(f"{path}: non-numeric columns {bad[:10]}; fix the export or list "
                                     f"them in data.ignore_columns")
                values = [c for c in names if c != cfg.timestamp_column]
                if log_ is None:
                    log_ = f.create_dataset("rows", shape=(0, len(values)), maxshape=(None, len(values)),
                                            dtype=np.float32, chunks=(max(1, 131072 // len(values)), len(values)))
                    if cfg.timestamp_column in names:
                        f.create_dataset("timestamps", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(65536,))
                raw = chunk[cfg.node_column]
                code = {u: ids.setdefault(check_node_name(str(u), str(path)), len(ids)) for u in pd.unique(raw)}
                node_of = raw.map(code).to_numpy(dtype=np.int64)
                order = np.argsort(node_of, kind="stable")
                start = log_.shape[0]
                log_.resize(start + len(order), axis=0)
                log_[start:] = chunk.reindex(columns=values).to_numpy(dtype=np.float32)[order]
                if "timestamps" in f:
                    if cfg.timestamp_column not in chunk.columns:  # a folder's file without it
                        raise InputError(f"{path}: no {cfg.timestamp_column!r} column, unlike other files "
                                         f"of {path.parent}")
                    f["timestamps"].resize(start + len(order), axis=0)
                    f["timestamps"][start:] = chunk[cfg.timestamp_column].to_numpy()[order]
                seg_nodes, at, count = np.unique(node_of[order], return_index=True, return_counts=True)
                segments.append(np.stack([seg_nodes, start + at, count], axis=1))
            if dropped:  # e.g. the last line of an export cut short: the rest of that day is missing too
                log.warning("%s: %d of %d row(s) have no %r value and were dropped (the first: data row %d; a "
                            "truncated export ends so)", path, dropped, read, cfg.node_column, first_dropped)
        if names is None:
            raise InputError(f"{files[0]}: the file holds no rows")
        table = np.concatenate(segments) if segments else np.zeros((0, 3), np.int64)
        f.create_dataset("segments", data=table)
        f.create_dataset("node_names", data=np.array(list(ids), dtype=object), dtype=h5py.string_dtype())
    rows = np.bincount(table[:, 0], weights=table[:, 2], minlength=len(ids)) if len(table) else np.zeros(0)
    return names, {node: int(rows[i]) for node, i in ids.items()}


def read_staged(scratches: list[Path], names: list[str], conv: FrameConverter, where: Path, nodes: list[str],
                skipped: list | None = None, progress: bool = True) -> Iterator[NodeData]:
    """Pass 2: ``nodes`` converted one at a time, each from its segments of the scratch files' row logs
    (in the files' order: every rank's pass 1 over its block of the input files, in file order). The
    timestamps, epoch seconds since pass 1, reach the converter as UTC times: read as numbers they
    would be taken in ``data.epoch_unit`` a second time."""
    import pandas as pd

    ts_col = conv.cfg.timestamp_column
    values = [c for c in names if c != ts_col]
    with contextlib.ExitStack() as stack:
        logs = []  # per scratch file: its row log, its timestamps and {node: its segments' (first row, rows)}
        for path in scratches:
            f = stack.enter_context(h5_file(path, "r"))
            table = f["segments"][()]
            node_names = [n.decode() if isinstance(n, bytes) else n for n in f["node_names"][()]]
            order = np.argsort(table[:, 0], kind="stable")  # a node's segments in the order they were written
            cuts = np.flatnonzero(np.diff(table[order, 0])) + 1
            logs.append((f.get("rows"), f.get("timestamps"),
                         {node_names[int(g[0, 0])]: g[:, 1:] for g in np.split(table[order], cuts) if len(g)}))

        def read(node: str) -> pd.DataFrame:
            spans = [(rows, ts, int(a), int(a) + int(n)) for rows, ts, segs in logs for a, n in segs.get(node, ())]
            frame = pd.DataFrame(np.concatenate([rows[a:b] for rows, _, a, b in spans]), columns=values)
            if ts_col in names:
                stamps = np.concatenate([ts[a:b] for _, ts, a, b in spans])
                frame.insert(names.index(ts_col), ts_col, pd.to_datetime(stamps, unit="s", utc=True))
            return frame

        yield from counted((_guarded(lambda: conv(read(node), node, str(where)), node, skipped) for node in nodes),
                           len(nodes), progress)


def _iter_node_rows(files: list[Path], conv: FrameConverter, scratch_dir: Path,
                    skipped: list | None = None, progress: bool = True) -> Iterator[NodeData]:
    """Files of many nodes' rows (one file, or a folder of them), staged in a scratch HDF5 file by node
    (:func:`stage_rows`), then converted node by node. Memory holds one input chunk or one node, never
    a whole file. A single file without the node column is one node named after the file; a folder's
    files all need the column, and a metric a file lacks is missing in its rows (the files' header
    union is the metric list)."""
    where = files[0] if len(files) == 1 else files[0].parent
    fd, scratch = tempfile.mkstemp(suffix=".h5", dir=scratch_dir, prefix=".ingest-")
    os.close(fd)
    try:
        names, rows = stage_rows(files, conv.cfg, row_columns(files, conv.cfg), Path(scratch))
        yield from read_staged([Path(scratch)], names, conv, where, sorted(rows), skipped, progress)
    finally:
        Path(scratch).unlink(missing_ok=True)


def check_inputs(data_cfg) -> None:
    """``data.source`` and ``data.jobs`` exist on this node (the preflight asks every rank that will
    read them: hpcad/data/ranks.py), else ``InputError`` naming the option."""
    for option, value in (("data.source", data_cfg.source), ("data.jobs", data_cfg.jobs)):
        if value is not None and not Path(value).expanduser().exists():
            raise InputError(f"{option}: {Path(value).expanduser().resolve()} does not exist")


def ingest(data_cfg, store_path: Path, progress: bool = True) -> Path:
    """Make sure a store for ``data_cfg.source`` exists; return its path (an input store is used as is).
    ``progress``: a bar or periodic log lines while the nodes are read (``compute.progress``)."""
    source = data_cfg.source
    if source is not None and str(source).lower().endswith((".h5", ".hdf5")):
        path = Path(source)
        TelemetryStore(path)  # validates layout, names the file on error
        log.info("using existing store %s", path, extra=CLUSTER_WIDE)
        return path
    if source is None:
        s = data_cfg.synthetic
        sig = f"synthetic:{s.profile}:{s.nodes}:{s.rows}:{s.seed}:{s.clean_fraction}:{s.anomaly_fraction}:{s.kinds}"
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
    src, jobs_path, sig = todo
    fmt = data_cfg.format
    jobs = read_jobs(jobs_path, data_cfg.timezone) if jobs_path else None
    skipped: list | None = [] if data_cfg.on_bad_node == "skip" else None
    store_path.parent.mkdir(parents=True, exist_ok=True)
    stager = None
    try:
        if fmt == "wide":
            conv = FrameConverter(data_cfg)
            files = node_files(src) if src.is_dir() else [src]
            if src.is_dir() and not has_node_column(files, data_cfg):
                conv.metrics = plan_metrics(files, data_cfg, skip_bad=skipped is not None)  # as ranks share it out
                stream = iter_files(files, conv, skipped, progress)
            elif src.is_dir() or is_table(src):
                stream = _iter_node_rows(files, conv, store_path.parent, skipped, progress)
            else:
                raise InputError(f"data.source: {src} is not a directory, CSV/Parquet file or .h5 store")
            first = next(stream, None)  # the first node fixes the metric list the store is written with
            if first is None:
                raise InputError(f"{src}: no nodes found")
            metrics, stream = list(conv.metrics or []), itertools.chain([first], stream)
        else:
            stager, keep = stage_grid(data_cfg, src, store_path.parent)
            metrics = [stager.metric_names[c] for c in keep]
            stream = counted(stager.iter_nodes(keep), len(stager.node_names), progress)
        n = write_store(store_path, metrics, finish_nodes(stream, metrics, data_cfg, jobs), str(src),
                        signature=sig, skipped=skipped, jobs=jobs)
    finally:
        if stager is not None:
            stager.close()
    wrote(store_path, [], n, src, f"{fmt} format", skipped, jobs, jobs_path)  # drops parts of an ingest over ranks
    return store_path


def wrote(store_path: Path, parts: list[str], n: int, src: Path, how: str, skipped: list | None,
          jobs: JobTable | None, jobs_path: Path | None) -> None:
    """After a store was written (by one process, or as an index over ``parts``): the part files it
    does not use go, the job table is checked against its nodes, and the log says what was done."""
    drop_parts(store_path, parts)
    if jobs is not None:
        jobs.check_nodes(TelemetryStore(store_path).nodes, str(jobs_path))
    log.info("ingested %d nodes from %s (%s) -> %s", n, src, how, store_path)
    if skipped:
        log.error("%d node(s) skipped for bad input (recorded in the store and the report): %s",
                  len(skipped), ", ".join(n for n, _ in skipped))


def to_ingest(data_cfg, store_path: Path) -> tuple[Path, Path | None, str] | None:
    """For ``data.source`` (files, not a store): None when ``store_path`` is up to date with it (said
    once), else the input, the job file and the input's signature, after checking the options."""
    check_inputs(data_cfg)
    src = Path(data_cfg.source).expanduser().resolve()
    if data_cfg.format not in FORMATS:
        raise InputError(f"data.format={data_cfg.format!r}: one of {list(FORMATS)}")
    jobs_path = Path(data_cfg.jobs).expanduser().resolve() if data_cfg.jobs else None
    sig = signature(src, jobs_path, data_cfg)
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


def counted(stream: Iterable[NodeData | None], nodes: int, progress: bool) -> Iterator[NodeData]:
    """The nodes of ``stream`` (None: one skipped for bad input) with ingest's progress, node by node:
    a bar on a terminal, a line a minute in a log (thousands of node-years take an hour and more,
    while the job's other ranks, or GPUs, wait)."""
    bar = Progress(nodes, "ingest", "node", progress, log)
    try:
        for nd in stream:
            bar.update()
            if nd is not None:
                yield nd
    finally:
        bar.close()


def finish_nodes(stream: Iterator[NodeData], metrics: list[str], data_cfg, jobs: JobTable | None) -> Iterator[NodeData]:
    """Per node, whatever the format: counters into rates, job per row."""
    counters = counter_columns(metrics, list(data_cfg.counters))
    for nd in stream:
        nd = to_rates(nd, counters, metrics)
        if jobs is not None:
            nd.job = jobs.assign(nd)
        yield nd


def signature(src: Path, jobs: Path | None, data_cfg) -> str:
    """Input files plus every option that changes what the store holds."""
    opts = {k: str(getattr(data_cfg, k)) for k in (
        "format", "node_column", "timestamp_column", "label_column", "metric_column", "value_column",
        "period_s", "timezone", "epoch_unit", "counters", "on_missing_metric", "ignore_columns",
        "sort_timestamps", "on_bad_node")}
    if data_cfg.dayfirst is not None:  # unset, dates read as the column shows: earlier stores keep their signature
        opts["dayfirst"] = str(data_cfg.dayfirst)
    parts = [source_signature(src), source_signature(jobs) if jobs else "", json.dumps(opts, sort_keys=True)]
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
