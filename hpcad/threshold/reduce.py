"""Cluster-wide reductions for threshold fitting: one process, or every MPI rank (mpi4py); where
MPI does not join the ranks (torchrun, srun with another --mpi plugin, submitit's tasks), their
torch.distributed process group does the same reductions.

Each rank fits on its share of the monitored nodes; what crosses ranks is small and does not grow
with the number of nodes: min/max of the signal, cost curves and histograms on a shared grid
(summed), one threshold per node (merged), and for peaks-over-threshold the exceedances over a
high quantile. Applying the thresholds is shared out the same way: each rank's alarm records and
per-node figures go to rank 0 (``gather``), which writes them; sums (class profiles, the alarm
budget) are added over the ranks.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from hpcad.dist import CLUSTER_WIDE, World, all_objects, init, mpi_comm, peers_watched, reason

log = logging.getLogger(__name__)
ABORT_GRACE_S = 0.5  # a failing rank's pause between saying why and MPI_Abort


class Reducer:
    """The single-process case: every reduction is the identity."""

    rank, size = 0, 1

    @contextmanager
    def all_or_none(self, stage: str) -> Iterator[None]:
        """A part in which every rank takes part in the reductions (one process: nothing to do)."""
        yield

    def sum(self, a: np.ndarray) -> np.ndarray:
        return a

    def min(self, x: float) -> float:
        return x

    def max(self, x: float) -> float:
        return x

    def merge(self, d: dict[str, Any]) -> dict[str, Any]:
        return d

    def concat(self, a: np.ndarray) -> np.ndarray:
        return a

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable) on rank 0, in rank order; the other ranks get []."""
        return [obj]

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass None)."""
        return obj


class _RanksReducer(Reducer):
    """Several ranks: merge and concat from every rank's part (``_allgather``), the same over MPI or a
    torch process group."""

    def _allgather(self, obj: Any) -> list[Any]:
        raise NotImplementedError

    def merge(self, d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self._allgather(d):
            out.update(part)
        return dict(sorted(out.items()))

    def concat(self, a: np.ndarray) -> np.ndarray:
        return np.concatenate(self._allgather(np.asarray(a)))


class MpiReducer(_RanksReducer):
    def __init__(self, comm: Any):
        from mpi4py import MPI

        self.comm, self._mpi = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    @contextmanager
    def all_or_none(self, stage: str) -> Iterator[None]:
        """A rank that fails here ends the whole MPI job (MPI_Abort, exit 2) after saying why: the other
        ranks would wait in a reduction for ever (MPI has no time-out, and SLURM's --kill-on-bad-exit
        never fires for a failed rank that then waits in MPI_Finalize)."""
        try:
            yield
        except Exception as exc:
            said = reason(exc)
            log.error("%s; every rank of the MPI job stops (MPI_Abort)", said)
            print(f"hpcad {stage}: error: {said} (rank {self.rank} of {self.size}: every rank of the MPI job stops, "
                  f"MPI_Abort)", file=sys.stderr, flush=True)
            logging.shutdown()  # the rank's log file in the run folder has the reason whatever happens next
            # mpiexec kills the job's processes on MPI_Abort and drops output it has not forwarded yet
            # (MPICH: the line above was lost in 1 run of 25): give its forwarder a moment first.
            time.sleep(ABORT_GRACE_S)
            self.comm.Abort(2)

    def sum(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=self._mpi.SUM)
        return out

    def min(self, x: float) -> float:
        return self.comm.allreduce(x, op=self._mpi.MIN)

    def max(self, x: float) -> float:
        return self.comm.allreduce(x, op=self._mpi.MAX)

    def _allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def gather(self, obj: Any) -> list[Any]:
        return self.comm.gather(obj, root=0) or []

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0)


class GroupReducer(_RanksReducer):
    """The ranks' torch.distributed process group (the command's, or a gloo group started for the
    stage): MPI's reductions over pickled objects, for ranks that MPI does not join."""

    def __init__(self) -> None:
        import torch.distributed as tdist

        self._t = tdist
        self.rank, self.size = tdist.get_rank(), tdist.get_world_size()

    @contextmanager
    def all_or_none(self, stage: str) -> Iterator[None]:
        """A rank that fails here stops with its own error; its exit ends the other ranks' waits in a
        collective with one line saying so (``dist.peers_watched``), as MPI_Abort ends them."""
        with peers_watched():
            yield

    def sum(self, a: np.ndarray) -> np.ndarray:
        parts = self._allgather(np.ascontiguousarray(a))
        out = parts[0].copy()
        for part in parts[1:]:  # in rank order, as MPI adds two ranks' parts
            out += part
        return out

    def min(self, x: float) -> float:
        return min(self._allgather(x))

    def max(self, x: float) -> float:
        return max(self._allgather(x))

    def _allgather(self, obj: Any) -> list[Any]:
        return all_objects(obj)

    def gather(self, obj: Any) -> list[Any]:
        parts: list[Any] | None = [None] * self.size if self.rank == 0 else None
        self._t.gather_object(obj, parts, dst=0)
        return parts or []

    def bcast(self, obj: Any) -> Any:
        box = [obj]
        self._t.broadcast_object_list(box, src=0)
        return box[0]


def reducer(w: World) -> Reducer:
    """MPI's COMM_WORLD when this process is one of several ranks (:func:`hpcad.dist.world`) and MPI
    connects them (mpiexec, ``srun --mpi=pmi2``); else the ranks' torch.distributed process group
    (the command's, where training or scoring started one; else a gloo group started here), said
    once; one process: local."""
    if not w.distributed:
        return Reducer()
    comm, why = mpi_comm(w)
    if comm is not None:
        return MpiReducer(comm)
    import torch

    init(torch.device("cpu"))  # the command's group where it has one
    log.info("%s: the ranks reduce over their torch.distributed process group instead (the same thresholds)",
             why, extra=CLUSTER_WIDE)
    return GroupReducer()
