"""Whitened reconstruction errors (``signal.whiten``; docs/pipeline.md, "The alarm signal").

A node's metrics come in families that move together (a socket's cores' ips and utilisation, its
power and temperatures), and so do its model's residuals. The plain sum of squared errors counts a
family-wide deviation once per member of the family, and weighs a broken relation (one metric off
where its family is not) no more than a deviation the family always shares. Whitening divides the
residuals by their own covariance on the node's training rows: a row's summed error becomes the
Mahalanobis distance of its residual, times the residuals' mean variance (so a normal row keeps
about its unwhitened size and the range-excess term its weight).

- Fitted as the model is: the covariance is the Ledoit-Wolf estimate (shrunk towards the mean
  variance times the identity, by the amount its formula finds from the rows) of the residuals of
  the rows the model was fitted on, and the whitened signal's normal level and per-metric errors
  are measured on the held-out rows, which neither the model nor the covariance saw (as the
  unwhitened level is). A level measured on rows the covariance was fitted on is an in-sample
  figure: where the held-out rows differ from the fitted ones (the real DAVIDE node's residuals
  there are 76 x the fitted rows') they dominate such a covariance, score low against it, and every
  later normal row sits far above the level (docs/results.md, "Whitened residuals").
  One forward pass after training, two [M, M] sums per node (all rows; held-out rows) and two
  scalars, in blocks of rows on the training device. Without held-out rows, all rows stand in for
  both.
- ZCA whitening (the symmetric inverse square root) keeps each whitened component tied to its
  metric, so per-metric errors still say which metrics an alarm is about: a metric's whitened error
  is what of its residual the residuals it usually moves with do not account for.

Per node, one node at a time for the sums (float32 products per block of rows, float64 sums of
them): a node's whitening does not depend on the nodes it shares a chunk with (the forward pass is
the batched one scoring uses).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcad.model.autoencoder import AutoencoderSpec, ensemble_recon, stack
from hpcad.numerics import fixed_order_mm, one_thread
from hpcad.preprocess import fit_rows

ROW_BLOCK = 1024  # rows per forward pass and per partial sum (a block of 64 nodes x 160 metrics: 42 MB)
GROUP = 64  # nodes whose [M, M] sums are held at once (2 x GROUP x M^2 float64: 26 MB at M = 160)
EIGEN_FLOOR = 1e-6  # smallest eigenvalue kept, as a share of the mean variance
# 2: covariance of the fitted rows, level on the held-out rows (2026-12-05). 1 (files without a version):
# covariance of all training rows, level in sample: scored only to follow thresholds fitted on it
# (hpcad.score); training retrains such models, and a choice made afresh scores them unwhitened
VERSION = 2


@dataclass(frozen=True)
class Whitening:
    """A node's residual whitening: ``error = (r @ matrix) ** 2`` per metric for a residual row r."""

    matrix: np.ndarray  # [M, M] float32, symmetric: sqrt(mean variance) x covariance^(-1/2)
    level: float  # mean whitened row signal (sum over metrics) on the held-out rows (not in the covariance)
    holdout_error: np.ndarray  # [M] float32: mean whitened error per metric on the same rows
    shrinkage: float  # the Ledoit-Wolf shrinkage used (0: the sample covariance; 1: a scaled identity)
    version: int = VERSION  # how it was fitted (:data:`VERSION`)

    @property
    def current(self) -> bool:
        """Fitted as this hpcad fits it (an earlier version's level was measured in sample)."""
        return self.version == VERSION

    def to_dict(self) -> dict:
        return {"matrix": torch.from_numpy(np.ascontiguousarray(self.matrix, dtype=np.float32)),
                "version": int(self.version), "level": float(self.level), "shrinkage": float(self.shrinkage),
                "holdout_error": torch.from_numpy(np.asarray(self.holdout_error, dtype=np.float32))}

    @classmethod
    def from_dict(cls, d: dict) -> "Whitening":
        return cls(d["matrix"].numpy().astype(np.float32), float(d["level"]),
                   d["holdout_error"].numpy().astype(np.float32), float(d["shrinkage"]), int(d.get("version", 1)))

    @classmethod
    def identity(cls, n_metrics: int, level: float = 1.0) -> "Whitening":
        """No whitening (errors as they are), in this form: for models made without training rows."""
        return cls(np.eye(n_metrics, dtype=np.float32), float(level), np.full(n_metrics, level / max(n_metrics, 1),
                                                                               dtype=np.float32), 1.0)


def held_out_from(n_rows: int, validation_split: float) -> int:
    """Where a node's held-out training rows start, as training holds them out (0: none are held
    out, all rows stand in for them)."""
    n_tr = fit_rows(n_rows, validation_split)
    return n_tr if n_tr < n_rows else 0


def fit_whitening(spec: AutoencoderSpec, members: list[list[list[torch.Tensor]]], zs: list[np.ndarray],
                  hold_from: list[int], n_metrics: int, device: torch.device | str = "cpu") -> list[Whitening]:
    """The whitening of each node (``members[k]``: its members' parameters; ``zs[k]``: its
    standardised training inputs, windows where ``spec.window`` > 1; its rows from ``hold_from[k]``
    on are the held-out ones: :func:`held_out_from`)."""
    out: list[Whitening] = []
    for g in range(0, len(zs), GROUP):
        out += _fit_group(spec, members[g:g + GROUP], zs[g:g + GROUP], hold_from[g:g + GROUP], n_metrics, device)
    return out


