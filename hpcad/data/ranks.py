"""Ingest over the ranks of a job: every rank converts and writes its share of the nodes.

Each rank writes its nodes into a part file beside the store (``store-part-<signature>-<r>of<n>.h5``,
a store of its own); rank 0 then writes ``store.h5`` as an index of external links to them
(hpcad/data/store.py). What is shared out:

- a folder of node files (wide format): the nodes, balanced by the size of their files (one, or one
  per subfolder: hpcad/data/nodefiles.py); each rank reads its own;
- LDMS and long-format exports: rank 0 reads the input and stages it in scratch buckets by node
  (pass 1, hpcad/data/grid.py), then the ranks pivot the buckets (pass 2, most of the time: 36 of
  56 s for 200 nodes x 14 days), balanced by size;
- a folder of files of many nodes' rows (daily exports of the whole cluster, a node column in each):
  each rank stages its block of the files by node in a scratch file (pass 1), then converts its
  share of the nodes, balanced by rows, from every rank's scratch file (pass 2).

Ingesting costs about 2.5 s per node-year of 160 metrics on one core, so N ranks cut the wait before
training about N-fold (4,000 node-years: over two hours on rank 0 alone). A requeued job keeps the
parts its ranks finished. The store is the one a single process writes, whatever the number of ranks.
One file of many nodes' rows, an existing store and the synthetic cluster are ingested by rank 0
while the others wait. Call :func:`ingest_ranks` on every rank of a started process group.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hpcad import dist
from hpcad.data.grid import GridStager
from hpcad.data.convert import FrameConverter, counted
from hpcad.data.ingest import (check_tables, finish_nodes, ingest, iter_files, node_files, plan_metrics, stage_grid,
                               to_ingest, up_to_date, wrote)
from hpcad.data.jobs import JobTable, read_jobs
from hpcad.data.labelfile import LabelTable, read_labels
from hpcad.data.node import NodeData
from hpcad.data.nodefiles import node_groups
from hpcad.data.notes import InputWarnings, input_warnings, merged
from hpcad.data.rows import has_node_column, read_staged, row_columns, stage_rows
from hpcad.data.store import STORE_SUFFIXES, TelemetryStore, part_path, write_index, write_store
from hpcad.data.paths import TABLE_SUFFIXES, is_pattern
from hpcad.dist import CLUSTER_WIDE
from hpcad.errors import InputError

log = logging.getLogger(__name__)
# a rank's part: file name, {node: (rows, labelled, digest)}, skipped nodes, skipped files, and the
# readers' warnings (how many, the first ones: hpcad/data/notes.py)
Share = tuple[str, dict[str, tuple[int, bool, str]], list, list, tuple[int, list[str]]]


@dataclass
class Plan:
    """What rank 0 decides for every rank: the units to share out (node files, or the grid's scratch
    buckets) with their sizes, and the store's metrics."""

    source: Path
    jobs: Path | None  # data.jobs, resolved
    signature: str
    metrics: list[str]
    sizes: dict[str, int]  # unit -> bytes (the shares are balanced by size)
    grid: dict = field(default_factory=dict)  # LDMS/long: GridStager.state(), "keep" and "nodes" per bucket
    columns: list[str] | None = None  # files of many nodes' rows: the columns they are staged with
    files: dict[str, list[str]] = field(default_factory=dict)  # node files: unit (a node) -> its files

    def unit_files(self, units: list[str]) -> list[Path]:
        """The node files of ``units`` (a node's files in subfolders stay together: one rank reads them)."""
        return [Path(f) for u in units for f in self.files[u]]

    def nodes(self, data_cfg, units: list[str], skipped: list | None, progress: bool,
              skipped_files: list | None = None) -> Iterator[NodeData]:
        """This rank's nodes, converted (None in ``skipped``-mode for a bad node file is dropped)."""
        if not self.grid:
            return iter_files(self.unit_files(units), FrameConverter(data_cfg, self.metrics), skipped, progress,
                              skipped_files)
        buckets = sorted(int(u) for u in units)
        stager = GridStager.attach(self.grid)
        return counted(stager.iter_nodes(self.grid["keep"], buckets), sum(self.grid["nodes"][b] for b in buckets),
                       progress)


