"""Dense autoencoders as a batched ensemble: K per-node models as stacked weights.

Layer l of model k maps ``x[k] @ W[l][k] + b[l][k]``; one ``baddbmm`` runs all K models at once,
so K tiny models cost one kernel launch per layer instead of K. Encoder layers use ReLU (the last
encoder layer is the code), the decoder mirrors the encoder, and the output layer is linear:
the lecture's model is ``hidden=[64]``: M -> 64 ReLU -> M.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class AutoencoderSpec:
    hidden: list[int] = field(default_factory=lambda: [64])
    code_l1: float = 0.0
    scope: str = "node"  # node: one model per monitored node | fleet: one shared model (hpcad/fleet.py)

    def __post_init__(self) -> None:
        if self.scope not in ("node", "fleet"):
            raise ValueError(f"model.scope={self.scope!r}: node or fleet")
        self.hidden = [int(h) for h in self.hidden]
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(f"model.hidden={self.hidden}: need at least one positive width")
        if self.code_l1 < 0:
            raise ValueError(f"model.code_l1={self.code_l1}: must be >= 0")

    def widths(self, n_metrics: int) -> list[int]:
        enc = [n_metrics, *self.hidden]
        return enc + enc[-2::-1]

    def n_params(self, n_metrics: int) -> int:
        w = self.widths(n_metrics)
        return sum(a * b + b for a, b in zip(w[:-1], w[1:]))

    def to_dict(self) -> dict:
        return {"hidden": list(self.hidden), "code_l1": float(self.code_l1)}


def glorot_init(spec: AutoencoderSpec, n_metrics: int, seed: int) -> list[torch.Tensor]:
    """One model's parameters [W0, b0, W1, b1, ...] (Keras defaults: Glorot uniform, zero bias)."""
    g = torch.Generator().manual_seed(int(seed))
    w = spec.widths(n_metrics)
    params: list[torch.Tensor] = []
    for fan_in, fan_out in zip(w[:-1], w[1:]):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        params.append((torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * limit)
        params.append(torch.zeros(fan_out))
    return params


def forward(params: list[torch.Tensor], x: torch.Tensor, n_encoder: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched forward: params stacked as [K, in, out] / [K, out], x [K, B, M] -> (recon, code)."""
    h = x
    code = x
    n_layers = len(params) // 2
    for layer in range(n_layers):
        W, b = params[2 * layer], params[2 * layer + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, W)
        if layer < n_layers - 1:
            h = torch.relu(h)
        if layer == n_encoder - 1:
            code = h
    return h, code


def stack(models: list[list[torch.Tensor]], device: torch.device | str) -> list[torch.Tensor]:
    return [torch.stack([m[i] for m in models]).to(device) for i in range(len(models[0]))]


def unstack(params: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    return [p[k].detach().cpu().clone() for p in params]
