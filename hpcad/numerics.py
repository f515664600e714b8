"""Matrix products that come out the same bits whatever threads a process has.

A BLAS splits one product over a long inner dimension (a block's 1,024 residual rows) among its
threads, and its rounding with it, so ranks sharing a machine's CPUs (one thread each:
:func:`hpcad.dist.share_cpu_threads`) and one process with every CPU fitted whitenings, hence
thresholds, apart in the seventh digit. Products over at most ``FIXED_K`` of the inner dimension are
split by output only; their sums are added in a fixed order here. (The 1-NN baseline's
``torch.cdist`` is left as it is: over a few rows, its normal level's held-out ones, its rounding
follows the threads and moved its thresholds in the sixteenth digit, but the same distances in fixed
order took 1.6 times its time over a block of 4,096 rows, on 2 threads.)"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

FIXED_K = 64  # inner-dimension slice of one product


def fixed_order_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched where ``a`` and ``b`` are [B, ., .]: each item's bits do not depend on the
    others) as the products of ``FIXED_K``-wide slices of the inner dimension added in order, in the
    inputs' dtype; returned in float64."""
    out = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=a.dtype, device=a.device)
    add = out.baddbmm_ if out.dim() == 3 else out.addmm_
    for s in range(0, a.shape[-1], FIXED_K):
        add(a[..., s:s + FIXED_K], b[..., s:s + FIXED_K, :])
    return out.double()


@contextmanager
def one_thread() -> Iterator[None]:
    """torch (and the LAPACK and BLAS under it) on one thread for the block, then as it was: for small
    dense algebra (an M x M eigendecomposition) whose routines split work by thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
