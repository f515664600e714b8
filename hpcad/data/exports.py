"""Write a (synthetic) cluster the way monitoring stacks export it: LDMS CSV stores, long format.

Used by ``hpcad generate generate.format=ldms|long``, by the tests that check every reader gives
the same store, and as worked examples of the formats. Interleaving nodes in time order needs the
whole cluster at once, so this is for demo and test sizes (the benchmark streams its own input).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpcad.data.node import NodeData

LDMS_FIXED = ["Time", "Time_usec", "ProducerName", "component_id", "job_id", "app_id"]
DAY = 86_400


def _groups(metrics: list[str], k: int) -> list[list[int]]:
    return [list(g) for g in np.array_split(np.arange(len(metrics)), k) if len(g)]


def write_ldms(nodes: list[NodeData], metrics: list[str], out: Path, samplers: int = 2, seed: int = 0,
               label_column: str = "anomaly") -> list[Path]:
    """One directory per sampler, one file per day (LDMS rollover names ``<sampler>.<epoch>``).

    Sample times jitter by up to 3 s after the period start (Time + Time_usec), the first sampler
    also carries the labels, and each first file repeats its header mid-way (a sampler restart).
    """
    rng = np.random.default_rng(seed)
    written = []
    for s, cols in enumerate(_groups(metrics, samplers)):
        name = f"sampler{s}"
        parts = []
        for i, nd in enumerate(nodes):
            f = pd.DataFrame(nd.values[:, cols].astype(np.float64), columns=[metrics[c] for c in cols])
            if s == 0 and nd.labels is not None:
                f[label_column] = nd.labels.astype(int)
            f.insert(0, "Time", nd.timestamp + rng.integers(0, 3, len(nd.timestamp)))
            f.insert(1, "Time_usec", rng.integers(0, 1_000_000, len(nd.timestamp)))
            f.insert(2, "ProducerName", nd.name)
            f.insert(3, "component_id", i + 1)
            f.insert(4, "job_id", 0)
            f.insert(5, "app_id", 0)
            parts.append(f)
        frame = pd.concat(parts).sort_values(["Time", "component_id"], kind="stable")
        day = frame["Time"] // DAY * DAY
        (out / name).mkdir(parents=True, exist_ok=True)
        for k, (d, part) in enumerate(frame.groupby(day, sort=True)):
            path = out / name / f"{name}.{int(d)}"
            text = part.to_csv(index=False)
            header, _, body = text.partition("\n")
            lines = body.splitlines(keepends=True)
            if k == 0 and len(lines) > 2:  # a sampler restart writes the header again
                lines.insert(len(lines) // 2, f"#{header}\n")
            path.write_text(f"#{header}\n" + "".join(lines))
            written.append(path)
    return written


def write_long(nodes: list[NodeData], metrics: list[str], out: Path, plugins: int = 2, fmt: str = "parquet",
               label_column: str = "anomaly") -> list[Path]:
    """One file per plugin (metric group) and day: rows (timestamp, node, metric, value) in time order."""
    written = []
    for p, cols in enumerate(_groups(metrics, plugins)):
        name = f"plugin{p}"
        parts = []
        for nd in nodes:
            block = pd.DataFrame(nd.values[:, cols], columns=[metrics[c] for c in cols])
            if p == 0 and nd.labels is not None:
                block[label_column] = nd.labels.astype(np.float32)
            block["timestamp"] = pd.to_datetime(nd.timestamp, unit="s", utc=True)
            block["node"] = nd.name
            parts.append(block.melt(id_vars=["timestamp", "node"], var_name="metric", value_name="value"))
        frame = pd.concat(parts).sort_values(["timestamp", "node"], kind="stable")
        (out / name).mkdir(parents=True, exist_ok=True)
        for d, part in frame.groupby(frame["timestamp"].dt.strftime("%Y-%m-%d"), sort=True):
            path = out / name / f"{name}-{d}.{'parquet' if fmt == 'parquet' else 'csv'}"
            if fmt == "parquet":
                part.to_parquet(path, index=False)
            else:
                part.assign(timestamp=part["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(path, index=False)
            written.append(path)
    return written
