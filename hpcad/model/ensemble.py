"""Train a shard of per-node autoencoders as one batched ensemble, with per-model semantics.

Each model keeps what it would have if trained alone (Keras ``fit`` semantics, as in the lecture):
its own rows, validation split (the last share of its training rows), shuffling stream, batches of
``batch_size`` (a short last batch), Adam state and step count, early stopping with patience and
restore-best. A model whose epoch has ended, or that stopped early, receives no update while the
others go on. Shuffling keys come from a counter-based hash of (node seed, epoch, row), so a node's
model does not depend on which other nodes share its chunk.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from hpcad.device import precision_context
from hpcad.model.autoencoder import AutoencoderSpec, forward, glorot_init, stack, unstack

log = logging.getLogger(__name__)
BETA1, BETA2, EPS = 0.9, 0.999, 1e-7  # Keras Adam defaults
_MASK63 = (1 << 63) - 1


def node_seed(seed: int, node: str) -> int:
    return (zlib.crc32(node.encode()) ^ (int(seed) * 0x9E3779B1)) & 0x7FFFFFFF


def _shuffle_keys(seeds: torch.Tensor, epoch: int, n: int) -> torch.Tensor:
    """Deterministic pseudo-random int64 keys [K, n] (a splitmix64-style mix, device independent)."""
    x = seeds[:, None] * 0x632BE59BD9B4E019 + (epoch + 1) * 0x1B873593 + torch.arange(n, device=seeds.device)[None, :]
    for mul, shift in ((0x3C79AC492BA7B653, 33), (0x1C69B3F74AC4AE35, 29)):
        x = x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))
        x = x * mul
    return x & _MASK63


@dataclass
class TrainResult:
    params: list[list[torch.Tensor]]  # per model, [W0, b0, ...] on CPU
    history: list[dict]
    holdout_signal: list[float]  # mean alarm signal on each model's held-out validation rows


def train_ensemble(spec: AutoencoderSpec, data: list[np.ndarray], seeds: list[int], cfg,
                   device: torch.device, progress=None) -> TrainResult:
    """Train one model per entry of ``data`` (standardised training rows [n_k, M]) together."""
    K = len(data)
    M = data[0].shape[1]
    B = int(cfg.batch_size)
    n = torch.tensor([d.shape[0] for d in data], device=device)
    n_tr = torch.ceil(n.double() * (1.0 - float(cfg.validation_split))).long()
    n_tr = torch.clamp(n_tr, min=torch.ones_like(n), max=n) if K else n_tr
    n_va = n - n_tr
    Nmax = int(n.max())
    X = torch.zeros(K, Nmax, M, device=device)
    for k, d in enumerate(data):
        X[k, : d.shape[0]] = torch.from_numpy(np.ascontiguousarray(d)).to(device)
    X_rows = X.view(K * Nmax, M)
    row_base = (torch.arange(K, device=device) * Nmax)[:, None]
    seeds_t = torch.tensor(seeds, dtype=torch.int64, device=device)
    n_encoder = len(spec.hidden)
    # All of a model's weights live in one row of a flat [K, P] buffer: the optimiser and the
    # early-stopping bookkeeping are then a handful of whole-buffer operations per step.
    stacked = stack([glorot_init(spec, M, s) for s in seeds], device)
    shapes = [tuple(p.shape[1:]) for p in stacked]
    flat = torch.cat([p.reshape(K, -1) for p in stacked], 1)
    offsets = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])

    def views(t: torch.Tensor) -> list[torch.Tensor]:
        return [t[:, a:b].view(K, *sh) for a, b, sh in zip(offsets[:-1], offsets[1:], shapes)]

    params = views(flat)  # views sharing the flat buffer's storage
    g_flat = torch.zeros_like(flat)
    g_views = views(g_flat)
    m_state = torch.zeros_like(flat)
    v_state = torch.zeros_like(flat)
    tmp = torch.empty_like(flat)
    step_t = torch.zeros(K, device=device)
    best = flat.detach().clone()
    best_loss = torch.full((K,), float("inf"), device=device)
    wait = torch.zeros(K, dtype=torch.long, device=device)
    running = torch.ones(K, dtype=torch.bool, device=device)
    steps_per_epoch = torch.ceil(n_tr.double() / B).long()
    hist_loss: list[list[float]] = [[] for _ in range(K)]
    hist_val: list[list[float]] = [[] for _ in range(K)]
    stopped_epoch = [int(cfg.epochs)] * K
    ar_B = torch.arange(B, device=device)
    row_idx = torch.arange(Nmax, device=device)[None, :]
    lr = float(cfg.lr)
    l1 = float(spec.code_l1)

    amp = precision_context(getattr(cfg, "precision", "fp32"), device)
    cdt = torch.bfloat16 if getattr(cfg, "precision", "fp32") == "bf16" else torch.float32

    def per_row_loss(x: torch.Tensor) -> torch.Tensor:
        with amp:
            recon, code = forward(params, x, n_encoder)
        return _row_loss(recon.float() - x, code.float(), l1)

    for epoch in range(int(cfg.epochs)):
        if not bool(running.any()):
            break
        keys = _shuffle_keys(seeds_t, epoch, Nmax)
        keys = torch.where(row_idx < n_tr[:, None], keys, torch.full_like(keys, _MASK63))
        perm = torch.argsort(keys, dim=1)
        S = int(steps_per_epoch[running].max())
        loss_sum = torch.zeros(K, device=device)
        for s in range(S):
            pos = s * B + ar_B
            idx = perm[:, s * B: (s + 1) * B]
            if idx.shape[1] < B:  # the padded tail of perm is shorter than a batch
                idx = torch.cat([idx, idx[:, :1].expand(-1, B - idx.shape[1])], 1)
            valid = (pos[None, :] < n_tr[:, None]).float()
            active = running & (s < steps_per_epoch)
            xb = X_rows.index_select(0, (idx + row_base).flatten()).view(K, B, M)
            count = valid.sum(1).clamp(min=1)
            with torch.no_grad():
                a = active.float()
                row_loss = _grads_into(params, g_views, xb, valid * (a / count)[:, None], n_encoder, l1, cdt)
                model_loss = (row_loss * valid).sum(1) / count
                loss_sum += model_loss.detach() * valid.sum(1) * a
                step_t += a
                bc1 = 1 - BETA1 ** step_t.clamp(min=1)
                bc2 = 1 - BETA2 ** step_t.clamp(min=1)
                lr_t = (a * lr * torch.sqrt(bc2) / bc1)[:, None]  # 0 for models that sit this step out
                a = a[:, None]
                # Adam on the whole buffer, in place (memory-bound: no temporaries per step);
                # moments and weights stay unchanged where a == 0.
                m_state.lerp_(g_flat, (1 - BETA1) * a)
                torch.mul(g_flat, g_flat, out=tmp)
                v_state.lerp_(tmp, (1 - BETA2) * a)
                torch.sqrt(v_state, out=tmp)
                tmp.add_(EPS)
                torch.div(m_state, tmp, out=tmp)
                tmp.mul_(lr_t)
                flat.sub_(tmp)
        with torch.no_grad():
            train_loss = loss_sum / n_tr.clamp(min=1)
            val_loss = _holdout_loss(per_row_loss, X, n_tr, n, Nmax, device)
            monitored = torch.where(n_va > 0, val_loss, train_loss)
            improved = running & (monitored < best_loss)
            best_loss = torch.where(improved, monitored, best_loss)
            best.copy_(torch.where(improved[:, None], flat, best))
            wait = torch.where(improved, torch.zeros_like(wait), wait + running.long())
            newly_stopped = running & (wait >= int(cfg.patience))
            tl, vl = train_loss.tolist(), val_loss.tolist()
            for k in torch.nonzero(running).flatten().tolist():
                hist_loss[k].append(tl[k])
                hist_val[k].append(vl[k] if int(n_va[k]) > 0 else float("nan"))
            for k in torch.nonzero(newly_stopped).flatten().tolist():
                stopped_epoch[k] = epoch + 1
            running &= ~newly_stopped
        if progress is not None:
            progress(epoch + 1, int(running.sum()))
    with torch.no_grad():
        if cfg.restore_best:
            flat.copy_(best)
        params = views(flat)
        holdout = _holdout_signal(params, n_encoder, X, n_tr, n, Nmax, device)
    histories = []
    for k in range(K):
        vals = hist_val[k]
        finite = [v for v in vals if v == v]
        best_epoch = (int(np.argmin(finite)) + 1) if finite else int(np.argmin(hist_loss[k])) + 1
        histories.append({"loss": hist_loss[k], "val_loss": vals, "best_epoch": best_epoch,
                          "epochs_run": len(hist_loss[k]), "stopped_early": stopped_epoch[k] < int(cfg.epochs),
                          "train_rows": int(n_tr[k]), "val_rows": int(n_va[k])})
    return TrainResult([unstack(params, k) for k in range(K)], histories, holdout)


def _holdout_rows(X, n_tr, n, Nmax, device):
    """Validation rows [K, V, M] (padded) and their mask; V = the largest validation part."""
    V = max(int((n - n_tr).max()), 1)
    idx = n_tr[:, None] + torch.arange(V, device=device)[None, :]
    mask = idx < n[:, None]
    idx = torch.where(mask, idx, torch.zeros_like(idx)).clamp(max=Nmax - 1)
    return torch.gather(X, 1, idx[..., None].expand(-1, -1, X.shape[2])), mask.float()


def _holdout_loss(per_row_loss, X, n_tr, n, Nmax, device, block: int = 4096):
    xv, mask = _holdout_rows(X, n_tr, n, Nmax, device)
    total = torch.zeros(X.shape[0], device=device)
    for s in range(0, xv.shape[1], block):
        total += (per_row_loss(xv[:, s:s + block]) * mask[:, s:s + block]).sum(1)
    return total / mask.sum(1).clamp(min=1)


def _holdout_signal(params, n_encoder, X, n_tr, n, Nmax, device) -> list[float]:
    """Mean alarm signal (sum of squared errors) on held-out rows; falls back to training rows."""
    xv, mask = _holdout_rows(X, n_tr, n, Nmax, device)
    recon, _ = forward(params, xv, n_encoder)
    sig = ((recon - xv) ** 2).sum(-1)
    mean_v = (sig * mask).sum(1) / mask.sum(1).clamp(min=1)
    out = []
    for k in range(X.shape[0]):
        if mask[k].sum() > 0:
            out.append(float(mean_v[k]))
        else:
            r, _ = forward([p[k:k + 1] for p in params], X[k:k + 1, : int(n[k])], n_encoder)
            out.append(float(((r - X[k:k + 1, : int(n[k])]) ** 2).sum(-1).mean()))
    return [max(v, 1e-12) for v in out]


def _row_loss(diff: torch.Tensor, code: torch.Tensor, l1: float) -> torch.Tensor:
    """The training objective per row: mean squared reconstruction error (+ L1 on the code)."""
    loss = (diff * diff).mean(-1)
    return loss + l1 * code.abs().sum(-1) if l1 > 0 else loss


def _grads_into(params: list[torch.Tensor], grads: list[torch.Tensor], x: torch.Tensor, w_row: torch.Tensor,
                n_encoder: int, l1: float, cdt: torch.dtype) -> torch.Tensor:
    """Forward and hand-written backward of K dense autoencoders in one pass, gradients written into
    ``grads`` (views of the flat gradient buffer); returns each row's loss [K, B].

    The objective is sum over rows of ``w_row`` x (mean squared error + ``l1`` x |code|_1): the
    same as autograd over ``per_row_loss`` (test_ensemble checks both against a plain loop), without
    building a graph for a few tiny matmuls per step. Matmuls run in ``cdt`` (float32, or bfloat16
    for ``train.precision=bf16``); everything else in float32.
    """
    n_layers = len(params) // 2
    acts, pre = [x], []
    h = x
    for layer in range(n_layers):
        W, b = params[2 * layer], params[2 * layer + 1]
        z = torch.baddbmm(b.unsqueeze(1).to(cdt), h.to(cdt), W.to(cdt)).float()
        pre.append(z)
        h = torch.relu(z) if layer < n_layers - 1 else z
        acts.append(h)
    recon = acts[-1]
    diff = recon - x
    M = x.shape[2]
    row_loss = _row_loss(diff, acts[n_encoder], l1)
    dz = diff * (w_row * (2.0 / M)).unsqueeze(-1)
    for layer in range(n_layers - 1, -1, -1):
        h_in = acts[layer]
        grads[2 * layer].copy_(torch.bmm(h_in.transpose(1, 2).to(cdt), dz.to(cdt)))
        torch.sum(dz, 1, out=grads[2 * layer + 1])
        if layer == 0:
            break
        dh = torch.bmm(dz.to(cdt), params[2 * layer].transpose(1, 2).to(cdt)).float()
        if l1 > 0 and layer == n_encoder:  # the code is the (post-ReLU) output of layer n_encoder - 1
            dh = dh + l1 * torch.sign(acts[layer]) * w_row.unsqueeze(-1)
        dz = dh * (pre[layer - 1] > 0)
    return row_loss


def default_chunk_cap(device: torch.device) -> int:
    """Nodes per chunk when ``train.max_nodes_per_chunk`` is unset: CPU caches favour small chunks
    (the optimiser streams all K models' weights every step), GPUs want as many as fit."""
    return 4096 if device.type == "cuda" else 32


def chunk_size(n_rows: int, n_metrics: int, spec: AutoencoderSpec, budget_mb: int, batch: int, cap: int) -> int:
    """Nodes per batched chunk so that data, parameters, optimiser state and activations fit the budget."""
    p = spec.n_params(n_metrics)
    per_node = 4 * (n_rows * n_metrics * 2 + p * 6 + batch * sum(spec.widths(n_metrics)) * 4 + n_rows * 2)
    return int(max(1, min(cap, (budget_mb * 2**20) // max(per_node, 1))))
