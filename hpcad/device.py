"""Pick the torch device from the ``train.device`` option."""
from __future__ import annotations

import torch

from hpcad.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU (local rank modulo the visible GPUs) when CUDA works, else the CPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    if name == "auto":
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device={name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}: CUDA is not available on this machine")
    return dev


def precision_context(precision: str, device: torch.device):
    """Matmul precision for training and scoring: fp32 (default), tf32 (CUDA tensor cores) or bf16 autocast.

    Weights, optimiser state and the loss stay in fp32 in every mode.
    """
    import contextlib

    if precision not in ("fp32", "tf32", "bf16"):
        raise ConfigError(f"train.precision={precision!r}: expected fp32, tf32 or bf16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
