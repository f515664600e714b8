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
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    x = _finite(signal)
    p, r, _ = precision_recall_curve(y, x)
    f1 = float(np.max(2 * p * r / np.maximum(p + r, 1e-12)))
    return {"ap": average_precision(x, y), "roc_auc": float(roc_auc_score(y, x)), "best_f1": f1,
            "prevalence": float(y.mean())}


def average_precision(signal: np.ndarray, y: np.ndarray) -> float:
    """Area under the precision-recall curve of ``signal`` against the boolean labels ``y``."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, _finite(signal)))


def _finite(signal: np.ndarray) -> np.ndarray:
    """NaN ranks lowest, +inf highest (sklearn refuses both)."""
    return np.nan_to_num(np.asarray(signal, dtype=np.float64), nan=0.0, posinf=np.finfo(np.float64).max)


def macro(per_node: list[dict]) -> dict:
    """Mean and standard deviation over nodes of each figure (nodes without both classes are left out)."""
    out: dict = {"nodes": len(per_node)}
    for k in FIGURES:
        v = np.array([d[k] for d in per_node], dtype=np.float64)
        out[k] = float(v.mean()) if v.size else None
        out[f"{k}_std"] = float(v.std()) if v.size else None
    return out
