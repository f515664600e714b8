"""The range-excess weight of the alarm signal (``signal.excess_weight``), chosen per run.

Scoring adds ``weight x (squared excess of a value outside its metric's training range)`` to each
metric's reconstruction error. How much a never-seen value should count depends on the system: on
spacecraft channels a new value is the anomaly itself (MSL's validation prefers 1000), on compute
nodes new workloads bring new values (DAVIDE and the synthetic cluster prefer 1). So the default,
``auto``, lets each run's own labelled validation rows decide:

- for every candidate weight in ``signal.excess_grid``, each node's smoothed signal is ranked
  against its validation labels (average precision, threshold-free; nodes whose validation rows
  hold both classes); the per-node figures are summed over ranks and averaged;
- the smallest candidate within ``signal.excess_margin`` of the best mean average precision wins
  (ties and noise keep the smaller, more conservative weight);
- without labelled validation rows (production, the nightly job) the weight of the run whose
  thresholds will be applied is reused (its ``thresholds.json``), else the first candidate.

A number instead of ``auto`` fixes the weight. The choice and the figures behind it are written to
``errors.h5`` (attributes ``excess_weight``, ``excess_choice``), thresholds.json and metrics.json.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcad.dist import CLUSTER_WIDE, all_sum
from hpcad.errors import ConfigError
from hpcad.preprocess import VAL, split_codes
from hpcad.signals import signal_level, smooth_signal
from hpcad.threshold.quality import average_precision

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

log = logging.getLogger(__name__)
AUTO = "auto"


def fixed_weight(value: object) -> float | None:
    """``signal.excess_weight`` as a number, or None for ``auto``."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"signal.excess_weight={value!r}: a number >= 0 or 'auto'") from None
    if not w >= 0:
        raise ConfigError(f"signal.excess_weight={value!r}: must be >= 0")
    return w


def candidates(sig_cfg) -> list[float]:
    grid = [float(x) for x in sig_cfg.excess_grid]
    if not grid or any(not x >= 0 for x in grid):
        raise ConfigError(f"signal.excess_grid={list(sig_cfg.excess_grid)}: a non-empty list of weights >= 0")
    return sorted(set(grid))


def choose(cfg: HpcadConfig, store, node_errors: Callable[[], Iterator[tuple]],
           fallback: float | None) -> tuple[float, dict | None]:
    """The weight to score with, and the record of how it was chosen (None when it was fixed).

    ``node_errors()`` yields ``(model, node data, reconstruction errors, squared excess, missing
    mask, light map)`` per node; it is iterated once more only when labelled validation rows exist."""
    sig = cfg.signal
    w = fixed_weight(sig.excess_weight)
    if w is not None or not sig.range_excess:
        return (1.0 if w is None else w), None
    grid = candidates(sig)
    totals, count = np.zeros(len(grid)), 0
    if store.has_labels:
        for model, nd, err, excess2, miss, _ in node_errors():
            val = split_codes(nd, cfg.split) == VAL
            y = nd.labels[val] != 0 if nd.labels is not None else np.zeros(0, bool)
            if y.all() or not y.any():
                continue
            base = np.where(miss, 0.0, err).sum(1, dtype=np.float64)
            extra = np.where(miss, 0.0, excess2).sum(1, dtype=np.float64)
            level = signal_level(model.signal_scale, err.shape[1], sig.scale_floor)
            totals += [validation_ap(base + c * extra, level, sig, val, y) for c in grid]
            count += 1
    sums = all_sum(np.r_[totals, count])
    totals, count = sums[:-1], int(sums[-1])
    if count == 0:
        w = grid[0] if fallback is None else float(fallback)
        how = "no labelled validation rows: " + ("the first candidate" if fallback is None
                                                 else "the weight of the run whose thresholds apply")
        log.info("signal.excess_weight=auto: %s (%s)", w, how, extra=CLUSTER_WIDE)
        return w, {"rule": how, "candidates": grid, "chosen": w, "nodes": 0}
    ap = totals / count
    margin = float(sig.excess_margin)
    w = next(c for c, a in zip(grid, ap) if a >= ap.max() - margin)
    log.info("signal.excess_weight=auto: %s (validation average precision %s over %d node(s))", w,
             ", ".join(f"{c:g}: {a:.4f}" for c, a in zip(grid, ap)), count, extra=CLUSTER_WIDE)
    return w, {"rule": f"smallest weight within {margin:g} of the best mean validation average precision",
               "candidates": grid, "validation_ap": [round(float(a), 6) for a in ap], "chosen": w, "nodes": count}


def validation_ap(row_signal: np.ndarray, level: float, sig, val: np.ndarray, y: np.ndarray) -> float:
    """Average precision of the smoothed signal on the validation rows (as scoring writes it)."""
    return average_precision(smooth_signal(row_signal, sig.smooth, level, sig.causal)[val], y)


def attrs(weight: float, choice: dict | None) -> dict:
    """``errors.h5`` attributes recording the weight (and how it was chosen)."""
    out: dict = {"excess_weight": float(weight)}
    if choice is not None:
        out["excess_choice"] = json.dumps(choice)
    return out


def recorded(run: Path | None) -> float | None:
    """The weight a run's thresholds were fitted with (its ``thresholds.json``), or None."""
    if run is None or not (Path(run) / "thresholds.json").exists():
        return None
    details = json.loads((Path(run) / "thresholds.json").read_text()).get("details", {})
    w = details.get("excess_weight")
    return None if w is None else float(w)


def check_applies(th_weight: float | None, scored_weight: float, thresholds: Path, errors: Path) -> None:
    """Thresholds fitted on one weight's signal mean nothing on another's: refuse the mix."""
    if th_weight is not None and float(th_weight) != float(scored_weight):
        raise ConfigError(f"{thresholds} was fitted on signals with signal.excess_weight={th_weight:g}, but "
                          f"{errors} was scored with {scored_weight:g}: score again with "
                          f"signal.excess_weight=auto (or {th_weight:g})")
