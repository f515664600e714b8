"""``hpcad bench bench.mode=score``: the real ``score`` stage timed on a store and model files of
``bench.nodes`` nodes (e.g. one day: ``bench.rows=288``)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpcad.atomic import write_json
from hpcad.bench.rss import peak_rss_mb
from hpcad.data.synthetic import generate_node
from hpcad.device import resolve_device
from hpcad.errors import ConfigError
from hpcad.model.autoencoder import glorot_init
from hpcad.model.ensemble import member_seed
from hpcad.model.whiten import Whitening
from hpcad.preprocess import Scaler
from hpcad.train import model_spec

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)


def synthetic_run(cfg: HpcadConfig, store_path: Path, models_dir: Path, labelled: bool = False):
    """A store of ``bench.nodes`` synthetic nodes x ``bench.rows`` rows (``bench.pool`` distinct ones,
    reused cyclically; ``labelled``: with their anomaly labels) and a model file per node (initial
    weights: what is timed does not depend on training; files there already are kept)."""
    from hpcad.data.node import NodeData
    from hpcad.data.store import TelemetryStore, write_store
    from hpcad.data.synthetic import metric_names
    from hpcad.model.files import NodeModel, model_path

    b = cfg.bench
    if b.metrics != 160:
        raise ConfigError(f"bench.mode={b.mode}: the synthetic cluster has 160 metrics: set bench.metrics=160")
    spec = model_spec(cfg)
    pool = [generate_node(f"p{i}", b.rows, seed=b.seed) for i in range(min(b.pool, b.nodes))]
    names = [f"node{i:05d}" for i in range(b.nodes)]
    write_store(store_path, metric_names(), (NodeData(n, pool[i % len(pool)].timestamp, pool[i % len(pool)].values,
                                                      pool[i % len(pool)].labels if labelled else None)
                                             for i, n in enumerate(names)), "bench")
    store = TelemetryStore(store_path)
    for i, n in enumerate(names):
        if not model_path(models_dir, n).exists():
            v = pool[i % len(pool)].values
            members = [glorot_init(spec, v.shape[1], member_seed(i, r)) for r in range(spec.members)]
            # untrained: the identity stands in for a whitening fitted on training rows (the same work to score)
            NodeModel(n, spec, store.metrics, members, Scaler.fit(v, cfg.preprocess), {}, 1.0,
                      whitening=Whitening.identity(v.shape[1])).save(model_path(models_dir, n))
    return store


def bench_score(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Time the real score stage on ``bench.nodes`` nodes x ``bench.rows`` rows (e.g. one day: 288);
    with ``bench.labelled`` the store has labels and the time includes ``auto``'s signal choice pass
    (its candidates and ranked nodes in ``signal_choice``)."""
    import json

    from hpcad.errorstore import ErrorStore
    from hpcad.score import score_nodes

    b = cfg.bench
    store_path, models_dir = run_dir / "bench_store.h5", run_dir / "bench_models"
    store = synthetic_run(cfg, store_path, models_dir, labelled=b.labelled)
    device = resolve_device(b.device)
    t0 = time.perf_counter()
    score_nodes(cfg, store, models_dir, run_dir / "bench_errors.h5", device=device)
    score_s = time.perf_counter() - t0
    out = {"mode": "score", "nodes": b.nodes, "rows": b.rows, "metrics": 160, "device": str(device),
           "score_s": round(score_s, 3), "nodes_per_s": b.nodes / score_s, "rows_per_s": b.nodes * b.rows / score_s,
           "peak_rss_mb": peak_rss_mb(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "labelled": bool(b.labelled)}
    choice = json.loads(ErrorStore(run_dir / "bench_errors.h5").attrs.get("signal_choice", "{}"))
    out["signal_choice"] = {"candidates": len(choice.get("candidates", [])), "nodes": choice.get("nodes", 0),
                            "chosen": choice.get("chosen")}
    write_json(run_dir / "bench.json", out)
    return out
