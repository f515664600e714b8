"""Alarm state across nights: repeated alarms on one node with one cause are one incident.

An alarm's *cause* is the metric family (:func:`hpcad.explain.metric_family`) holding most of the
error of its top metrics (``signal`` when no per-metric errors are known). On night D an incident ``(node, cause)`` is

- ``new``: alarmed on D and not open on the previous night;
- ``ongoing``: alarmed on D and open on the previous night; it keeps its id
  ``<node>/<cause>/<first night>`` and counts its nights;
- ``resolved``: open on the previous night and not alarmed on D (listed once, on D).

*The previous night* is the latest night folder at most ``gap_days`` before D that holds an
``incidents.json``, so one failed or skipped night does not split an incident. Each night's
``incidents.json`` is derived from the previous night's file and the night's own alarms only: a
rerun of a night writes the same file, and a backfill run oldest first (``nightly.date=A..B``)
rebuilds the state night by night.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from hpcad.explain import metric_family

FILE = "incidents.json"
OPEN = ("new", "ongoing")
STATES = (*OPEN, "resolved")


def cause_of(alarm: dict) -> str:
    """The metric family with the most weight among the alarm's top metrics: their "times normal"
    where known, else their error (the family, not the single metric, so that a governor fault
    that tops ``ips_p0_3`` one night and ``ips_p1_0`` the next stays one cause)."""
    mass: dict[str, float] = {}
    top = alarm.get("top_metrics") or []
    key = "x_normal" if top and all("x_normal" in m for m in top) else "error"
    for m in top:
        fam = metric_family(m["metric"])
        mass[fam] = mass.get(fam, 0.0) + float(m[key])
    return max(sorted(mass), key=mass.__getitem__) if mass else "signal"


def read_night(night_dir: Path) -> list[dict] | None:
    """A night folder's incidents, or None when it has no ``incidents.json``."""
    p = Path(night_dir) / FILE
    return json.loads(p.read_text()) if p.exists() else None


def previous_incidents(out: Path, day: dt.date, gap_days: int) -> list[dict]:
    """The incidents of the latest night within ``gap_days`` before ``day`` (none: empty)."""
    for k in range(1, max(int(gap_days), 1) + 1):
        found = read_night(out / (day - dt.timedelta(days=k)).isoformat())
        if found is not None:
            return found
    return []


def night_incidents(day: dt.date, alarms: list[dict], previous: list[dict]) -> list[dict]:
    """The incidents of ``day`` from its alarm records (:func:`hpcad.nightly.night.alarm_record` form)
    and the previous night's incidents; open ones first (new, then ongoing), then resolved."""
    iso = day.isoformat()
    before = {(i["node"], i["cause"]): i for i in previous if i["state"] in OPEN}
    today: dict[tuple[str, str], list[dict]] = {}
    for a in alarms:
        today.setdefault((a["node"], cause_of(a)), []).append(a)
    out = []
    for (node, cause), group in sorted(today.items()):
        prev = before.get((node, cause))
        first = prev["first_night"] if prev else iso
        peak = max(group, key=lambda a: a["peak_score"])
        out.append({"id": f"{node}/{cause}/{first}", "node": node, "cause": cause,
                    "state": "ongoing" if prev else "new", "first_night": first, "last_night": iso,
                    "nights": prev["nights"] + 1 if prev else 1, "alarms": len(group),
                    "peak_score": peak["peak_score"], "peak_time": peak["peak_time"],
                    "top_metrics": peak.get("top_metrics", []),
                    "jobs": sorted({j for a in group for j in a.get("jobs", [])})})
    for key, prev in sorted(before.items()):
        if key not in today:
            out.append({**prev, "state": "resolved", "resolved_night": iso, "alarms": 0})
    return sorted(out, key=lambda i: (STATES.index(i["state"]), i["node"], i["cause"]))


def incident_of(alarm: dict, incidents: list[dict]) -> dict | None:
    key = (alarm["node"], cause_of(alarm))
    return next((i for i in incidents if (i["node"], i["cause"]) == key and i["state"] in OPEN), None)
