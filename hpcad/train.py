"""The train stage: per-node preprocessing, chunking by memory budget, batched training, model files."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpcad.atomic import write_json
from hpcad.config import build
from hpcad.data.exclusions import Exclusions, read_exclusions
from hpcad.data.store import TelemetryStore
from hpcad.device import reset_peak_memory, resolve_device
from hpcad.dist import world
from hpcad.errors import ConfigError, StoreError, TooFewTrainingRows
from hpcad.model.autoencoder import AutoencoderSpec, ensemble_recon, stack
from hpcad.model.whiten import fit_whitening, held_out_from
from hpcad.model.files import NodeModel, model_path, untrained_for, untrained_path, write_untrained
from hpcad.preprocess import (Scaler, check_training_rows, fill_gaps, fit_rows, split_codes, split_identity,
                              training_rows, window_rows, windows)
from hpcad.model.backprop import Workspace
from hpcad.model.budget import Budget, check_compute_config, default_chunk_cap, retry_cap_after_oom
from hpcad.model.checkpoint import ChunkCheckpoint
from hpcad.model.ensemble import member_seed, node_seed, train_ensemble
from hpcad.progress import LOG_EVERY_S, Progress, elapsed_and_left
from hpcad.signal_choice import fixed_scales, fixed_whiten
from hpcad.signals import recorded_holdout

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig, TrainConfig

log = logging.getLogger(__name__)


def prepare_training_rows(store: TelemetryStore, node: str, cfg: HpcadConfig, window: int = 1,
                          excluded: Exclusions | None = None) -> tuple[np.ndarray, Scaler]:
    """Standardised training inputs of one node and the scaler fitted on its training rows. With
    ``window`` > 1, an input is a training row with the window - 1 rows before it (flattened), and
    only windows made of training rows are used. ``excluded``: ``split.exclude`` as read once by the
    caller (its files are listed and checked once per stage, not once per node)."""
    nd = store.read(node)
    codes = split_codes(nd, cfg.split)
    mask = training_rows(nd, codes, cfg.split.normal_only, cfg.split.exclude_idle,
                         excluded.rows(nd) if excluded else None)
    check_training_rows(int(window_rows(mask, window).sum()) if window > 1 else int(mask.sum()), f"node {node}")
    values = fill_gaps(nd.values, cfg.preprocess.nan_fill_limit)
    scaler = Scaler.fit(values[mask], cfg.preprocess, where=f"node {node}", names=store.metrics)
    if window == 1:
        return scaler.transform(values[mask])[0], scaler
    z, _ = scaler.transform(values)
    return windows(z, window)[window_rows(mask, window)], scaler


def ensemble_holdout_level(spec: AutoencoderSpec, members: list[list[torch.Tensor]], z: np.ndarray,
                           validation_split: float, n_metrics: int) -> tuple[float, np.ndarray]:
    """Mean alarm signal of a node's members' mean reconstruction on its held-out training inputs
    (the last ``validation_split`` share, as in training; all of them when there are none), and
    the mean squared error per metric on the same rows."""
    n_tr = fit_rows(len(z), validation_split)
    hold = z[n_tr:] if n_tr < len(z) else z
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(hold))[None]
        recon, _ = ensemble_recon(stack(members, "cpu"), x, len(spec.hidden),
                                  spec.members, n_metrics)
        sq = (recon - x[..., -n_metrics:]) ** 2
        return (max(float(sq.sum(-1).mean()), 1e-12),
                sq[0].mean(0, dtype=torch.float64).numpy().astype(np.float32))


def check_train_config(tc: TrainConfig, scope: str = "node") -> None:
    """Refuse training settings that cannot train anything, or that ``model.scope`` does not
    implement (the fleet model trains plainly), naming the option."""
    checks = [(int(tc.epochs) >= 1, "train.epochs", "must be >= 1"),
              (int(tc.batch_size) >= 1, "train.batch_size", "must be >= 1"),
              (float(tc.lr) > 0, "train.lr", "must be > 0"),
              (0 <= float(tc.validation_split) < 1, "train.validation_split", "must be in [0, 1)"),
              (int(tc.patience) >= 1, "train.patience", "must be >= 1"),
              (int(tc.seed) >= 0, "train.seed", "must be >= 0 (numpy's and scikit-learn's seeds)"),
              (float(tc.input_noise) >= 0, "train.input_noise", "must be >= 0 (0: no denoising)"),
              (0 <= float(tc.trim) < 1, "train.trim", "must be in [0, 1) (0: every row counts)"),
              (0 <= float(tc.weight_decay) * float(tc.lr) < 1, "train.weight_decay",
               "must be >= 0 and below 1 / train.lr (0: no decay)")]
    if scope == "fleet":
        checks += [(float(tc.input_noise) == 0, "train.input_noise", "model.scope=fleet trains one plain model (0)"),
                   (float(tc.trim) == 0, "train.trim", "model.scope=fleet trains one plain model (0)"),
                   (float(tc.weight_decay) == 0, "train.weight_decay", "model.scope=fleet trains one plain model (0)")]
    for ok, option, rule in checks:
        if not ok:
            raise ConfigError(f"{option}={getattr(tc, option.split('.')[1])}: {rule}")


def training_fingerprint(cfg: HpcadConfig, spec: AutoencoderSpec, store: TelemetryStore) -> str:
    """A digest of what every node's model is built from apart from the node's own data: the model,
    the training settings that change its weights, preprocessing, the split and the store's metric
    list (:func:`node_fingerprint` adds the node's data)."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    t = cfg.train
    shape = {"spec": spec.to_dict(), "metrics": list(store.metrics),
             # precision is compute.precision since the compute group; its place in the digest is kept
             "train": {**{k: t[k] for k in ("epochs", "batch_size", "lr", "validation_split", "patience",
                                            "restore_best", "seed")},
                       "precision": cfg.compute.precision, "input_noise": t.input_noise,
                       **({"trim": t.trim} if t.trim else {}),  # absent at 0: earlier runs' models stay valid
                       **({"weight_decay": t.weight_decay} if t.weight_decay else {})},
             "preprocess": OmegaConf.to_container(cfg.preprocess) if OmegaConf.is_config(cfg.preprocess)
             else dict(vars(cfg.preprocess)),
             "split": split_identity(cfg.split)}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:20]


