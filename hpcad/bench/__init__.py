"""``hpcad bench``: reproducible throughput and memory of each stage, one module per
``bench.mode`` (docs/benchmarks.md): ``train`` (batched training against the naive loop),
``score``, ``ingest``, ``baselines``, ``report``, ``drift`` (light retraining against none and
full retraining on synthetic drift), ``explain`` (how often alarms' causes name the synthetic
faults, in a run folder), ``nightly`` (one night of the nightly job, by phase) and ``threshold``
(fitting and applying the thresholds on labelled errors). Each writes
``bench.json`` in the run folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.errors import ConfigError

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig


def run_bench(cfg: HpcadConfig, run_dir: Path) -> dict:
    from hpcad.bench.baselines import bench_baselines
    from hpcad.bench.drift import run_drift_study
    from hpcad.bench.explain import bench_explain
    from hpcad.bench.ingest import bench_ingest
    from hpcad.bench.nightly import bench_nightly
    from hpcad.bench.report import bench_report
    from hpcad.bench.score import bench_score
    from hpcad.bench.threshold import bench_threshold
    from hpcad.bench.train import bench_train

    modes = {"train": bench_train, "score": bench_score, "ingest": bench_ingest, "drift": run_drift_study,
             "report": bench_report, "baselines": bench_baselines, "explain": bench_explain, "nightly": bench_nightly,
             "threshold": bench_threshold}
    if cfg.bench.mode not in modes:
        raise ConfigError(f"bench.mode={cfg.bench.mode!r}: {', '.join(modes)}")
    return modes[cfg.bench.mode](cfg, run_dir)
