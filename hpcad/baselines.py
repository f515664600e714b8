"""Baselines on the same splits, preprocessing and signal rules as the autoencoder.

Each baseline fits per node on the same standardised normal training rows and writes a signal
file in the error-file layout (smoothed and normalised like the autoencoder's signal,
:mod:`hpcad.signals`), so thresholds and figures come from the same code:

- ``kde``: Gaussian kernel density (the seed lecture's baseline), bandwidth by held-out
  log-likelihood; signal = negative log density. Brute force in torch (at ~160 dimensions a tree
  search visits every point anyway): one distance matrix serves every candidate bandwidth.
- ``iforest``: scikit-learn's IsolationForest; signal = its anomaly score.
- ``pca``: reconstruction error of the principal components that explain ``pca_variance`` of the
  training variance (the linear autoencoder).
- ``knn``: distance of a row's window (it and the ``knn_window - 1`` rows before it) to the
  nearest training window: a strong classic on multivariate telemetry.
- ``range``: no model at all: the sum over metrics of the squared distance of a value outside the
  metric's training range (standardised units), the term the autoencoder's signal adds
  (``signal.range_excess``). It shows how much of a ranking that term makes on its own.

``pca``, ``knn`` and ``kde`` add the same range-excess term (``baselines.range_excess``, default
true, so the comparison is of the models, not of the term): as it is for PCA's and the 1-NN's
squared distances, which are in the autoencoder's units; divided by 2 h^2 for KDE's negative log
density (bandwidth h), which grows as (distance / h)^2 / 2 far from the data. IsolationForest's
score has no such units and goes without it. Its weight: with ``signal.excess_weight=auto`` and
labelled rows each method chooses its own as the autoencoder does (:func:`run_baselines`); a fixed
weight applies to all; without labels, the autoencoder's (its ``errors.h5``).

Fits use at most ``max_train_rows`` training rows (a random subsample beyond that, drawn from the
node's own seed: a node's baseline does not depend on which other nodes a process fits, so ranks
can share the nodes out). Under several ranks each rank fits its share of the nodes into
``<method>-rank<r>.h5`` and rank 0 writes ``<method>.h5`` as an index of links (like ``errors.h5``).
Baselines are a comparison, not a production detector: beyond ``max_nodes`` nodes they are skipped
with a warning (raise the option to run them on a large cluster anyway).
"""
from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpcad.config import check_at_least
from hpcad.data.exclusions import read_exclusions
from hpcad.data.store import TelemetryStore
from hpcad.errors import ConfigError, TooFewTrainingRows
from hpcad.preprocess import (Scaler, check_training_rows, fill_gaps, fit_rows, split_codes, split_identity,
                              training_rows, window_at, window_rows)
from hpcad.atomic import remove_unreferenced
from hpcad.data.h5 import open_h5
from hpcad.dist import CLUSTER_WIDE, all_sum
from hpcad.errorstore import NodeSignal, signal_attrs, write_index, write_signal_file
from hpcad.progress import Progress
from hpcad.signals import signal_level, smooth_signal

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)
METHODS = ("kde", "iforest", "pca", "knn", "range")
OPTIONS = {"kde": ("kde_bandwidths",), "iforest": ("iforest_trees",), "pca": ("pca_variance",),
           "knn": ("knn_window",), "range": ()}  # each method's own ``baselines.*`` options