def node_fingerprint(base: str, store: TelemetryStore, node: str, excluded: Exclusions | None = None) -> str:
    """A node's model fingerprint: ``base`` (:func:`training_fingerprint`), the node's content digest
    in the store, so adding nodes to the input, or ingesting the same telemetry again, retrains no
    other node, and the stretches ``split.exclude`` lists for it, if any. A store without digests
    (written before 2026-12-03) keys on its whole input instead."""
    import hashlib

    data = store.digest(node) or f"store {store.signature}"
    listed = excluded.key(node) if excluded is not None else ""
    text = f"{base}\n{node}\n{data}" + (f"\nexclude {listed}" if listed else "")
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def reusable(path: Path, fingerprint: str, scales: bool = False, whiten: bool = False) -> bool:
    """Whether the model file at ``path`` is complete and was trained from the same inputs (with
    ``scales``: and holds the per-metric held-out errors ``signal.metric_scales`` needs; with
    ``whiten``: and the whitening ``signal.whiten`` needs); says why not in the log (it will be
    retrained)."""
    if not path.exists():
        return False
    try:
        model = NodeModel.load(path)
    except StoreError as exc:
        log.warning("%s; retraining the node", exc)
        return False
    if model.fingerprint != fingerprint:
        log.info("%s was trained with other settings or data (fingerprint %s, now %s); retraining the node",
                 path, model.fingerprint or "none", fingerprint)
        return False
    held = recorded_holdout(model, len(model.metrics))
    if scales and held is None:
        log.info("%s has no per-metric held-out errors (trained by an older hpcad) and signal.metric_scales is "
                 "not false; retraining the node", path)
        return False
    if whiten and (model.whitening is None or not model.whitening.current):
        log.info("%s has no residual whitening of this hpcad's (trained by an older one) and signal.whiten is "
                 "not false; retraining the node", path)
        return False
    if model.spec.window > 1 and model.spec.members == 1 and held is None:
        log.info("%s: a windowed model whose normal level was measured over its whole window (an older hpcad; "
                 "scoring measures the newest row); retraining the node", path)
        return False
    return True


