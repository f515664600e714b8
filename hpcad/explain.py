"""Explanation: which metrics carry the error, per anomaly class (the lecture's error profiles)."""
from __future__ import annotations

import numpy as np

from hpcad.errorstore import ErrorStore


def class_profiles(errors: ErrorStore, top: int = 20) -> dict:
    """Mean per-metric squared error per label class, accumulated node by node (sums and counts),
    and where every node's normal errors are known the mean "times normal" (each row's errors over
    its node's :meth:`~hpcad.errorstore.ErrorStore.explain_scale`, as alarms rank their top metrics):
    ``top_x_normal``."""
    sums: dict[int, np.ndarray] = {}
    times: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    known = True
    for s in errors.signals():
        if s.labels is None:
            continue
        err = errors.errors(s.node)
        scale = errors.explain_scale(s.node)
        known &= scale is not None
        for c in np.unique(s.labels):
            rows = s.labels == c
            sums[int(c)] = sums.get(int(c), 0) + err[rows].sum(0, dtype=np.float64)
            if known:
                times[int(c)] = times.get(int(c), 0) + (err[rows] / scale).sum(0)
            counts[int(c)] = counts.get(int(c), 0) + int(rows.sum())
    out = {}
    for c in sorted(sums):
        mean = sums[c] / counts[c]
        order = np.argsort(mean)[::-1]
        out[str(c)] = {"rows": counts[c], "mean_error": mean.tolist(),
                       "top": [[errors.metrics[j], float(mean[j])] for j in order[:top]]}
        if known:
            x = times[c] / counts[c]
            out[str(c)]["top_x_normal"] = [[errors.metrics[j], float(x[j])] for j in np.argsort(x)[::-1][:top]]
    return out


def metric_family(name: str) -> str:
    """``ips_p0_3`` -> ``ips``: the telemetry family a metric belongs to."""
    return name.split("_")[0]
