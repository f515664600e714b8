"""The seed lecture's alarm cost model and event-level scores.

A row is predicted anomalous when ``signal > threshold``. A false alarm is a predicted row with no
anomalous row within +-tolerance rows; a missed anomaly is an anomalous row with no predicted row
within +-tolerance rows; ``cost = c_alarm * false_alarms + c_missed * missed``.

Both counts are monotone in the threshold, so the whole cost curve follows from two sorted arrays:
the signal on rows far from any anomaly (each is a false alarm while ``signal > t``) and, per
anomalous row, the largest signal within its tolerance window (it is missed while that is ``<= t``).
The curves are sums over rows, so they add across nodes and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def maximum_filter1d(*args, **kw) -> np.ndarray:
    """scipy's, imported on first use (scipy.ndimage costs 0.2 s of every hpcad start-up)."""
    from scipy.ndimage import maximum_filter1d as mf

    return mf(*args, **kw)


def dilate(mask: np.ndarray, tol: int) -> np.ndarray:
    """Rows within +-tol rows of a True row."""
    if tol <= 0 or not mask.any():
        return mask.copy()
    return maximum_filter1d(mask.astype(np.uint8), size=2 * tol + 1, mode="constant", cval=0).astype(bool)


@dataclass
class CostTerms:
    """Sufficient statistics of one node's rows for every threshold at once."""

    far: np.ndarray  # sorted signal values of rows with no anomaly within tolerance
    anom_peak: np.ndarray  # sorted, per anomalous row, the max signal within +-tolerance

    @classmethod
    def of(cls, signal: np.ndarray, anomalous: np.ndarray, tol: int) -> "CostTerms":
        near = dilate(anomalous, tol)
        far = np.sort(signal[~near])
        if anomalous.any():
            peak = maximum_filter1d(signal, size=2 * tol + 1, mode="constant", cval=-np.inf) if tol > 0 else signal
            anom_peak = np.sort(peak[anomalous])
        else:
            anom_peak = np.empty(0)
        return cls(far, anom_peak)

    def counts(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(false alarms, missed anomalies) for each threshold."""
        fa = self.far.size - np.searchsorted(self.far, thresholds, side="right")
        missed = np.searchsorted(self.anom_peak, thresholds, side="right")
        return fa, missed

    def candidates(self) -> np.ndarray:
        """Thresholds between which the cost is constant: the optimum is at one of these."""
        vals = np.unique(np.concatenate([self.far, self.anom_peak]))
        below = vals[0] - max(1.0, abs(vals[0])) if vals.size else 0.0
        return np.concatenate([[below], vals]) if vals.size else np.array([0.0])


@dataclass
class CostModel:
    c_alarm: float = 1.0
    c_missed: float = 5.0
    tolerance: int = 12

    def cost(self, signal: np.ndarray, labels: np.ndarray, threshold: float) -> float:
        fa, missed = CostTerms.of(signal, labels != 0, self.tolerance).counts(np.array([threshold]))
        return float(self.c_alarm * fa[0] + self.c_missed * missed[0])

    def curve(self, terms: CostTerms, thresholds: np.ndarray) -> np.ndarray:
        fa, missed = terms.counts(thresholds)
        return self.c_alarm * fa + self.c_missed * missed

    def optimum(self, terms: CostTerms) -> tuple[float, float]:
        """Exact minimiser over all thresholds (searched over the data's own breakpoints).

        The cost is constant on [c_i, c_i+1); the returned threshold is the middle of the
        lowest-threshold optimal interval, so it is not balanced on a data point.
        """
        cand = terms.candidates()
        costs = self.curve(terms, cand)
        i = int(np.argmin(costs))
        t = 0.5 * (cand[i] + cand[i + 1]) if i + 1 < cand.size else cand[i] * (1 + 1e-6) + 1e-12
        return float(t), float(costs[i])


def grid_step(u_grid: np.ndarray) -> float:
    """The spacing of a uniform grid (1 for a one-point grid)."""
    return (u_grid[-1] - u_grid[0]) / max(u_grid.size - 1, 1) or 1.0


def level_counts(values: np.ndarray, u_grid: np.ndarray) -> np.ndarray:
    """Counts of ``values`` (already in the grid's units) per point of a uniform grid (nearest point)."""
    if values.size == 0:
        return np.zeros(u_grid.size)
    idx = np.clip(np.rint((values - u_grid[0]) / grid_step(u_grid)), 0, u_grid.size - 1).astype(np.int64)
    return np.bincount(idx, minlength=u_grid.size).astype(np.float64)


def drift_smoothed_curve(far_counts: np.ndarray, peak_counts: np.ndarray, u_grid: np.ndarray, sigma: float,
                         model: "CostModel") -> np.ndarray:
    """Expected cost at each threshold of a uniform grid ``u_grid`` (log-like units, e.g. asinh of the
    normalised signal) when every value may move by a Gaussian ``N(0, sigma^2)`` on that scale.

    ``far_counts``/``peak_counts`` are :func:`level_counts` of the rows far from any anomaly and of the
    anomalous rows' peaks. A row far from anomalies at level u is a false alarm at threshold t with
    probability P(u + e > t); an anomalous row is missed with probability P(peak + e <= t). This is
    the step cost curve convolved with a Gaussian: a threshold pays for how close it sits to the
    values that decide it, so a band of mislabelled rows cannot pull it just under the anomalies.
    """
    from scipy.special import ndtr  # here: scipy costs 0.3 s of every hpcad start-up

    G = u_grid.size
    k = np.arange(-(G - 1), G) * grid_step(u_grid) / sigma  # offset (value - threshold) in units of sigma
    # Direct sums, not an FFT: where the optimum is a plateau (a node whose labelled anomalies score
    # under its normal rows) the rule takes its lowest point, and an FFT's rounding noise (~1e-12)
    # moved MSL M-2's threshold 264x along it (docs/results.md, "Per-node thresholds shrunk ...").
    fa = np.convolve(far_counts, ndtr(k)[::-1], mode="full")[G - 1: 2 * G - 1]
    missed = np.convolve(peak_counts, ndtr(-k)[::-1], mode="full")[G - 1: 2 * G - 1]
    return model.c_alarm * fa + model.c_missed * missed


def runs(mask: np.ndarray, merge_gap: int = 0) -> list[tuple[int, int]]:
    """Contiguous True runs as [start, end) row intervals; runs separated by at most ``merge_gap``
    False rows are merged into one (an operator sees one alarm, not a flicker of many)."""
    if not mask.any():
        return []
    d = np.diff(np.r_[0, mask.astype(np.int8), 0])
    out = list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))
    if merge_gap <= 0:
        return out
    merged = [out[0]]
    for a, b in out[1:]:
        if a - merged[-1][1] <= merge_gap:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


ROWS_PER_DAY = 288  # row-indexed data (no timestamps): a day is 288 rows of 5 minutes


@dataclass
class Scores:
    """Row-level cost terms, event-level counts and range-aware sums; they add across nodes."""

    false_alarms: int = 0
    missed: int = 0
    cost: float = 0.0
    rows: int = 0
    anomalous_rows: int = 0
    alarm_rows: int = 0
    events: int = 0
    events_detected: int = 0
    alarm_events: int = 0
    alarm_events_true: int = 0
    delay_rows: int = 0  # summed over detected events: rows from the event's start to its first alarm
    delay_s: float = 0.0  # the same in seconds, over the detected events of timestamped data
    timed_events: int = 0  # detected events of timestamped data
    node_days: float = 0.0  # observed time (rows / 288 for row-indexed data)

    def __iadd__(self, other: "Scores") -> "Scores":
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        p = self.alarm_events_true / self.alarm_events if self.alarm_events else float("nan")
        r = self.events_detected / self.events if self.events else float("nan")
        fa_events = self.alarm_events - self.alarm_events_true
        d.update(precision=p, recall=r, f1=(2 * p * r / (p + r)) if (p + r) > 0 else 0.0,
                 false_alarm_events=fa_events,
                 false_alarms_per_node_day=fa_events / self.node_days if self.node_days else float("nan"),
                 mean_delay_rows=self.delay_rows / self.events_detected if self.events_detected else float("nan"),
                 mean_delay_s=self.delay_s / self.timed_events if self.timed_events else float("nan"))
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def score_rows(signal: np.ndarray, labels: np.ndarray | None, threshold: float, model: CostModel,
               timestamp: np.ndarray | None = None) -> Scores:
    """Cost, event-level detection and detection delay of one node's rows at one threshold.

    ``timestamp`` in seconds gives delays in seconds and node-days from the rows' time span;
    without it a day is ``ROWS_PER_DAY`` rows. An event's delay counts from its first row to the
    first alarm within the event's span +- tolerance (0 for an alarm just before it)."""
    pred = signal > threshold
    s = Scores(rows=int(signal.size), alarm_rows=int(pred.sum()))
    if timestamp is not None and signal.size:
        span = float(timestamp[-1] - timestamp[0]) + float(np.median(np.diff(timestamp))) if signal.size > 1 else 300.0
        s.node_days = span / 86400.0
    else:
        s.node_days = signal.size / ROWS_PER_DAY
    alarm_events = runs(pred, merge_gap=model.tolerance)
    s.alarm_events = len(alarm_events)
    if labels is None:
        return s
    anom = labels != 0
    tol = model.tolerance
    near_anom = dilate(anom, tol)
    near_pred = dilate(pred, tol)
    s.anomalous_rows = int(anom.sum())
    s.false_alarms = int((pred & ~near_anom).sum())
    s.missed = int((anom & ~near_pred).sum())
    s.cost = model.c_alarm * s.false_alarms + model.c_missed * s.missed
    events = runs(anom)
    s.events = len(events)
    for a, b in events:
        lo, hi = max(0, a - tol), min(pred.size, b + tol)
        hits = np.flatnonzero(pred[lo:hi])
        if hits.size:
            first = lo + int(hits[0])
            s.events_detected += 1
            s.delay_rows += max(0, first - a)
            if timestamp is not None:
                s.delay_s += max(0.0, float(timestamp[first] - timestamp[a]))
                s.timed_events += 1
    s.alarm_events_true = sum(bool(near_anom[a:b].any()) for a, b in alarm_events)
    return s
