"""The alarm signal's per-run choices: the range-excess weight, the per-metric error scales and the
residuals' whitening.

Scoring adds ``weight x (squared excess of a value outside its metric's training range)`` to each
metric's reconstruction error (``signal.excess_weight``) and, with ``signal.metric_scales``, divides
each metric's error by its mean on the node's held-out normal rows (at least the metrics' mean;
hpcad/signals.py) before summing. What suits a system differs: on spacecraft channels a new value
is the anomaly itself (MSL's validation prefers weights of 10^4 to 10^6, and scales), on compute
nodes new workloads bring new values (DAVIDE and the synthetic cluster prefer 1, without scales). With
``auto`` (the weight's default; the scales are off unless set to ``auto`` or ``true``: their
validation gain on MSL did not hold on its test halves, docs/results.md; the whitening's default is
``auto`` too, hpcad/model/whiten.py) each run's own labelled validation rows decide:

- every candidate (``signal.excess_grid`` x scales off/on x whitening on/off, or the fixed value of
  an option that is not ``auto``) ranks each node's smoothed signal against its validation labels (average precision,
  threshold-free; nodes whose validation rows hold both classes); the per-node figures are summed
  over ranks and averaged;
- the first candidate within ``signal.excess_margin`` of the best mean average precision wins, in
  the order whitened before unwhitened, scales off before on, smaller weights before larger (ties
  and noise keep the default: whitened, unscaled, the smaller weight; whitening ranks better or ties
  on every data set measured, with labels and without: docs/results.md, "Whitened residuals");
- without labelled validation rows (a site without labels, production, the nightly job) the recipe
  of the run whose thresholds will be applied is reused (its ``thresholds.json``), else the first
  candidate: whitened, weight 1, unscaled.

The choice and the figures behind it are written to ``errors.h5`` (attributes ``excess_weight``,
``metric_scales``, ``whiten``, ``signal_choice``), thresholds.json and metrics.json.
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
from hpcad.preprocess import VAL, no_validation_rows, split_codes
from hpcad.signals import Recipe, metric_scales, recorded_holdout, smooth_signal
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


def fixed_scales(value: object) -> bool | None:
    """``signal.metric_scales`` as a bool, or None for ``auto``."""
    return _fixed_bool(value, "signal.metric_scales")


def fixed_whiten(value: object) -> bool | None:
    """``signal.whiten`` as a bool, or None for ``auto``."""
    return _fixed_bool(value, "signal.whiten")


def _fixed_bool(value: object, option: str) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return None
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"{option}={value!r}: true, false or 'auto'")


def candidates(sig_cfg) -> list[Recipe]:
    """The recipes ``auto`` chooses from, in order of preference on ties (one: nothing to choose);
    checks the signal options on the way."""
    if not float(sig_cfg.excess_margin) >= 0:
        raise ConfigError(f"signal.excess_margin={sig_cfg.excess_margin}: must be >= 0 (average precision)")
    if not float(sig_cfg.scale_floor) > 0:
        raise ConfigError(f"signal.scale_floor={sig_cfg.scale_floor}: must be > 0 (the normal level's floor per "
                          "metric)")
    w = fixed_weight(sig_cfg.excess_weight)
    if not sig_cfg.range_excess:
        weights = [1.0 if w is None else w]  # no excess term: the weight changes nothing
    elif w is None:
        weights = [float(x) for x in sig_cfg.excess_grid]
        if not weights or any(not x >= 0 for x in weights):
            raise ConfigError(f"signal.excess_grid={list(sig_cfg.excess_grid)}: a non-empty list of weights >= 0")
        weights = sorted(set(weights))
    else:
        weights = [w]
    scales = fixed_scales(sig_cfg.metric_scales)
    whiten = fixed_whiten(sig_cfg.whiten)
    return [Recipe(c, s, wh) for wh in ([True, False] if whiten is None else [whiten])
            for s in ([False, True] if scales is None else [scales]) for c in weights]


def choose(cfg: HpcadConfig, store, node_errors: Callable[[], Iterator[tuple]],
           fallback: Recipe | None) -> tuple[Recipe, dict | None]:
    """The recipe to score with, and the record of how it was chosen (None when nothing was chosen).

    ``node_errors()`` yields ``(model, node data, reconstruction errors, squared excess, missing
    mask, light map)`` per node; it is iterated once more only when labelled validation rows exist,
    and needs to yield only the nodes whose validation rows hold both classes
    (:func:`rankable_nodes`): the others are passed over."""
    sig = cfg.signal
    grid = candidates(sig)
    if fallback is not None and not store.has_labels:  # the run's thresholds will apply: refuse before scoring
        check_applies(fallback, _follow(fallback, grid), Path(str(cfg.train_run)) / "thresholds.json", "this run")
    if len(grid) == 1:
        return grid[0], None
    labelled = store.has_labels and not no_validation_rows(cfg.split)  # a night's labels: nothing to choose on
    totals, count, unscaled_only, unwhitened_only = np.zeros(len(grid)), 0, 0, 0
    if labelled:
        for model, nd, err, excess2, miss, _ in node_errors():
            rows = validation_labels(split_codes(nd, cfg.split), nd.labels)
            if rows is None:
                continue
            val, y = rows
            # the node's errors per whitening (both where auto chooses it: hpcad.score yields a dict)
            errs = err if isinstance(err, dict) else {grid[0].whitened: err}
            if any(r.whitened for r in grid) and model.whitening is None:
                unwhitened_only += 1  # (its chunk's companions were scored without whitening too: none is ranked so)
            ex = np.where(miss, 0.0, excess2)
            M = ex.shape[1]
            if recorded_holdout(model, M) is None:
                unscaled_only += 1
            sums = {}
            for wh, e in errs.items():
                e = np.where(miss, 0.0, e)
                sums[wh, False] = (e.sum(1, dtype=np.float64), ex.sum(1, dtype=np.float64))
                held = model.whitening.holdout_error if wh else recorded_holdout(model, M)
                if held is not None and any(r.scaled for r in grid):
                    sc = metric_scales(held)
                    sums[wh, True] = ((e / sc).sum(1, dtype=np.float64), (ex / sc).sum(1, dtype=np.float64))
            for j, r in enumerate(grid):
                if (r.whitened, r.scaled) in sums:
                    base, extra = sums[r.whitened, r.scaled]
                    totals[j] += validation_ap(base + r.weight * extra, r.level(model, M, sig.scale_floor), sig, val, y)
            count += 1
    sums = all_sum(np.r_[totals, count, unscaled_only, unwhitened_only])
    totals, count, unscaled_only, unwhitened_only = sums[:-3], int(sums[-3]), int(sums[-2]), int(sums[-1])
    names = [r.to_dict() for r in grid]
    if count == 0:
        chosen = grid[0] if fallback is None else _follow(fallback, candidates(sig))
        how = "no labelled validation rows: " + ("the first candidate" if fallback is None
                                                 else "the recipe of the run whose thresholds apply")
        log.info("signal: %s (%s)", chosen, how, extra=CLUSTER_WIDE)
        return chosen, {"rule": how, "candidates": names, "chosen": chosen.to_dict(), "nodes": 0,
                        "followed": fallback is not None}
    keep = list(range(len(grid)))
    if unscaled_only and any(r.scaled for r in grid):  # models from before the held-out errors were recorded
        log.warning("signal.metric_scales=auto: %d node model(s) have no per-metric held-out errors (trained by an "
                    "older hpcad); choosing without scales", unscaled_only, extra=CLUSTER_WIDE)
        keep = [j for j in keep if not grid[j].scaled]
        if not keep:
            raise ConfigError(f"signal.metric_scales=true: {unscaled_only} node model(s) have no per-metric held-out "
                              f"errors (trained by an older hpcad): run `hpcad train` with signal.metric_scales=true "
                              f"(it retrains such nodes), or set signal.metric_scales=false")
    if unwhitened_only:  # models from before the whitening (a fixed signal.whiten=true stops at scoring instead)
        log.warning("signal.whiten=auto: %d node model(s) have no residual whitening (trained by an older hpcad); "
                    "choosing without it", unwhitened_only, extra=CLUSTER_WIDE)
        keep = [j for j in keep if not grid[j].whitened]
    grid, totals, names = [grid[j] for j in keep], totals[keep], [names[j] for j in keep]
    ap = totals / count
    margin = float(sig.excess_margin)
    chosen = first_within(grid, ap, margin)
    log.info("signal: %s (validation average precision %s over %d node(s))", chosen,
             ", ".join(f"{_short(r)}: {a:.4f}" for r, a in zip(grid, ap)), count, extra=CLUSTER_WIDE)
    return chosen, {"rule": f"first candidate within {margin:g} of the best mean validation average precision",
                    "candidates": names, "validation_ap": [round(float(a), 6) for a in ap],
                    "chosen": chosen.to_dict(), "nodes": count}


def without_whitening(recipe: Recipe, choice: dict | None, why: str) -> tuple[Recipe, dict]:
    """``auto``'s whitened choice given up for the unwhitened recipe, where a node's model has no
    whitening (trained by an older hpcad; hpcad.score retries the pass on every rank)."""
    plain = Recipe(recipe.weight, recipe.scaled, False)
    log.warning("signal.whiten=auto: %s; scoring every node unwhitened (%s)", why, plain, extra=CLUSTER_WIDE)
    return plain, {**(choice or {}), "chosen": plain.to_dict(), "unwhitened": why}


def may_unwhiten(sig_cfg, recipe: Recipe, choice: dict | None) -> bool:
    """Whether :func:`without_whitening` may stand in for ``recipe``: ``signal.whiten=auto`` chose
    it, not the recipe of thresholds fitted on whitened signals (those would mean nothing)."""
    return recipe.whitened and fixed_whiten(sig_cfg.whiten) is None and not (choice or {}).get("followed", False)


def validation_labels(split: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A node's validation rows (mask) and their labels (anomalous: True), or None where they do not
    hold both classes (nothing to rank)."""
    val = split == VAL
    y = labels[val] != 0 if labels is not None else np.zeros(0, bool)
    return None if y.all() or not y.any() else (val, y)


