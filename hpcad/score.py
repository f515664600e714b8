"""The score stage: per-row, per-metric squared reconstruction errors into ``errors.h5``.

Layout (docs/data.md):

    /                 attrs: hpcad_format="error-store", format_version, store, models, created,
                      excess_weight, metric_scales, whiten (the signal's recipe, hpcad.signal_choice), signal_choice
    /metrics          [M] metric names
    /nodes/<node>/    attrs: signal_scale (the node's normal level, hpcad.signals.signal_level), rows, smooth, causal
        (every dataset carries HDF5 Fletcher-32 checksums: a corrupt file is an error on read)
        error         [T, M] float32 (score.error_dtype=float16: float16) squared error per metric in standardised units
                      (of the residual whitened by the model's whitening where whiten = 1; 0 where missing),
                      plus the squared excess of a value outside the metric's training range (times
                      excess_weight), divided by the metric's held-out error scale where metric_scales = 1;
                      chunks of 1024 rows, uncompressed
        signal_row    [T] float32 sum over metrics of error (the row's own signal)
        signal        [T] float32 the alarm signal: signal_row smoothed (hpcad.signals.smooth_signal)
        signal_norm   [T] float32 signal / signal_scale (one threshold can serve all nodes)
                      (attr light_version: the light map applied, 0 = none; hpcad/model/light.py;
                      attr model: the digest of the model file that scored it, by content)
        timestamp     [T] int64, split [T] int8 (0 train, 1 validation, 2 test), labels [T] int8 if labelled
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from hpcad import __version__
from hpcad.atomic import atomic_path
from hpcad.data.h5 import h5_writing
from hpcad.data.store import STR, TelemetryStore, checked
from hpcad.device import describe, resolve_device, tf32_context
from hpcad.dist import all_sum, world
from hpcad.errors import ConfigError, InputError, StoreError
from hpcad.errorstore import FORMAT, write_lost
from hpcad.model.light import LightMap, scoring_maps
from hpcad.model.autoencoder import ensemble_recon, stack
from hpcad.model.budget import Budget, default_chunk_cap, retry_cap_after_oom
from hpcad.model.files import NodeModel, model_path, models_stamp
from hpcad.model.whiten import stacked, whitened_errors
from hpcad.preprocess import fill_gaps, in_model_order, metric_positions, split_codes, windows
from hpcad.progress import Progress, tracked
from hpcad.signal_choice import attrs as recipe_attrs
from hpcad.signal_choice import choose as choose_recipe
from hpcad.signal_choice import fixed_whiten, may_unwhiten, without_whitening
from hpcad.signal_choice import rankable_nodes
from hpcad.signals import NoWhitening, Recipe, smooth_signal
from hpcad.signals import whitening as signal_whitening

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)
ERROR_DTYPES = {"float32": np.float32, "float16": np.float16}
ROW_BLOCK = 8192


def score_nodes(cfg: HpcadConfig, store: TelemetryStore, models_dir: Path, out_path: Path,
                nodes: list[str] | None = None, device: torch.device | None = None, light: Callable[[str], LightMap | None] | None = None,
                recipe_fallback: Recipe | None = None, built: dict | None = None) -> int:
    """Score ``nodes`` (default: all) of ``store`` with their models, K nodes per batched forward pass.

    K follows from ``compute.memory_budget_mb`` and ``compute.device_memory_mb``; only one chunk of nodes
    is in memory at a time.
    ``light`` picks each node's light map (default: ``score.light_maps`` and ``score.light_night``).
    ``signal.excess_weight=auto`` and ``signal.metric_scales=auto`` choose the signal's recipe on the
    labelled validation rows (hpcad.signal_choice; ``recipe_fallback``, the recipe of the run whose
    thresholds will be applied, where there are none). ``built``: :func:`built_from`'s record where
    the caller has it (under ranks rank 0 computes it for all). Writes ``out_path`` atomically.
    """
    if light is None:
        maps = scoring_maps(cfg.score, models_dir)

        def light(n: str) -> LightMap | None:
            return maps.for_night(n, cfg.score.light_night)
    device = resolve_device(cfg.compute.device, world().local_rank) if device is None else device
    nodes = list(store.nodes if nodes is None else nodes)
    log.info("scoring %d node(s) on %s", len(nodes), describe(device))
    missing = [n for n in nodes if not model_path(models_dir, n).exists()]
    if missing:
        raise StoreError(f"{models_dir}: no model for nodes {missing[:10]} ({len(missing)} missing); "
                         f"train them first or point train_run at the run that did")
    metrics = NodeModel.load(model_path(models_dir, nodes[0])).metrics if nodes else list(store.metrics)
    columns = metric_columns(metrics, store.metrics, str(store.path))
    sig_cfg = cfg.signal
    error_dtype = ERROR_DTYPES.get(str(cfg.score.error_dtype))
    if error_dtype is None:
        raise ConfigError(f"score.error_dtype={cfg.score.error_dtype!r}: one of {', '.join(ERROR_DTYPES)}")
    budget = Budget.resolve(cfg.compute, device)

    def node_errors(which: list[str], whiten: bool | None, earlier: bool = False) -> Iterator[tuple]:
        return _node_errors(cfg, store, models_dir, which, metrics, columns, budget, device, light, whiten, earlier)

    def ranked_errors() -> Iterator[tuple]:
        """The choice's pass: only the nodes it ranks (validation rows of both classes), with its own progress."""
        which = rankable_nodes(store, nodes, cfg.split)
        return tracked(node_errors(which, fixed_whiten(cfg.signal.whiten)), len(which), "signal choice", "node",
                       cfg.compute.progress, log)

    recipe, choice = choose_recipe(cfg, store, ranked_errors, recipe_fallback)
    retry = may_unwhiten(sig_cfg, recipe, choice)  # the same on every rank: the choice is collective
    # a whitening of an earlier version serves only the thresholds fitted on it (hpcad.model.whiten.VERSION)
    earlier = recipe_fallback is not None and recipe == recipe_fallback

    def errors_of(which: list[str], whiten: bool | None) -> Iterator[tuple]:
        return node_errors(which, whiten, earlier)

    lacking = _write_errors(cfg, store, models_dir, out_path, nodes, recipe, choice, errors_of, built, metrics,
                            error_dtype, retry)
    if retry and all_sum(np.array([lacking is not None]))[0]:  # a model without whitening on some rank
        recipe, choice = without_whitening(recipe, choice, lacking or "a node's model on another rank has no "
                                                                     "residual whitening (trained by an older hpcad)")
        _write_errors(cfg, store, models_dir, out_path, nodes, recipe, choice, errors_of, built, metrics, error_dtype)
    log.info("scored %d nodes -> %s", len(nodes), out_path)
    return len(nodes)


