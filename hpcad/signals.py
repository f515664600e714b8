"""The alarm signal of a node, from per-row values to what thresholds see.

Every detector (the autoencoders and the baselines) goes through the same two steps, so they are
thresholded and evaluated alike:

- ``smooth_signal``: the row's signal is the mean, on the asinh scale of the signal relative to
  the node's normal level, of the rows around it (``signal.smooth`` rows, centred; ``causal``: the
  row and the ones before it; at the series' ends, the rows there are). For values well above
  normal this is a geometric mean: one spike does not make an alarm, a sustained rise does. The
  default window is 25 rows (+-12, the cost model's tolerance), so smoothing moves no alarm
  further than the cost model already tolerates.
- ``signal_level``: the node's normal level (the mean signal of its held-out normal rows) floored
  at ``scale_floor`` per metric, so that ``signal / level`` (``signal_norm``) is comparable across
  nodes and cannot explode on a node whose training rows were reconstructed perfectly.
- ``metric_scales``: where ``signal.metric_scales`` applies, each metric's error is divided by its
  mean on the node's held-out normal rows (at least the metrics' mean) before the sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcad.errors import ConfigError, StoreError


def smooth_window(window: int) -> int:
    """``signal.smooth``, checked: rows averaged into each row's signal."""
    if not int(window) >= 1:
        raise ConfigError(f"signal.smooth={window}: must be >= 1 (rows; 1 = no smoothing)")
    return int(window)


def smooth_signal(signal: np.ndarray, window: int, level: float, causal: bool = False) -> np.ndarray:
    """``level * sinh(mean(asinh(signal / level)))`` over ``window`` rows (1: unchanged); centred
    windows use ``window // 2`` rows on each side, fewer at the series' ends (the mean of the rows
    there are: the end row counts once, not also for the rows missing beyond it)."""
    window = smooth_window(window)
    x = np.asarray(signal, dtype=np.float64)
    if window == 1 or x.size == 0:
        return x
    level = float(level) if np.isfinite(level) and level > 0 else 1.0
    u = np.arcsinh(x / level)
    if causal:
        c = np.cumsum(np.r_[0.0, u])
        idx = np.arange(1, u.size + 1)
        lo = np.maximum(idx - window, 0)
        m = (c[idx] - c[lo]) / (idx - lo)
    else:
        from scipy.ndimage import uniform_filter1d  # here: scipy.ndimage costs 0.2 s of start-up

        half = window // 2
        m = uniform_filter1d(u, 2 * half + 1, mode="nearest")
        # the first and last ``half`` rows: the mean of the rows there are. Repeating the end row
        # instead gave it half + 1 of the window's weight: a one-row glitch at a night's first or
        # last row (a collector restarting at midnight) alarmed where the same row at noon did not.
        n = u.size
        edge = np.r_[np.arange(min(half, n)), np.arange(max(n - half, min(half, n)), n)]
        c = np.cumsum(np.r_[0.0, u])
        lo, hi = np.maximum(edge - half, 0), np.minimum(edge + half + 1, n)
        m[edge] = (c[hi] - c[lo]) / (hi - lo)
    return level * np.sinh(m)


def signal_level(holdout_mean: float, n_metrics: int, scale_floor: float) -> float:
    """A node's normal signal level: its held-out mean, at least ``scale_floor`` x metrics."""
    floor = max(float(scale_floor) * max(int(n_metrics), 1), 1e-12)
    v = float(holdout_mean)
    return max(v, floor) if np.isfinite(v) else floor


def metric_scales(holdout_error: np.ndarray) -> np.ndarray:
    """Per-metric divisors of a node's errors (``signal.metric_scales``): each metric's mean squared
    error on the node's held-out normal rows, at least the mean over its metrics. A metric the model
    always reconstructs worse than average stops dominating the sum; none is magnified."""
    h = np.asarray(holdout_error, dtype=np.float64)
    return np.maximum(h, max(float(h.mean()) if h.size else 0.0, 1e-12))


def scaled_level(holdout_error: np.ndarray) -> float:
    """The held-out mean of the scaled signal (``signal_level``'s input when scales apply)."""
    h = np.asarray(holdout_error, dtype=np.float64)
    return float((h / metric_scales(h)).sum())


EXPLAIN_FLOOR = 0.25  # share of the node's mean normal error below which a metric's normal error is not taken


