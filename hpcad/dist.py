"""Distributed set-up and teardown in one place: ranks from SLURM or torchrun, one process otherwise.

``world()`` reads the environment only (no process group), so any stage can ask which share of
the monitored nodes is its own. ``init()`` starts torch.distributed (gloo; NCCL where a stage
reduces tensors on the GPU) when there is more than one rank, once per process: a command's stages
(``hpcad run``: train, then score) share that process group, and ``finish()`` tears it down when the
command ends. Destroyed and started again on the same port, torch's rendezvous is not reliable: a
rank can reach rank 0's old store before it closes, and the step then waits at the next stage's
start for the whole collective timeout (seen once in a test run; a bare init/destroy loop of two
gloo ranks on one port failed within 1 to 33 rounds in each of four tries, torch 2.13).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from hpcad.errors import ConfigError, HpcadError

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)

#: ``extra=`` for a log line that states a cluster-wide result, the same on every rank (the chosen
#: signal recipe, a threshold's verdict, an option error): rank 0 writes it, the other ranks leave it out
#: (``rank_zero_says``), so a 400-rank job's log says it once.
CLUSTER_WIDE = {"cluster_wide": True}


def _not_cluster_wide(record: logging.LogRecord) -> bool:
    return not getattr(record, "cluster_wide", False)


def rank_zero_says(rank: int) -> None:
    """On ranks other than 0, drop the log lines marked ``CLUSTER_WIDE`` (from every handler of the
    root logger, where Hydra's console and per-rank log file are). Idempotent."""
    if rank > 0:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_cluster_wide)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    source: str = "single"  # single | torchrun | mpi | slurm

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError as exc:
        raise ConfigError(f"environment {name}={os.environ[name]!r}: not an integer") from exc


def world() -> World:
    """This process's rank: torchrun variables first, then MPI's PMI, then a SLURM job step, else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        w = World(_int("RANK"), _int("WORLD_SIZE"), _int("LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torchrun")
    elif "PMI_RANK" in env and "PMI_SIZE" in env:  # mpiexec (MPICH/Hydra) or srun --mpi=pmi2
        w = World(_int("PMI_RANK"), _int("PMI_SIZE"), int(env.get("MPI_LOCALRANKID", env.get("SLURM_LOCALID", 0))),
                  "mpi")
    elif "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:  # Open MPI's mpirun
        w = World(_int("OMPI_COMM_WORLD_RANK"), _int("OMPI_COMM_WORLD_SIZE"),
                  int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), "mpi")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        w = World(_int("SLURM_PROCID"), _int("SLURM_NTASKS"), _int("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                  "slurm")
    else:
        return World()
    if not 0 <= w.rank < w.size:
        raise ConfigError(f"rank {w.rank} is outside a world of {w.size} ({w.source} environment)")
    expected = env.get("HPCAD_WORLD_SIZE")
    if expected is not None and int(expected) != w.size:
        raise ConfigError(f"launched with {w.size} ranks but HPCAD_WORLD_SIZE={expected}: "
                          f"the job's task count and the script disagree")
    return w


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``n[1-4,7]`` -> ``n1``, ``gpu-a,gpu-b`` -> ``gpu-a``."""
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def node_address(node: str) -> str:
    """The address SLURM reaches ``node`` at (its NodeAddr); the node name where scontrol is absent."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                                 timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"NodeAddr=(\S+)", out)
        if m:
            return m.group(1)
    return node


def timeout() -> dt.timedelta:
    """How long a collective may wait (``HPCAD_DIST_TIMEOUT_MIN``, default 720 minutes). Ranks wait at
    barriers for whole stages (rank 0 ingesting one file of all nodes, the slowest rank training):
    NCCL's default of 10 minutes would kill a healthy job; the SLURM time limit bounds a hung one."""
    raw = os.environ.get("HPCAD_DIST_TIMEOUT_MIN", "720")
    try:
        minutes = float(raw)
    except ValueError:
        raise ConfigError(f"environment HPCAD_DIST_TIMEOUT_MIN={raw!r}: not a number of minutes") from None
    if minutes <= 0:
        raise ConfigError(f"environment HPCAD_DIST_TIMEOUT_MIN={raw!r}: must be > 0")
    return dt.timedelta(minutes=minutes)