WITH_EXCESS = ("pca", "knn", "kde")  # the autoencoder's range-excess term is added (baselines.range_excess)
_BLOCK = 4096  # evaluation rows per distance block


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] (float64, clamped at 0)."""
    return (torch.cdist(a, b) ** 2).clamp_(min=0)


def _by_block(x: np.ndarray, train: torch.Tensor, reduce) -> np.ndarray:
    """``reduce(squared distances of a block of rows to every training row)`` for rows x, in blocks
    of ``_BLOCK`` rows (the distance matrix stays small; each block is made float64 on its own)."""
    return np.concatenate([reduce(_sq_dist(torch.from_numpy(x[s:s + _BLOCK]).double(), train)).numpy()
                           for s in range(0, len(x), _BLOCK)] or [np.empty(0)])


class _Kde:
    def __init__(self, train: np.ndarray, holdout: np.ndarray, bandwidths: list[float]):
        self.t = torch.from_numpy(train).double()
        ref = holdout if len(holdout) else train
        ll = np.zeros(len(bandwidths))  # each bandwidth's summed log density of the reference rows,
        for s in range(0, len(ref), _BLOCK):  # in blocks of rows (their distances computed once per block)
            d2 = _sq_dist(torch.from_numpy(ref[s:s + _BLOCK]).double(), self.t)
            ll += [float(self._logdens(d2, h).sum()) for h in bandwidths]
        self.h = float(bandwidths[int(np.argmax(ll))])

    def _logdens(self, d2: torch.Tensor, h: float) -> torch.Tensor:
        M = self.t.shape[1]
        return torch.logsumexp(-d2 / (2 * h * h), dim=1) - np.log(self.t.shape[0]) - M * np.log(h * np.sqrt(2 * np.pi))

    def score(self, x: np.ndarray) -> np.ndarray:
        return _by_block(x, self.t, lambda d2: -self._logdens(d2, self.h))


class _Pca:
    def __init__(self, train: np.ndarray, variance: float):
        self.mu = train.mean(0)
        _, s, vt = np.linalg.svd(train - self.mu, full_matrices=False)
        share = np.cumsum(s ** 2) / max(float((s ** 2).sum()), 1e-300)
        k = int(np.searchsorted(share, variance) + 1)
        self.V = vt[: min(k, vt.shape[0])].T

    def score(self, x: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(x), 4 * _BLOCK):  # in blocks of rows: five copies of a node-year otherwise
            c = x[s:s + 4 * _BLOCK] - self.mu
            out.append(((c - (c @ self.V) @ self.V.T) ** 2).sum(1))
        return np.concatenate(out) if out else np.empty(0, dtype=np.result_type(x, self.mu))


class _Knn:
    """Nearest training window (the caller builds the windows of ``baselines.knn_window`` rows)."""

    def __init__(self, train: np.ndarray):
        self.t = torch.from_numpy(train).double()

    def score(self, x: np.ndarray) -> np.ndarray:
        return _by_block(x, self.t, lambda d2: d2.min(1).values)


def _fit(method: str, train: np.ndarray, hold: np.ndarray, bc, seed: int):
    """A fitted baseline's row scorer, whether its score is error-like (>= 0, 0 = perfect), and the
    factor that puts a squared standardised distance into its score's units (None: no such units)."""
    check_methods([method])
    if method == "kde":  # far from the data, -log density grows as (distance / h)^2 / 2
        kde = _Kde(train, hold, list(bc.kde_bandwidths))
        return kde.score, False, 1.0 / (2.0 * kde.h * kde.h)
    if method == "iforest":
        from sklearn.ensemble import IsolationForest

        model = IsolationForest(n_estimators=int(bc.iforest_trees), random_state=seed).fit(train)
        return (lambda x: -model.score_samples(x)), False, None
    if method == "pca":
        return _Pca(train, float(bc.pca_variance)).score, True, 1.0
    if method == "range":  # the excess is added by the caller, from the node's scaler
        return (lambda x: np.zeros(len(x))), True, 1.0
    return _Knn(train).score, True, 1.0  # knn


def check_options(bc) -> None:
    """``baselines.*``, checked before the data is read (before, a zero tree count or row limit, or a
    negative bandwidth, stopped the stage with scikit-learn's or torch's traceback after the
    training and scoring; a window of 0 rows or a variance share above 1 were taken)."""
    check_methods(list(bc.methods))
    check_at_least("baselines", bc, {"knn_window": 1, "iforest_trees": 1, "max_train_rows": 2, "max_nodes": 0,
                                     "seed": 0})
    if not 0 < float(bc.pca_variance) <= 1:
        raise ConfigError(f"baselines.pca_variance={bc.pca_variance}: a share of the variance in (0, 1]")
    if not bc.kde_bandwidths or any(not float(h) > 0 for h in bc.kde_bandwidths):
        raise ConfigError(f"baselines.kde_bandwidths={list(bc.kde_bandwidths)}: a non-empty list of bandwidths > 0")


