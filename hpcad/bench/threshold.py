"""``hpcad bench bench.mode=threshold``: the real ``threshold`` stage (fit the thresholds on labelled
errors, then apply them: alarms with their top metrics, figures, class profiles) timed on
``bench.nodes`` synthetic nodes x ``bench.rows`` rows, e.g. node-years: ``bench.rows=105120``."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf, open_dict

from hpcad.atomic import write_json
from hpcad.bench.rss import in_fresh_process, peak_rss_mb
from hpcad.bench.score import synthetic_run
from hpcad.device import resolve_device

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)


def _threshold_child(cfg: HpcadConfig, folder: str, conn) -> None:
    """The whole stage (fit and apply), then the rule's fit alone, in a fresh process: its peak RSS is
    the stage's, not the set-up's."""
    from hpcad.config import build
    from hpcad.errorstore import ErrorStore
    from hpcad.pipeline import stage_threshold
    from hpcad.threshold.reduce import Reducer

    t0 = time.perf_counter()
    result = stage_threshold(cfg, Path(folder))  # as `hpcad threshold` runs it: its imports' first use included
    stage_s = time.perf_counter() - t0
    errors = ErrorStore(Path(folder) / "errors.h5")
    t0 = time.perf_counter()
    build(cfg.threshold, "threshold").fit(errors.signals, Reducer())
    conn.send({"fit_s": time.perf_counter() - t0, "stage_s": stage_s, "alarms": result["alarms"],
               "peak_rss_mb": peak_rss_mb()})


def bench_threshold(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Score ``bench.nodes`` labelled synthetic nodes (untimed) into ``<run>/bench_run``, then time the
    whole threshold stage (fit and apply), as ``hpcad threshold`` runs it, and the rule's fit alone, in
    a fresh process (docs/benchmarks.md)."""
    from hpcad.score import score_nodes

    b = cfg.bench
    folder = run_dir / "bench_run"
    folder.mkdir(exist_ok=True)
    store = synthetic_run(cfg, folder / "bench_store.h5", folder / "models", labelled=True)
    bcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(bcfg):
        bcfg.data.source, bcfg.train_run = str(store.path), None  # the store, used in place: the stage's check
    t0 = time.perf_counter()
    score_nodes(bcfg, store, folder / "models", folder / "errors.h5", device=resolve_device(b.device))
    log.info("bench threshold: %d nodes x %d rows scored in %.1f s (not timed)", b.nodes, b.rows,
             time.perf_counter() - t0)
    res = in_fresh_process(_threshold_child, bcfg, str(folder), what="bench threshold")
    out = {"mode": "threshold", "nodes": b.nodes, "rows": b.rows, "metrics": 160,
           "rule": str(bcfg.threshold.get("_target_", "")).rsplit(".", 1)[-1], "scope": bcfg.threshold.get("scope"),
           "errors_mb": round((folder / "errors.h5").stat().st_size / 2**20, 1), "fit_s": round(res["fit_s"], 3),
           "threshold_s": round(res["stage_s"], 3), "apply_s": round(res["stage_s"] - res["fit_s"], 3),
           "node_years_per_s": b.nodes * b.rows / 105120 / res["stage_s"], "alarms": res["alarms"],
           "peak_rss_mb": round(res["peak_rss_mb"]), "cpu_count": os.cpu_count()}
    log.info("bench threshold: fit %.2f s, fit and apply %.2f s, peak RSS %.0f MB", res["fit_s"], res["stage_s"],
             res["peak_rss_mb"])
    write_json(run_dir / "bench.json", out)
    return out
