"""Baselines on the same splits and preprocessing: the lecture's KDE and scikit-learn's IsolationForest.

Each baseline fits per node on the same standardised normal training rows as the autoencoder and
writes a signal file in the error-file layout, so thresholds and scores use the same code.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import KernelDensity

from hpcad.data.store import TelemetryStore
from hpcad.errors import ConfigError
from hpcad.preprocess import Scaler, fill_gaps, split_codes, training_rows
from hpcad.score import NodeSignal, write_signal_file

log = logging.getLogger(__name__)


def _kde(train: np.ndarray, holdout: np.ndarray, bandwidths: list[float]) -> tuple[KernelDensity, float]:
    """Gaussian KDE with the bandwidth that maximises held-out log-likelihood."""
    best, best_ll = None, -np.inf
    for bw in bandwidths:
        kde = KernelDensity(bandwidth=bw).fit(train)
        ll = kde.score(holdout) if len(holdout) else kde.score(train)
        if ll > best_ll:
            best, best_ll = bw, ll
    return KernelDensity(bandwidth=best).fit(train), float(best)


def baseline_signals(method: str, cfg, fit_store: TelemetryStore, eval_store: TelemetryStore) -> Iterator[NodeSignal]:
    rng = np.random.default_rng(cfg.baselines.seed)
    for node in eval_store.nodes:
        if node not in fit_store.nodes:
            raise ConfigError(f"baseline {method}: node {node} has no training data in {fit_store.path}")
        fit_nd = fit_store.read(node)
        codes = split_codes(fit_nd, cfg.split) if fit_store is eval_store else _train_codes(fit_nd, cfg)
        rows = training_rows(fit_nd, codes, cfg.split.normal_only, cfg.split.exclude_idle)
        vals = fill_gaps(fit_nd.values, cfg.preprocess.nan_fill_limit)[rows]
        scaler = Scaler.fit(vals, cfg.preprocess, where=f"node {node}")
        z = scaler.transform(vals)[0]
        if len(z) > cfg.baselines.max_train_rows:
            z = z[np.sort(rng.choice(len(z), cfg.baselines.max_train_rows, replace=False))]
        cut = int(np.ceil(len(z) * (1 - cfg.train.validation_split)))
        train, hold = z[:cut], z[cut:]
        if method == "kde":
            model, bw = _kde(train, hold, list(cfg.baselines.kde_bandwidths))
            score = lambda x: -model.score_samples(x)  # noqa: E731
        elif method == "iforest":
            model = IsolationForest(n_estimators=200, random_state=cfg.baselines.seed).fit(train)
            score = lambda x: -model.score_samples(x)  # noqa: E731
        else:
            raise ConfigError(f"baselines.methods: unknown method {method!r} (kde, iforest)")
        ref = score(hold if len(hold) else train)
        offset, scale = float(np.median(ref)), float(max(np.std(ref), 1e-9))
        nd = eval_store.read(node)
        sig = score(scaler.transform(fill_gaps(nd.values, cfg.preprocess.nan_fill_limit))[0]) - offset
        yield NodeSignal(node, sig.astype(np.float64), split_codes(nd, cfg.split), nd.labels, nd.timestamp, scale)


def _train_codes(nd, cfg) -> np.ndarray:
    """A training run's own split, as the models of ``train_run`` saw it."""
    from omegaconf import OmegaConf

    from hpcad.pipeline import load_run_config

    tcfg = load_run_config(Path(cfg.train_run))
    return split_codes(nd, OmegaConf.merge(cfg.split, tcfg.split) if tcfg is not None else cfg.split)


def run_baselines(cfg, fit_store: TelemetryStore, eval_store: TelemetryStore, out_dir: Path) -> dict[str, Path]:
    out = {}
    for method in cfg.baselines.methods:
        path = out_dir / f"{method}.h5"
        write_signal_file(path, method, baseline_signals(method, cfg, fit_store, eval_store))
        log.info("baseline %s -> %s", method, path)
        out[method] = path
    return out
