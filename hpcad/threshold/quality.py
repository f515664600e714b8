"""Threshold-free detection figures: how well a signal ranks anomalous rows above normal ones.

Reported per node and split beside the cost (metrics.json): average precision (area under the
precision-recall curve, the figure that stays honest when anomalies are rare), ROC-AUC, and the
best point-wise F1 over all thresholds. No point adjustment: every row counts on its own.
"""
from __future__ import annotations

import numpy as np

FIGURES = ("ap", "roc_auc", "best_f1")


def ranking(signal: np.ndarray, labels: np.ndarray | None) -> dict | None:
    """AP, ROC-AUC and best F1 of ``signal`` against ``labels != 0``; None without both classes."""
    if labels is None:
        return None
    y = labels != 0
    if y.all() or not y.any():
        return None
    fps, tps = _curve(_finite(signal), y)
    p, r = tps / (tps + fps), tps / tps[-1]
    f1 = float(np.max(2 * p * r / np.maximum(p + r, 1e-12)))
    fpr, tpr = np.r_[0.0, fps / fps[-1]], np.r_[0.0, r]
    return {"ap": _ap(p, r), "roc_auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2), "best_f1": f1,
            "prevalence": float(y.mean())}


def average_precision(signal: np.ndarray, y: np.ndarray) -> float:
    """Area under the precision-recall curve of ``signal`` against the boolean labels ``y``
    (scikit-learn's ``average_precision_score``; NaN when ``y`` holds no anomaly)."""
    y = np.asarray(y, dtype=bool)
    if not y.any():
        return float("nan")
    fps, tps = _curve(_finite(signal), y)
    return _ap(tps / (tps + fps), tps / tps[-1])


def _curve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positives at each distinct threshold, highest first (as scikit-learn's
    ``_binary_clf_curve``; written here because importing scikit-learn costs a second per process)."""
    order = np.argsort(x, kind="mergesort")[::-1]
    xs, ys = x[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(xs)), len(xs) - 1]  # the last row of each run of equal scores
    tps = np.cumsum(ys)[last]
    return 1.0 + last - tps, tps


def _ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Sum of precision x recall step, in scikit-learn's order (recall falling), so the figure is
    the same to the last bit."""
    r = np.r_[recall[::-1], 0.0]
    return float(-np.sum(np.diff(r) * precision[::-1]))


def _finite(signal: np.ndarray) -> np.ndarray:
    """NaN ranks lowest, +inf highest."""
    return np.nan_to_num(np.asarray(signal, dtype=np.float64), nan=0.0, posinf=np.finfo(np.float64).max)


def macro(per_node: list[dict]) -> dict:
    """Mean and standard deviation over nodes of each figure (nodes without both classes are left out)."""
    out: dict = {"nodes": len(per_node)}
    for k in FIGURES:
        v = np.array([d[k] for d in per_node], dtype=np.float64)
        out[k] = float(v.mean()) if v.size else None
        out[f"{k}_std"] = float(v.std()) if v.size else None
    return out
