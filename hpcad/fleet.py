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

Memory: a rank holds its share's training rows in host memory once (filled node by node, within
``compute.memory_budget_mb``: a share that does not fit is refused as soon as that is clear, naming
what to change). On a GPU the rows move to the device when they fit ``compute.device_memory_mb``;
otherwise they stay on the host and each epoch's minibatches are gathered there a segment of steps
at a time and uploaded through two pinned buffers (the same batches, so the same model). Validation
runs in blocks of ``VAL_ROWS`` rows, whichever way.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as tdist

from hpcad import dist
from hpcad.device import Staging
from hpcad.errors import HpcadError, TooFewTrainingRows
from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
from hpcad.model.budget import Budget
from hpcad.model.files import NodeModel, model_path, untrained_for, untrained_path, write_untrained
from hpcad.model.whiten import fit_whitening
from hpcad.preprocess import fit_rows
from hpcad.signal_choice import fixed_scales, fixed_whiten

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)
VAL_ROWS = 1 << 16  # rows per validation forward pass: its activations stay small whatever the share
SEGMENT_BYTES = 256 * 2**20  # rows gathered and uploaded at once when the share stays in host memory


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
    node of the store and its data (it trains on all of them) and the rank count (it shapes the shards)."""
    import hashlib

    from hpcad.data.exclusions import read_exclusions
    from hpcad.train import node_fingerprint, training_fingerprint

    base = training_fingerprint(cfg, spec, store)
    ex = read_exclusions(cfg.split.exclude, cfg.data)
    text = "\n".join(["fleet", base, str(world_size), *(node_fingerprint(base, store, n, ex) for n in store.nodes)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _epoch_order(n: int, seed: int, rank: int, epoch: int) -> torch.Tensor:
    """This rank's shuffle of its rows for one epoch: a function of (seed, rank, epoch) alone."""
    state = np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(2, np.uint32)
    return torch.randperm(max(n, 1), generator=torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))


def _already_trained(models_dir, nodes: list[str], store, fingerprint: str, scales: bool,
                     skip_bad: bool, whiten: bool = False) -> dict | None:
    """The fleet model's summary when every rank's nodes hold it already, or were left untrained by
    it (``data.on_bad_node=skip``); decided by all ranks together."""
    from hpcad.train import reusable

    left = [n for n in nodes if skip_bad and untrained_for(models_dir, n, fingerprint)]
    missing = sum(not reusable(model_path(models_dir, n), fingerprint, scales, whiten) for n in nodes if n not in left)
    counts = dist.all_sum(np.array([missing, len(nodes) - len(left)]))
    if counts[0] > 0 or counts[1] == 0:
        return None
    first = next((n for n in store.nodes if model_path(models_dir, n).exists()), None)
    if first is None:  # this rank's nodes were all left untrained: another rank's file holds the history
        return {"nodes": len(nodes), "scope": "fleet", "trained_now": 0, "untrained": len(left)}
    history = NodeModel.load(model_path(models_dir, first)).history
    log.info("fleet model already trained from the same data and settings in %s: not trained again", models_dir)
    return {"nodes": len(nodes), "scope": "fleet", "epochs_run": history["epochs_run"],
            "best_val_loss": float(min(history["val_loss"])), "trained_now": 0, "untrained": len(left)}