def _fit_group(spec, members, zs, hold_from, M, device) -> list[Whitening]:
    G, R, n_enc = len(zs), spec.members, len(spec.hidden)
    params = stack([p for m in members for p in m], device)
    T, D = max(len(z) for z in zs), zs[0].shape[1]
    dev = params[0].device
    S = torch.zeros(G, M, M, dtype=torch.float64, device=dev)  # all rows
    H = torch.zeros_like(S)  # held-out rows
    fourth = torch.zeros(G, dtype=torch.float64, device=dev)  # sum of |r|^4 (Ledoit-Wolf's estimate)
    fourth_held = torch.zeros_like(fourth)
    ends = torch.tensor([len(z) for z in zs], device=dev)[:, None, None]  # each node's rows end here
    starts = torch.tensor(hold_from, device=dev)[:, None, None]  # ... and its held-out ones start here
    with torch.no_grad():
        for s in range(0, T, ROW_BLOCK):
            n = min(ROW_BLOCK, T - s)
            x = torch.zeros(G, n, D, device=dev)
            for k, z in enumerate(zs):
                part = z[s:s + n]
                x[k, :len(part)] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).to(dev)
            recon, _ = ensemble_recon(params, x, n_enc, R, M)
            row = torch.arange(s, s + n, device=dev)[None, :, None]
            r = (recon - x[..., D - M:]) * (row < ends)  # a shorter node's padding rows: out of its sums
            held = r * (row >= starts)
            # float32 products per block, float64 sums over the blocks; the same bits whatever the
            # threads and whichever nodes share the group (tested)
            S += fixed_order_mm(r.transpose(1, 2), r)
            H += fixed_order_mm(held.transpose(1, 2), held)
            for k, z in enumerate(zs):
                rows = max(0, min(n, len(z) - s))
                if rows == 0:
                    continue
                rk = r[k, :rows]
                fourth[k] += rk.double().square().sum(1).square().sum()
                h0 = max(hold_from[k] - s, 0)
                if h0 < rows:
                    fourth_held[k] += rk[h0:].double().square().sum(1).square().sum()
    out = []
    with one_thread():  # the eigendecomposition and the M x M products too
        for k, z in enumerate(zs):
            n, n_hold = len(z), len(z) - hold_from[k]
            if hold_from[k] > 0:  # the rows the model was fitted on: all rows less the held-out ones
                n_fit, fitted, fourth_fitted = n - n_hold, S[k] - H[k], fourth[k] - fourth_held[k]
            else:  # without held-out rows, all rows stand in for both
                n_fit, fitted, fourth_fitted = n, S[k], fourth[k]
            W, shrink = _zca(fitted / n_fit, float(fourth_fitted) / n_fit, n_fit, M)
            held = torch.diagonal(W.T @ (H[k] / n_hold) @ W)
            out.append(Whitening(W.float().cpu().numpy(), max(float(held.sum()), 1e-12),
                                 held.float().cpu().numpy(), shrink))
    return out


def ledoit_wolf(cov: torch.Tensor, fourth_mean: float, n: int) -> tuple[torch.Tensor, float]:
    """The Ledoit-Wolf shrinkage of a sample second-moment matrix ``cov`` [M, M] (rows not centred:
    residuals are errors about zero) of ``n`` rows whose squared norms' squares average
    ``fourth_mean``: ``((1 - s) cov + s mu I, s)``, mu the mean variance (scikit-learn's formula)."""
    M = cov.shape[0]
    mu = float(torch.trace(cov)) / M
    fro2 = float(cov.square().sum())
    delta = (fro2 - M * mu * mu) / M  # distance of cov from mu I
    beta = min((fourth_mean - fro2) / (M * n), delta)
    s = 0.0 if beta <= 0 or delta <= 0 else min(beta / delta, 1.0)
    eye = torch.eye(M, dtype=cov.dtype, device=cov.device)
    return (1 - s) * cov + s * mu * eye, s


def _zca(cov: torch.Tensor, fourth_mean: float, n: int, M: int) -> tuple[torch.Tensor, float]:
    """``sqrt(mu) C^(-1/2)`` for the shrunk covariance C (eigenvalues floored at EIGEN_FLOOR x mu);
    the identity where the residuals are all zero."""
    mu = float(torch.trace(cov)) / M
    if not mu > 0:
        return torch.eye(M, dtype=cov.dtype, device=cov.device), 1.0
    C, s = ledoit_wolf(cov, fourth_mean, n)
    lam, V = torch.linalg.eigh(C)
    lam = lam.clamp(min=EIGEN_FLOOR * mu)
    return (V * (mu / lam).sqrt()) @ V.T, s


def whitened_errors(r: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Squared whitened residuals [K, T, M] of residuals ``r`` [K, T, M] by ``matrices`` [K, M, M]."""
    return torch.bmm(r, matrices).square_()


def stacked(whitenings: list[Whitening], device: torch.device | str) -> torch.Tensor:
    """The nodes' matrices as one [K, M, M] float32 tensor on ``device``."""
    return torch.from_numpy(np.stack([w.matrix for w in whitenings])).to(device)
