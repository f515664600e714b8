"""``model.scope=fleet``: one autoencoder over every monitored node's data, with DistributedDataParallel.

Each rank feeds the standardised training rows of its share of the nodes (each node keeps its own
standardisation); gradients are averaged across ranks by DDP (gloo on CPU, NCCL on CUDA). Every
rank runs the same number of steps per epoch (the largest shard's; smaller shards cycle their rows),
validation loss is the all-reduced mean over every node's held-out rows, and early stopping acts on
that, so all ranks stop together. The shared weights are written into each node's model file beside
that node's standardisation, so scoring, thresholds and reports work unchanged.

Reruns: when every node's file holds the fleet model of the same data, settings and rank count
(``fleet_fingerprint``), training is skipped (all ranks decide together). Otherwise rank 0 saves the
training state (weights, Adam state, early-stopping state, history) after an epoch every
``compute.checkpoint_every_s`` seconds, and a rerun with the same rank count goes on from it; each
epoch's shuffle is a function of (seed, rank, epoch), so a resumed run ends as an uninterrupted one.
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


def fleet_fingerprint(cfg: HpcadConfig, spec: AutoencoderSpec, store, world_size: int) -> str:
    """What the fleet model is built from: a node model's inputs (``training_fingerprint``), every
    node of the store (it trains on all of them) and the rank count (it shapes the shards)."""
    import hashlib

    from hpcad.train import training_fingerprint

    text = "\n".join(["fleet", training_fingerprint(cfg, spec, store), str(world_size), *store.nodes])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _epoch_order(n: int, seed: int, rank: int, epoch: int) -> torch.Tensor:
    """This rank's shuffle of its rows for one epoch: a function of (seed, rank, epoch) alone."""
    state = np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(2, np.uint32)
    return torch.randperm(max(n, 1), generator=torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))


def _already_trained(models_dir, nodes: list[str], store, fingerprint: str) -> dict | None:
    """The fleet model's summary when every rank's nodes hold it already (decided by all ranks together)."""
    from hpcad import dist
    from hpcad.train import reusable

    missing = sum(not reusable(model_path(models_dir, n), fingerprint) for n in nodes)
    if dist.all_sum(np.array([missing]))[0] > 0:
        return None
    history = NodeModel.load(model_path(models_dir, store.nodes[0])).history
    log.info("fleet model already trained from the same data and settings in %s: not trained again", models_dir)
    return {"nodes": len(nodes), "scope": "fleet", "epochs_run": history["epochs_run"],
            "best_val_loss": float(min(history["val_loss"])), "trained_now": 0}


def train_fleet(cfg: HpcadConfig, store, models_dir, nodes: list[str], device: torch.device, rank: int = 0) -> dict:
    from hpcad.model.checkpoint import ChunkCheckpoint, remove_checkpoints
    from hpcad.train import model_spec, prepare_training_rows

    spec = model_spec(cfg)
    tc = cfg.train
    M = len(store.metrics)
    world_size = tdist.get_world_size() if tdist.is_initialized() else 1
    fingerprint = fleet_fingerprint(cfg, spec, store, world_size)
    done = _already_trained(models_dir, nodes, store, fingerprint)
    if done is not None:
        return done
    ckpt = ChunkCheckpoint(models_dir, fingerprint, list(store.nodes), 1, cfg.compute.checkpoint_every_s,
                           what="the fleet model")
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
    best, best_loss, wait, history = None, float("inf"), 0, {"loss": [], "val_loss": []}
    start, state = 0, ckpt.load()  # rank 0 saved it; every rank resumes from the same file
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(model.weights, state["weights"]):
                p.copy_(saved)
        opt.load_state_dict(state["adam"])
        best = None if state["best"] is None else [t.to(device) for t in state["best"]]
        best_loss, wait, history, start = float(state["best_loss"]), int(state["wait"]), state["history"], state["epoch"]
    for epoch in range(int(start), int(tc.epochs)):
        perm = _epoch_order(len(Xtr), tc.seed, rank, epoch).to(device)
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
        if rank == 0 and epoch + 1 < int(tc.epochs) and ckpt.due():  # the same on every rank: one file
            ckpt.save({"epoch": epoch + 1, "weights": [p.detach().cpu() for p in model.weights],
                       "adam": _to_cpu(opt.state_dict()), "best": None if best is None else [t.cpu() for t in best],
                       "best_loss": best_loss, "wait": wait, "history": history})
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
            NodeModel(n, spec, store.metrics, [params], scaler, dict(history), max(scale, 1e-12), fingerprint).save(
                model_path(models_dir, n))
    if tdist.is_initialized():
        tdist.barrier()  # every rank's node files are written before the checkpoint goes
    if rank == 0:
        remove_checkpoints(models_dir)  # this training's, and any of another rank count
    log.info("fleet model: %d epochs, best validation loss %.4g; %d node files", history["epochs_run"],
             best_loss, len(prepared))
    return {"nodes": len(nodes), "scope": "fleet", "epochs_run": history["epochs_run"], "best_val_loss": best_loss,
            "trained_now": len(nodes)}


def _to_cpu(obj):
    """An optimiser state dict with its tensors on the host (a checkpoint reads back on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
