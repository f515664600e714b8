"""Train a shard of per-node autoencoders as one batched ensemble, with per-model semantics.

Each model keeps what it would have if trained alone (the lecture's Keras ``fit`` loop, with Adam
as ``torch.optim.Adam``): its own rows, validation split (the last share of its training rows),
shuffling stream, batches of ``batch_size`` (a short last batch), Adam state and step count, early
stopping with patience and restore-best. A model whose epoch has ended, or that stopped early,
receives no update while the others go on. Shuffling keys come from a counter-based hash of
(node seed, epoch, row), so a node's model does not depend on which other nodes share its chunk.
"""
from __future__ import annotations

import bisect
import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpcad.device import Staging, tf32_context
from hpcad.model.adam import BatchedAdam, alloc, masked_adam, views
from hpcad.model.autoencoder import AutoencoderSpec, forward, glorot_init, stack
from hpcad.model.backprop import Backprop, Workspace, row_loss, sq_err
from hpcad.preprocess import fit_rows

if TYPE_CHECKING:
    from hpcad.config import TrainConfig
    from hpcad.model.checkpoint import ChunkCheckpoint

log = logging.getLogger(__name__)
_MASK63 = (1 << 63) - 1
_COMPACT_SHARE = 0.25  # compact the chunk once this share of its models has stopped early


def node_seed(seed: int, node: str) -> int:
    return (zlib.crc32(node.encode()) ^ (int(seed) * 0x9E3779B1)) & 0x7FFFFFFF


def member_seed(seed: int, member: int) -> int:
    """Seed of a node's ``member``-th autoencoder (member 0 keeps the node's own seed)."""
    if member == 0:
        return seed
    return (zlib.crc32(f"{seed}/{member}".encode()) ^ (int(member) * 0x85EBCA6B)) & 0x7FFFFFFF


def _shuffle_keys(seeds: torch.Tensor, epoch: int, n: int) -> torch.Tensor:
    """Deterministic pseudo-random int64 keys [K, n] (a splitmix64-style mix, device independent)."""
    x = seeds[:, None] * 0x632BE59BD9B4E019 + (epoch + 1) * 0x1B873593 + torch.arange(n, device=seeds.device)[None, :]
    for mul, shift in ((0x3C79AC492BA7B653, 33), (0x1C69B3F74AC4AE35, 29)):
        x = x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))
        x = x * mul
    return x & _MASK63


def input_noise(seeds: torch.Tensor, epoch: int, step: int, shape: tuple[int, int]) -> torch.Tensor:
    """Standard Gaussian noise [K, *shape] for training step ``step`` of ``epoch``: a function of
    each model's seed and the step only (hashed like :func:`_shuffle_keys`, Box-Muller), so a
    model's noise, like its shuffle, does not depend on its chunk companions or the device."""
    n = shape[0] * shape[1]
    keys = _shuffle_keys(seeds * 0x2545F4914F6CDD1D + 0x5851F42D4C957F2D, epoch * 1_000_003 + step, n)
    u1 = (((keys >> 31) & 0xFFFFFFFF).to(torch.float64) + 0.5) / 4294967296.0
    u2 = (keys & 0x7FFFFFFF).to(torch.float64) / 2147483648.0
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return z.to(torch.float32).view(-1, *shape)


@dataclass
class TrainResult:
    params: list[list[torch.Tensor]]  # per model, [W0, b0, ...] on CPU
    history: list[dict]
    holdout_signal: list[float]  # mean alarm signal on each model's held-out validation rows
    holdout_error: list[np.ndarray]  # [M] each model's mean squared error per metric on the same rows


