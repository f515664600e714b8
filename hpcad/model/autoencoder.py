"""Dense autoencoders as a batched ensemble: K per-node models as stacked weights.

Layer l of model k maps ``x[k] @ W[l][k] + b[l][k]``; one ``baddbmm`` runs all K models at once,
so K tiny models cost one kernel launch per layer instead of K. Encoder layers use ReLU (the last
encoder layer is the code), the decoder mirrors the encoder, and the output layer is linear:
the lecture's model is ``hidden=[64]``: M -> 64 ReLU -> M.

Two options shape a node's model beyond the lecture's:

- ``window`` w: the input is the node's last w rows, flattened (w x M values, oldest first), and the
  model reconstructs the whole window; a row is scored by the error of its own (newest) part, so
  errors stay per row and per metric. ``window=1`` is the lecture's per-row model.
- ``members`` R: R autoencoders per node, trained from different seeds and data orders in the same
  batched kernel; the node's reconstruction is the mean of theirs (the error of the averaged
  prediction, which is what cancels seed noise; docs/results.md measures it).
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
    members: int = 1  # autoencoders per node (seed ensemble); the node's reconstruction is their mean
    window: int = 1  # rows per input (the row and the w - 1 before it); 1 = the lecture's per-row model

    def __post_init__(self) -> None:
        if self.scope not in ("node", "fleet"):
            raise ValueError(f"model.scope={self.scope!r}: node or fleet")
        self.hidden = [int(h) for h in self.hidden]
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(f"model.hidden={self.hidden}: need at least one positive width")
        if self.code_l1 < 0:
            raise ValueError(f"model.code_l1={self.code_l1}: must be >= 0")
        self.members, self.window = int(self.members), int(self.window)
        if not 1 <= self.members <= 64:
            raise ValueError(f"model.members={self.members}: must be between 1 and 64")
        if not 1 <= self.window <= 288:
            raise ValueError(f"model.window={self.window}: must be between 1 and 288 rows")
        if self.scope == "fleet" and (self.members > 1 or self.window > 1 or self.code_l1 > 0):
            raise ValueError("model.scope=fleet trains one plain model: members and window must be 1, code_l1 0")

    def widths(self, n_metrics: int) -> list[int]:
        """Layer widths of one member, for a node with ``n_metrics`` metrics."""
        enc = [n_metrics * self.window, *self.hidden]
        return enc + enc[-2::-1]

    def n_params(self, n_metrics: int) -> int:
        w = self.widths(n_metrics)
        return sum(a * b + b for a, b in zip(w[:-1], w[1:]))

    def to_dict(self) -> dict:
        return {"hidden": list(self.hidden), "code_l1": float(self.code_l1), "members": self.members,
                "window": self.window}


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


def ensemble_recon(params: list[torch.Tensor], x: torch.Tensor, n_encoder: int, members: int,
                   n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction of K nodes' inputs x [K, T, D] by their ``members`` models each (``params``
    stacked node-major: node k's members are models k*R .. k*R + R - 1): the members' mean
    reconstruction of each row's own ``n_out`` values (the newest row of a window) [K, T, n_out],
    and the members' mean code [K, T, C] (float32)."""
    K, T, D = x.shape
    xr = x if members == 1 else x.unsqueeze(1).expand(K, members, T, D).reshape(K * members, T, D)
    recon, code = forward(params, xr, n_encoder)
    recon = recon.float()[..., D - n_out:].reshape(K, members, T, n_out).mean(1)
    code = code.float().reshape(K, members, T, -1).mean(1)
    return recon, code