class _Share:
    """A rank's nodes' standardised rows for the fleet model, in host memory once: the training rows
    of every node one after the other (``train``), their held-out validation rows (``val``), and
    where each node's rows are (its scaler beside them, for its model file). With
    ``data.on_bad_node=skip`` a node with too few training rows is left out and recorded as the
    per-node scope records it (``models/<node>.untrained.json``)."""

    def __init__(self, store, nodes: list[str], cfg: HpcadConfig, host_bytes: int, budget_source: str,
                 models_dir: Path, fingerprint: str):
        from hpcad.data.exclusions import read_exclusions
        from hpcad.train import prepare_training_rows

        excluded = read_exclusions(cfg.split.exclude, cfg.data)
        M, parts, used = len(store.metrics), [], 0
        self.untrained: list[str] = []
        for i, n in enumerate(nodes):
            try:
                z, scaler = prepare_training_rows(store, n, cfg, excluded=excluded)
            except TooFewTrainingRows as exc:
                if cfg.data.on_bad_node != "skip":
                    raise
                write_untrained(models_dir, n, exc.short, fingerprint)
                self.untrained.append(n)
                log.warning("node %s: %s: left out of the fleet model and untrained (data.on_bad_node=skip), "
                            "not scored", n, exc.short)
                continue
            parts.append((n, z, scaler, fit_rows(len(z), cfg.train.validation_split)))
            used += z.nbytes + 8 * parts[-1][3]  # the rows, and the epoch shuffle's index of the fitted ones
            if used > host_bytes:
                so_far = f" ({used / 2**20:,.1f} MB after {i + 1} of them)" if i + 1 < len(nodes) else ""
                raise HpcadError(
                    f"model.scope=fleet: this rank's {len(nodes)} nodes need about "
                    f"{used / (i + 1) * len(nodes) / 2**20:,.1f} MB of training rows in host memory{so_far}, "
                    f"more than its budget ({budget_source}): run on more ranks (srun -n, each takes a share of the "
                    f"nodes), set compute.memory_budget_mb higher where the memory is there, or use "
                    f"model.scope=node (one model per node, trained in chunks that fit)")
        n_tr = sum(cut for *_, cut in parts)
        n_va = sum(len(z) - cut for _, z, _, cut in parts)
        self.train = np.empty((n_tr, M), np.float32)  # filled node by node: each node's rows are let go once copied
        self.val = np.empty((n_va, M), np.float32)
        self.nodes: list[tuple[str, object, slice, slice]] = []  # node, scaler, its training and validation rows
        a = b = 0
        for k, (n, z, scaler, cut) in enumerate(parts):
            self.train[a:a + cut], self.val[b:b + len(z) - cut] = z[:cut], z[cut:]
            self.nodes.append((n, scaler, slice(a, a + cut), slice(b, b + len(z) - cut)))
            a, b = a + cut, b + len(z) - cut
            parts[k] = None  # type: ignore[call-overload]
        self.nbytes = self.train.nbytes + self.val.nbytes


def _device_bytes(n_train: int, n_val: int, n_metrics: int, spec: AutoencoderSpec, batch: int) -> int:
    """Device memory the fleet model takes with its rows on the device: the rows, the epoch's shuffle
    (int64, and its batch index), weights with Adam's state, and the activations of a step and of a
    validation block."""
    widths = sum(spec.widths(n_metrics))
    return (4 * n_metrics * (n_train + n_val) + 16 * n_train + 4 * spec.n_params(n_metrics) * 5
            + 4 * widths * (4 * batch + 2 * VAL_ROWS))


class _Feed:
    """An epoch's minibatches ``X[perm[(s * B + j) % n]]``, j < B, for its steps s. From rows on the
    device, or from rows in host memory: gathered there a segment of ``segment_steps`` steps at a
    time into one of two staging buffers (``hpcad.device.Staging``) and uploaded while the device
    runs the segment before. The same batches either way."""

    def __init__(self, X: np.ndarray, device: torch.device, batch: int, on_device: bool, segment_steps: int):
        self.n, self.B, self.device = len(X), batch, device
        self.host = torch.from_numpy(X)
        self.X = self.host.to(device) if on_device else None
        self.S = max(1, segment_steps)
        self.stage: Staging | None = None  # made at the first segment

    def batches(self, perm: torch.Tensor, steps: int):
        B, n = self.B, self.n
        if self.X is not None:
            p, ar = perm.to(self.device), torch.arange(B, device=self.device)
            for s in range(steps):
                yield self.X[p[(s * B + ar) % n]]
            return
        if self.stage is None:
            self.stage = Staging((self.S * B, self.host.shape[1]), self.device)
        for s0 in range(0, steps, self.S):
            m = min(self.S, steps - s0)
            buf = self.stage.take()[: m * B]
            torch.index_select(self.host, 0, perm[(s0 * B + torch.arange(m * B)) % n], out=buf)
            seg = buf.to(self.device, non_blocking=True)
            self.stage.sent()
            for j in range(m):
                yield seg[j * B:(j + 1) * B]