def check_methods(methods: list[str]) -> None:
    """``baselines.methods``, checked: each one hpcad has."""
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"baselines.methods: unknown method {method!r} ({', '.join(METHODS)})")


def node_rng(seed: int, node: str) -> np.random.Generator:
    """The random stream of one node's baseline fit: from the seed and the node's name only, so the
    node's fit is the same whichever nodes, in whichever order, a process fits beside it."""
    return np.random.default_rng([int(seed), zlib.crc32(node.encode())])


def excess_weight(cfg: HpcadConfig, errors_path: Path | None) -> float:
    """The range-excess weight the baselines add (``WITH_EXCESS``) where they do not choose their own
    (:func:`choose_weight`): the one the autoencoder's ``errors.h5`` was scored with; a fixed
    ``signal.excess_weight`` where there is no errors.h5 yet, 1 for ``auto``; 0 with
    ``signal.range_excess=false`` or ``baselines.range_excess=false``."""
    from hpcad.signal_choice import fixed_weight

    if not cfg.signal.range_excess or not cfg.baselines.range_excess:
        return 0.0
    if errors_path is not None and errors_path.exists():
        from hpcad.errorstore import ErrorStore

        return float(ErrorStore(errors_path).recipe.weight)
    w = fixed_weight(cfg.signal.excess_weight)
    return 1.0 if w is None else float(w)


def weight_rule(cfg: HpcadConfig, method: str, eval_store: TelemetryStore, fallback: float) -> list[float]:
    """The weights ``method`` chooses from: ``signal.excess_grid`` where it chooses its own (a method
    that adds the term, ``signal.excess_weight=auto``, labelled rows to choose on), else the one it
    gets: a fixed ``signal.excess_weight``, else ``fallback`` (the autoencoder's, :func:`excess_weight`);
    0 for a method without the term or with ``signal.range_excess`` or ``baselines.range_excess`` off."""
    from hpcad.signal_choice import fixed_weight

    if method not in WITH_EXCESS or not cfg.signal.range_excess or not cfg.baselines.range_excess:
        return [0.0]
    fixed = fixed_weight(cfg.signal.excess_weight)
    if fixed is not None:
        return [fixed]
    if not eval_store.has_labels:
        return [fallback]
    return sorted({float(x) for x in cfg.signal.excess_grid})


def validation_totals(method: str, cfg: HpcadConfig, fit_store: TelemetryStore, eval_store: TelemetryStore,
                      nodes: list[str], grid: list[float], progress: bool,
                      keep: Callable[[_Parts], None] | None = None) -> np.ndarray:
    """Per weight of ``grid``, the sum over ``nodes`` of the validation average precision of the
    baseline's signal with that weight (nodes whose validation rows hold both classes), then their
    count: what :func:`choose_weight` sums over ranks, as the autoencoder's choice does
    (hpcad/signal_choice.py). ``keep`` is given each node's scores (the signals are then made from
    them, not fitted again)."""
    from hpcad.signal_choice import validation_labels
    from hpcad.threshold.quality import average_precision

    totals = np.zeros(len(grid) + 1)
    for parts in _node_parts(method, cfg, fit_store, eval_store, nodes, progress, True):
        if keep is not None:
            keep(parts)
        rows = validation_labels(parts.split, parts.labels)
        if rows is None:
            continue
        val, y = rows
        for j, w in enumerate(grid):
            totals[j] += average_precision(parts.signal(w, cfg.signal).signal[val], y)
        totals[-1] += 1
    return totals


