"""``hpcad bench`` (``bench.mode=train``, the default): batched training against the naive loop.

``bench.nodes`` per-node autoencoders train for a fixed number of epochs (early stopping off, so
both sides do the same work) with the batched ensemble, then a naive loop (one plain ``torch.nn``
model per node with ``torch.optim.Adam``, trained one after another with the same settings) on the
same data in the same run; ``bench.json`` holds both. Data comes from the synthetic generator: a
pool of ``bench.pool`` distinct nodes reused cyclically (the arithmetic per node is the same, and
generating 5,000 distinct nodes would dominate the run).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpcad.atomic import write_json
from hpcad.bench.rss import peak_rss_mb
from hpcad.data.synthetic import generate_node
from hpcad.device import precision_context, reset_peak_memory, resolve_device
from hpcad.errors import ConfigError
from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
from hpcad.model.backprop import Workspace
from hpcad.model.budget import Budget, default_chunk_cap, device_bytes_per_model
from hpcad.model.ensemble import member_seed, node_seed, train_ensemble
from hpcad.model.whiten import fit_whitening, held_out_from
from hpcad.preprocess import Scaler, fit_rows, windows
from hpcad.progress import Progress
from hpcad.train import model_spec

if TYPE_CHECKING:
    from hpcad.config import BenchConfig, HpcadConfig

log = logging.getLogger(__name__)


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
    batched_s = naive_s = whitening_s = 0.0
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
        t0 = time.perf_counter()  # the residuals' whitening, fitted after each chunk as hpcad train does
        rows = [pool[i % len(pool)][: lengths[i]] for i in idx]
        fit_whitening(node_spec, [res.params[k * R:(k + 1) * R] for k in range(len(idx))], rows,
                      [held_out_from(len(z), tc.validation_split) for z in rows], b.metrics, device)
        _sync(device)
        whitening_s += time.perf_counter() - t0
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
        # the whitening's pass over each node's training rows (hpcad/model/whiten.py), after its chunk
        "whitening_s": round(whitening_s, 3), "whitening_share": round(whitening_s / batched_s, 4),
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
    out["peak_rss_mb"] = peak_rss_mb()
    write_json(run_dir / "bench.json", out)
    return out