def rankable_nodes(store, nodes: list[str], split_cfg) -> list[str]:
    """Of ``nodes``, those whose validation rows hold both classes: the only ones :func:`choose`
    ranks. Found from the store's labels and timestamps alone, so that the choice's scoring pass
    skips the others (with an incident list every node is labelled, and most have no anomaly on
    their validation rows)."""
    labelled = [n for n in nodes if store.labelled.get(n)]
    return [nd.name for nd in store.labels_of(labelled)
            if validation_labels(split_codes(nd, split_cfg), nd.labels) is not None]


def first_within(candidates: list, ap: np.ndarray, margin: float):
    """The first of ``candidates`` (in order of preference) within ``margin`` of the best mean
    validation average precision ``ap``: ties and noise keep the simpler, more conservative one."""
    return next(c for c, a in zip(candidates, ap) if a >= ap.max() - margin)


def _follow(fallback: Recipe, grid: list[Recipe]) -> Recipe:
    """The fallback's recipe in what is left to ``auto``; fixed options keep their value."""
    return Recipe(fallback.weight if len({r.weight for r in grid}) > 1 else grid[0].weight,
                  fallback.scaled if len({r.scaled for r in grid}) > 1 else grid[0].scaled,
                  fallback.whitened if len({r.whitened for r in grid}) > 1 else grid[0].whitened)


