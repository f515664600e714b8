"""Ingest over the ranks of a job: a folder of node files is read by every rank, each its share.

Each rank writes its share of the nodes into a part file beside the store (``store-part-<signature>-
<r>of<n>.h5``, a store of its own); rank 0 then writes ``store.h5`` as an index of external links to
them (hpcad/data/store.py). Ingesting costs about 2 s per node-year on one core, so N ranks cut the
wait before training N-fold (4,000 node-years: over two hours on rank 0 alone). A requeued job keeps
the parts its ranks finished. The store is the same whichever number of ranks wrote it: the metric
list comes from the files' headers (``plan_metrics``) and every node is converted alike.

Any other input (one file of all nodes, LDMS or long exports, an existing store, the synthetic
cluster) is ingested by rank 0 while the others wait: those readers stage the whole input in one
scratch file. Call :func:`ingest_ranks` on every rank of a started process group.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from hpcad import dist
from hpcad.data.ingest import (FrameConverter, check_inputs, finish_nodes, ingest, iter_files, node_files,
                               plan_metrics, said_up_to_date, signature, up_to_date)
from hpcad.data.jobs import read_jobs
from hpcad.data.tables import TABLE_SUFFIXES
from hpcad.data.store import TelemetryStore, drop_parts, part_path, write_index, write_store
from hpcad.dist import CLUSTER_WIDE
from hpcad.errors import InputError

log = logging.getLogger(__name__)
Share = tuple[str, dict[str, tuple[int, bool]], list]  # a rank's part: file name, {node: (rows, labelled)}, skipped


@dataclass
class FolderPlan:
    """What rank 0 decides for every rank: the node files with their sizes, the store's metrics."""

    source: Path
    sizes: dict[str, int]  # node file -> bytes (the shares are balanced by size)
    metrics: list[str]
    signature: str


def read_by_every_rank(data_cfg) -> bool:
    """Whether each rank reads part of ``data.source`` (a folder of node files in the wide format):
    then it must be on a file system every rank's node mounts (``hpcad preflight`` checks)."""
    src = data_cfg.source
    return (src is not None and data_cfg.format == "wide"
            and not str(src).lower().endswith((*TABLE_SUFFIXES, ".h5", ".hdf5")))


def ingest_ranks(data_cfg, store_path: Path, progress: bool = True) -> None:
    """Make ``store_path`` up to date with ``data.source`` (see the module). An error on any rank
    (a bad node file with ``data.on_bad_node=error``, a full disk) stops every rank: the rank that
    failed with its own error, the others naming it (``dist.share_outcome``)."""
    w = dist.world()
    plan, failed = None, None
    if w.rank == 0:
        try:
            plan = _plan(data_cfg, store_path, progress)
        except Exception as exc:
            failed = exc
    dist.share_outcome(failed)
    plan = dist.all_objects(plan)[0]
    if plan is None:  # rank 0 ingested alone, or the store was up to date
        return
    mine = dist.shard(plan.sizes, w.size)[w.rank]
    part = part_path(store_path, plan.signature, w.rank, w.size)
    result = None
    try:
        result = _ingest_share(data_cfg, plan, [Path(f) for f in mine], part, progress)
    except Exception as exc:
        failed = exc
    dist.share_outcome(failed)
    results = dist.all_objects(result)
    if w.rank == 0:
        try:
            _write_index(data_cfg, plan, store_path, results)
        except Exception as exc:
            failed = exc
    dist.share_outcome(failed)


