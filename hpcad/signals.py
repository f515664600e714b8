"""The alarm signal of a node, from per-row values to what thresholds see.

Every detector (the autoencoders and the baselines) goes through the same two steps, so they are
thresholded and evaluated alike:

- ``smooth_signal``: the row's signal is the mean, on the asinh scale of the signal relative to
  the node's normal level, of the rows around it (``signal.smooth`` rows, centred; ``causal``: the
  row and the ones before it). For values well above normal this is a geometric mean: one spike
  does not make an alarm, a sustained rise does. The default window is 25 rows (+-12, the cost
  model's tolerance), so smoothing moves no alarm further than the cost model already tolerates.
- ``signal_level``: the node's normal level (the mean signal of its held-out normal rows) floored
  at ``scale_floor`` per metric, so that ``signal / level`` (``signal_norm``) is comparable across
  nodes and cannot explode on a node whose training rows were reconstructed perfectly.
"""
from __future__ import annotations

import numpy as np

from hpcad.errors import ConfigError


def smooth_window(window: int) -> int:
    """``signal.smooth``, checked: rows averaged into each row's signal."""
    if not int(window) >= 1:
        raise ConfigError(f"signal.smooth={window}: must be >= 1 (rows; 1 = no smoothing)")
    return int(window)


def smooth_signal(signal: np.ndarray, window: int, level: float, causal: bool = False) -> np.ndarray:
    """``level * sinh(mean(asinh(signal / level)))`` over ``window`` rows (1: unchanged); centred
    windows use ``window // 2`` rows on each side and repeat the edge rows at the ends."""
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

        m = uniform_filter1d(u, 2 * (window // 2) + 1, mode="nearest")
    return level * np.sinh(m)


def signal_level(holdout_mean: float, n_metrics: int, scale_floor: float) -> float:
    """A node's normal signal level: its held-out mean, at least ``scale_floor`` x metrics."""
    floor = max(float(scale_floor) * max(int(n_metrics), 1), 1e-12)
    v = float(holdout_mean)
    return max(v, floor) if np.isfinite(v) else floor
