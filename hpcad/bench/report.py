"""``hpcad bench bench.mode=report``: ``report.html`` and its node pages for a night of a large
machine (synthetic errors, ``bench.alarms`` alarmed nodes)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from hpcad.atomic import write_json
from hpcad.bench.rss import peak_rss_mb
from hpcad.errors import ConfigError
from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
from hpcad.preprocess import Scaler
from hpcad.progress import iterate

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)


def bench_report(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Time ``report.html`` and its node pages for a night of ``bench.nodes`` nodes x ``bench.rows``
    rows x ``bench.metrics`` metrics with ``bench.alarms`` alarmed nodes (synthetic per-metric errors:
    each alarmed node gets one 30-row burst on 5 metrics)."""
    from hpcad.data.h5 import h5_writing
    from hpcad.data.store import STR
    from hpcad.report.page import write_report
    from hpcad.errorstore import FORMAT, ErrorStore
    from hpcad.score import _write_node_errors
    from hpcad.threshold.cost import CostModel
    from hpcad.threshold.evaluate import apply_thresholds
    from hpcad.threshold.rules import Thresholds

    b = cfg.bench
    if not 0 <= b.alarms <= b.nodes or b.rows < 40:
        raise ConfigError(f"bench.mode=report: needs 0 <= bench.alarms ({b.alarms}) <= bench.nodes ({b.nodes}) "
                          f"and bench.rows >= 40 ({b.rows})")
    rng = np.random.default_rng(b.seed)
    metrics = [f"m{i // 16}_{i % 16}" for i in range(b.metrics)]
    alarmed = set(rng.choice(b.nodes, b.alarms, replace=False).tolist()) if b.alarms else set()
    sig = SimpleNamespace(smooth=cfg.signal.smooth, causal=False)
    t0 = time.perf_counter()
    with h5_writing(run_dir / "errors.h5") as f:
        f.attrs.update(hpcad_format=FORMAT, format_version=1)
        f.create_dataset("metrics", data=np.array(metrics, dtype=object), dtype=STR)
        g = f.create_group("nodes")
        for k in iterate(range(b.nodes), "bench report: errors", "node", cfg.compute.progress):
            err = rng.gamma(0.5, 0.02, size=(b.rows, b.metrics)).astype(np.float32)
            if k in alarmed:
                a = int(rng.integers(0, b.rows - 35))
                err[a:a + 30, rng.choice(b.metrics, 5, replace=False)] += 5.0
            nd = SimpleNamespace(name=f"node{k:05d}", timestamp=1_736_640_000 + 300 * np.arange(b.rows), labels=None)
            _write_node_errors(g, nd, err, 1.6, np.full(b.rows, 2, np.int8), sig)
    errors_s = time.perf_counter() - t0
    # the alarmed nodes' telemetry and models: their pages plot the metrics against the training range
    from hpcad.data.node import NodeData
    from hpcad.data.store import write_store
    from hpcad.model.files import NodeModel, model_path

    spec = AutoencoderSpec([8])
    telemetry = [NodeData(f"node{k:05d}", 1_736_640_000 + 300 * np.arange(b.rows),
                          rng.normal(size=(b.rows, b.metrics)).astype(np.float32), None) for k in sorted(alarmed)]
    if telemetry:
        write_store(run_dir / "store.h5", metrics, telemetry, "bench")
    for nd in telemetry:
        NodeModel(nd.name, spec, metrics, [glorot_init(spec, b.metrics, 0)], Scaler.fit(nd.values, cfg.preprocess),
                  {}, 1.0).save(model_path(run_dir / "models", nd.name))
    errors = ErrorStore(run_dir / "errors.h5")
    th = Thresholds("quantile", "node", None, {n: 5.0 for n in errors.nodes})
    th.save(run_dir / "thresholds.json")
    records, _ = apply_thresholds(errors, th, CostModel(1.0, 5.0, 12), cfg.report.top_k, "s", None,
                                  run_dir / "alarms.csv")
    t0 = time.perf_counter()
    write_report(cfg, run_dir, errors, run_dir / "models", title="hpcad bench report")
    report_s = time.perf_counter() - t0
    pages = list((run_dir / "nodes").glob("*.html")) if (run_dir / "nodes").exists() else []
    size = (run_dir / "report.html").stat().st_size + sum(p.stat().st_size for p in pages)
    out = {"mode": "report", "nodes": b.nodes, "rows": b.rows, "metrics": b.metrics, "alarms": len(records),
           "alarmed_nodes": len({r["node"] for r in records}), "node_pages": len(pages),
           "errors_write_s": round(errors_s, 2), "report_s": round(report_s, 2), "report_mb": round(size / 1e6, 2),
           "peak_rss_mb": peak_rss_mb(), "cpu_count": os.cpu_count()}
    write_json(run_dir / "bench.json", out)
    return out
