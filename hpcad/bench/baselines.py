"""``hpcad bench bench.mode=baselines``: each baseline's time and peak memory per node, one core each."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpcad.atomic import write_json
from hpcad.bench.rss import in_fresh_process, peak_rss_mb
from hpcad.errors import ConfigError

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)


def _baseline_child(cfg: HpcadConfig, store: str, method: str, conn) -> None:
    from threadpoolctl import threadpool_limits

    from hpcad.baselines import baseline_signals, excess_weight
    from hpcad.data.store import TelemetryStore

    torch.set_num_threads(1)
    st = TelemetryStore(Path(store))
    t0 = time.perf_counter()
    with threadpool_limits(1):  # numpy's BLAS too: the figure is per core
        nodes = sum(1 for _ in baseline_signals(method, cfg, st, st, progress=bool(cfg.compute.progress),
                                                weight=excess_weight(cfg, None)))  # as a run adds it
    conn.send({"s": time.perf_counter() - t0, "nodes": nodes,
               "peak_rss_mb": peak_rss_mb()})


def bench_baselines(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Time each of ``baselines.methods`` on ``bench.nodes`` nodes x ``bench.rows`` rows x
    ``bench.metrics`` metrics (random values; a node-year: ``bench.nodes=1 bench.rows=105120
    bench.metrics=160``), each method in a fresh process on one core, whose peak RSS is what one
    rank fitting baselines needs (docs/benchmarks.md)."""
    from hpcad.baselines import check_methods
    from hpcad.data.node import NodeData
    from hpcad.data.store import write_store

    b, methods = cfg.bench, list(cfg.baselines.methods)
    check_methods(methods)
    if not methods:
        raise ConfigError("bench.mode=baselines: baselines.methods is empty")
    store = run_dir / f"bench_baselines_{b.nodes}x{b.rows}x{b.metrics}_seed{b.seed}.h5"  # kept across reruns
    if not store.exists():
        rng = np.random.default_rng(b.seed)
        write_store(store, [f"m{i}" for i in range(b.metrics)],
                    (NodeData(f"node{k:05d}", 1_700_000_000 + 300 * np.arange(b.rows, dtype=np.int64),
                              (rng.normal(size=(1, b.metrics)) + 0.3 * rng.normal(size=(b.rows, b.metrics))
                               ).astype(np.float32), None) for k in range(b.nodes)), "bench")
    per: dict[str, dict] = {}
    for method in methods:
        res = in_fresh_process(_baseline_child, cfg, str(store), method, what=f"bench baselines: the {method}")
        per[method] = {"s": round(res["s"], 2), "s_per_node": round(res["s"] / b.nodes, 2),
                       "peak_rss_mb": round(res["peak_rss_mb"])}
        log.info("bench baselines: %s %.1f s for %d node(s), peak RSS %.0f MB", method, res["s"], res["nodes"],
                 res["peak_rss_mb"])
    total = sum(m["s"] for m in per.values())
    out = {"mode": "baselines", "nodes": b.nodes, "rows": b.rows, "metrics": b.metrics, "methods": per,
           "s_per_node": round(total / b.nodes, 2), "nodes_per_s": b.nodes / total,
           "peak_rss_mb": max(m["peak_rss_mb"] for m in per.values()), "threads": 1, "cpu_count": os.cpu_count()}
    write_json(run_dir / "bench.json", out)
    return out