def model_spec(cfg: HpcadConfig) -> AutoencoderSpec:
    """The model the ``model`` group configures; ``ConfigError`` naming a value it refuses."""
    spec = build(cfg.model, "model")
    if not isinstance(spec, AutoencoderSpec):
        raise ConfigError(f"model._target_={cfg.model._target_}: the trainer needs an AutoencoderSpec")
    return spec


EPOCH_LOG_S = LOG_EVERY_S  # at most one "epoch" log line per minute (the bar shows every epoch)


def _epoch_reporter(bar, chunk: int, models: int, epochs: int):
    """Progress inside a chunk: the bar's postfix after every epoch, and a log line at most every
    ``EPOCH_LOG_S`` seconds (SLURM logs, where the bar is off), so a long chunk shows it is alive."""
    last = [time.perf_counter()]

    def report(epoch: int, running: int) -> None:
        bar.set_postfix(chunk=chunk, epoch=f"{epoch}/{epochs}", training=f"{running}/{models}")
        now = time.perf_counter()
        if now - last[0] >= EPOCH_LOG_S:
            last[0] = now
            log.info("chunk %d: epoch %d/%d, %d of %d models still training", chunk, epoch, epochs, running, models)
    return report


def train_nodes(cfg: HpcadConfig, store: TelemetryStore, models_dir: Path, nodes: list[str] | None = None,
                device=None, summary_name: str = "training.json") -> dict:
    """Train (or resume training of) a model for each node; nodes with a model file are skipped. With
    ``data.on_bad_node=skip`` a node with too few training rows is left untrained and recorded
    (``models/<node>.untrained.json``): scoring leaves it out and the report lists it."""
    spec = model_spec(cfg)
    check_train_config(cfg.train, spec.scope)
    check_compute_config(cfg.compute)
    device = resolve_device(cfg.compute.device, world().local_rank) if device is None else device
    nodes = list(store.nodes if nodes is None else nodes)
    base = training_fingerprint(cfg, spec, store)
    ex = read_exclusions(cfg.split.exclude, cfg.data)
    fingerprint = {n: node_fingerprint(base, store, n, ex) for n in nodes}
    scales = fixed_scales(cfg.signal.metric_scales) is not False
    whiten = fixed_whiten(cfg.signal.whiten) is not False
    todo = [n for n in nodes if not reusable(model_path(models_dir, n), fingerprint[n], scales, whiten)]
    skip_bad = cfg.data.on_bad_node == "skip"
    untrained = [n for n in todo if skip_bad and untrained_for(models_dir, n, fingerprint[n])]
    if untrained:  # recorded by a training of the same data and settings: not read again
        left = set(untrained)
        todo = [n for n in todo if n not in left]
    if len(todo) < len(nodes):
        log.info("resuming: %d of %d nodes already have a model (%d left untrained) from the same data and "
                 "settings in %s", len(nodes) - len(todo) - len(untrained), len(nodes), len(untrained), models_dir)
    todo.sort(key=lambda n: (-store.rows(n), n))  # similar lengths share a chunk: less padding
    M = len(store.metrics)
    R = spec.members
    member_net = dataclasses.replace(spec, members=1, window=1)  # one member's network, on (window) inputs
    t0 = time.perf_counter()
    done = 0
    bar = Progress(len(todo), "train", "node", cfg.compute.progress)  # log lines: per chunk and _epoch_reporter
    i = n_chunk = largest = retries = 0
    workspace = Workspace()  # scratch reused chunk after chunk
    reset_peak_memory(device)
    budget = Budget.resolve(cfg.compute, device) if todo else None
    cap = cfg.compute.max_nodes_per_chunk or default_chunk_cap(device)
    while i < len(todo):
        K = budget.chunk_size(store.rows(todo[i]), M, spec, cfg.train.batch_size, cap, cfg.train.validation_split)
        if i == 0:
            log.info("chunks of up to %d models (%d nodes x %d members) on %s; budget: %s", K, max(1, K // R), R,
                     device, budget.source)
        taken = todo[i:i + max(1, K // R)]  # K models: the members of K // R nodes
        i += len(taken)
        chunk, prepared = [], []
        for n in taken:
            try:
                prepared.append(prepare_training_rows(store, n, cfg, spec.window, ex))
                chunk.append(n)
            except TooFewTrainingRows as exc:
                if not skip_bad:
                    raise
                write_untrained(models_dir, n, exc.short, fingerprint[n])
                untrained.append(n)
                log.warning("node %s: %s: left untrained (data.on_bad_node=skip), not scored", n, exc.short)
        if not chunk:
            done += len(taken)
            bar.update(len(taken))
            continue
        seeds = [member_seed(node_seed(cfg.train.seed, n), r) for n in chunk for r in range(R)]
        n_chunk += 1
        bar.set_postfix(chunk=f"{n_chunk} ({len(chunk)} nodes)", device=str(device))
        ckpt = ChunkCheckpoint(models_dir, " ".join(fingerprint[n] for n in chunk), chunk, R,
                               cfg.compute.checkpoint_every_s)
        res = None
        try:
            res = train_ensemble(member_net, [z for z, _ in prepared for _ in range(R)], seeds, cfg.train, device,
                                 progress=_epoch_reporter(bar, n_chunk, len(chunk) * R, int(cfg.train.epochs)),
                                 workspace=workspace, checkpoint=ckpt, precision=cfg.compute.precision)
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the exception (and the chunk's tensors it holds) is gone
        if res is None:
            workspace = Workspace()  # its tensors go too
            cap = retry_cap_after_oom(device, chunk, R, "training")  # this chunk again, in halves
            i -= len(taken)
            n_chunk -= 1
            retries += 1
            continue
        largest = max(largest, len(chunk))
        whitenings = fit_whitening(spec, [res.params[k * R:(k + 1) * R] for k in range(len(chunk))],
                                   [z for z, _ in prepared],
                                   [held_out_from(len(z), cfg.train.validation_split) for z, _ in prepared], M, device)
        for k, n in enumerate(chunk):
            members = res.params[k * R:(k + 1) * R]
            history = dict(res.history[k * R])
            if R > 1 or spec.window > 1:  # the newest row's error, as scoring measures it (training's own
                # pass measured the whole window: a level ~window times too high, M x window held-out errors)
                level, held = ensemble_holdout_level(spec, members, prepared[k][0], cfg.train.validation_split, M)
                if R > 1:
                    history["members"] = [{key: h[key] for key in ("best_epoch", "epochs_run", "stopped_early")}
                                          for h in res.history[k * R:(k + 1) * R]]
            else:
                level, held = res.holdout_signal[k], res.holdout_error[k]
            NodeModel(n, spec, store.metrics, members, prepared[k][1], history, level, fingerprint[n], held,
                      whitening=whitenings[k]).save(model_path(models_dir, n))
            untrained_path(models_dir, n).unlink(missing_ok=True)  # enough rows now
        ckpt.remove()  # its models are written
        done += len(taken)
        bar.update(len(taken))
        log.info("trained %d/%d nodes (%s)", done, len(todo), elapsed_and_left(time.perf_counter() - t0, done, len(todo)))
    bar.close()
    summary = {"nodes": len(nodes), "trained_now": len(todo), "seconds": round(time.perf_counter() - t0, 3),
               "device": str(device), "model": spec.to_dict(), "chunks": n_chunk, "largest_chunk_nodes": largest,
               "out_of_memory_retries": retries, "budget": budget.source if budget else None,
               "untrained": len(set(untrained)), "untrained_nodes": sorted(set(untrained))[:20]}
    if device.type == "cuda" and todo:  # what the chunks really took, beside the budget (tune device_memory_mb)
        summary["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    write_json(models_dir / summary_name, summary)
    return summary
