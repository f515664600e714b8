"""Explanation: which metrics carry the error, per anomaly class (the lecture's error profiles)."""
from __future__ import annotations

import numpy as np

from hpcad.errorstore import ErrorStore


def class_profiles(errors: ErrorStore, top: int = 20) -> dict:
    """Mean per-metric squared error per label class, accumulated node by node (sums and counts)."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for s in errors.signals():
        if s.labels is None:
            continue
        err = errors.errors(s.node)
        for c in np.unique(s.labels):
            rows = s.labels == c
            sums[int(c)] = sums.get(int(c), 0) + err[rows].sum(0, dtype=np.float64)
            counts[int(c)] = counts.get(int(c), 0) + int(rows.sum())
    out = {}
    for c in sorted(sums):
        mean = sums[c] / counts[c]
        order = np.argsort(mean)[::-1]
        out[str(c)] = {"rows": counts[c], "mean_error": mean.tolist(),
                       "top": [[errors.metrics[j], float(mean[j])] for j in order[:top]]}
    return out


def metric_family(name: str) -> str:
    """``ips_p0_3`` -> ``ips``: the telemetry family a metric belongs to."""
    return name.split("_")[0]