def read_by_every_rank(data_cfg) -> bool:
    """Whether each rank reads part of ``data.source`` (a folder of node files in the wide format):
    then it must be on a file system every rank's node mounts (``hpcad preflight`` checks)."""
    src = data_cfg.source
    return (src is not None and data_cfg.format == "wide"
            and (is_pattern(src) or not str(src).lower().endswith((*TABLE_SUFFIXES, *STORE_SUFFIXES))))


def ingest_ranks(data_cfg, store_path: Path, progress: bool = True) -> None:
    """Make ``store_path`` up to date with ``data.source`` (see the module). An error on any rank
    (a bad node file with ``data.on_bad_node=error``, a full disk) stops every rank: the rank that
    failed with its own error, the others naming it (``dist.share_outcome``)."""
    with input_warnings() as said:  # each rank's; rank 0's plan (the grid formats' pass 1) included
        _ingest_ranks(data_cfg, store_path, progress, said)


def _ingest_ranks(data_cfg, store_path: Path, progress: bool, said: InputWarnings) -> None:
    w = dist.world()
    plan, stager, failed = None, None, None
    if w.rank == 0:
        try:
            plan, stager = _plan(data_cfg, store_path, progress)
        except Exception as exc:
            failed = exc
    try:
        dist.share_outcome(failed)
        plan = dist.all_objects(plan)[0]
        if plan is None:  # rank 0 ingested alone, or the store was up to date
            return
        mine = dist.shard(plan.sizes, w.size)[w.rank]
        part = part_path(store_path, plan.signature, w.rank, w.size)
        result, jobs, labels = None, None, None
        try:
            if mine or w.rank == 0 or plan.columns:  # once per rank: its nodes, the index
                jobs = read_jobs(plan.jobs, data_cfg.timezone) if plan.jobs is not None else None
                labels = read_labels(data_cfg.labels, data_cfg) if data_cfg.labels else None
            if plan.columns is None:
                result = _ingest_share(data_cfg, plan, mine, part, jobs, labels, progress, said)
        except Exception as exc:
            failed = exc
        dist.share_outcome(failed)
        if plan.columns is not None:  # two passes with collectives between them (each rank shares its outcomes)
            result = _rows_share(data_cfg, plan, store_path, part, jobs, labels, progress, said)
        results = dist.all_objects(result)
        if w.rank == 0:
            try:
                _write_index(data_cfg, plan, store_path, results, jobs, labels)
            except Exception as exc:
                failed = exc
        dist.share_outcome(failed)
    finally:
        if stager is not None:  # rank 0, once every rank has pivoted its buckets (or stopped)
            stager.close()