def train_ensemble(spec: AutoencoderSpec, data: list[np.ndarray], seeds: list[int], cfg: TrainConfig,
                   device: torch.device, progress=None, workspace: Workspace | None = None,
                   checkpoint: ChunkCheckpoint | None = None, precision: str = "fp32") -> TrainResult:
    """Train one model per entry of ``data`` (standardised training rows [n_k, M]) together.

    Once a quarter of the chunk's models have stopped early, their results are taken out and the
    rest is compacted, so stopped models stop costing matmuls. ``workspace``: scratch buffers to
    reuse across calls (chunks); a fresh one when omitted. ``checkpoint``: where the chunk's state
    is saved after epochs (when due) and resumed from (hpcad/model/checkpoint.py); a resumed chunk
    ends bit-identical to an uninterrupted one. ``precision`` (``compute.precision``): fp32, tf32
    (CUDA matmuls in TF32) or bf16 (the steps' matmuls in bfloat16)."""
    K = len(data)
    M = data[0].shape[1]
    B = int(cfg.batch_size)
    n = torch.tensor([d.shape[0] for d in data], dtype=torch.long, device=device)
    n_tr = torch.tensor([fit_rows(d.shape[0], cfg.validation_split) for d in data], dtype=torch.long, device=device)
    n_va = n - n_tr
    rows_tr, rows_va = n_tr.tolist(), n_va.tolist()
    Nmax = int(n.max())
    buf = workspace or Workspace()
    X = buf("X", (K, Nmax, M), device)
    _upload(X, data)
    xv, v_mask = _holdout_rows(X, n_tr, n, Nmax, device)  # fixed for the whole run: gathered once
    seeds_t = torch.tensor(seeds, dtype=torch.int64, device=device)
    n_encoder = len(spec.hidden)
    # One tensor per layer parameter ([K, in, out] / [K, out], each model's slice padded to whole
    # 64-byte lines): the matmuls write gradients in place, and the optimiser updates runs of models
    # in one pass that rounds every model's values exactly as an update of that model alone would.
    init = stack([glorot_init(spec, M, s) for s in seeds], device)
    shapes = [tuple(p.shape[1:]) for p in init]
    store = alloc(shapes, K, device)
    for p, p0 in zip(views(store, shapes), init):
        p.copy_(p0)
    del init
    g_store = alloc(shapes, K, device)
    decay = float(getattr(cfg, "weight_decay", 0.0))
    adam = BatchedAdam(store, g_store, float(cfg.lr), masked=masked_adam(device), weight_decay=decay,
                       decayed=tuple(range(0, len(shapes), 2)))  # [W0, b0, W1, b1, ...]: the weights
    best = [t.clone() for t in store]
    best_loss = torch.full((K,), float("inf"), device=device)
    best_signal = torch.full((K,), float("nan"), device=device)
    wait = torch.zeros(K, dtype=torch.long, device=device)
    running = torch.ones(K, dtype=torch.bool, device=device)
    steps_per_epoch = torch.ceil(n_tr.double() / B).long()
    full_steps = n_tr // B  # steps in which a model's batch is full
    orig = list(range(K))  # chunk position of each model still in the buffers
    hist_loss: list[list[float]] = [[] for _ in range(K)]
    hist_val: list[list[float]] = [[] for _ in range(K)]
    stopped_epoch = [int(cfg.epochs)] * K
    out_params: list[list[torch.Tensor]] = [[] for _ in range(K)]
    out_signal = [0.0] * K
    out_error: list[np.ndarray | None] = [None] * K
    ar_B = torch.arange(B, device=device)
    row_idx = torch.arange(Nmax, device=device)[None, :]
    l1 = float(spec.code_l1)
    noise = float(getattr(cfg, "input_noise", 0.0))
    trim = float(getattr(cfg, "trim", 0.0))
    tf32 = tf32_context(precision, device)  # bf16: the step casts its own matmuls
    cdt = torch.bfloat16 if precision == "bf16" else torch.float32

    def finish(idx: list[int]) -> None:
        """Take out the kept weights (best or latest) and signal level of the models at ``idx``."""
        kept = views(best if cfg.restore_best else store, shapes)
        sel = torch.tensor(idx, dtype=torch.long, device=device)
        host = [t.index_select(0, sel).cpu() for t in kept]  # one copy per parameter, not per model
        for j, (k, sig) in enumerate(zip(idx, _holdout_signal(kept, n_encoder, X, n, n_va, best_signal, idx))):
            out_params[orig[k]], out_signal[orig[k]] = [h[j].clone() for h in host], sig
        for k, err in zip(idx, _holdout_metric_errors(kept, n_encoder, X, xv, v_mask, n, n_va, idx)):
            out_error[orig[k]] = err

    def compact_rows(keep: torch.Tensor) -> None:
        """Keep only the data of the models at ``keep`` (buffer positions, ascending)."""
        nonlocal X, xv, v_mask, n, n_tr, n_va, seeds_t, steps_per_epoch, full_steps
        for j, k in enumerate(keep.tolist()):  # in place, front to back (j <= k)
            if j != k:
                X[j].copy_(X[k])
                orig[j] = orig[k]
        del orig[len(keep):]
        X = X[: len(keep)]
        xv, v_mask, n, n_tr, n_va, seeds_t, steps_per_epoch, full_steps = (
            t[keep] for t in (xv, v_mask, n, n_tr, n_va, seeds_t, steps_per_epoch, full_steps))

    start = 0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and (list(state["seeds"]) != list(seeds) or len(state["store"]) != len(shapes)):
        log.warning("%s holds another chunk's models (seeds or layers differ): training the chunk from its first "
                    "epoch", checkpoint.path.name)
        state = None
    if state is not None:
        start = int(state["epoch"])
        keep = torch.tensor(state["orig"], dtype=torch.long, device=device)
        compact_rows(keep)
        store, best, g_store = (alloc(shapes, len(keep), device) for _ in range(3))
        moments = [alloc(shapes, len(keep), device) for _ in range(2)]
        for dst, name in ((store, "store"), (best, "best"), *zip(moments, ("m", "v"))):
            for t, saved in zip(dst, state[name]):
                t.copy_(saved)  # into fresh aligned storage, as the optimiser expects
        adam = BatchedAdam(store, g_store, float(cfg.lr), *moments, state["step_count"].to(device), adam.masked,
                           adam.weight_decay, adam.decayed)
        best_loss, best_signal, wait, running = (state[k].to(device) for k in
                                                 ("best_loss", "best_signal", "wait", "running"))
        hist_loss, hist_val, stopped_epoch = state["hist_loss"], state["hist_val"], state["stopped_epoch"]
        out_params, out_signal = state["out_params"], state["out_signal"]
        out_error = [None if e is None else np.asarray(e) for e in state.get("out_error", [None] * K)]

    def snapshot(next_epoch: int) -> dict:
        """The chunk's whole state after an epoch (on the host), for ``checkpoint``."""
        host = lambda ts: [t.cpu() for t in ts]  # noqa: E731
        return {"epoch": next_epoch, "seeds": list(seeds), "orig": list(orig), "store": host(store),
                "best": host(best), "m": host(adam.m), "v": host(adam.v), "step_count": adam.step_count.cpu(),
                "best_loss": best_loss.cpu(), "best_signal": best_signal.cpu(), "wait": wait.cpu(),
                "running": running.cpu(), "hist_loss": hist_loss, "hist_val": hist_val,
                "stopped_epoch": stopped_epoch, "out_params": out_params, "out_signal": out_signal,
                "out_error": [None if e is None else torch.from_numpy(e) for e in out_error]}

    with tf32:
        for epoch in range(start, int(cfg.epochs)):
            if not bool(running.any()):
                break
            K = len(orig)
            params, g_views = views(store, shapes), views(g_store, shapes)
            X_rows = X.view(K * Nmax, M)
            keys = _shuffle_keys(seeds_t, epoch, Nmax)
            keys = torch.where(row_idx < n_tr[:, None], keys, torch.full_like(keys, _MASK63))
            perm = torch.argsort(keys, dim=1)
            S = int(steps_per_epoch[running].max())
            if S * B > Nmax:  # the padded tail of perm is shorter than the last batch
                perm = torch.cat([perm, perm[:, :1].expand(-1, S * B - Nmax)], 1)
            # This epoch's training rows in each model's shuffled order, gathered in one pass (random
            # rows gathered step by step cost more in cache misses): step s reads rows [s*B, (s+1)*B).
            row_base = (torch.arange(K, device=device) * Nmax)[:, None]
            epoch_x = buf("epoch_x", (K, S * B, M), device)
            torch.index_select(X_rows, 0, (perm[:, : S * B] + row_base).view(-1), out=epoch_x.view(K * S * B, M))
            del perm
            run_f = running.float()[:, None]
            full_w = (run_f / B).expand(K, B)  # every running model has a full batch: weight 1/B per row
            full_until = int(full_steps[running].min())
            running_list = torch.nonzero(running).flatten().tolist()
            running_group = adam.group(running_list)
            # The tail (short last batches, models whose epoch has ended) shrinks the stepping set
            # step by step; known on the host from one copy per epoch, so no step waits on the device.
            spe = steps_per_epoch.tolist()
            by_length = sorted(running_list, key=lambda k: spe[k])
            ends = [spe[k] for k in by_length]
            tail_groups: dict[int, tuple] = {}
            running_f = run_f.squeeze(1)
            loss_rows = torch.zeros(K, B, device=device)  # per-slot sums, reduced once per epoch
            backprop = Backprop(params, g_views, B, n_encoder, l1, cdt, buf, trim)
            full = backprop.weights(full_w)
            for s in range(S):
                xb = epoch_x[:, s * B:(s + 1) * B]
                if s < full_until:
                    weights, counted, active, a = full, run_f, running_group, running_f
                else:  # short last batches, and models whose epoch has ended
                    valid = ((s * B + ar_B)[None, :] < n_tr[:, None]).float()
                    a = (running & (s < steps_per_epoch)).float()
                    weights = backprop.weights(valid * (a / valid.sum(1).clamp(min=1))[:, None])
                    counted = valid * a[:, None]
                    first = bisect.bisect_right(ends, s)  # by_length[first:] still step
                    if first not in tail_groups:
                        tail_groups[first] = adam.group(by_length[first:])
                    active = tail_groups[first]
                with torch.no_grad():
                    x_in = xb + noise * input_noise(seeds_t, epoch, s, (B, M)).to(device) if noise > 0 else None
                    losses = backprop(xb, weights, x_in)
                    loss_rows.addcmul_(losses, counted)
                    adam.step(active, a)
            with torch.no_grad():
                train_loss = loss_rows.sum(1) / n_tr.clamp(min=1)
                val_loss, val_signal = _holdout_eval(params, n_encoder, xv, v_mask, l1)  # fp32 in every mode
                monitored = torch.where(n_va > 0, val_loss, train_loss)
                improved = running & (monitored < best_loss)
                best_loss = torch.where(improved, monitored, best_loss)
                # the validation signal of the weights that will be kept (best, or the latest)
                best_signal = torch.where(improved if cfg.restore_best else running, val_signal, best_signal)
                for b, t in zip(best, store):
                    b.copy_(torch.where(improved[:, None], t, b))
                wait = torch.where(improved, torch.zeros_like(wait), wait + running.long())
                newly_stopped = running & (wait >= int(cfg.patience))
                tl, vl = train_loss.tolist(), val_loss.tolist()
                for k in running_list:
                    hist_loss[orig[k]].append(tl[k])
                    hist_val[orig[k]].append(vl[k] if rows_va[orig[k]] > 0 else float("nan"))
                for k in torch.nonzero(newly_stopped).flatten().tolist():
                    stopped_epoch[orig[k]] = epoch + 1
                running &= ~newly_stopped
                stopped = torch.nonzero(~running).flatten().tolist()
                if stopped and len(stopped) >= _COMPACT_SHARE * K and len(stopped) < K:
                    finish(stopped)
                    keep = torch.nonzero(running).flatten()
                    compact_rows(keep)
                    best_loss, best_signal, wait, running = (t[keep] for t in (best_loss, best_signal, wait, running))
                    store, best = [t[keep] for t in store], [t[keep] for t in best]
                    g_store = alloc(shapes, len(keep), device)
                    adam = adam.select(keep, store, g_store)
            if progress is not None:
                progress(epoch + 1, int(running.sum()))
            if checkpoint is not None and epoch + 1 < int(cfg.epochs) and bool(running.any()) and checkpoint.due():
                checkpoint.save(snapshot(epoch + 1))
        with torch.no_grad():
            finish(list(range(len(orig))))
    histories = []
    for k in range(len(out_params)):
        vals = hist_val[k]
        finite = [v for v in vals if v == v]
        best_epoch = (int(np.argmin(finite)) + 1) if finite else int(np.argmin(hist_loss[k])) + 1
        histories.append({"loss": hist_loss[k], "val_loss": vals, "best_epoch": best_epoch,
                          "epochs_run": len(hist_loss[k]), "stopped_early": stopped_epoch[k] < int(cfg.epochs),
                          "train_rows": rows_tr[k], "val_rows": rows_va[k]})
    return TrainResult(out_params, histories, out_signal, out_error)