def choose_weight(cfg: HpcadConfig, method: str, grid: list[float], totals: np.ndarray,
                  fallback: float) -> tuple[float, dict | None]:
    """The weight ``method`` adds (the first of ``grid`` within ``signal.excess_margin`` of the best mean
    validation average precision: the autoencoder's rule, on the baseline's own signal), and the record
    of the choice; ``fallback`` (the autoencoder's weight) without a node to choose on."""
    from hpcad.signal_choice import first_within

    if len(grid) == 1:
        return grid[0], None
    count = int(totals[-1])
    if count == 0:
        return fallback, {"rule": "no labelled validation rows: the autoencoder's weight", "chosen": fallback}
    ap = totals[:-1] / count
    margin = float(cfg.signal.excess_margin)
    chosen = first_within(grid, ap, margin)
    log.info("baseline %s: signal.excess_weight=%g (validation average precision %s over %d node(s))", method,
             chosen, ", ".join(f"{w:g}: {a:.4f}" for w, a in zip(grid, ap)), count, extra=CLUSTER_WIDE)
    return chosen, {"rule": f"first weight within {margin:g} of the best mean validation average precision",
                    "candidates": grid, "validation_ap": [round(float(a), 6) for a in ap], "chosen": chosen,
                    "nodes": count}


@dataclass
class _Parts:
    """One node's baseline score before the range-excess term is added (see :func:`baseline_signals`)."""

    node: str
    raw: np.ndarray  # per row, the model's score
    exc: np.ndarray | None  # per row, the summed squared range excess (None: not computed)
    ref_raw: np.ndarray  # the same on the reference rows (held-out training rows), for the signal's level
    ref_exc: np.ndarray | None
    unit: float | None  # a squared standardised distance in the score's units (None: no such units)
    error_like: bool
    split: np.ndarray
    labels: np.ndarray | None
    timestamp: np.ndarray
    width: int  # metrics per row (the level's floor)

    def signal(self, weight: float, sig_cfg) -> NodeSignal:
        """The node's signal with ``weight`` x the range excess added in the score's units."""
        node_weight = weight * self.unit if self.unit is not None and self.exc is not None else 0.0
        ref, sig = self.ref_raw, self.raw
        if node_weight:
            ref, sig = ref + self.ref_exc * node_weight, sig + self.exc * node_weight
        if self.error_like:  # like the autoencoder: >= 0, normal level = the held-out mean (its floor too)
            offset, scale = 0.0, signal_level(float(np.mean(ref)), self.width, sig_cfg.scale_floor)
        else:  # an arbitrary origin: centred on the held-out median, in units of its spread
            offset, scale = float(np.median(ref)), float(max(np.std(ref), 1e-9))
        out = smooth_signal(sig - offset, sig_cfg.smooth, scale, sig_cfg.causal)
        return NodeSignal(self.node, out, self.split, self.labels, self.timestamp, scale)


def baseline_signals(method: str, cfg: HpcadConfig, fit_store: TelemetryStore, eval_store: TelemetryStore,
                     nodes: list[str] | None = None, progress: bool = False,
                     weight: float = 0.0) -> Iterator[NodeSignal]:
    """One baseline's signal for ``nodes`` of ``eval_store`` (all of them by default), fitted on
    ``fit_store``'s normal training rows of the same node; ``pca``, ``knn`` and ``kde`` add ``weight`` x
    the range excess in their score's units (:func:`choose_weight`), ``range`` is that excess alone."""
    weight = 1.0 if method == "range" else weight if method in WITH_EXCESS else 0.0
    for parts in _node_parts(method, cfg, fit_store, eval_store, nodes, progress, bool(weight)):
        yield parts.signal(weight, cfg.signal)


