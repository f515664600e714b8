"""``hpcad bench bench.mode=ingest``: an input written (``bench.input``: long format, daily exports
of every node, or a CSV file per node) and its ingestion timed on one or ``bench.ranks`` local ranks, with the peak RSS
that must stay bounded by a bucket or an input chunk, not by the input."""
from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcad.atomic import write_json
from hpcad.bench.rss import in_fresh_process, peak_rss_mb
from hpcad.errors import ConfigError
from hpcad.progress import iterate

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)


def write_long_input(out: Path, nodes: int, days: int, metrics: int, seed: int, plugins: int = 4) -> int:
    """Long-format parquet like an ExaMon export: one file per metric plugin, a row group per day,
    rows in time order with every node interleaved. Streams a day at a time; returns the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    node_dict = pa.array([f"node{i:05d}" for i in range(nodes)])
    groups = np.array_split(np.arange(metrics), plugins)
    rows, per_day = 0, 86_400 // 300
    for p, cols in enumerate(groups):
        metric_dict = pa.array([f"metric{c:03d}" for c in cols])
        path = out / f"plugin{p}-month0.parquet"
        with pq.ParquetWriter(path, pa.schema([("timestamp", pa.timestamp("s", tz="UTC")),
                                              ("node", pa.dictionary(pa.int32(), pa.string())),
                                              ("metric", pa.dictionary(pa.int32(), pa.string())),
                                              ("value", pa.float32())])) as w:
            for d in iterate(range(days), f"bench input {path.name}", "day"):
                t = 1_736_121_600 + 300 * (d * per_day + np.arange(per_day, dtype=np.int64))
                n = per_day * nodes * len(cols)  # order: time, node, metric
                ts = np.repeat(t, nodes * len(cols))
                node = np.tile(np.repeat(np.arange(nodes, dtype=np.int32), len(cols)), per_day)
                metric = np.tile(np.arange(len(cols), dtype=np.int32), per_day * nodes)
                w.write_table(pa.table({
                    "timestamp": pa.array(ts, pa.timestamp("s", tz="UTC")),
                    "node": pa.DictionaryArray.from_arrays(node, node_dict),
                    "metric": pa.DictionaryArray.from_arrays(metric, metric_dict),
                    "value": rng.standard_normal(n, dtype=np.float32)}), row_group_size=1 << 20)
                rows += n
    return rows


def write_daily_input(out: Path, nodes: int, days: int, metrics: int, seed: int) -> int:
    """Daily wide parquet exports of the whole cluster (a database dump): one file per day, a ``node``
    column, rows in time order with every node interleaved. Returns the samples (rows x metrics)."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_day = 86_400 // 300
    names = np.array([f"node{i:05d}" for i in range(nodes)])
    for d in iterate(range(days), "bench input (daily exports)", "day"):
        t = 1_736_121_600 + 300 * (d * per_day + np.arange(per_day, dtype=np.int64))
        frame = pd.DataFrame(rng.standard_normal((per_day * nodes, metrics), dtype=np.float32),
                             columns=[f"metric{c:03d}" for c in range(metrics)])
        frame.insert(0, "node", np.tile(names, per_day))
        frame.insert(0, "timestamp", pd.to_datetime(np.repeat(t, nodes), unit="s", utc=True))
        frame.to_parquet(out / f"{d:04d}.parquet", index=False)
    return per_day * nodes * days * metrics


