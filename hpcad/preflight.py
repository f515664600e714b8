"""``hpcad preflight``: what every rank of an allocation sees, checked in seconds before a long job.

Launch it the way the job will run (``srun`` inside ``sbatch``, ``launcher=submitit``, torchrun).
Each rank reports its rank, node, device, the GPUs bound to it and its memory budgets (rank 0 also
how ``data.source`` will be read: its files and nodes, one file's node as an example); the ranks
meet as the job's stages will (same rendezvous and backend: NCCL for ``model.scope=fleet`` on CUDA,
else gloo) but give up after ``PREFLIGHT_WAIT`` instead of the stages' hours, and time a barrier.
On CUDA each rank multiplies two matrices on its GPU, and with the fleet scope the ranks all-reduce
a tensor on their GPUs. Rank 0 writes ``preflight.json`` and logs one line per rank. Two ranks on
one GPU, a GPU that computes wrongly, a wrong all-reduce or an input a rank will read but cannot
see (``data.source``: a folder of node files on every node, other inputs on rank 0's; ``train_run``
on every node) stop it with exit 2 on every rank.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpcad import dist
from hpcad.atomic import write_json
from hpcad.data.ingest import check_inputs, source_view
from hpcad.data.ranks import read_by_every_rank
from hpcad.device import allocated_gpus, describe, resolve_device
from hpcad.errors import ConfigError, HpcadError
from hpcad.model.budget import Budget
from hpcad.runfolder import check_shared, train_run

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)
PREFLIGHT_WAIT = dt.timedelta(minutes=2)  # joining and every collective (or HPCAD_DIST_TIMEOUT_MIN if shorter)


def _node() -> str:
    """This rank's node as SLURM names it (the host name outside SLURM)."""
    return os.environ.get("SLURMD_NODENAME", socket.gethostname())