def _node_parts(method: str, cfg: HpcadConfig, fit_store: TelemetryStore, eval_store: TelemetryStore,
                nodes: list[str] | None, progress: bool, excess: bool) -> Iterator[_Parts]:
    """Per node: the baseline fitted on ``fit_store``'s normal training rows, its scores of
    ``eval_store``'s rows and of the reference rows; with ``excess``, the range excess of both."""
    bc = cfg.baselines
    w = int(bc.knn_window) if method == "knn" else 1
    nodes = list(eval_store.nodes) if nodes is None else nodes
    bar = Progress(len(nodes), f"baseline {method}", "node", progress, log)
    fit_split = cfg.split if fit_store is eval_store else _train_split(cfg)  # read once, not once per node
    excluded = read_exclusions(getattr(fit_split, "exclude", None), cfg.data)  # the fitting run's list
    for node in nodes:
        if node not in fit_store.nodes:
            raise ConfigError(f"baseline {method}: node {node} has no training data in {fit_store.path}")
        fit_nd = fit_store.read(node)
        rows = training_rows(fit_nd, split_codes(fit_nd, fit_split), cfg.split.normal_only, cfg.split.exclude_idle,
                             excluded.rows(fit_nd) if excluded else None)
        fit_idx = np.flatnonzero(window_rows(rows, w))  # rows whose whole window is training data
        try:
            check_training_rows(len(fit_idx), f"baseline {method}: node {node}")
        except TooFewTrainingRows as exc:
            if cfg.data.on_bad_node != "skip":
                raise
            log.warning("baseline %s: node %s: %s: no baseline for it (data.on_bad_node=skip)", method, node, exc.short)
            bar.update(1)
            continue
        vals = fill_gaps(fit_nd.values, cfg.preprocess.nan_fill_limit)
        scaler = Scaler.fit(vals[rows], cfg.preprocess, where=f"node {node}", quiet=True)  # training said it
        z = scaler.transform(vals)[0]
        cut = fit_rows(len(fit_idx), cfg.train.validation_split)
        train_idx, hold_idx = fit_idx[:cut], fit_idx[cut:]
        if len(train_idx) > bc.max_train_rows:
            pick = node_rng(bc.seed, node).choice(len(train_idx), int(bc.max_train_rows), replace=False)
            train_idx = train_idx[np.sort(pick)]
        train, hold = window_at(z, train_idx, w), window_at(z, hold_idx, w)
        score, error_like, unit = _fit(method, train, hold, bc, int(bc.seed))
        ref = score(hold if len(hold) else train)
        with_exc = excess and unit is not None
        # the reference rows' excess (0 inside the training range), from the fit store's rows
        ref_exc = scaler.excess_sum(z[hold_idx if len(hold) else train_idx]) if with_exc else None
        if eval_store is fit_store:  # fitted and scored on one store: the node read and standardised once
            nd = fit_nd
        else:
            nd = eval_store.read(node)
            z = scaler.transform(fill_gaps(nd.values, cfg.preprocess.nan_fill_limit))[0]
        if w == 1:
            raw = score(z)
        else:  # each block's windows built for it alone (a node-year's 10-row windows: 3.3 GB at once),
            step = 4 * _BLOCK  # blocks of whole distance blocks: the same distances, the same figures
            raw = np.concatenate([score(window_at(z, np.arange(a, min(a + step, len(z))), w))
                                  for a in range(0, len(z), step)] or [np.empty(0)])
        yield _Parts(node, raw, scaler.excess_sum(z) if with_exc else None, ref, ref_exc, unit, error_like,
                     split_codes(nd, cfg.split), nd.labels, nd.timestamp, z.shape[1])  # (excess: a window's newest row)
        bar.update(1)
    bar.close()


def _exclusions_digest(cfg: HpcadConfig, tcfg) -> str | None:
    """What the fitting run's ``split.exclude`` lists (its content, not its path), or None."""
    spec = cfg.split.exclude if tcfg is None else tcfg.split.get("exclude")
    excluded = read_exclusions(spec, cfg.data)
    return excluded.digest() if excluded else None


def _train_split(cfg: HpcadConfig):
    """The split of the training run (``train_run``), as its models saw the rows."""
    from omegaconf import OmegaConf

    from hpcad.runfolder import load_run_config

    tcfg = load_run_config(Path(cfg.train_run))
    return OmegaConf.merge(cfg.split, tcfg.split) if tcfg is not None else cfg.split


def skipped(cfg: HpcadConfig, eval_store: TelemetryStore) -> bool:
    """True (with a warning) beyond ``baselines.max_nodes`` nodes: baselines are a comparison."""
    if len(eval_store.nodes) <= cfg.baselines.max_nodes:
        return False
    log.warning("baselines skipped: %d nodes > baselines.max_nodes=%d (they are a comparison; raise the "
                "option to run them anyway)", len(eval_store.nodes), cfg.baselines.max_nodes, extra=CLUSTER_WIDE)
    return True