def _write_errors(cfg: HpcadConfig, store: TelemetryStore, models_dir: Path, out_path: Path, nodes: list[str],
                  recipe: Recipe, choice: dict | None, node_errors: Callable, built: dict | None, metrics: list[str],
                  error_dtype: type, retry: bool = False) -> str | None:
    """Score ``nodes`` with ``recipe`` into ``out_path`` (atomically). With ``retry``, a model without
    the whitening the recipe needs leaves nothing written and says why (None: written)."""
    sig_cfg, M = cfg.signal, len(metrics)
    try:
        with atomic_path(out_path) as tmp, h5_writing(tmp) as f:
            f.attrs.update(hpcad_format=FORMAT, format_version=1, store=str(store.path), models=str(models_dir),
                           created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
                           hpcad_version=__version__, **(built or built_from(store, models_dir)),
                           **recipe_attrs(recipe, choice))
            f.create_dataset("metrics", data=np.array(metrics, dtype=object), dtype=STR)
            nodes_grp = f.create_group("nodes")
            bar = Progress(len(nodes), "score", "node", cfg.compute.progress, log)
            shares: dict[str, float] = {}
            lost: dict[str, np.ndarray] = {}
            for model, nd, err, excess2, miss, lm in node_errors(nodes, recipe.whitened):
                recipe.errors(model, err, excess2, miss, f"{models_dir}: node {nd.name}")
                level = recipe.level(model, M, sig_cfg.scale_floor)
                shares[nd.name] = missing_share(miss, model.scaler.absent)
                lost[nd.name] = metrics_lost(miss, model.scaler.absent)
                _write_node_errors(nodes_grp, nd, err, level, split_codes(nd, cfg.split), sig_cfg,
                                   lm.version if lm else 0, error_dtype, shares[nd.name], recipe.normal_error(model),
                                   model.digest)
                bar.update(1)
            bar.close()
            # every node's share in one table (node-name order, as /node_rows of an index): read without a
            # group opened per node
            f.create_dataset("node_missing", data=np.array([shares[n] for n in sorted(shares)], dtype=np.float32))
            write_lost(f, [lost[n] for n in sorted(lost)], M)
    except NoWhitening as exc:
        if not retry:
            raise
        return str(exc)
    return None