def _plan(data_cfg, store_path: Path, progress: bool) -> tuple[Plan | None, GridStager | None]:
    """Rank 0: the plan to share out (and the grid's stager, whose scratch files it removes at the
    end), or None once it has ingested another input itself or found the store up to date."""
    src = data_cfg.source
    grid = data_cfg.format in ("ldms", "long")
    if src is None or not (grid or (read_by_every_rank(data_cfg) and (is_pattern(src) or Path(src).expanduser().is_dir()))):
        ingest(data_cfg, store_path, progress)
        return None, None
    todo = to_ingest(data_cfg, store_path)
    if todo is None:
        return None, None
    src, jobs, sig = todo
    w = dist.world()
    parts = part_path(store_path, sig, 0, w.size).name.replace("-0of", "-<r>of")  # for the log
    if grid:
        store_path.parent.mkdir(parents=True, exist_ok=True)
        stager, keep = stage_grid(data_cfg, src, store_path.parent)
        buckets = stager.finish_pass1()
        state = {**stager.state(), "keep": keep, "nodes": {b: n for b, (_, n) in buckets.items()}}
        plan = Plan(src, jobs, sig, [stager.metric_names[c] for c in keep],
                    {str(b): size for b, (size, _) in buckets.items()}, state)
        log.info("pivoting %d nodes' scratch buckets over %d ranks (each its share into %s)", len(stager.node_names),
                 w.size, parts, extra=CLUSTER_WIDE)
        return plan, stager
    files = node_files(src, data_cfg.node_column)
    FrameConverter(data_cfg)  # checks data.on_missing_metric before any rank reads
    if has_node_column(files, data_cfg):  # daily exports of the whole cluster, say
        if len(files) < 2:  # one file of many nodes: read by one process
            ingest(data_cfg, store_path, progress)
            return None, None
        names = row_columns(files, data_cfg, skip_bad=data_cfg.on_bad_node == "skip")
        log.info("staging %d files of many nodes' rows over %d ranks (each its block of files by node, then "
                 "its share of the nodes into %s)", len(files), w.size, parts, extra=CLUSTER_WIDE)
        metrics = [c for c in names if c not in (data_cfg.timestamp_column, data_cfg.label_column)]
        return Plan(src, jobs, sig, metrics, {str(f): f.stat().st_size for f in files}, columns=names), None
    metrics = plan_metrics(files, data_cfg, skip_bad=data_cfg.on_bad_node == "skip")
    if not metrics:
        raise InputError(f"{src}: no node file's header could be read")
    groups = node_groups(files, data_cfg.node_column)
    log.info("ingesting %d node files of %d nodes over %d ranks (each its share into %s)", len(files), len(groups),
             w.size, parts, extra=CLUSTER_WIDE)
    return Plan(src, jobs, sig, metrics, {n: sum(f.stat().st_size for f in fs) for n, fs in groups.items()},
                files={n: [str(f) for f in fs] for n, fs in groups.items()}), None


def _ingest_share(data_cfg, plan: Plan, units: list[str], part: Path, jobs: JobTable | None,
                  labels: LabelTable | None, progress: bool, said: InputWarnings) -> Share:
    """This rank's nodes into ``part``. A part written before (a requeued job, a rerun after another
    rank failed) is kept."""
    rank = dist.world().rank
    if not units:  # more ranks than node files (or buckets)
        return part.name, {}, [], [], said.said()
    if up_to_date(part, plan.signature):
        return _kept(part)
    unseen = [] if plan.grid else [f for f in plan.unit_files(units) if not f.exists()]
    if unseen:
        raise InputError(f"data.source: {unseen[0]} does not exist on {socket.gethostname()} (rank {rank}; {len(unseen)} "
                         f"of its {len(units)} node files): every rank reads its share of the node files, so they must "
                         f"be on a file system every node of the job mounts")
    skipped: list | None = [] if data_cfg.on_bad_node == "skip" else None
    skipped_files: list | None = [] if skipped is not None else None
    stream = plan.nodes(data_cfg, units, skipped, progress, skipped_files)
    n = write_store(part, plan.metrics, finish_nodes(stream, plan.metrics, data_cfg, jobs, labels),
                    str(plan.source), signature=plan.signature, skipped=skipped, empty_ok=True,
                    skipped_files=skipped_files, warnings=said)
    log.info("rank %d: ingested %d node(s) of its %d %s into %s", rank, n, len(units),
             "scratch bucket(s)" if plan.grid else "nodes' files", part.name)
    return _share(part)