def settings_key(cfg: HpcadConfig, method: str, fit_store: TelemetryStore, eval_store: TelemetryStore,
                 nodes: list[str], weight: float | dict = 0.0) -> str | None:
    """A digest of what a baseline's signal file depends on (the stores' inputs, the nodes, the
    baseline, split, preprocessing and smoothing options, the range-excess weight or the rule that
    chooses it); None when a store cannot say what it holds."""
    from omegaconf import OmegaConf

    if not fit_store.signature or not eval_store.signature:
        return None
    tcfg = None
    if cfg.train_run:
        from hpcad.runfolder import load_run_config

        tcfg = load_run_config(Path(cfg.train_run))
    what = {"method": method, "fit": fit_store.signature, "eval": eval_store.signature, "nodes": nodes,
            "baselines": {k: cfg.baselines[k] for k in ("max_train_rows", "seed", *OPTIONS[method])},
            "excess_weight": weight if method in WITH_EXCESS else None,
            "split": split_identity(cfg.split),
            "exclude": _exclusions_digest(cfg, tcfg),
            "train_split": None if tcfg is None else OmegaConf.to_container(tcfg.split, resolve=True),
            "preprocess": OmegaConf.to_container(cfg.preprocess, resolve=True),
            "smooth": cfg.signal.smooth, "causal": cfg.signal.causal, "validation_split": cfg.train.validation_split}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_attrs(path: Path) -> dict:
    """A signal file's attributes ({} where there is none, or it cannot be read: it is written again)."""
    if not path.exists():
        return {}
    try:
        with open_h5(path, kind="baseline signal file") as f:
            return dict(f.attrs)
    except Exception:
        return {}


def run_baselines(cfg: HpcadConfig, fit_store: TelemetryStore, eval_store: TelemetryStore, out_dir: Path,
                  nodes: list[str] | None = None, rank: int | None = None, weight: float = 0.0) -> dict[str, Path]:
    """Each method's signal file of ``nodes`` (all of ``eval_store``'s by default): ``<method>.h5``;
    with ``rank``, that rank's share as ``<method>-rank<r>.h5`` (:func:`index_ranks` links them). A
    file already written for the same data and settings is kept (a rerun, a requeued job).

    ``weight``: the autoencoder's range-excess weight. With ``signal.excess_weight=auto`` and labelled
    rows each method that adds the term chooses its own weight as the autoencoder chose its own, on
    its own validation average precision (summed over every rank's nodes; each node fitted once, its
    scores kept in a scratch file until the weight is chosen), so that neither the baselines' figures depend on the
    autoencoder's training nor the autoencoder is compared with baselines given its choice."""
    out: dict[str, Path] = {}
    check_options(cfg.baselines)
    nodes = list(eval_store.nodes) if nodes is None else nodes
    for method in cfg.baselines.methods:
        path = out_dir / (f"{method}.h5" if rank is None else f"{method}-rank{rank}.h5")
        grid = weight_rule(cfg, method, eval_store, weight)
        key = settings_key(cfg, method, fit_store, eval_store, nodes, grid[0] if len(grid) == 1 else
                           {"grid": grid, "margin": float(cfg.signal.excess_margin), "fallback": weight})
        kept = _file_attrs(path)
        held = key is not None and str(kept.get("settings", "")) == key
        chosen, choice, totals = grid[0], None, None
        with _PartsCache(out_dir, method) as cache:
            if len(grid) > 1:  # every rank sums, once per method, whether its file is kept or not
                totals = _held_totals(kept, len(grid)) if held else None
                if totals is None:  # the scores are kept: the signals are made from them below
                    held, totals = False, validation_totals(method, cfg, fit_store, eval_store, nodes, grid,
                                                            cfg.compute.progress, keep=cache.put)
                chosen, choice = choose_weight(cfg, method, grid, all_sum(totals), weight)
                held = held and kept.get("excess_weight") == chosen  # (the same sums: the same choice)
            if held:
                log.info("baseline %s: %s is up to date (the same data and settings): kept", method, path.name)
            else:
                attrs = {"excess_weight": float(chosen)} if method in WITH_EXCESS else {}
                if choice is not None:
                    attrs.update(signal_choice=json.dumps(choice), choice_totals=json.dumps(totals.tolist()))
                signals = (cache.signals(chosen, cfg.signal) if cache.nodes else
                           baseline_signals(method, cfg, fit_store, eval_store, nodes, cfg.compute.progress, chosen))
                write_signal_file(path, method, signals, settings=key, store_signature=eval_store.signature,
                                  attrs=attrs)
                log.info("baseline %s -> %s", method, path)
        if rank is None:
            _drop_parts(out_dir, method, [])
        out[method] = path
    return out


