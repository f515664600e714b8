"""Cluster-wide reductions for threshold fitting: one process, or every MPI rank (mpi4py).

Each rank fits on its share of the monitored nodes; what crosses ranks is small and does not grow
with the number of nodes: min/max of the signal, cost curves and histograms on a shared grid
(summed), one threshold per node (merged), and for peaks-over-threshold the exceedances over a
high quantile.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hpcad.dist import World


class Reducer:
    """The single-process case: every reduction is the identity."""

    rank, size = 0, 1

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


class MpiReducer(Reducer):
    def __init__(self, comm: Any):
        from mpi4py import MPI

        self.comm, self._mpi = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def sum(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=self._mpi.SUM)
        return out

    def min(self, x: float) -> float:
        return self.comm.allreduce(x, op=self._mpi.MIN)

    def max(self, x: float) -> float:
        return self.comm.allreduce(x, op=self._mpi.MAX)

    def merge(self, d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.comm.allgather(d):
            out.update(part)
        return dict(sorted(out.items()))

    def concat(self, a: np.ndarray) -> np.ndarray:
        return np.concatenate(self.comm.allgather(np.asarray(a)))


def reducer(w: World) -> Reducer:
    """MPI's COMM_WORLD when this process is one of several ranks (:func:`hpcad.dist.world`) and MPI
    connects them (mpiexec, ``srun --mpi=pmi2``); else local (every rank reduces its own share, and
    the caller's rank still decides who writes)."""
    if not w.distributed:
        return Reducer()
    try:
        from mpi4py import MPI
    except ImportError:
        return Reducer()
    comm = MPI.COMM_WORLD
    return MpiReducer(comm) if comm.Get_size() == w.size and comm.Get_rank() == w.rank else Reducer()
