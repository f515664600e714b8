"""Per-node drift across nights: a sustained shift of a node's error level away from its baseline.

Statistic: a node's *level* for a night is the median of ``signal_norm`` (the alarm signal divided
by the node's mean signal on its held-out training rows) over the night's rows; the median ignores
anomalies shorter than half the night. Its *baseline* is the median level of its first
``nightly.drift_reference_nights`` nights scored with tonight's model (default 3; before that no
verdict is given).
A node drifts when level / baseline >= ``nightly.drift_ratio`` (default 2) on
``nightly.drift_days`` (default 3) consecutive nights: its normal behaviour moved away from what
the model learned, which a one-off job mix or a single incident does not do. A missing night
breaks the streak. Levels are kept per night (``<out>/<date>/levels.csv``), so reruns and
backfills give the same verdicts.
"""
from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hpcad.atomic import atomic_path
from hpcad.errorstore import NodeSignal
from hpcad.nightly.days import published_nights
from hpcad.threshold.rules import Thresholds

FIELDS = ["node", "rows", "rows_expected", "alarmed_rows", "level", "missing_share", "metrics_lost", "model", "held"]


def night_levels(signals: Iterable[NodeSignal], th: Thresholds, missing: dict[str, float] | None = None,
                 lost: dict[str, list[str]] | None = None, expected: dict[str, int] | None = None) -> list[dict]:
    """Each node's level and alarmed rows; ``missing``: its share of missing input values, ``lost``:
    the metrics it reported in training that sent no value (:class:`hpcad.errorstore.ErrorStore`),
    ``expected``: the rows it should have sent (``rows_expected``, "" where unknown)."""
    missing, lost, expected = missing or {}, lost or {}, expected or {}
    out = []
    for s in signals:
        alarmed = th.signal_of(s) > th.threshold_for(s.node)
        level = float(np.median(s.normalised)) if len(alarmed) else float("nan")
        out.append({"node": s.node, "rows": int(len(alarmed)), "rows_expected": expected.get(s.node, ""),
                    "alarmed_rows": int(alarmed.sum()), "level": level,
                    "missing_share": round(missing.get(s.node, 0.0), 6), "metrics_lost": lost.get(s.node, [])})
    return out


def write_levels(path: Path, levels: list[dict]) -> None:
    """levels.csv: one row per node (``metrics_lost``: the names, separated by ``;``; ``model``: the
    digest of the model file that scored it, hpcad.model.files.model_digest; ``held``: why its alarms
    opened no incident, a cluster-wide event or settling after a change, where they did not)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({**lv, "metrics_lost": ";".join(lv.get("metrics_lost", []))} for lv in levels)


def level_rows(path: Path) -> dict[str, dict]:
    """A night's levels.csv, node -> its row (empty where the night has none)."""
    if not path.exists():
        return {}
    with open(path) as fh:
        return {r["node"]: r for r in csv.DictReader(fh)}


def assess(out_root: Path, day: dt.date, today: list[dict], ratio: float, days: int, reference: int = 3) -> list[dict]:
    """Verdict per node from today's levels and the earlier nights under ``out_root/<date>/levels.csv``.

    A node's baseline and streak count only the nights scored with the model it is scored with
    tonight (``model``: its model file's digest; a night that did not record one counts): after the
    job moves to a new training run, or the node is retrained, the new model's first nights are the
    baseline, not the old model's (whose levels are another model's errors)."""
    nights = published_nights(out_root, before=day.isoformat(), holding="levels.csv")
    model = {rec["node"]: rec.get("model", "") for rec in today}
    base: dict[str, list[float]] = {n: [] for n in model}
    other: set[str] = set()  # nodes scored by another model on earlier nights (a retraining)
    for d in nights:  # each node's first `reference` nights with tonight's model
        if all(len(b) >= reference for b in base.values()):
            break
        for node, r in level_rows(out_root / d / "levels.csv").items():
            if node in base and len(base[node]) < reference:
                if _same_model(r, model[node]):
                    base[node].append(_level(r))
                else:
                    other.add(node)
    recent = [level_rows(out_root / (day - dt.timedelta(days=k)).isoformat() / "levels.csv")
              for k in range(1, max(days, 1))]
    verdicts = []
    for rec in today:
        node = rec["node"]
        b = [v for v in base[node] if v == v]
        if len(b) < reference or not np.median(b) > 0:
            verdicts.append({"node": node, "level": rec["level"], "baseline": None, "streak": 0, "drifted": False,
                             "new_model": node in other})
            continue
        baseline = float(np.median(b))
        streak = 0
        earlier = [_level(lv[node]) if node in lv and _same_model(lv[node], model[node]) else float("nan")
                   for lv in recent]
        for v in [rec["level"]] + earlier:
            if v == v and v / baseline >= ratio:  # NaN (no data that night, another model) breaks the streak
                streak += 1
            else:
                break
        verdicts.append({"node": node, "level": rec["level"], "baseline": baseline, "streak": streak,
                         "drifted": streak >= days})
    return verdicts


def _level(row: dict) -> float:
    return float(row["level"]) if row["level"] not in ("", "nan") else float("nan")


def _same_model(row: dict, model: str) -> bool:
    return not row.get("model") or not model or row["model"] == model