def _upload(X: torch.Tensor, data: list[np.ndarray]) -> None:
    """``X[k] = data[k]`` zero-padded. On CUDA through two pinned staging buffers, so that copying
    node k into one overlaps with node k-1's transfer to the device (pageable copies block)."""
    if X.device.type != "cuda":
        for k, d in enumerate(data):
            X[k, : d.shape[0]] = torch.from_numpy(np.ascontiguousarray(d))
            X[k, d.shape[0]:] = 0.0
        return
    _upload_staged(X, data)


def _upload_staged(X: torch.Tensor, data: list[np.ndarray]) -> None:
    """``_upload`` through two staging buffers (any device; pinned, and overlapping, on CUDA)."""
    stage = Staging((max((d.shape[0] for d in data), default=0), X.shape[2]), X.device, X.dtype)
    for k, d in enumerate(data):
        n, buf = d.shape[0], stage.take()
        buf[:n].copy_(torch.from_numpy(np.ascontiguousarray(d)))
        X[k, :n].copy_(buf[:n], non_blocking=True)
        X[k, n:] = 0.0
        stage.sent()
    stage.wait()


VAL_BLOCK = 128  # validation rows per forward pass and per partial sum


def _holdout_rows(X, n_tr, n, Nmax, device):
    """Validation rows [K, V, M] (padded) and their mask. V is the largest validation part
    rounded up to whole blocks, so a model's sums run over the same values in the same order
    whatever the other models' lengths (its losses, and so its early stopping, stay its own)."""
    V = -(-max(int((n - n_tr).max()), 1) // VAL_BLOCK) * VAL_BLOCK
    idx = n_tr[:, None] + torch.arange(V, device=device)[None, :]
    mask = idx < n[:, None]
    idx = torch.where(mask, idx, torch.zeros_like(idx)).clamp(max=Nmax - 1)
    return torch.gather(X, 1, idx[..., None].expand(-1, -1, X.shape[2])), mask.float()


def _holdout_eval(params, n_encoder, xv, mask, l1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's mean loss and mean alarm signal (sum of squared errors) on its validation rows,
    in blocks of rows (temporaries stay small)."""
    loss = torch.zeros(xv.shape[0], device=xv.device)
    signal = torch.zeros_like(loss)
    for s in range(0, xv.shape[1], VAL_BLOCK):
        x, m = xv[:, s:s + VAL_BLOCK], mask[:, s:s + VAL_BLOCK]
        recon, code = forward(params, x, n_encoder)
        sq = sq_err(recon.float().sub_(x))
        signal += (sq * m).sum(1)
        loss += (row_loss(sq, x.shape[-1], code.float(), l1) * m).sum(1)
    count = mask.sum(1).clamp(min=1)
    return loss / count, signal / count


def _holdout_metric_errors(params, n_encoder, X, xv, mask, n, n_va, idx: list[int]) -> list[np.ndarray]:
    """Mean squared error per metric [M] of the kept weights of the models at ``idx`` on their
    held-out rows (their training rows when they have none): the scales of ``signal.metric_scales``
    (hpcad/signals.py). In fp32, blocks of rows, float64 sums."""
    every = idx == list(range(xv.shape[0]))  # the chunk's last models: views, no copies
    sel = torch.tensor(idx, dtype=torch.long, device=X.device)
    p = params if every else [t.index_select(0, sel) for t in params]
    xs, ms = (xv, mask) if every else (xv[sel], mask[sel])  # a subset: the models that stopped early
    total = torch.zeros(len(idx), X.shape[2], dtype=torch.float64, device=X.device)
    for s in range(0, xv.shape[1], VAL_BLOCK):
        x, m = xs[:, s:s + VAL_BLOCK], ms[:, s:s + VAL_BLOCK]
        recon, _ = forward(p, x, n_encoder)
        total += recon.float().sub_(x).square_().mul_(m[..., None]).sum(1, dtype=torch.float64)
    out = (total / ms.sum(1, dtype=torch.float64).clamp(min=1)[:, None]).cpu().numpy()
    rows, rows_va = n.tolist(), n_va.tolist()
    for j, k in enumerate(idx):
        if rows_va[k] == 0:
            x = X[k:k + 1, : rows[k]]
            r, _ = forward([t[k:k + 1] for t in params], x, n_encoder)
            out[j] = (r.float() - x).square().mean(1, dtype=torch.float64)[0].cpu().numpy()
    return list(out.astype(np.float32))


def _holdout_signal(params, n_encoder, X, n, n_va, val_signal, idx: list[int]) -> list[float]:
    """Mean alarm signal of the kept weights of the models at ``idx`` on their held-out rows (from
    the validation pass of the epoch the weights come from); a model without validation rows is
    measured on its training rows."""
    signal, rows, rows_va = val_signal.tolist(), n.tolist(), n_va.tolist()
    out = []
    for k in idx:
        v = signal[k]
        if rows_va[k] == 0 or v != v:
            x = X[k:k + 1, : rows[k]]
            r, _ = forward([p[k:k + 1] for p in params], x, n_encoder)
            v = float(sq_err(r - x).mean())
        out.append(max(v, 1e-12))
    return out