def _validation(model, X: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over ``X``'s rows of the mean squared reconstruction error, a block of rows at a time
    (``X`` on the device or in host memory)."""
    total = torch.zeros((), device=device)
    for a in range(0, len(X), VAL_ROWS):
        x = X[a:a + VAL_ROWS].to(device)
        total += ((model(x) - x) ** 2).mean(1).sum()
    return total


def _gather_share(store, nodes: list[str], cfg: HpcadConfig, budget: Budget, models_dir: Path,
                  fingerprint: str) -> _Share:
    """This rank's :class:`_Share`, decided by all ranks together: where one rank cannot hold its
    share (or a node of it is bad input), every rank stops with that rank's reason, instead of the
    others failing at the first all-reduce with a connection error (gloo) or waiting there (NCCL)."""
    try:
        share, failed = _Share(store, nodes, cfg, budget.host_bytes, budget.source, models_dir, fingerprint), None
    except HpcadError as exc:
        share, failed = None, exc
    dist.share_outcome(failed)
    return share


def train_fleet(cfg: HpcadConfig, store, models_dir, nodes: list[str], device: torch.device, rank: int = 0) -> dict:
    from hpcad.model.checkpoint import ChunkCheckpoint, remove_checkpoints
    from hpcad.train import model_spec

    spec = model_spec(cfg)
    tc = cfg.train
    M = len(store.metrics)
    world_size = tdist.get_world_size() if tdist.is_initialized() else 1
    fingerprint = fleet_fingerprint(cfg, spec, store, world_size)
    done = _already_trained(models_dir, nodes, store, fingerprint,
                            fixed_scales(cfg.signal.metric_scales) is not False, cfg.data.on_bad_node == "skip",
                            fixed_whiten(cfg.signal.whiten) is not False)
    if done is not None:
        return done
    ckpt = ChunkCheckpoint(models_dir, fingerprint, list(store.nodes), 1, cfg.compute.checkpoint_every_s,
                           what="the fleet model")
    budget = Budget.resolve(cfg.compute, device)
    share = _gather_share(store, nodes, cfg, budget, Path(models_dir), fingerprint)
    if dist.all_sum(np.array([len(share.nodes)]))[0] == 0:  # every node left untrained (skip): nothing to fit
        log.warning("fleet model: no node has enough training rows; nothing trained")
        return {"nodes": len(nodes), "scope": "fleet", "trained_now": 0, "untrained": len(share.untrained)}
    B = int(tc.batch_size)
    need = _device_bytes(len(share.train), len(share.val), M, spec, B)
    on_device = budget.device_bytes is None or need <= budget.device_bytes
    feed = _Feed(share.train, device, B, on_device, SEGMENT_BYTES // (4 * B * M))
    Xva = torch.from_numpy(share.val).to(device) if on_device else torch.from_numpy(share.val)
    log.info("fleet model on rank %d: %d nodes, %.1f MB of rows, %s (budget: %s)", rank, len(nodes),
             share.nbytes / 2**20, f"on {device}" if on_device else
             f"in host memory, uploaded {feed.S} steps at a time ({need / 2**20:,.0f} MB would not fit on {device})",
             budget.source)
    model = DenseAutoencoder(spec, M, tc.seed).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if tdist.is_initialized() else model
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, eps=1e-7)
    steps = _allreduce(torch.tensor([math.ceil(feed.n / B)], device=device), tdist.ReduceOp.MAX
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
        total = torch.zeros(2, device=device)
        batches = feed.batches(_epoch_order(feed.n, tc.seed, rank, epoch), int(steps)) if feed.n else None
        for s in range(int(steps)):
            if batches is not None:
                xb = next(batches)
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
            v = torch.stack([_validation(model, Xva, device), torch.tensor(float(len(Xva)), device=device)])
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
        for n, scaler, tr, va in share.nodes:
            rows = share.val[va] if va.stop > va.start else share.train[tr]  # held-out rows; all, if none
            x = torch.from_numpy(rows).to(device)
            sq = (model(x) - x) ** 2
            scale = float(sq.sum(1).mean()) if len(x) else 1.0
            held = sq.mean(0, dtype=torch.float64).cpu().numpy().astype(np.float32) if len(x) else None
            z = np.concatenate([share.train[tr], share.val[va]])  # its training rows, the held-out ones last
            whitening = fit_whitening(spec, [[params]], [z], [tr.stop - tr.start if va.stop > va.start else 0], M,
                                      device)[0]
            NodeModel(n, spec, store.metrics, [params], scaler, dict(history), max(scale, 1e-12), fingerprint,
                      held, whitening=whitening).save(model_path(models_dir, n))
            untrained_path(models_dir, n).unlink(missing_ok=True)  # enough rows now
    dist.barrier("for the other ranks to write their node files")  # before the checkpoint goes
    if rank == 0:
        remove_checkpoints(models_dir)  # this training's, and any of another rank count
    log.info("fleet model: %d epochs, best validation loss %.4g; %d node files", history["epochs_run"],
             best_loss, len(share.nodes))
    return {"nodes": len(nodes), "scope": "fleet", "epochs_run": history["epochs_run"], "best_val_loss": best_loss,
            "trained_now": len(share.nodes), "untrained": len(share.untrained)}


def _to_cpu(obj):
    """An optimiser state dict with its tensors on the host (a checkpoint reads back on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