def _plan(data_cfg, store_path: Path, progress: bool) -> FolderPlan | None:
    """Rank 0: the plan for a folder to share out, or None once it has ingested any other input
    itself (or found the store up to date)."""
    if not read_by_every_rank(data_cfg) or not Path(data_cfg.source).expanduser().is_dir():
        ingest(data_cfg, store_path, progress)
        return None
    check_inputs(data_cfg)
    src = Path(data_cfg.source).expanduser().resolve()
    jobs = Path(data_cfg.jobs).expanduser().resolve() if data_cfg.jobs else None
    sig = signature(src, jobs, data_cfg)
    if up_to_date(store_path, sig):
        said_up_to_date(store_path, src)
        return None
    if data_cfg.on_bad_node not in ("error", "skip"):
        raise InputError(f"data.on_bad_node={data_cfg.on_bad_node!r}: error or skip")
    FrameConverter(data_cfg)  # checks data.on_missing_metric before any rank reads
    files = node_files(src)
    metrics = plan_metrics(files, data_cfg, skip_bad=data_cfg.on_bad_node == "skip")
    if not metrics:
        raise InputError(f"{src}: no node file's header could be read")
    w = dist.world()
    log.info("ingesting %d node files over %d ranks (each its share into %s)", len(files), w.size,
             part_path(store_path, sig, 0, w.size).name.replace("-0of", "-<r>of"), extra=CLUSTER_WIDE)
    return FolderPlan(src, {str(f): f.stat().st_size for f in files}, metrics, sig)


def _ingest_share(data_cfg, plan: FolderPlan, files: list[Path], part: Path, progress: bool) -> Share:
    """This rank's nodes into ``part``. A part written before (a requeued job, a rerun after another
    rank failed) is kept."""
    rank = dist.world().rank
    if up_to_date(part, plan.signature):
        share = _share(part)
        log.info("rank %d: %s already holds this rank's %d node(s): kept", rank, part.name, len(share[1]))
        return share
    unseen = [f for f in files if not f.exists()]
    if unseen:
        raise InputError(f"data.source: {unseen[0]} does not exist on {socket.gethostname()} (rank {rank}; {len(unseen)} "
                         f"of its {len(files)} node files): every rank reads its share of the node files, so they must "
                         f"be on a file system every node of the job mounts")
    skipped: list | None = [] if data_cfg.on_bad_node == "skip" else None
    jobs = read_jobs(Path(data_cfg.jobs).expanduser().resolve(), data_cfg.timezone) if data_cfg.jobs else None
    stream = iter_files(files, FrameConverter(data_cfg, plan.metrics), skipped, progress)
    n = write_store(part, plan.metrics, finish_nodes(stream, plan.metrics, data_cfg, jobs), str(plan.source),
                    signature=plan.signature, skipped=skipped, empty_ok=True)
    log.info("rank %d: ingested %d of its %d node file(s) into %s", rank, n, len(files), part.name)
    return _share(part)


def _share(part: Path) -> Share:
    st = TelemetryStore(part)
    return part.name, {n: (st.rows(n), st.labelled[n]) for n in st.nodes}, st.skipped


def _write_index(data_cfg, plan: FolderPlan, store_path: Path, results: list[Share]) -> None:
    """Rank 0: ``store.h5`` over the ranks' parts, then what ``ingest`` checks and says after a write."""
    parts = {store_path.parent / name: nodes for name, nodes, _ in results if nodes}
    skipped = sorted((s for _, _, sk in results for s in sk), key=lambda s: s[0])
    if not parts:
        raise InputError(f"{plan.source}: no usable node" + (f" ({len(skipped)} skipped)" if skipped else ""))
    jobs_path = Path(data_cfg.jobs).expanduser().resolve() if data_cfg.jobs else None
    jobs = read_jobs(jobs_path, data_cfg.timezone) if jobs_path else None
    n = write_index(store_path, plan.metrics, parts, str(plan.source), plan.signature, skipped, jobs)
    drop_parts(store_path, [p.name for p in parts])
    if jobs is not None:
        jobs.check_nodes(TelemetryStore(store_path).nodes, str(jobs_path))
    log.info("ingested %d nodes from %s (wide format, %d ranks) -> %s", n, plan.source, len(results), store_path)
    if skipped:
        log.error("%d node(s) skipped for bad input (recorded in the store and the report): %s",
                  len(skipped), ", ".join(n for n, _ in skipped))
