"""``hpcad bench bench.mode=drift``: light retraining vs none vs full retraining on synthetic drift.

Each of ``bench.nodes`` synthetic nodes reports every 5 minutes for ``train_days + 7 + test_days``
days (labelled anomalies throughout). Models train on the first ``train_days`` days. From the
next day on, the node's normal levels shift (``bench.drift``: CPU/GPU temperatures +6 C, power
+15 %, fans +10 %, ambient +3 C; a new cooling or firmware state), anomalies included. Then:

- ``none``: the old model and scaler, as if nothing happened;
- ``light_Nd`` (N = 1, 3, 7): hpcad.model.light maps fitted on the normal rows of the N days right
  before the test period (the old model, scaler and network stay frozen);
- ``full``: a new scaler and autoencoder trained from scratch on the same 7 days.

Each strategy's per-node threshold is the 99th percentile of its signal on normal rows it saw: the
held-out validation rows of training for ``none`` and ``full``, the fitted rows for the light maps
(a ridge-penalised linear map barely fits its own rows better than new ones), and all are scored on
the last ``test_days`` days: row ROC AUC (threshold-free), event precision/recall/F1, false alarms, missed anomalies and
cost (hpcad.threshold.cost), and the fit time.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from hpcad.atomic import write_json
from hpcad.data.node import NodeData
from hpcad.data.synthetic import START_EPOCH, generate_node, metric_names
from hpcad.model.light import LightMap, fit_light_map, recon_and_code
from hpcad.model.ensemble import node_seed, train_ensemble
from hpcad.preprocess import Scaler, fit_rows
from hpcad.threshold.cost import CostModel, Scores, score_rows
from hpcad.train import model_spec

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

DAY = 288
SHIFT = {"temp": ("add", 6.0), "gpu_temp": ("add", 6.0), "pow": ("mul", 1.15), "fan": ("mul", 1.10),
         "ambient": ("add", 3.0)}


def apply_drift(nd: NodeData, start_row: int, metrics: list[str], scale: float = 1.0) -> NodeData:
    """The same node with its levels shifted from ``start_row`` on (see ``SHIFT``; ``scale`` times
    each shift: 0.25 is a quarter of it)."""
    v = nd.values.copy()
    for j, m in enumerate(metrics):
        key = next((k for k in sorted(SHIFT, key=len, reverse=True) if m.startswith(k)), None)
        if key is None:
            continue
        op, amount = SHIFT[key]
        v[start_row:, j] = v[start_row:, j] + amount * scale if op == "add" else \
            v[start_row:, j] * (1 + (amount - 1) * scale)
    return NodeData(nd.name, nd.timestamp, v, nd.labels)


def _signal(params, n_enc: int, x: np.ndarray, lm: LightMap | None = None) -> np.ndarray:
    recon, code = recon_and_code([params], n_enc, x)
    if lm is not None:
        recon = lm.apply(recon.float(), code.float()).double()
    return ((recon - torch.from_numpy(x).double()) ** 2).sum(1).numpy()


def run_drift_study(cfg: HpcadConfig, run_dir: Path, train_days: int = 7, test_days: int = 7) -> dict:
    b = cfg.bench
    # the study measures light retraining of one plain per-row model per node
    spec = dataclasses.replace(model_spec(cfg), members=1, window=1)
    metrics = metric_names()
    n_enc = len(spec.hidden)
    tc = SimpleNamespace(**{**dict(cfg.train), "epochs": int(cfg.train.epochs)})
    adapt_days = 7
    rows = DAY * (train_days + adapt_days + test_days)
    drift_at, test_at = DAY * train_days, DAY * (train_days + adapt_days)
    nodes = []
    for i in range(b.nodes):
        nd = generate_node(f"drift{i:03d}", rows, seed=b.seed, clean_fraction=0.0, anomaly_fraction=0.1)
        nd.timestamp = START_EPOCH + 300 * np.arange(rows)
        nodes.append(apply_drift(nd, drift_at, metrics))
    cm = CostModel()

    def normal(nd, a, z):
        return nd.values[a:z][nd.labels[a:z] == 0]

    # the original models: scaler + autoencoder on the first train_days days
    t0 = time.perf_counter()
    scalers = [Scaler.fit(normal(nd, 0, drift_at), cfg.preprocess) for nd in nodes]
    data = [sc.transform(normal(nd, 0, drift_at))[0] for sc, nd in zip(scalers, nodes)]
    base = train_ensemble(spec, data, [node_seed(b.seed, nd.name) for nd in nodes], tc, torch.device("cpu"))
    base_s = time.perf_counter() - t0
    strategies: dict[str, dict] = {}

    def evaluate(name, per_node, fit_s):
        tot, aucs = Scores(), []
        for nd, (signal_fn, thr) in zip(nodes, per_node):
            sig = signal_fn(nd.values[test_at:])
            lab = nd.labels[test_at:]
            tot += score_rows(sig, lab, thr, cm)
            aucs.append(roc_auc_score(lab != 0, sig))
        strategies[name] = {**tot.as_dict(), "roc_auc": float(np.mean(aucs)), "fit_s_per_node": fit_s / len(nodes)}

    def q99(sig):
        return float(np.quantile(sig, 0.99))

    # none: original model, threshold from its held-out training rows
    per_node = []
    for k, nd in enumerate(nodes):
        p, sc = base.params[k], scalers[k]
        n_tr = fit_rows(len(data[k]), tc.validation_split)
        thr = q99(_signal(p, n_enc, data[k][n_tr:]))
        per_node.append((lambda v, p=p, sc=sc: _signal(p, n_enc, sc.transform(v)[0]), thr))
    evaluate("none", per_node, base_s)
    for days in (1, 3, 7):
        per_node, t0 = [], time.perf_counter()
        for k, nd in enumerate(nodes):
            p, sc = base.params[k], scalers[k]
            x = sc.transform(normal(nd, test_at - days * DAY, test_at))[0]
            lm = fit_light_map([p], n_enc, x, cfg.nightly.light_ridge, [f"{days}d"])
            per_node.append((lambda v, p=p, sc=sc, lm=lm: _signal(p, n_enc, sc.transform(v)[0], lm),
                             q99(_signal(p, n_enc, x, lm))))
        evaluate(f"light_{days}d", per_node, time.perf_counter() - t0)
    t0 = time.perf_counter()
    new_sc = [Scaler.fit(normal(nd, drift_at, test_at), cfg.preprocess) for nd in nodes]
    new_data = [sc.transform(normal(nd, drift_at, test_at))[0] for sc, nd in zip(new_sc, nodes)]
    full = train_ensemble(spec, new_data, [node_seed(b.seed + 1, nd.name) for nd in nodes], tc, torch.device("cpu"))
    full_s = time.perf_counter() - t0
    per_node = []
    for k in range(len(nodes)):
        p, sc = full.params[k], new_sc[k]
        n_tr = fit_rows(len(new_data[k]), tc.validation_split)
        per_node.append((lambda v, p=p, sc=sc: _signal(p, n_enc, sc.transform(v)[0]),
                         q99(_signal(p, n_enc, new_data[k][n_tr:]))))
    evaluate("full_7d", per_node, full_s)
    out = {"mode": "drift", "nodes": b.nodes, "train_days": train_days, "adapt_days_max": adapt_days,
           "test_days": test_days, "shift": {k: list(v) for k, v in SHIFT.items()}, "model": spec.to_dict(),
           "epochs": int(cfg.train.epochs), "light_ridge": cfg.nightly.light_ridge, "cost_model": vars(cm),
           "strategies": strategies}
    write_json(run_dir / "bench.json", out)
    return out
