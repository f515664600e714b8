"""``hpcad bench bench.mode=nightly``: one night of the nightly job on a cluster of ``bench.nodes``
synthetic nodes (the synthetic cluster's 160 metrics, labelled anomalies in the night on
``bench.alarms`` of them): where its time goes (ingest, scoring, alarms, drift and light, report)
and its peak memory.

Set-up, not timed: the nodes' exports as a site writes them (``<run>/site/train/<node>.csv``, the
``bench.days`` training days; ``<run>/site/daily/<night>/<node>.csv``, the night after), and a
training run over them (``hpcad run`` in a child process, its defaults but ``train.epochs``).
Then the night is scored in this process as cron's job scores it (``run_nightly``) and timed.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import OmegaConf, open_dict

from hpcad.atomic import write_json
from hpcad.bench.rss import peak_rss_mb
from hpcad.errors import ConfigError
from hpcad.progress import iterate

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)
DAY = 288  # five-minute rows


def write_site(root: Path, nodes: int, days: int, faulty: int, seed: int, progress: bool) -> str:
    """Training exports of ``days`` days and one night's per node, anomalies in the night on ``faulty``
    nodes drawn at random; returns the night (YYYY-MM-DD)."""
    from hpcad.data.synthetic import START_EPOCH, generate_node, node_frame, node_names

    night = (dt.datetime.fromtimestamp(START_EPOCH, dt.timezone.utc) + dt.timedelta(days=days)).date().isoformat()
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "daily" / night).mkdir(parents=True, exist_ok=True)
    names = node_names(nodes)
    bad = set(np.random.default_rng(seed).choice(nodes, min(faulty, nodes), replace=False).tolist())
    for k, name in enumerate(iterate(names, "bench nightly: exports", "node", progress)):
        nd = generate_node(name, DAY * (days + 1), seed, clean_fraction=days / (days + 1),
                           anomaly_fraction=0.12 if k in bad else 0.0)
        nd.timestamp = START_EPOCH + 300 * np.arange(len(nd.timestamp))
        frame = node_frame(nd)
        frame.iloc[:DAY * days].to_csv(root / "train" / f"{name}.csv", index=False, float_format="%.6g")
        frame.iloc[DAY * days:].to_csv(root / "daily" / night / f"{name}.csv", index=False, float_format="%.6g")
    return night


def bench_nightly(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Time one night of ``bench.nodes`` nodes (``bench.days`` training days before it)."""
    from hpcad.nightly import run_nightly

    b = cfg.bench
    if b.nodes < 1 or b.days < 1:
        raise ConfigError(f"bench.mode=nightly: needs bench.nodes >= 1 ({b.nodes}) and bench.days >= 1 ({b.days})")
    site, train = run_dir / "site", run_dir / "trainrun"
    t0 = time.perf_counter()
    night = write_site(site, b.nodes, b.days, b.alarms, b.seed, cfg.compute.progress)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hpcad", "run", f"data.source={site / 'train'}", f"hydra.run.dir={train}",
                    f"train.epochs={cfg.train.epochs}", f"train.seed={b.seed}", "baselines.methods=[]",
                    "report.enabled=false", "compute.progress=false"], check=True)
    train_s = time.perf_counter() - t0
    ncfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(ncfg):
        ncfg.train_run = str(train)
        ncfg.nightly.update(input=f"{site / 'daily'}/{{date}}", out=str(run_dir / "nightly"), date=night)
    t0 = time.perf_counter()
    res = run_nightly(ncfg, run_dir)["days"][0]
    night_s = time.perf_counter() - t0
    pages = list((run_dir / "nightly" / night / "nodes").glob("*.html"))
    out = {"mode": "nightly", "nodes": b.nodes, "training_days": b.days, "faulty_nodes": min(b.alarms, b.nodes),
           "night": night, "night_s": round(night_s, 2),
           "seconds_by_phase": res["seconds_by_phase"], "alarms": res["alarms"], "node_pages": len(pages),
           "setup_s": round(setup_s, 1), "training_run_s": round(train_s, 1), "peak_rss_mb": peak_rss_mb(),
           "cpu_count": os.cpu_count()}
    log.info("bench nightly: %d nodes, night %s in %.1f s (%s)", b.nodes, night, night_s,
             ", ".join(f"{k} {v:.1f} s" for k, v in res["seconds_by_phase"].items()))
    write_json(run_dir / "bench.json", out)
    return out