class _PartsCache:
    """A method's per-node scores between the pass that chooses its weight and the signals: in a
    scratch HDF5 file beside its signal file (a node-year's scores are ~2 MB; up to
    ``baselines.max_nodes`` nodes), removed at the end, so that the nodes are fitted once."""

    FIELDS = ("raw", "exc", "ref_raw", "ref_exc", "split", "labels", "timestamp")

    def __init__(self, out_dir: Path, method: str):
        import contextlib

        self.out_dir, self.method, self.nodes, self.path, self.file = out_dir, method, [], None, None
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> "_PartsCache":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stack.__exit__(*exc)  # closes the file (hpcad.data.h5: not where a write found no room)
        finally:
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def put(self, parts: _Parts) -> None:
        if self.file is None:
            import os
            import tempfile

            from hpcad.data.h5 import h5_writing

            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(suffix=".h5", prefix=f".{self.method}-scores-", dir=self.out_dir)
            os.close(fd)
            self.path = Path(name)
            self.file = self.stack.enter_context(h5_writing(self.path))
        g = self.file.create_group(parts.node)
        for name in self.FIELDS:
            if getattr(parts, name) is not None:
                g.create_dataset(name, data=getattr(parts, name))
        g.attrs.update(unit=np.nan if parts.unit is None else parts.unit, error_like=parts.error_like,
                       width=parts.width)
        self.nodes.append(parts.node)

    def signals(self, weight: float, sig_cfg) -> Iterator[NodeSignal]:
        for node in self.nodes:
            g = self.file[node]
            unit = float(g.attrs["unit"])
            parts = _Parts(node, *(g[n][()] if n in g else None for n in self.FIELDS[:4]),
                           None if np.isnan(unit) else unit, bool(g.attrs["error_like"]),
                           *(g[n][()] if n in g else None for n in self.FIELDS[4:]), int(g.attrs["width"]))
            yield parts.signal(weight, sig_cfg)


def _held_totals(attrs: dict, n: int) -> np.ndarray | None:
    """The validation sums a kept signal file (its ``attrs``) was chosen with (its rank's share), or None."""
    try:
        totals = np.array(json.loads(str(attrs.get("choice_totals", "null"))), dtype=np.float64)
    except ValueError:
        return None
    return totals if totals.shape == (n + 1,) else None


def index_ranks(out_dir: Path, methods: list[str], ranks: int, store_signature: str = "") -> dict[str, Path]:
    """``<method>.h5`` as an index of links over the ranks' ``<method>-rank<r>.h5`` (rank 0, after every
    rank has written its share)."""
    out: dict[str, Path] = {}
    for method in methods:
        parts = [out_dir / f"{method}-rank{r}.h5" for r in range(ranks)]
        write_index(out_dir / f"{method}.h5", parts, {**signal_attrs(method, store_signature),
                                                      **{k: v for k, v in _file_attrs(parts[0]).items()
                                                         if k in ("excess_weight", "signal_choice")}})
        _drop_parts(out_dir, method, parts)
        log.info("baseline %s -> %s (an index of %d rank files)", method, out_dir / f"{method}.h5", ranks)
        out[method] = out_dir / f"{method}.h5"
    return out


def _drop_parts(out_dir: Path, method: str, parts: list[Path]) -> None:
    """Remove the per-rank files of ``method`` that its ``<method>.h5`` no longer links to (an earlier run
    on more ranks, or on several ranks before a single-process one)."""
    remove_unreferenced(out_dir, f"{method}-rank*.h5", [p.name for p in parts], f"per-rank {method}", f"{method}.h5")
