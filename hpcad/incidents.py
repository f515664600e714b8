"""Alarm state across nights: a node's alarms on consecutive nights are one incident.

An alarm's *cause* is the metric family (:func:`hpcad.explain.metric_family`) holding most of the
error of its top metrics (``signal`` when no per-metric errors are known). One fault moves between
families from night to night (a power-saving governor tops ``util`` one night, ``pwr`` or ``ips``
the next: the real DAVIDE node's changed eight times in 19 nights), so the incident belongs to the
node and records its causes: ``cause`` is tonight's (that of its highest alarm), ``causes`` every
family its alarms named so far, first seen first. On night D an incident of a node is

- ``new``: the node alarmed on D and had no open incident the previous night; its id is
  ``<node>/<cause>/<first night>`` (the cause of its first night);
- ``ongoing``: alarmed on D and open on the previous night; it keeps its id and counts its nights;
- ``resolved``: open on the previous night, scored on D and not alarmed (listed once, on D).

An open incident of a node that sent no telemetry on D (*silent*: down, or its collector is) is not
resolved: nothing was seen to end it, and a node that failed with its fault goes dark. It stays
``ongoing`` with ``silent_since`` (its first night without rows), its nights not counted on, until
the node is scored again: then it goes on (it alarms) or is resolved (it does not).

*The previous night* is the latest night folder at most ``gap_days`` before D that holds an
``incidents.json``, so one failed or skipped night does not split an incident. Each night's
``incidents.json`` is derived from the previous night's file and the night's own alarms only: a
rerun of a night writes the same file, and a backfill run oldest first (``nightly.date=A..B``)
rebuilds the state night by night. A previous night written when incidents were per node and cause
(before 2026-12-03) may hold several open incidents of one node: the oldest goes on, with their
nights and causes, and the others are resolved, ``merged_into`` it.
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
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


def night_incidents(day: dt.date, alarms: list[dict], previous: list[dict], silent: Iterable[str] = ()) -> list[dict]:
    """The incidents of ``day`` from its alarm records (:func:`hpcad.threshold.evaluate.alarm_record` form)
    and the previous night's incidents, one per node; open ones first (new, then ongoing), then resolved.
    ``silent``: the nodes that sent no rows on ``day`` (their open incidents stay open)."""
    iso = day.isoformat()
    before, merged = _open_by_node(previous)
    today: dict[str, list[dict]] = {}
    for a in alarms:
        today.setdefault(a["node"], []).append(a)
    out = []
    for node, group in sorted(today.items()):
        prev = before.get(node)
        peak = max(group, key=lambda a: a["peak_score"])
        cause = cause_of(peak)
        causes = list(prev.get("causes", [prev["cause"]])) if prev else []
        for c in [cause, *(cause_of(a) for a in group)]:
            if c not in causes:
                causes.append(c)
        out.append({"id": prev["id"] if prev else f"{node}/{cause}/{iso}", "node": node, "cause": cause,
                    "causes": causes, "state": "ongoing" if prev else "new",
                    "first_night": prev["first_night"] if prev else iso, "last_night": iso,
                    "nights": prev["nights"] + 1 if prev else 1, "alarms": len(group),
                    "peak_score": peak["peak_score"], "peak_time": peak["peak_time"],
                    "top_metrics": peak.get("top_metrics", []),
                    "jobs": sorted({j for a in group for j in a.get("jobs", [])})})
    quiet = set(silent)
    for node, prev in sorted(before.items()):
        if node in quiet and node not in today:
            out.append({**prev, "state": "ongoing", "alarms": 0, "silent_since": prev.get("silent_since", iso)})
        elif node not in today:
            seen = {k: v for k, v in prev.items() if k != "silent_since"}
            out.append({**seen, "state": "resolved", "resolved_night": iso, "alarms": 0})
    out += [{**i, "state": "resolved", "resolved_night": iso, "alarms": 0} for i in merged]
    return sorted(out, key=lambda i: (STATES.index(i["state"]), i["node"], i["id"]))


def _open_by_node(previous: list[dict]) -> tuple[dict[str, dict], list[dict]]:
    """The previous night's open incident of each node, and those merged into it (a night written
    when incidents were per node and cause: the oldest goes on, with all their nights and causes)."""
    by_node: dict[str, list[dict]] = {}
    for i in previous:
        if i["state"] in OPEN:
            by_node.setdefault(i["node"], []).append(i)
    kept, merged = {}, []
    for node, found in by_node.items():
        found = sorted(found, key=lambda i: (i["first_night"], i["id"]))
        first = found[0]
        causes = [c for i in found for c in i.get("causes", [i["cause"]])]
        kept[node] = {**first, "nights": max(i["nights"] for i in found), "causes": list(dict.fromkeys(causes))}
        merged += [{**i, "merged_into": first["id"]} for i in found[1:]]
    return kept, merged


def incident_of(alarm: dict, incidents: list[dict]) -> dict | None:
    """The open incident the alarm belongs to: its node's."""
    return next((i for i in incidents if i["node"] == alarm["node"] and i["state"] in OPEN), None)
