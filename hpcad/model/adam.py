"""Adam for a chunk of K models stored side by side, each with its own step count.

The parameters live in ``alloc`` storage (one tensor per layer parameter, each model's slice on
whole 64-byte cache lines), so an update of a run of models rounds every model's values exactly as
an update of that model alone would: a model never depends on its chunk companions.
"""
from __future__ import annotations

import numpy as np
import torch

BETA1, BETA2, EPS = 0.9, 0.999, 1e-7  # the lecture's (Keras) Adam settings
_LINE = 16  # float32 values per 64-byte cache line (and per AVX-512 vector)


def alloc(shapes: list[tuple[int, ...]], K: int, device: torch.device) -> list[torch.Tensor]:
    """Zeroed storage [K, padded size] per parameter: every model's slice starts on a 64-byte line
    and spans whole lines (the padding stays zero: zero gradient, zero update)."""
    return [torch.zeros(K, -(-int(np.prod(sh)) // _LINE) * _LINE, device=device) for sh in shapes]


def views(store: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The [K, *shape] parameters inside ``alloc`` storage (contiguous where no padding was needed)."""
    return [t[:, : int(np.prod(sh))].view(t.shape[0], *sh) for t, sh in zip(store, shapes)]


class BatchedAdam:
    """Adam for K models whose parameters are ``alloc`` storage, each model with its own step count.

    Runs the kernel behind ``torch.optim.Adam(fused=True)`` (one pass over weights, gradient and
    moments). A model that sits a step out is left out, so its weights, moments and step count
    stay as they are. Models that step together and share a step count form runs of consecutive
    rows, updated as one slice per parameter (multi-threaded); since each model's slice is whole
    cache lines, the kernel's vector lanes and thread splits fall on the same element positions as
    for that model alone, so a model's update never depends on which other models share its
    chunk. Semantics are those of ``torch.optim.Adam(lr, eps=1e-7)``.
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
                 m: list[torch.Tensor] | None = None, v: list[torch.Tensor] | None = None,
                 step_count: torch.Tensor | None = None, masked: bool = False, weight_decay: float = 0.0,
                 decayed: tuple[int, ...] = ()) -> None:
        self.lr, self.params, self.grads, self.masked = lr, params, grads, masked
        self.weight_decay, self.decayed = float(weight_decay), tuple(decayed)
        self.m = m if m is not None else [torch.zeros_like(p) for p in params]
        self.v = v if v is not None else [torch.zeros_like(p) for p in params]
        # float32, as torch.optim keeps it and the fused kernel reads it (whatever the default dtype)
        K = params[0].shape[0]
        self.step_count = (torch.zeros(K, dtype=torch.float32, device=params[0].device)
                           if step_count is None else step_count)
        self.steps = list(self.step_count.unbind(0))
        self.counts = np.array(self.step_count.tolist(), dtype=np.int64)  # host copy: grouping never syncs

    def select(self, keep: torch.Tensor, params: list[torch.Tensor], grads: list[torch.Tensor]) -> "BatchedAdam":
        """The state of the models at ``keep``, for the compacted ``params``/``grads`` storage."""
        return BatchedAdam(params, grads, self.lr, [t[keep] for t in self.m], [t[keep] for t in self.v],
                           self.step_count[keep], self.masked, self.weight_decay, self.decayed)

    def group(self, active: list[int]) -> tuple:
        """The slices of the models in ``active`` (build once, step many times while the same
        models step together): one per run of consecutive models with equal step counts."""
        if self.masked:  # every model's rows, the inactive ones masked out in step()
            return self.params, self.grads, self.m, self.v, [], np.array(sorted(active), dtype=np.int64)
        counts = self.counts
        runs: list[list[int]] = []
        for k in sorted(active):
            if runs and runs[-1][1] == k and counts[runs[-1][0]] == counts[k]:
                runs[-1][1] = k + 1
            else:
                runs.append([k, k + 1])
        out: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])
        for a, b in runs:
            for i in range(len(self.params)):
                for dst, src in zip(out, (self.params, self.grads, self.m, self.v)):
                    dst.append(src[i][a:b])
                out[4].append(self.steps[a])
        return (*out, np.array(sorted(active), dtype=np.int64))

    def step(self, group: tuple[list[torch.Tensor], ...], active: torch.Tensor) -> None:
        """One update of the models in ``group``; ``active`` is the 0/1 mask [K] of the same models."""
        p, g, m, v, steps, idx = group
        if not p or not len(idx):
            return
        self.step_count.add_(active)
        self.counts[idx] += 1
        if self.weight_decay > 0:  # decoupled (AdamW): the stepping models' weight matrices shrink first
            shrink = 1.0 - self.lr * self.weight_decay * active[:, None]
            for i in self.decayed:
                self.params[i].mul_(shrink)
        if self.masked:
            self._masked_step(active)
            return
        torch._fused_adam_(p, g, m, v, [], steps, lr=self.lr, beta1=BETA1, beta2=BETA2, weight_decay=0.0,
                           eps=EPS, amsgrad=False, maximize=False)

    def _masked_step(self, active: torch.Tensor) -> None:
        """The same update for all K models at once, each with its own step count and bias
        correction, inactive models (``active`` 0) left exactly as they are: a few element-wise
        passes instead of one fused kernel per run of models. On CUDA, models of different lengths
        split the fused kernel's runs into thousands of one-model slices (40x slower per step,
        docs/benchmarks.md); element-wise, a model's update still depends on its own values only."""
        # in the fused kernel's order: bias corrections in float64, then float32 element-wise
        on = active[:, None] > 0
        c = self.step_count[:, None].double().clamp(min=1)
        step_size = torch.where(on, self.lr / (1 - BETA1 ** c), 0.0).float()
        bc2_sqrt = torch.sqrt(1 - BETA2 ** c).float()
        b1 = torch.where(on, BETA1, 1.0).float()
        b2 = torch.where(on, BETA2, 1.0).float()
        for p, g, m, v in zip(self.params, self.grads, self.m, self.v):
            gm = torch.where(on, g, 0.0)
            m.mul_(b1).add_(gm * (1 - BETA1))
            v.mul_(b2).add_(gm * gm * (1 - BETA2))
            p.sub_(step_size * m / (v.sqrt() / bc2_sqrt + EPS))


def masked_adam(device: torch.device) -> bool:
    """Whether training on ``device`` uses :meth:`BatchedAdam._masked_step` (CUDA) or the fused kernel (CPU,
    where its per-run loop is cheap and it is bit-compatible with ``torch.optim.Adam``)."""
    return device.type == "cuda"