def explain_scale(normal_error: np.ndarray) -> np.ndarray:
    """Per-metric divisors that turn an alarm's mean errors into "times normal" (the ranking of an
    alarm's top metrics): each metric's error on the node's held-out normal rows, at least
    ``EXPLAIN_FLOOR`` x their mean over the metrics, so that a metric the model reconstructs almost
    exactly (constant in training) does not top every alarm for a small deviation. The floor was
    chosen on the synthetic cluster's validation alarms (docs/results.md, "Explanations")."""
    h = np.nan_to_num(np.asarray(normal_error, dtype=np.float64))
    return np.maximum(h, max(EXPLAIN_FLOOR * float(h.mean()) if h.size else 0.0, 1e-12))


@dataclass(frozen=True)
class Recipe:
    """How a node's per-metric errors become its row signal."""

    weight: float  # range-excess weight
    scaled: bool = False  # per-metric error scales applied
    whitened: bool = False  # the errors are whitened residuals (signal.whiten, hpcad/model/whiten.py)

    def __str__(self) -> str:
        return (f"signal.excess_weight={self.weight:g} signal.metric_scales={str(self.scaled).lower()} "
                f"signal.whiten={str(self.whitened).lower()}")

    def to_dict(self) -> dict:
        return {"excess_weight": self.weight, "metric_scales": self.scaled, "whiten": self.whitened}

    def errors(self, model, err: np.ndarray, excess2: np.ndarray, miss: np.ndarray, where: str = "") -> np.ndarray:
        """``err`` turned in place into the errors this recipe scores (0 where the value is missing)."""
        err += self.weight * excess2
        if self.scaled:
            err /= metric_scales(self.holdout(model, where, err.shape[1])).astype(err.dtype)
        err[miss] = 0.0
        return err

    def holdout(self, model, where: str, n_metrics: int) -> np.ndarray:
        """The model's per-metric held-out errors in this recipe's units before scales (whitened or
        not); a clear error for a model file written without them."""
        return whitening(model, where).holdout_error if self.whitened else holdout_error(model, where, n_metrics)

    def normal_error(self, model) -> np.ndarray | None:
        """The model's per-metric error on its held-out normal rows in the units of :meth:`errors`
        (divided by the metric scales where they apply); None for a model file without it."""
        h = whitening(model, "").holdout_error if self.whitened else recorded_holdout(model, len(model.metrics))
        if h is None:
            return None
        h = np.asarray(h, dtype=np.float32)
        return (h / metric_scales(h)).astype(np.float32) if self.scaled else h

    def level(self, model, n_metrics: int, scale_floor: float) -> float:
        """The node's normal level of this recipe's signal (hpcad.signals.signal_level)."""
        if self.scaled:
            held = scaled_level(self.holdout(model, "", n_metrics))
        else:
            held = whitening(model, "").level if self.whitened else model.signal_scale
        return signal_level(held, n_metrics, scale_floor)


class NoWhitening(StoreError):
    """A model file without the residual whitening the recipe needs (trained by an older hpcad)."""


def whitening(model, where: str):
    """The model's residual whitening; a clear error for a model file written without it."""
    if model.whitening is None:
        raise NoWhitening(f"{where or 'node ' + model.node}: its model file has no residual whitening, or one fitted "
                          f"the earlier way (trained by an older hpcad): run `hpcad train` (it retrains such "
                          f"nodes), or score with signal.whiten=false")
    return model.whitening


def recorded_holdout(model, n_metrics: int) -> np.ndarray | None:
    """The model's per-metric held-out errors, or None where its file has none usable: not recorded,
    or a windowed model's over its whole window (both written by an older hpcad)."""
    h = model.holdout_error
    return h if h is not None and len(h) == n_metrics else None


def holdout_error(model, where: str, n_metrics: int) -> np.ndarray:
    """The model's per-metric held-out errors (``n_metrics`` of them); a clear error for a model file
    written without them."""
    held = recorded_holdout(model, n_metrics)
    if held is None:
        raise StoreError(f"{where or 'node ' + model.node}: its model file has no per-metric held-out errors (trained "
                         f"by an older hpcad; a windowed model's were its whole window's): run `hpcad train` with "
                         f"signal.metric_scales=true (it retrains such nodes), or score with "
                         f"signal.metric_scales=false")
    return held
