"""Monotonic counters (cumulative instructions, bytes, jiffies) into per-second rates.

``data.counters`` lists metric names or shell patterns (``*::procstat``, ``cum_*``). For each such
metric, row t becomes ``(v[t] - v[t-1]) / (ts[t] - ts[t-1])`` (per row when the input has no
timestamps). The first row has no rate and is missing (NaN). A decrease is a counter reset
(reboot, wrap-around, daemon restart): that row is missing too, and the resets are counted and
logged per node; they are never turned into a huge negative rate.
"""
from __future__ import annotations

import fnmatch
import logging

import numpy as np

from hpcad.data.node import NodeData
from hpcad.errors import ConfigError

log = logging.getLogger(__name__)


def is_counter(metric: str, patterns: list[str]) -> bool:
    """Whether ``data.counters`` (names or shell patterns) names ``metric``."""
    return any(fnmatch.fnmatchcase(metric, pat) for pat in patterns)


def counter_columns(metrics: list[str], patterns: list[str]) -> list[int]:
    """Indices of the metrics matched by ``data.counters``; a pattern matching nothing is an error."""
    idx: set[int] = set()
    for pat in patterns:
        hit = [i for i, m in enumerate(metrics) if is_counter(m, [pat])]
        if not hit:
            raise ConfigError(f"data.counters: {pat!r} matches no metric (e.g. {metrics[:5]})")
        idx.update(hit)
    return sorted(idx)


def to_rates(node: NodeData, columns: list[int], metrics: list[str]) -> NodeData:
    """Replace the counter columns of one node by rates (in place on a copy of those columns)."""
    if not columns:
        return node
    vals = node.values
    dt = np.diff(node.timestamp).astype(np.float64)
    if node.time_unit == "row":
        dt = np.ones_like(dt)
    raw = vals[:, columns].astype(np.float64)
    diff = np.diff(raw, axis=0)
    reset = diff < 0
    rate = np.full_like(raw, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate[1:] = np.where(reset, np.nan, diff / dt[:, None])
    n_reset = reset.sum(axis=0)
    if n_reset.any():
        hit = {metrics[c]: int(k) for c, k in zip(columns, n_reset) if k}
        log.warning("node %s: counter resets (rows left missing): %s", node.name, hit)
    vals = vals.copy()
    vals[:, columns] = rate.astype(vals.dtype)
    return NodeData(node.name, node.timestamp, vals, node.labels, node.time_unit, node.job)
