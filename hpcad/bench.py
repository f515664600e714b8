"""``hpcad bench``: reproducible throughput and memory of batched training (or scoring).

Training mode trains ``bench.nodes`` per-node autoencoders for a fixed number of epochs (early
stopping off, so both sides do the same work) with the batched ensemble, then times a naive loop
(one plain ``torch.nn`` model per node with ``torch.optim.Adam``, trained one after another with the
same settings) on the same data in the same run, and writes ``bench.json``. Scoring mode writes a
store and model files for ``bench.nodes`` nodes and times the real ``score`` stage on it.

Data comes from the synthetic generator: a pool of ``bench.pool`` distinct nodes reused cyclically
(the arithmetic per node is the same, and generating 5,000 distinct nodes would dominate the run).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import resource
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpcad.atomic import write_json
from hpcad.data.synthetic import generate_node
from hpcad.device import precision_context, reset_peak_memory, resolve_device
from hpcad.errors import ConfigError
from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
from hpcad.model.budget import Budget, default_chunk_cap, device_bytes_per_model
from hpcad.model.ensemble import Workspace, member_seed, node_seed, train_ensemble
from hpcad.preprocess import Scaler, fit_rows, windows
from hpcad.progress import Progress, iterate
from hpcad.train import model_spec

if TYPE_CHECKING:
    from hpcad.config import BenchConfig, HpcadConfig

log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_pool(b: BenchConfig, cfg: HpcadConfig) -> list[np.ndarray]:
    """Standardised [rows, metrics] matrices of ``b.pool`` distinct synthetic nodes."""
    pool = []
    for i in range(min(b.pool, b.nodes)):
        nd = generate_node(f"bench{i:04d}", b.rows, seed=b.seed)
        v = nd.values
        reps = -(-b.metrics // v.shape[1])
        v = np.tile(v, (1, reps))[:, : b.metrics]
        pool.append(Scaler.fit(v, cfg.preprocess).transform(v)[0])
    return pool


def node_lengths(nodes: int, rows: int, spread: float) -> np.ndarray:
    """Rows of each bench node: ``rows``, or spread evenly over [(1 - spread) x rows, rows] (a real
    cluster's nodes differ in length: short last batches and ends of epochs differ per model)."""
    if not 0 <= spread < 1:
        raise ConfigError(f"bench.rows_spread={spread}: must be in [0, 1)")
    frac = (np.arange(nodes) * 0.6180339887498949) % 1.0  # low-discrepancy, the same for every run
    return np.maximum(1, rows - np.floor(spread * rows * frac)).astype(np.int64)


def naive_train(x: np.ndarray, seed: int, spec: AutoencoderSpec, tc, device: torch.device) -> float:
    """The naive reference: one plain model, Adam, shuffled mini-batches, validation each epoch."""
    torch.manual_seed(seed)
    M = x.shape[1]
    layers: list[torch.nn.Module] = []
    widths = spec.widths(M)
    for i, (a, b_) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b_))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    with torch.no_grad():  # the same initial weights as the batched side (Keras's Glorot uniform)
        linear = [m for m in layers if isinstance(m, torch.nn.Linear)]
        init = glorot_init(spec, M, seed)
        for lin, W, b in zip(linear, init[0::2], init[1::2]):
            lin.weight.copy_(W.T)
            lin.bias.copy_(b)
    model = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, eps=1e-7)
    X = torch.from_numpy(x).to(device)
    n_tr = fit_rows(len(x), tc.validation_split)
    xtr, xva = X[:n_tr], X[n_tr:]
    val = float("nan")
    amp = lambda: precision_context(tc.precision, device)  # noqa: E731  (a fresh context per use)
    for _ in range(tc.epochs):
        perm = torch.randperm(n_tr, device=device)
        for s in range(0, n_tr, tc.batch_size):
            xb = xtr[perm[s:s + tc.batch_size]]
            opt.zero_grad(set_to_none=True)
            with amp():
                out = model(xb)
            loss = torch.nn.functional.mse_loss(out.float(), xb)
            loss.backward()
            opt.step()
        with torch.no_grad(), amp():
            val = float(torch.nn.functional.mse_loss(model(xva).float(), xva))
    return val


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Times ``bench.nodes`` nodes with the configured model: a node with ``model.members`` R is R
    models on both sides (batched: R slots of the chunk; naive: R plain models one after another),
    and ``model.window`` w feeds both sides the same w-row windows."""
    b = cfg.bench
    device = resolve_device(b.device)
    node_spec = model_spec(cfg)
    R, w = node_spec.members, node_spec.window
    spec = dataclasses.replace(node_spec, members=1, window=1)  # one member's network, on window inputs
    tc = SimpleNamespace(**{**dict(cfg.train), "epochs": int(b.epochs), "patience": int(b.epochs) + 1,
                            "restore_best": True, "precision": str(cfg.compute.precision)})
    t0 = time.perf_counter()
    pool = [windows(p, w) for p in bench_pool(b, cfg)]
    gen_s = time.perf_counter() - t0
    reset_peak_memory(device)
    budget = Budget.resolve(cfg.compute, device)
    K = max(1, budget.chunk_size(b.rows, b.metrics, node_spec, tc.batch_size,
                                 cfg.compute.max_nodes_per_chunk or default_chunk_cap(device), tc.validation_split) // R)
    chunks = [list(range(s, min(s + K, b.nodes))) for s in range(0, b.nodes, K)]
    n_naive = 0 if b.naive_nodes == 0 else b.nodes if b.naive_nodes is None else min(int(b.naive_nodes), b.nodes)
    # The naive nodes are spread over the chunks and timed right after each one, so that both sides
    # see the same machine: on a shared VM the speed drifts by up to 2x over minutes.
    naive_share = np.array_split(np.arange(n_naive), len(chunks))
    lengths = node_lengths(b.nodes, b.rows, float(b.rows_spread))
    bar = Progress(b.nodes * b.epochs, "bench batched", "node-epoch", cfg.compute.progress)
    naive_bar = Progress(n_naive, "bench naive", "node", cfg.compute.progress and n_naive > 0)
    # Untimed warm-up of both sides (first-call library initialisation is not per-node work).
    warm = SimpleNamespace(**{**vars(tc), "epochs": 1})
    train_ensemble(spec, [p[:512] for p in pool[:2]], list(range(len(pool[:2]))), warm, device, precision=tc.precision)
    if n_naive:
        naive_train(pool[0][:512], 0, spec, warm, device)
    batched_s = naive_s = 0.0
    final_val, naive_val, by_chunk = [], [], []
    workspace = Workspace()
    for idx, share in zip(chunks, naive_share):
        last = [0]

        def progress(epoch: int, _running: int, n=len(idx)) -> None:
            bar.update((epoch - last[0]) * n)
            last[0] = epoch

        t0 = time.perf_counter()
        res = train_ensemble(spec, [pool[i % len(pool)][: lengths[i]] for i in idx for _ in range(R)],
                             [member_seed(node_seed(b.seed, f"n{i}"), r) for i in idx for r in range(R)],
                             tc, device, progress=progress, workspace=workspace, precision=tc.precision)
        _sync(device)
        chunk_s = time.perf_counter() - t0
        batched_s += chunk_s
        final_val += [h["val_loss"][-1] for h in res.history]
        if len(share):
            t0 = time.perf_counter()
            for i in map(int, share):
                for r in range(R):
                    naive_val.append(naive_train(pool[i % len(pool)][: lengths[i]], member_seed(node_seed(b.seed, f"n{i}"), r),
                                                 spec, tc, device))
                naive_bar.update(1)
            _sync(device)
            share_s = time.perf_counter() - t0
            naive_s += share_s
            by_chunk.append((share_s / len(share)) / (chunk_s / len(idx)))
    bar.close()
    naive_bar.close()
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    n_tr = float(np.mean([fit_rows(int(n), tc.validation_split) for n in lengths]))  # training rows per node, mean
    out = {
        "mode": "train", "nodes": b.nodes, "rows": b.rows, "rows_spread": float(b.rows_spread),
        "rows_mean": float(lengths.mean()), "metrics": b.metrics, "epochs": b.epochs,
        "model": node_spec.to_dict(), "batch_size": tc.batch_size, "precision": tc.precision,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "nodes_per_chunk": K,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG") if device.type == "cuda" else None,
        "data_generation_s": round(gen_s, 3), "batched_s": round(batched_s, 3),
        "node_epochs_per_s": b.nodes * b.epochs / batched_s,
        "samples_per_s": b.nodes * b.epochs * n_tr / batched_s,
        "batched_final_val_loss_mean": float(np.mean(final_val)),
        "peak_gpu_mb": peak_gpu, "budget": budget.source,
        # the chunk's device memory as budgeted (compare with peak_gpu_mb on CUDA)
        "estimated_device_mb": min(K, b.nodes) * R / 2**20 * device_bytes_per_model(
            b.rows, b.metrics, node_spec, tc.batch_size, tc.validation_split),
    }
    if n_naive:
        out.update(naive_nodes=n_naive, naive_s=round(naive_s, 3),
                   naive_node_epochs_per_s=n_naive * b.epochs / naive_s,
                   naive_final_val_loss_mean=float(np.mean(naive_val)),
                   speedup_vs_naive=(naive_s / n_naive) / (batched_s / b.nodes),
                   speedup_by_chunk=[round(r, 2) for r in by_chunk])
    out["peak_rss_mb"] = _peak_rss_mb()
    write_json(run_dir / "bench.json", out)
    return out


def bench_score(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Time the real score stage on ``bench.nodes`` nodes x ``bench.rows`` rows (e.g. one day: 288)."""
    from hpcad.data.store import TelemetryStore, write_store
    from hpcad.data.node import NodeData
    from hpcad.data.synthetic import metric_names
    from hpcad.model.files import NodeModel, model_path
    from hpcad.score import score_nodes

    b = cfg.bench
    if b.metrics != 160:
        raise ConfigError("bench.mode=score uses the synthetic cluster's 160 metrics: set bench.metrics=160")
    spec = model_spec(cfg)
    pool = [generate_node(f"p{i}", b.rows, seed=b.seed) for i in range(min(b.pool, b.nodes))]
    names = [f"node{i:05d}" for i in range(b.nodes)]
    store_path = run_dir / "bench_store.h5"
    write_store(store_path, metric_names(), (NodeData(n, pool[i % len(pool)].timestamp, pool[i % len(pool)].values,
                                                      None) for i, n in enumerate(names)), "bench")
    store = TelemetryStore(store_path)
    models_dir = run_dir / "bench_models"
    for i, n in enumerate(names):
        if not model_path(models_dir, n).exists():
            v = pool[i % len(pool)].values
            members = [glorot_init(spec, v.shape[1], member_seed(i, r)) for r in range(spec.members)]
            NodeModel(n, spec, store.metrics, members, Scaler.fit(v, cfg.preprocess), {}, 1.0).save(
                model_path(models_dir, n))
    device = resolve_device(b.device)
    t0 = time.perf_counter()
    score_nodes(cfg, store, models_dir, run_dir / "bench_errors.h5", device=device)
    score_s = time.perf_counter() - t0
    out = {"mode": "score", "nodes": b.nodes, "rows": b.rows, "metrics": 160, "device": str(device),
           "score_s": round(score_s, 3), "nodes_per_s": b.nodes / score_s, "rows_per_s": b.nodes * b.rows / score_s,
           "peak_rss_mb": _peak_rss_mb(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    write_json(run_dir / "bench.json", out)
    return out


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


def _ingest_child(data_cfg, store: str, conn) -> None:
    import resource as res

    from hpcad.data.ingest import ingest

    t0 = time.perf_counter()
    ingest(data_cfg, Path(store))
    conn.send({"ingest_s": time.perf_counter() - t0,
               "peak_rss_mb": res.getrusage(res.RUSAGE_SELF).ru_maxrss / 1024.0})


def bench_ingest(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Generate an input (``bench.input``: long format, or daily exports of every node; kept across
    reruns) and time its ingestion in a fresh process, whose peak RSS is the figure that must stay
    bounded by the bucket size (long) or an input chunk (days), not the input size."""
    import multiprocessing as mp

    from omegaconf import OmegaConf

    from hpcad.config import DataConfig

    b = cfg.bench
    writers = {"long": write_long_input, "days": write_daily_input}
    if b.input not in writers:
        raise ConfigError(f"bench.input={b.input!r}: one of {', '.join(writers)}")
    src = run_dir / f"bench_{b.input}_{b.nodes}x{b.days}dx{b.metrics}"
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
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_ingest_child, args=(data_cfg, str(store), child))
        proc.start()
        res = parent.recv() if parent.poll(timeout=24 * 3600) else {}
        proc.join()
        if proc.exitcode != 0 or not res:
            raise ConfigError(f"bench ingest child failed (exit {proc.exitcode}); see the log above")
        parts = [store]
    input_mb = sum(p.stat().st_size for p in src.glob("*.parquet")) / 2**20
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
    the files and converts its share of the nodes: hpcad/data/ranks.py). ``ingest_s`` is the wall
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
                          f"{run}/ingest-rank*.log")
    return {"ingest_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
            "store": run / "store.h5", "parts": sorted(run.glob("store*.h5"))}


def _baseline_child(cfg: HpcadConfig, store: str, method: str, conn) -> None:
    import resource as res

    from threadpoolctl import threadpool_limits

    from hpcad.baselines import baseline_signals
    from hpcad.data.store import TelemetryStore

    torch.set_num_threads(1)
    st = TelemetryStore(Path(store))
    t0 = time.perf_counter()
    with threadpool_limits(1):  # numpy's BLAS too: the figure is per core
        nodes = sum(1 for _ in baseline_signals(method, cfg, st, st))
    conn.send({"s": time.perf_counter() - t0, "nodes": nodes,
               "peak_rss_mb": res.getrusage(res.RUSAGE_SELF).ru_maxrss / 1024.0})


def bench_baselines(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Time each of ``baselines.methods`` on ``bench.nodes`` nodes x ``bench.rows`` rows x
    ``bench.metrics`` metrics (random values; a node-year: ``bench.nodes=1 bench.rows=105120
    bench.metrics=160``), each method in a fresh process on one core, whose peak RSS is what one
    rank fitting baselines needs (docs/benchmarks.md)."""
    import multiprocessing as mp

    from hpcad.baselines import check_methods
    from hpcad.data.node import NodeData
    from hpcad.data.store import write_store

    b, methods = cfg.bench, list(cfg.baselines.methods)
    check_methods(methods)
    if not methods:
        raise ConfigError("bench.mode=baselines: baselines.methods is empty")
    store = run_dir / f"bench_baselines_{b.nodes}x{b.rows}x{b.metrics}.h5"  # kept across reruns
    if not store.exists():
        rng = np.random.default_rng(b.seed)
        write_store(store, [f"m{i}" for i in range(b.metrics)],
                    (NodeData(f"node{k:05d}", 1_700_000_000 + 300 * np.arange(b.rows, dtype=np.int64),
                              (rng.normal(size=(1, b.metrics)) + 0.3 * rng.normal(size=(b.rows, b.metrics))
                               ).astype(np.float32), None) for k in range(b.nodes)), "bench")
    ctx = mp.get_context("spawn")
    per: dict[str, dict] = {}
    for method in methods:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_baseline_child, args=(cfg, str(store), method, child))
        proc.start()
        res = parent.recv() if parent.poll(timeout=24 * 3600) else {}
        proc.join()
        if proc.exitcode != 0 or not res:
            raise ConfigError(f"bench baselines: the {method} child failed (exit {proc.exitcode}); see the log above")
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


def bench_report(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Time ``report.html`` and its node pages for a night of ``bench.nodes`` nodes x ``bench.rows``
    rows x ``bench.metrics`` metrics with ``bench.alarms`` alarmed nodes (synthetic per-metric errors:
    each alarmed node gets one 30-row burst on 5 metrics)."""
    from hpcad.data.h5 import h5_writing
    from hpcad.data.store import STR
    from hpcad.report import write_report
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
           "peak_rss_mb": _peak_rss_mb(), "cpu_count": os.cpu_count()}
    write_json(run_dir / "bench.json", out)
    return out


def run_bench(cfg: HpcadConfig, run_dir: Path) -> dict:
    from hpcad.drift_study import run_drift_study

    modes = {"train": bench_train, "score": bench_score, "ingest": bench_ingest, "drift": run_drift_study,
             "report": bench_report, "baselines": bench_baselines}
    if cfg.bench.mode not in modes:
        raise ConfigError(f"bench.mode={cfg.bench.mode!r}: {', '.join(modes)}")
    return modes[cfg.bench.mode](cfg, run_dir)