def rank_report(cfg: HpcadConfig, device: torch.device, w: dist.World) -> dict:
    """This rank's view: where it runs, its device and GPUs, its budgets; on CUDA a matmul's check."""
    host = socket.gethostname()
    r = {"rank": w.rank, "ranks": w.size, "local_rank": w.local_rank, "launched_by": w.source, "host": host,
         "node": _node(), "device": describe(device),
         "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
         "gpus_without_cuda": device.type == "cpu" and allocated_gpus() is not None,
         "budget": Budget.resolve(cfg.compute, device).source, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        a = torch.arange(256 * 256, device=device, dtype=torch.float32).reshape(256, 256) % 7
        t0 = time.perf_counter()
        ok = torch.equal((a @ torch.eye(256, device=device)).cpu(), a.cpu())
        r.update(gpu=props.name, gpu_uuid=str(getattr(props, "uuid", device.index)),
                 gpu_memory_mb=props.total_memory // 2**20, gpu_matmul_ok=ok,
                 gpu_matmul_ms=round(1000 * (time.perf_counter() - t0), 1))
    return r


def missing_inputs(cfg: HpcadConfig, w: dist.World) -> list[str]:
    """The inputs this rank's stages will read but its node does not show: ``train_run`` (every rank
    loads its nodes' models), ``split.exclude`` (every rank trains its nodes), ``data.source`` and
    ``data.jobs`` (a folder of node files: every rank ingests its share; any other input: rank 0 for all)."""
    from hpcad.data.exclusions import read_exclusions

    reads = w.rank == 0 or read_by_every_rank(cfg.data)
    checks = [lambda: train_run(cfg), lambda: read_exclusions(cfg.split.exclude, cfg.data)]
    checks += [lambda: check_inputs(cfg.data)] if reads else []
    found = []
    for check in checks:
        try:
            check()
        except HpcadError as exc:
            found.append(f"rank {w.rank} on {_node()}: {exc}")
    return found


def problems(reports: list[dict]) -> list[str]:
    """What would make the job fail or slow: ranks sharing a GPU, GPUs that compute wrongly."""
    found, on_gpu = [], {}
    for r in reports:
        if "gpu_uuid" in r:
            on_gpu.setdefault((r["host"], r["gpu_uuid"]), []).append(r["rank"])
            if not r.get("gpu_matmul_ok", True):
                found.append(f"rank {r['rank']} on {r['node']}: its GPU ({r['device']}) computed a wrong product")
    found += [f"ranks {', '.join(map(str, ranks))} on {host} share one GPU ({uuid}): run as many tasks per node "
              f"as GPUs, each bound to its own (docs/cluster.md)" for (host, uuid), ranks in on_gpu.items()
              if len(ranks) > 1]
    return found


def _meeting_point() -> str:
    """Where the ranks meet, as ``dist.init`` set it: ``addr:port``."""
    return f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"


def preflight(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Check this rank's view and the ranks' meeting; rank 0 writes ``preflight.json`` (see the module)."""
    w = dist.world()
    device = resolve_device(cfg.compute.device, w.local_rank)
    fleet = cfg.model.get("scope", "node") == "fleet"
    t0 = time.perf_counter()
    wait = min(PREFLIGHT_WAIT, dist.timeout())
    try:
        dist.init(device, gpu_collectives=fleet, wait=wait)
    except HpcadError:  # dist's own diagnosis (rank 0 cannot listen at its port)
        raise
    except Exception as exc:  # torch's store and backend errors: say what it means for the job
        addr = _meeting_point()
        raise ConfigError(f"preflight: rank {w.rank} of {w.size} on {socket.gethostname()} could not join the "
                          f"ranks at {addr} within {wait.total_seconds():.0f} s ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); the job's stages would wait there for "
                          f"HPCAD_DIST_TIMEOUT_MIN. Can this node reach {addr}? (GLOO_SOCKET_IFNAME / "
                          f"NCCL_SOCKET_IFNAME, a firewall, docs/cluster.md)") from exc
    try:
        joined_s = time.perf_counter() - t0
        check_shared(run_dir)  # the stages' one run folder, seen by every rank (not node-local)
        shared = dist.share_cpu_threads()  # as the stages will (ranks sharing unbound CPUs split them)
        report = {**rank_report(cfg, device, w), "cpu_threads": torch.get_num_threads(),
                  "cpu_threads_shared": shared is not None}
        t1 = time.perf_counter()
        dist.barrier()
        barrier_ms = 1000 * (time.perf_counter() - t1)
        found = missing_inputs(cfg, w)
        view = None
        if w.rank == 0 and not found:  # how the input will be read: its nodes, before a job ingests it
            try:
                view = source_view(cfg.data)
            except HpcadError as exc:
                found.append(f"rank 0 on {_node()}: {exc}")
        if fleet and device.type == "cuda" and w.distributed:  # the fleet model's all-reduce, on the GPUs
            import torch.distributed as tdist

            t = torch.full((1024,), float(w.rank + 1), device=device)
            tdist.all_reduce(t)
            if float(t[0]) != w.size * (w.size + 1) / 2:
                found.append(f"rank {w.rank}: the all-reduce over NCCL gave {float(t[0])}, "
                             f"not {w.size * (w.size + 1) / 2}")
        reports = dist.all_objects({**report, "barrier_ms": round(barrier_ms, 2), "problems": found})
    finally:
        dist.finish()
    found = problems(reports) + [p for r in reports for p in r.pop("problems")]
    notes = [f"rank {r['rank']} on {r['node']}: GPUs allocated (CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']}) "
             f"but torch {r['torch']} sees no CUDA device: it would train on the CPU" for r in reports
             if r["gpus_without_cuda"]]
    summary = {"ranks": w.size, "nodes": sorted({r["node"] for r in reports}),
               "backend": dist.backend(device, fleet) if w.distributed else None,
               "rendezvous": _meeting_point()
               if w.distributed else None, "joined_s": round(joined_s, 2), "per_rank": reports, "problems": found,
               "notes": notes, "input": view}
    if w.rank == 0:
        write_json(run_dir / "preflight.json", summary)
        for r in reports:
            log.info("rank %d on %s (local %d): %s; %s", r["rank"], r["node"], r["local_rank"], r["device"], r["budget"])
    if found:
        raise ConfigError("preflight: " + "; ".join(found))
    summary["lines"] = [f"hpcad preflight: {w.size} rank(s) on {len(summary['nodes'])} node(s)"
                        + (f", {summary['backend']} at {summary['rendezvous']}, joined in {joined_s:.1f} s, "
                           f"barrier {max(r['barrier_ms'] for r in reports):.1f} ms" if w.distributed else "")]
    summary["lines"] += [f"  rank {r['rank']} on {r['node']}: {r['device']}, {r['cpu_threads']} CPU thread(s)"
                         + (" (CPUs shared with other ranks, unbound)" if r["cpu_threads_shared"] else "")
                         for r in reports]
    if view is not None:
        summary["lines"].append(f"  data.source: {view['files']} file(s)"
                                + (f" of {view['nodes']} node(s), e.g. {view['how']}" if view["nodes"] else
                                   f", {view['how']}"))
    summary["lines"] += [f"  note: {n}" for n in notes]
    return summary
