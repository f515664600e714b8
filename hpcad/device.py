"""Pick the torch device from the ``compute.device`` option."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings

import torch

from hpcad.errors import ConfigError

log = logging.getLogger(__name__)


def allocated_gpus() -> str | None:
    """The GPUs SLURM (or the user) gave this process (``CUDA_VISIBLE_DEVICES``); None when none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return None if visible in ("", "-1", "none", "NoDevFiles") else visible


@functools.cache  # once per process (train and score both resolve the device)
def _warn_no_cuda(visible: str, local_rank: int) -> None:
    """Said by each host's first rank (local rank 0); the others log it at DEBUG (every rank said it,
    once per step: 4 lines a step from the 4-rank job of tests/test_slurm.py)."""
    log.log(logging.WARNING if local_rank == 0 else logging.DEBUG,
            "GPUs are allocated to this process (CUDA_VISIBLE_DEVICES=%s) but torch %s sees no CUDA device "
            "(a CPU build, or no driver): running on the CPU", visible, torch.__version__)


def gpu_index(local_rank: int, visible: int) -> int:
    """This rank's GPU among the ``visible`` ones: its local rank, or 0 when SLURM (or the user)
    binds one GPU per task. More ranks on a node than GPUs is an error, not two ranks on one GPU."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise ConfigError(f"local rank {local_rank} but only {visible} GPUs visible to it (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run as many tasks per node as GPUs "
                          f"(--ntasks-per-node = --gpus-per-node) with one GPU or all of them visible to each task "
                          f"(HPCAD_GPU_BIND), or compute.device=cpu")
    return local_rank


# cuBLAS without a workspace has no split-K kernels, so a batched matmul rounds each model's
# product the same whatever the chunk's size: on an H200, a node's model was then bit-identical
# alone and in chunks of 8 and 64 (1e-3 apart with cuBLAS's default workspace), for about 2 % of
# training speed (docs/benchmarks.md "GPU"). A value the user exports wins.
CUBLAS_WORKSPACE = ":0:0"


def _no_cublas_workspace() -> None:
    if os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE) == CUBLAS_WORKSPACE:
        # torch then says, once, that cuBLASLt's workspace is capped too (as intended; fleet's addmm)
        warnings.filterwarnings("ignore", message="Requested unified CUBLASLT workspace size")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU (``gpu_index``) when CUDA works, else the CPU. On CUDA, sets
    ``CUBLAS_WORKSPACE_CONFIG`` (unless set) before cuBLAS starts (see ``CUBLAS_WORKSPACE``) and makes
    the GPU this process's current device, so that pinned buffers, events and library handles are
    created on it, not on GPU 0 (where they would cost every other rank's GPU memory)."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        dev = torch.device(f"cuda:{gpu_index(local_rank, torch.cuda.device_count())}")
    elif name == "auto":
        visible = allocated_gpus()
        if visible is not None:
            _warn_no_cuda(visible, local_rank)
        return torch.device("cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"compute.device={name!r}: {exc}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"compute.device={name!r}: CUDA is not available on this machine")
    if dev.type == "cuda":
        _no_cublas_workspace()
        torch.cuda.set_device(dev)
    return dev


class Staging:
    """Two host buffers of ``shape``, pinned on CUDA, taken in turn for uploads to ``device``: filling
    one overlaps with the other's transfer. ``take()`` returns the next buffer once its previous
    upload has left it; ``sent()`` marks the upload just issued from it (``non_blocking`` copies on
    the device's current stream); ``wait()`` waits for every upload. On the CPU nothing is in flight."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32):
        self.device, self.cuda = device, device.type == "cuda"
        self.buffers = [torch.empty(shape, dtype=dtype, pin_memory=self.cuda) for _ in range(2)]
        self.events: list = [None, None]
        self.i = 1

    def take(self) -> torch.Tensor:
        self.i = 1 - self.i
        if self.events[self.i] is not None:
            self.events[self.i].synchronize()
        return self.buffers[self.i]

    def sent(self) -> None:
        if self.cuda:
            self.events[self.i] = torch.cuda.Event()
            self.events[self.i].record(torch.cuda.current_stream(self.device))  # the copy's stream, not GPU 0's

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the device's peak allocated memory afresh (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the allocator must exist before its statistics can be reset
        torch.cuda.reset_peak_memory_stats(device)


def describe(device: torch.device) -> str:
    """The device as a rank's log line names it: ``cuda:1 (NVIDIA A100-SXM-64GB)`` or ``cpu``, with
    the GPUs SLURM bound to the process (``CUDA_VISIBLE_DEVICES``) when it is set."""
    text = str(device)
    if device.type == "cuda":
        text += f" ({torch.cuda.get_device_name(device)})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return text if visible is None else f"{text}, CUDA_VISIBLE_DEVICES={visible}"


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """Matmul precision for a plain torch training loop: fp32 (default), tf32 (CUDA tensor cores) or
    bf16 autocast (``tf32_context`` plus autocast). Weights, optimiser state and the loss stay in
    fp32 in every mode; scoring always runs in fp32 (the alarm signal is not quantised)."""
    with tf32_context(precision, device):
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield


@contextlib.contextmanager
def tf32_context(precision: str, device: torch.device):
    """CUDA matmuls in TF32 while training with ``compute.precision=tf32`` (restored afterwards)."""
    if precision not in ("fp32", "tf32", "bf16"):
        raise ConfigError(f"compute.precision={precision!r}: expected fp32, tf32 or bf16")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