def _short(r: Recipe) -> str:
    return f"{r.weight:g}{' scaled' if r.scaled else ''}{' whitened' if r.whitened else ''}"


def validation_ap(row_signal: np.ndarray, level: float, sig, val: np.ndarray, y: np.ndarray) -> float:
    """Average precision of the smoothed signal on the validation rows (as scoring writes it)."""
    return average_precision(smooth_signal(row_signal, sig.smooth, level, sig.causal)[val], y)


def attrs(recipe: Recipe, choice: dict | None) -> dict:
    """``errors.h5`` attributes recording the recipe (and how it was chosen)."""
    out: dict = {"excess_weight": float(recipe.weight), "metric_scales": int(recipe.scaled),
                 "whiten": int(recipe.whitened)}
    if choice is not None:
        out["signal_choice"] = json.dumps(choice)
    return out


def from_details(details: dict) -> Recipe | None:
    """The recipe a ``thresholds.json``'s details record (None: none recorded)."""
    w = details.get("excess_weight")
    return None if w is None else Recipe(float(w), bool(details.get("metric_scales", False)),
                                         bool(details.get("whiten", False)))


def recorded(run: Path | None) -> Recipe | None:
    """The recipe a run's thresholds were fitted with (its ``thresholds.json``), or None."""
    if run is None or not (Path(run) / "thresholds.json").exists():
        return None
    return from_details(json.loads((Path(run) / "thresholds.json").read_text()).get("details", {}))


def check_applies(fitted: Recipe | None, scored: Recipe, thresholds: Path | str, errors: Path | str) -> None:
    """Thresholds fitted on one recipe's signal mean nothing on another's: refuse the mix."""
    if fitted is not None and fitted.whitened != scored.whitened:
        how = ("whitened", "unwhitened") if fitted.whitened else ("unwhitened", "whitened")
        raise ConfigError(f"the thresholds in {thresholds} were fitted on {how[0]} signals ({fitted}), but {errors} "
                          f"is scored with {how[1]} residuals ({scored}): score with "
                          f"signal.whiten={str(fitted.whitened).lower()}, or fit thresholds on {how[1]} signals "
                          f"(`hpcad threshold` on a labelled run scored so)")
    if fitted is not None and fitted != scored:
        raise ConfigError(f"the thresholds in {thresholds} were fitted on signals scored with {fitted}, but "
                          f"{errors} is scored with {scored}: score with signal.excess_weight=auto "
                          f"signal.metric_scales=auto (the thresholds' recipe), or {fitted}")