# Rendezvous ports of SLURM steps: 20000-31999, below Linux's ephemeral range (32768-60999), from
# which the kernel picks the local ports of outgoing connections (gloo's and NCCL's own included):
# a port there can be taken by some connection on rank 0's node, and rank 0 would fail to listen.
PORT_BASE, PORT_SPAN = 20000, 12000


def step_port(job_id: int, step_id: int = 0) -> int:
    """The port a SLURM step's ranks meet at: one per job and step, so that two jobs sharing a node,
    or two steps of one job running at once (``srun ... &`` in an allocation), do not collide."""
    return PORT_BASE + (job_id + 4099 * step_id) % PORT_SPAN


def rendezvous(w: World, env: dict | None = None, bcast: Callable[[object], object] | None = None) -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT for this launch, unless already set: inside a SLURM step (also
    when launched through PMI by ``srun --mpi=pmi2``) rank 0's node and a port from the job and
    step ids (``step_port``), so multi-node steps meet on the right host and concurrent steps do not
    collide. Under ``mpiexec``/``mpirun`` outside SLURM, rank 0 offers its host and a port free
    there over MPI (``bcast``: rank 0's value on every rank, default ``mpi_bcast``), so two jobs on
    one host meet at their own ports and ranks on other hosts find rank 0's; where MPI does not
    join the ranks (no mpi4py), ranks on one host meet at 127.0.0.1:29511."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if "SLURM_JOB_ID" in env and (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        if addr is None:  # rank 0 runs on the step's first node
            addr = node_address(first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
        step = env.get("SLURM_STEP_ID", "0")
        port = port or str(step_port(int(env["SLURM_JOB_ID"]), int(step) if step.isdigit() else 0))
    elif w.source == "mpi" and (addr is None or port is None):
        bcast = bcast or mpi_bcast(w)
        if bcast is not None:
            host, port = bcast((socket.gethostname(), port or str(free_port())) if w.rank == 0 else None)
            addr = addr or ("127.0.0.1" if host == socket.gethostname() else host)
        elif addr is None and _hosts_apart(env):
            raise ConfigError(f"rank {w.rank} of {w.size}: the ranks run on several hosts, but MPI does not join them for "
                              f"hpcad (mpi4py is not installed, or its MPI is not the one that launched them), so they "
                              f"cannot learn where rank 0 is: pip install 'hpcad[mpi]' (mpi4py built for the "
                              f"launcher's MPI), or export MASTER_ADDR=<rank 0's host> and MASTER_PORT=<a free port>")
    return addr or "127.0.0.1", port or "29511"


def mpi_comm(w: World) -> tuple[Any | None, str]:
    """MPI's COMM_WORLD where MPI (mpi4py) joins this launch's ranks, else None and why not (mpi4py
    absent, or its MPI another than the launcher's: each rank then sees a world of one). torchrun's
    ranks are never MPI's: MPI is not started in them (each would start an MPI singleton for nothing,
    and at its exit finalize it beside torch's process group)."""
    if w.source == "torchrun":
        return None, "torchrun starts ranks that MPI does not join (MPI is not started in them)"
    try:
        from mpi4py import MPI
    except ImportError:
        return None, "mpi4py is not installed (pip install mpi4py)"
    comm = MPI.COMM_WORLD
    if comm.Get_size() == w.size and comm.Get_rank() == w.rank:
        return comm, ""
    return None, (f"MPI did not join the {w.size} ranks (this one is rank {comm.Get_rank()} of an MPI world of "
                  f"{comm.Get_size()}; MPI library: {_mpi_library(MPI)}): under srun, its --mpi plugin does not match "
                  "that MPI (`srun --mpi=list`; HPCAD_SRUN_MPI picks it in the shipped scripts, docs/cluster.md)")


def _mpi_library(mpi: Any) -> str:
    """The MPI library's name and version, e.g. "MPICH Version: 5.0.2", "Open MPI v4.1.5"."""
    first = " ".join(mpi.Get_library_version().strip().splitlines()[0].split())
    return first.split(",")[0]


def mpi_bcast(w: World) -> Callable[[object], object] | None:
    """Rank 0's value to every rank over MPI's COMM_WORLD (``mpi_comm``); None where MPI does not
    join the ranks."""
    comm = mpi_comm(w)[0]
    return None if comm is None else lambda obj: comm.bcast(obj, root=0)


def free_port(tries: int = 64) -> int:
    """A port no process on this host listens at, in 20000-31999 (``PORT_BASE``) where one is free:
    rank 0 listens there right after the ranks learn it. Where none of ``tries`` is, one the kernel
    picks."""
    import random

    pick = random.SystemRandom()
    for _ in range(tries):
        candidate = PORT_BASE + pick.randrange(PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("", candidate))
            except OSError:
                continue
            return candidate
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _hosts_apart(env) -> bool:
    """Whether the MPI launcher says this host runs fewer of the ranks than there are (MPICH's
    ``MPI_LOCALNRANKS``, Open MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``)."""
    for local, size in (("MPI_LOCALNRANKS", "PMI_SIZE"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE")):
        if str(env.get(local, "")).isdigit() and str(env.get(size, "")).isdigit():
            return int(env[local]) < int(env[size])
    return False


#: How often rank 0, waiting for the other ranks (to join, to finish a stage), says so: a long wait
#: for the slowest rank reads as one in the job log, and a step that hangs shows where it waits.
WAIT_LOG_S = 300.0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@contextmanager
def waiting(what: str, every_s: float | None = None) -> Iterator[None]:
    """While the body blocks (a collective), rank 0 logs ``still waiting <what> (<time> so far)``
    every ``every_s`` seconds (``WAIT_LOG_S``). Only rank 0: the other ranks' lines would say the
    same hundreds of times over."""
    if world().rank != 0:
        yield
        return
    every = WAIT_LOG_S if every_s is None else every_s
    done = threading.Event()
    t0 = time.monotonic()

    def say() -> None:
        while not done.wait(every):
            log.info("still waiting %s (%s so far)", what, _duration(time.monotonic() - t0))

    ticker = threading.Thread(target=say, name="hpcad-waiting", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def backend(device: torch.device, gpu_collectives: bool) -> str:
    """NCCL only where tensors on the GPU are reduced (the fleet model's DDP). The per-node scope's
    collectives (barriers, rank 0's outcome, small sums of Python objects) go over gloo, on CUDA
    too: no NCCL communicator on every GPU and no NCCL watchdog on barriers that wait for a stage."""
    return "nccl" if device.type == "cuda" and gpu_collectives else "gloo"


def init(device: torch.device, gpu_collectives: bool = False, wait: dt.timedelta | None = None) -> World:
    """Start the process group when there is more than one rank; ``gpu_collectives``: the stage
    reduces tensors on the GPU (see ``backend``); ``wait``: how long a collective (and joining) may
    take, default ``timeout()``. Rank 0 logs where the ranks meet before it waits for them: a job
    whose ranks cannot reach it ends its log there (``hpcad preflight`` finds out fast).

    Once per process: a later stage of the same command keeps the group the first one started (see
    the module), also where it would have chosen another backend (``hpcad run model.scope=fleet`` on
    CUDA: scoring's barriers then go over the training's NCCL group, whose timeout is ``wait`` too;
    gloo reduces CUDA tensors as well)."""
    w = world()
    if not w.distributed or _started():
        return w
    import torch
    import torch.distributed as tdist

    if device.type == "cuda":  # first: a CUDA-aware MPI that rendezvous() may start then uses this GPU, not GPU 0
        torch.cuda.set_device(device)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = rendezvous(w)
    name = backend(device, gpu_collectives)
    wait = wait or timeout()
    if w.rank == 0:
        s = wait.total_seconds()
        log.info("process group: %s, %d ranks, rank 0 at %s:%s, collectives wait up to %s", name, w.size,
                 os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], f"{s / 60:g} min" if s >= 60 else f"{s:g} s")
    t0 = time.perf_counter()
    try:
        with waiting(f"for the other {w.size - 1} rank(s) to join at {os.environ['MASTER_ADDR']}:"
                     f"{os.environ['MASTER_PORT']}"):
            tdist.init_process_group(name, rank=w.rank, world_size=w.size, timeout=wait)
    except tdist.DistNetworkError as exc:
        if "EADDRINUSE" not in str(exc):  # rank 0 could not open the rendezvous port: say which, and what to do
            raise
        raise HpcadError(f"rank 0 on {socket.gethostname()} cannot listen at port {os.environ['MASTER_PORT']} for the "
                         f"other ranks: another process on this node holds it (address already in use). Export "
                         f"MASTER_PORT=<a free port> for the job (HPCAD_ENV) and run it again") from exc
    if w.rank == 0:
        log.info("process group: all %d ranks joined in %.1f s", w.size, time.perf_counter() - t0)
    return w


def reason(error: BaseException) -> str:
    """A failure in one line for other ranks' and the job log's messages: hpcad's own errors as they
    read, anything else with its type."""
    return str(error) if isinstance(error, HpcadError) else f"{type(error).__name__}: {error}"


def share_outcome(error: BaseException | None) -> None:
    """After the ranks did something apart (rank 0 ingesting alone, each rank reading its share),
    every rank learns whether one failed: a rank that failed re-raises its own error, the others
    raise one naming the first that failed. The step then ends with one clean message per rank
    instead of the waiting ranks' connection errors when a rank leaves. Call on every rank."""
    said = all_objects(None if error is None else reason(error))
    if error is not None:
        raise error
    for r, why in enumerate(said):
        if why is not None:
            raise HpcadError(f"rank {r} stopped: {why}")


# How a collective fails on the ranks left waiting when another rank's process ends (gloo's TCP pairs,
# the c10d store, NCCL's communicator): the rank that ended has said why itself.
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote worker crash|remote process exit|"
                        r"NCCL communicator was aborted|recvValue failed|failed to recv")


def peer_lost(exc: BaseException) -> HpcadError | None:
    """For a collective that failed because another rank stopped (its own error is in its log), the
    one-line error this rank stops with; None for any other failure."""
    if not isinstance(exc, (RuntimeError, ConnectionError)) or not _PEER_LOST.search(str(exc)):
        return None
    w = world()
    said = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0]).split(". This is")[0]  # gloo: "[pair.cc:553] ..."
    return HpcadError(f"rank {w.rank} of {w.size}: another rank of this step stopped, so this one stops too: the "
                      f"first error in the job log (or that rank's logs/<stage>-rank<r>.log in the run folder) says why "
                      f"({said[:160]})")


@contextmanager
def peers_watched() -> Iterator[None]:
    """Around a stage's collectives: a collective that failed because another rank stopped ends this
    rank with ``peer_lost``'s one line (its cause), not the backend's traceback."""
    try:
        yield
    except (RuntimeError, ConnectionError) as exc:
        lost = peer_lost(exc)
        if lost is None:
            raise
        raise lost from exc


def barrier(what: str = "for the other ranks") -> None:
    """Wait for every rank; ``what`` says for what in rank 0's periodic line (``waiting``)."""
    if _started():
        import torch.distributed as tdist

        with waiting(what):
            tdist.barrier()


def finish() -> None:
    """Tear the process group down: at the end of a command (``hpcad.cli``) or a launcher's job, after
    its last stage, never between stages (see the module)."""
    if _started():
        import torch.distributed as tdist

        tdist.destroy_process_group()


def shard(rows: dict[str, int], size: int) -> list[list[str]]:
    """Assign nodes to ranks balanced by row count: largest first onto the least-loaded rank.

    Deterministic for a given input (ties broken by node name); a rank may get no node.
    """
    loads = [0] * size
    out: list[list[str]] = [[] for _ in range(size)]
    for node in sorted(rows, key=lambda n: (-rows[n], n)):
        r = min(range(size), key=lambda i: (loads[i], i))
        out[r].append(node)
        loads[r] += rows[node]
    return out


def all_objects(obj: object) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order ([obj] without a process group)."""
    if not _started():
        return [obj]
    import torch.distributed as tdist

    parts = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, obj)  # any backend (gloo, NCCL), no device tensors
    return parts


T = TypeVar("T")


def from_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone and its result (small, picklable) given to every rank: for
    what each rank would otherwise read from the shared file system itself (the training run's
    models folder, listed and its files stat'ed by 400 ranks at once, is 400 times the load on
    Lustre's metadata server). An error on rank 0 stops every rank (``share_outcome``: rank 0 with
    its own error, the others naming it). Without a process group: ``compute()``."""
    if not _started():
        return compute()
    import torch.distributed as tdist

    value, error = None, None
    if tdist.get_rank() == 0:
        try:
            value = compute()
        except Exception as exc:  # shared below, then raised on rank 0 as it was
            error = exc
    share_outcome(error)
    box = [value]
    tdist.broadcast_object_list(box, src=0)  # any backend (gloo, NCCL: through the current device)
    return box[0]


def share_cpu_threads() -> int | None:
    """Give this rank its share of the CPUs it shares with other ranks of its node: where ranks are not
    bound to CPUs of their own (SLURM's task/none, ``--cpu-bind=none``, a plain ``srun`` or submitit
    without binding) and OMP_NUM_THREADS is unset, torch starts a thread per visible CPU in every rank,
    and the oversubscribed OpenMP threads wait on each other (two ranks on 2 cores trained 64 nodes in
    29-178 s instead of 3.5 s). The ranks compare their CPU masks (one small all-gather); a rank whose
    mask overlaps k ranks' on its host (itself included) uses len(mask) // k threads. OMP_NUM_THREADS
    (the batch scripts set it from --cpus-per-task) is kept unless the k ranks would then run more
    threads than the CPUs they share: a node with fewer CPUs than SLURM was told (the dev cluster's
    32 on a small machine: two trainings with 8 threads each on 2 cores took 51 s instead of 4.7 s),
    or a value exported from a login node; then the share is used, and the rank says so. The share
    caps numpy's BLAS as well as torch (``limit_blas_threads``). Returns the number set, or None where
    nothing was changed. Call on every rank, after ``init``."""
    import torch

    mask = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    host = socket.gethostname()
    said = all_objects((host, mask))
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:  # the launcher or the user chose: kept while it fits the CPUs this rank can run on
        k = sharing(host, mask, said)
        if not omp.isdigit() or int(omp) * k <= len(mask):
            return None
        n = max(1, len(mask) // k)
        if [h for h, _ in said].index(host) == world().rank:  # said once per host, by its first rank
            log.warning("OMP_NUM_THREADS=%s for each of %d rank(s) sharing %d CPU(s) on %s would oversubscribe "
                        "them (OpenMP threads then wait on each other): %d thread(s) per rank", omp, k, len(mask),
                        host, n)
    else:
        n = cpu_share(host, mask, said)
    if n is not None:
        torch.set_num_threads(n)
        limit_blas_threads(n)
    return n


def limit_blas_threads(n: int) -> None:
    """Cap numpy's and scipy's BLAS (OpenBLAS, MKL) at ``n`` threads as well as torch's: each loaded one
    now (threadpoolctl; they read OMP_NUM_THREADS when loaded, before any rank knew its share) and
    one loaded later (its own variable, which it reads first). PCA's fit and scoring run in numpy's
    BLAS: 16 ranks on the dev cluster's 2 cores, each with the script's OMP_NUM_THREADS=8 in
    OpenBLAS, took 259 s for PCA's baseline instead of 28 s (docs/benchmarks.md)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def sharing(host: str, mask: list[int], said: list[tuple[str, list[int]]]) -> int:
    """How many ranks (itself included), given every rank's (host, CPU mask), run on CPUs of ``mask``."""
    mine = set(mask)
    return max(1, sum(1 for h, m in said if h == host and mine.intersection(m)))


def cpu_share(host: str, mask: list[int], said: list[tuple[str, list[int]]]) -> int | None:
    """Threads for a rank on ``host`` with CPU ``mask``, given every rank's (host, mask): its CPUs
    divided by the ranks on its host whose masks overlap its own (itself included); None when no
    other rank shares its CPUs (bound ranks, or one rank per node)."""
    k = sharing(host, mask, said)
    return None if k <= 1 else max(1, len(mask) // k)


def all_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of a small float64 array over all ranks (itself without a process group)."""
    values = np.asarray(values, dtype=np.float64)
    parts = all_objects(values.tolist())
    return np.sum(np.array(parts, dtype=np.float64), axis=0)


def _started() -> bool:
    """Whether this process has a process group (torch is imported only by the stages that use it)."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()
