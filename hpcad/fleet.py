"""``model.scope=fleet``: one autoencoder over every monitored node's data, with DistributedDataParallel.

Each rank feeds the standardised training rows of its share of the nodes (each node keeps its own
standardisation); gradients are averaged across ranks by DDP (gloo on CPU, NCCL on CUDA). Every
rank runs the same number of steps per epoch (the largest shard's; smaller shards cycle their rows),
validation loss is the all-reduced mean over every node's held-out rows, and early stopping acts on
that, so all ranks stop together. The shared weights are written into each node's model file beside
that node's standardisation, so scoring, thresholds and reports work unchanged.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as tdist

from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
from hpcad.model.files import NodeModel, model_path
from hpcad.preprocess import fit_rows

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)


class DenseAutoencoder(torch.nn.Module):
    """The same network as one member of the batched ensemble, as a plain module (for DDP)."""

    def __init__(self, spec: AutoencoderSpec, n_metrics: int, seed: int):
        super().__init__()
        init = glorot_init(spec, n_metrics, seed)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in init])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.weights) // 2
        for i in range(n):
            x = torch.addmm(self.weights[2 * i + 1], x, self.weights[2 * i])
            if i < n - 1:
                x = torch.relu(x)
        return x


def _allreduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if tdist.is_initialized():
        tdist.all_reduce(t, op=op or tdist.ReduceOp.SUM)
    return t


def train_fleet(cfg: HpcadConfig, store, models_dir, nodes: list[str], device: torch.device, rank: int = 0) -> dict:
    from hpcad.train import model_spec, prepare_training_rows

    spec = model_spec(cfg)
    tc = cfg.train
    M = len(store.metrics)
    prepared = {n: prepare_training_rows(store, n, cfg) for n in nodes}
    tr, va = [], []
    for n, (z, _) in prepared.items():
        cut = fit_rows(len(z), tc.validation_split)
        tr.append(z[:cut])
        va.append(z[cut:])
    Xtr = torch.from_numpy(np.concatenate(tr) if tr else np.zeros((0, M), np.float32)).to(device)
    Xva = torch.from_numpy(np.concatenate(va) if va else np.zeros((0, M), np.float32)).to(device)
    model = DenseAutoencoder(spec, M, tc.seed).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if tdist.is_initialized() else model
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, eps=1e-7)
    B = int(tc.batch_size)
    steps = _allreduce(torch.tensor([math.ceil(len(Xtr) / B)], device=device), tdist.ReduceOp.MAX
                       if tdist.is_initialized() else None).item()
    gen = torch.Generator().manual_seed(int(tc.seed) * 1000 + rank)
    best, best_loss, wait, history = None, float("inf"), 0, {"loss": [], "val_loss": []}
    for epoch in range(int(tc.epochs)):
        perm = torch.randperm(max(len(Xtr), 1), generator=gen).to(device)
        total = torch.zeros(2, device=device)
        for s in range(int(steps)):
            if len(Xtr):
                xb = Xtr[perm[(s * B + torch.arange(B, device=device)) % len(Xtr)]]
                loss = ((net(xb) - xb) ** 2).mean()
            else:  # a rank without rows still takes part in every gradient all-reduce
                xb = torch.zeros(1, M, device=device)
                loss = ((net(xb) - xb) ** 2).mean() * 0.0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total[0] += loss.detach() * len(xb)  # no host-made tensor per step
            total[1] += len(xb)
        with torch.no_grad():
            v = torch.stack([((model(Xva) - Xva) ** 2).mean(1).sum() if len(Xva) else torch.zeros((), device=device),
                             torch.tensor(float(len(Xva)), device=device)])
            v, total = _allreduce(v), _allreduce(total)
        val = float(v[0] / v[1]) if v[1] > 0 else float(total[0] / total[1])
        history["loss"].append(float(total[0] / total[1].clamp(min=1)))
        history["val_loss"].append(val)
        if val < best_loss:
            best, best_loss, wait = [p.detach().clone() for p in model.weights], val, 0
        else:
            wait += 1
            if wait >= int(tc.patience):
                break
    if tc.restore_best and best is not None:
        with torch.no_grad():
            for p, b in zip(model.weights, best):
                p.copy_(b)
    params = [p.detach().cpu().clone() for p in model.weights]
    history.update(best_epoch=int(np.argmin(history["val_loss"])) + 1, epochs_run=len(history["loss"]),
                   stopped_early=len(history["loss"]) < int(tc.epochs), scope="fleet")
    with torch.no_grad():
        for (n, (z, scaler)), zv in zip(prepared.items(), va):
            x = torch.from_numpy(zv if len(zv) else z).to(device)
            scale = float(((model(x) - x) ** 2).sum(1).mean()) if len(x) else 1.0
            NodeModel(n, spec, store.metrics, [params], scaler, dict(history), max(scale, 1e-12)).save(
                model_path(models_dir, n))
    log.info("fleet model: %d epochs, best validation loss %.4g; %d node files", history["epochs_run"],
             best_loss, len(prepared))
    return {"nodes": len(nodes), "scope": "fleet", "epochs_run": history["epochs_run"], "best_val_loss": best_loss}