def _rows_share(data_cfg, plan: Plan, store_path: Path, part: Path, jobs: JobTable | None,
                labels: LabelTable | None, progress: bool, said: InputWarnings) -> Share:
    """Files of many nodes' rows: each rank stages its block of the files by node in a scratch file
    (pass 1, :func:`stage_rows`; the blocks follow the file order, so a node's rows stay in it), then
    converts its share of the nodes, balanced by rows, from every rank's scratch file into ``part``
    (pass 2). A part written before is kept, but while any rank lacks its part every rank stages its
    files again (their rows belong to every rank's nodes)."""
    w = dist.world()
    scratch = [store_path.parent / f".ingest-rows-{plan.signature[:12]}-{r}of{w.size}.h5" for r in range(w.size)]
    kept = up_to_date(part, plan.signature)
    failed, staged = None, {}
    bad_files: list | None = [] if data_cfg.on_bad_node == "skip" else None
    try:
        if not all(dist.all_objects(kept)):
            try:
                files = [Path(f) for f in _blocks(plan.sizes, w.size)[w.rank]]
                first = Path(next(iter(plan.sizes)))  # the folder's first file, named in an error
                _, staged = stage_rows(files, data_cfg, plan.columns, scratch[w.rank], first=first,
                                       skipped_files=bad_files)
            except Exception as exc:
                failed = exc
            dist.share_outcome(failed)
        rows: dict[str, int] = {}
        skipped_files = []  # every rank's (each part records them all: a kept part's are the run's)
        for counts, bad in dist.all_objects((staged, bad_files or [])):
            skipped_files += bad
            for node, n in counts.items():
                rows[node] = rows.get(node, 0) + n
        mine, result = sorted(dist.shard(rows, w.size)[w.rank]), None
        try:
            if kept:
                result = _kept(part)
            elif not mine:  # more ranks than nodes
                result = part.name, {}, [], skipped_files, said.said()
            else:
                skipped: list | None = [] if data_cfg.on_bad_node == "skip" else None
                stream = read_staged(scratch, plan.columns, FrameConverter(data_cfg, plan.metrics), plan.source, mine,
                                     skipped, progress)
                n = write_store(part, plan.metrics, finish_nodes(stream, plan.metrics, data_cfg, jobs, labels),
                                str(plan.source), signature=plan.signature, skipped=skipped, empty_ok=True,
                                skipped_files=skipped_files, warnings=said)
                log.info("rank %d: ingested %d node(s) of the %d in the files into %s", w.rank, n, len(rows),
                         part.name)
                result = _share(part)
        except Exception as exc:
            failed = exc
        dist.share_outcome(failed)  # every rank has read every scratch file
        return result
    finally:
        scratch[w.rank].unlink(missing_ok=True)


def _blocks(sizes: dict[str, int], n: int) -> list[list[str]]:
    """The units (in their order) cut into ``n`` consecutive blocks of about equal total size."""
    total, out, acc = sum(sizes.values()), [[] for _ in range(n)], 0
    for unit, size in sizes.items():
        out[min(n - 1, int(acc * n / max(total, 1)))].append(unit)
        acc += size
    return out


def _kept(part: Path) -> Share:
    """A part written before (a requeued job, a rerun after another rank failed), kept."""
    share = _share(part)
    log.info("rank %d: %s already holds this rank's %d node(s): kept", dist.world().rank, part.name, len(share[1]))
    return share


def _share(part: Path) -> Share:
    st = TelemetryStore(part)
    return (part.name, {n: (st.rows(n), st.labelled[n], st.digest(n)) for n in st.nodes}, st.skipped,
            st.skipped_files, st.warnings)


def _write_index(data_cfg, plan: Plan, store_path: Path, results: list[Share], jobs: JobTable | None,
                 labels: LabelTable | None) -> None:
    """Rank 0: the job and labels files checked against every rank's nodes, ``store.h5`` over the
    ranks' parts, then what ``ingest`` does after a write."""
    parts = {store_path.parent / name: nodes for name, nodes, *_ in results if nodes}
    skipped = sorted((s for _, _, sk, *_ in results for s in sk), key=lambda s: s[0])
    skipped_files = sorted({p: why for _, _, _, files, _ in results for p, why in files}.items())
    if not parts:
        raise InputError(f"{plan.source}: no usable node" + (f" ({len(skipped)} skipped)" if skipped else ""))
    with input_warnings() as checked:  # the job and labels files' nodes: said here, as one process says them
        check_tables([node for nodes in parts.values() for node in nodes], data_cfg, jobs, labels)
    n = write_index(store_path, plan.metrics, parts, str(plan.source), plan.signature, skipped, jobs,
                    skipped_files, merged([said for *_, said in results] + [checked.said()]))
    wrote(store_path, [p.name for p in parts], n, plan.source, f"{data_cfg.format} format, {len(results)} ranks",
          skipped, skipped_files)