def _node_errors(cfg: HpcadConfig, store: TelemetryStore, models_dir: Path, nodes: list[str], metrics: list[str],
                 columns: np.ndarray | None, budget: Budget, device: torch.device,
                 light: Callable[[str], LightMap | None], whiten: bool | None, earlier: bool = False) -> Iterator[tuple]:
    """Per node, in order: ``(model, node data, squared reconstruction errors [T, M], squared
    range excess [T, M] (zeros with ``signal.range_excess=false``), missing mask, light map)``;
    K nodes per batched forward pass, only one chunk in memory. The errors are whitened with
    ``whiten``; with None (``signal.whiten=auto``'s choice) a dict of both, ``{False: plain, True:
    whitened}``, or of the plain ones alone for a chunk with a model from before the whitening.
    A model's whitening of an earlier version counts as none unless ``earlier`` (its thresholds'
    signal)."""
    M = len(metrics)
    i = 0
    cap = cfg.compute.max_nodes_per_chunk or default_chunk_cap(device)
    while i < len(nodes):
        first = NodeModel.load(model_path(models_dir, nodes[i]))  # its spec sizes the chunk
        spec = first.spec
        K = budget.score_chunk_size(store.rows(nodes[i]), M, spec, cap)
        chunk = nodes[i:i + K]
        i += len(chunk)
        models, data, zs, masks = [], [], [], []
        for node in chunk:
            model = first if node == chunk[0] else NodeModel.load(model_path(models_dir, node))
            if model.whitening is not None and not (earlier or model.whitening.current):
                model.whitening = None  # fitted before the level was measured out of sample
            if model.metrics != metrics:
                raise InputError(f"node {node}: its model was trained on other metrics than node {nodes[0]}'s "
                                 f"(first difference: {_first_diff(model.metrics, metrics)}); score models "
                                 f"of one training run together")
            nd = store.read(node)
            values = in_model_order(nd.values, columns)
            z, miss = model.scaler.transform(fill_gaps(values, cfg.preprocess.nan_fill_limit))
            models.append(model), data.append(nd), zs.append(z), masks.append(miss)
        maps = [light(n) for n in chunk]
        same_shape = len({(tuple(m.spec.hidden), m.spec.members, m.spec.window) for m in models}) == 1
        errs = None
        how = whiten if whiten is not None or all(m.whitening is not None for m in models) else False
        try:
            errs = reconstruction_errors(models, zs, device, maps, masks, how) if same_shape else \
                [reconstruction_errors([m], [z], device, [lm], [mk], how)[0]
                 for m, z, lm, mk in zip(models, zs, maps, masks)]
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the exception (and the chunk's tensors it holds) is gone
        if errs is None:
            cap = retry_cap_after_oom(device, chunk, 1, "scoring")  # this chunk again, in halves
            i -= len(chunk)
            continue
        for model, nd, z, err, miss, lm in zip(models, data, zs, errs, masks, maps):
            if whiten is None and how is False:
                err = {False: err}
            excess2 = np.square(model.scaler.excess(z)) if cfg.signal.range_excess else np.zeros_like(z)
            yield model, nd, err, excess2, miss, lm


def built_from(store: TelemetryStore, models_dir: Path) -> dict:
    """What an ``errors.h5`` is scored from, recorded in its attributes and checked by the stages
    that read it (``hpcad threshold``): the store's input signature and the models' stamp."""
    return {"store_signature": store.signature, "models_stamp": models_stamp(models_dir)}


def missing_share(miss: np.ndarray, absent: np.ndarray) -> float:
    """The share of a node's values its model could not see (missing after short gaps are filled),
    over the metrics the node reported in training: 1.0 when its collector sent rows without values."""
    present = miss[:, ~absent]
    return float(present.mean()) if present.size else 0.0


def metrics_lost(miss: np.ndarray, absent: np.ndarray) -> np.ndarray:
    """Per metric [M]: the node reported it in training (not absent) and it has no value in any
    scored row: a collector that lost a metric, which the model then cannot alarm on."""
    return miss.all(0) & ~absent if len(miss) else np.zeros(len(absent), dtype=bool)


def _write_node_errors(parent: h5py.Group, nd, err: np.ndarray, signal_scale: float, split: np.ndarray,
                       sig_cfg, light_version: int = 0, error_dtype: type = np.float32,
                       missing: float = 0.0, normal_error: np.ndarray | None = None, model: str = "") -> None:
    row = err.sum(1, dtype=np.float64)  # the signal comes from the float32 errors, whatever is stored
    signal = smooth_signal(row, sig_cfg.smooth, signal_scale, sig_cfg.causal)
    g = parent.create_group(nd.name)
    T, M = err.shape
    # Uncompressed: squared errors are noisy floats that gzip (+shuffle) shrinks by only ~14 % at
    # about 6x the write time (5.7 of 6.8 ms per 288 x 160 node; docs/benchmarks.md).
    # Checksummed (Fletcher-32 per chunk): a corrupt file is an error on read, never wrong numbers.
    # float16 saturates instead of overflowing to inf (65504): reconstruction errors stay far below it, a
    # value far outside its range times a large range-excess weight may not (the signal above is exact)
    if error_dtype is np.float16:
        err = np.minimum(err, np.finfo(np.float16).max).astype(np.float16)
    for name, data in (("error", err), ("signal_row", row.astype(np.float32)), ("signal", signal.astype(np.float32)),
                       ("signal_norm", (signal / signal_scale).astype(np.float32)), ("timestamp", nd.timestamp),
                       ("split", split), ("labels", nd.labels), ("normal_error", normal_error)):
        if data is not None:
            g.create_dataset(name, data=data, **checked(data))
    g.attrs.update(signal_scale=signal_scale, rows=T, light_version=light_version, missing_share=missing,
                   smooth=int(sig_cfg.smooth), causal=bool(sig_cfg.causal), model=model)


def reconstruction_errors(models: list[NodeModel], zs: list[np.ndarray], device: torch.device,
                          maps: list[LightMap | None] | None = None, masks: list[np.ndarray] | None = None,
                          whiten: bool | None = False) -> list:
    """Squared errors [T_k, M] of K nodes' standardised rows at once (every member of every node in
    one batched forward pass, rows padded to the longest, in row blocks): the error of each row
    against its members' mean reconstruction (of the row itself, the newest of its window). A
    node's light map (hpcad.model.light), where given, adapts its reconstruction. With ``whiten``,
    the squared whitened residuals (hpcad.model.whiten; ``masks``: the missing values, whose
    residuals are zeroed first so that they leak into no other metric's); with None, per node a dict
    of both, ``{False: plain, True: whitened}``. The models share one
    spec (hidden widths, members, window). Always fp32: ``compute.precision`` speeds up training only,
    the alarm signal is never quantised."""
    spec = models[0].spec
    both = None  # the plain errors beside the whitened ones (whiten=None)
    if whiten is not False:
        white = stacked([signal_whitening(m, "") for m in models], device)  # "" names the node
        both = [np.empty_like(z) for z in zs] if whiten is None else None
    R, w = spec.members, spec.window
    params = stack([p for m in models for p in m.members], device)
    n_enc = len(spec.hidden)
    T = max(z.shape[0] for z in zs)
    M = zs[0].shape[1]
    out = [np.empty_like(z) for z in zs]
    inputs = [windows(z, w) for z in zs]
    with torch.no_grad():
        for s in range(0, T, ROW_BLOCK):
            n = min(ROW_BLOCK, T - s)
            x = torch.zeros(len(zs), n, M * w, device=device)
            for k, z in enumerate(inputs):
                part = z[s:s + n]
                x[k, : len(part)] = torch.from_numpy(np.ascontiguousarray(part)).to(device)
            with tf32_context("fp32", device):
                recon, code = ensemble_recon(params, x, n_enc, R, M)
            for k, lm in enumerate(maps or []):
                if lm is not None:
                    recon[k] = lm.apply(recon[k], code[k])
            r = recon - x[..., M * (w - 1):]
            plain = r.square().cpu().numpy() if whiten is not True else None
            if whiten is not False:
                for k, mk in enumerate(masks or []):
                    part = mk[s:s + n]
                    if part.any():
                        r[k, :len(part)].masked_fill_(torch.from_numpy(np.ascontiguousarray(part)).to(device), 0.0)
                white_e = whitened_errors(r, white).cpu().numpy()
            for k, z in enumerate(zs):
                rows = max(0, min(n, z.shape[0] - s))
                out[k][s:s + rows] = (plain if whiten is False else white_e)[k, :rows]
                if both is not None:
                    both[k][s:s + rows] = plain[k, :rows]
    return out if both is None else [{False: p, True: q} for p, q in zip(both, out)]


def metric_columns(model_metrics: list[str], store_metrics: list[str], where: str) -> np.ndarray | None:
    """Where each of the models' metrics sits in the store (-1: not there), or None when the lists
    are equal. The store may lack some (heterogeneous or changed exports: scored as missing, no
    error) or hold more (ignored); both are logged. No metric in common is an error."""
    cols = metric_positions(model_metrics, store_metrics)
    if cols is None:
        return None
    if (cols < 0).all():
        raise InputError(f"{where}: none of the {len(model_metrics)} metrics the models were trained on "
                         f"(e.g. {list(model_metrics[:3])}) is in this store")
    lacking = [m for m, c in zip(model_metrics, cols) if c < 0]
    unknown = sorted(set(store_metrics) - set(model_metrics))
    if lacking:
        log.warning("%s lacks %d of the models' metrics; they are scored as missing (no error): %s", where,
                    len(lacking), lacking[:10])
    if unknown:
        log.warning("%s holds %d metric(s) the models were not trained on; ignored: %s", where, len(unknown),
                    unknown[:10])
    return cols


def _first_diff(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"column {i}: {x!r} vs {y!r}"
    return f"{len(a)} vs {len(b)} metrics"