def write_node_input(out: Path, nodes: int, days: int, metrics: int, seed: int) -> int:
    """A CSV file per node (the most common export: ``node00042.csv``, every day's rows in time order,
    ISO timestamps), written a node at a time. Returns the samples (rows x metrics)."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = days * 86_400 // 300
    stamps = pd.to_datetime(1_736_121_600 + 300 * np.arange(rows, dtype=np.int64), unit="s", utc=True)
    for i in iterate(range(nodes), "bench input (node files)", "node"):
        frame = pd.DataFrame(rng.standard_normal((rows, metrics), dtype=np.float32),
                             columns=[f"metric{c:03d}" for c in range(metrics)])
        frame.insert(0, "timestamp", stamps)
        frame.to_csv(out / f"node{i:05d}.csv", index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
    return rows * nodes * metrics


def _ingest_child(data_cfg, store: str, conn) -> None:
    from hpcad.data.ingest import ingest

    t0 = time.perf_counter()
    ingest(data_cfg, Path(store))
    conn.send({"ingest_s": time.perf_counter() - t0,
               "peak_rss_mb": peak_rss_mb()})


def bench_ingest(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Generate an input (``bench.input``: long format, daily exports of every node, or a CSV file
    per node; kept across reruns) and time its ingestion in a fresh process, whose peak RSS is the
    figure that must stay bounded by the bucket size (long), an input chunk (days) or a node's rows
    (nodes), not the input size."""
    from omegaconf import OmegaConf

    from hpcad.config import DataConfig

    b = cfg.bench
    writers = {"long": write_long_input, "days": write_daily_input, "nodes": write_node_input}
    if b.input not in writers:
        raise ConfigError(f"bench.input={b.input!r}: one of {', '.join(writers)}")
    src = run_dir / f"bench_{b.input}_{b.nodes}x{b.days}dx{b.metrics}_seed{b.seed}"
    marker = src / ".complete"
    t0 = time.perf_counter()
    if marker.exists():
        rows = int(marker.read_text())
    else:
        rows = writers[b.input](src, b.nodes, b.days, b.metrics, b.seed)
        marker.write_text(str(rows))
    gen_s = time.perf_counter() - t0
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
    data_cfg.source, data_cfg.jobs = str(src), None
    data_cfg.format = "long" if b.input == "long" else "wide"
    store = run_dir / "bench_store.h5"
    store.unlink(missing_ok=True)
    if b.ranks > 1:
        res = _ingest_ranks(data_cfg, run_dir / "bench_ingest_ranks", b.ranks)
        store, parts = res.pop("store"), res.pop("parts")
    else:
        res = in_fresh_process(_ingest_child, data_cfg, str(store), what="bench ingest")
        parts = [store]
    input_mb = sum(p.stat().st_size for p in src.iterdir() if p.suffix in (".parquet", ".csv")) / 2**20
    out = {"mode": "ingest", "input": b.input, "ranks": b.ranks, "nodes": b.nodes, "days": b.days,
           "metrics": b.metrics, "rows": rows,
           "input_mb": round(input_mb, 1), "store_mb": round(sum(p.stat().st_size for p in parts) / 2**20, 1),
           "scratch_buckets": data_cfg.scratch_buckets, "input_generation_s": round(gen_s, 1),
           "ingest_s": round(res["ingest_s"], 1), "samples_per_s": rows / res["ingest_s"],
           "peak_rss_mb": res["peak_rss_mb"],
           "bucket_mb": rows * 14 / data_cfg.scratch_buckets / 2**20 if b.input == "long" else None,
           "cpu_count": os.cpu_count()}
    for p in {store, *parts}:
        p.unlink(missing_ok=True)
    write_json(run_dir / "bench.json", out)
    return out


def _ingest_ranks(data_cfg, run: Path, ranks: int) -> dict:
    """``hpcad ingest`` of the bench input on ``ranks`` local processes (torchrun's variables; long
    format: rank 0 stages, every rank pivots its share; daily exports: every rank stages its block of
    the files and converts its share of the nodes; node files: every rank reads its share of them:
    hpcad/data/ranks.py). ``ingest_s`` is the wall
    time of the whole launch (each rank's start, torch's import and the process group included);
    ``peak_rss_mb`` the largest rank's."""
    import shutil
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the ranks to meet at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.rmtree(run, ignore_errors=True)
    group = "long" if data_cfg.format == "long" else "files"
    cmd = [sys.executable, "-m", "hpcad", "ingest", f"hydra.run.dir={run}", f"data={group}",
           f"data.source={data_cfg.source}",
           f"data.scratch_buckets={data_cfg.scratch_buckets}", f"data.period_s={data_cfg.period_s}",
           "compute.progress=false"]
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(ranks)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise ConfigError(f"bench ingest on {ranks} ranks failed (exit codes {codes}); see the log above and "
                          f"{run}/logs/ingest-rank*.log")
    return {"ingest_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
            "store": run / "store.h5", "parts": sorted(run.glob("store*.h5"))}
