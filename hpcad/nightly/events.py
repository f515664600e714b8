"""Cluster-wide events: many nodes alarmed in the same hours.

Each node's model alarms on its own node, so a cause the nodes share (the machine room's cooling or
power, a software or firmware roll-out, a job spread over many nodes, the telemetry pipeline itself)
alarms on all of them at once: without this, one incident per node, a notification listing them
all, and, once they stay open, drain commands for nodes that are not at fault.

An hour of the night is *cluster-wide* when at least ``nightly.event_share`` of the scored nodes,
and at least ``nightly.event_min_nodes``, have an alarm overlapping it; consecutive such hours are
one *event* (``<night>/events.json``: its hours, how many nodes, their causes and the jobs most of
them ran). An alarm that lies mostly (half its span or more) within an event is marked with the
event's id and opens no node incident, unless its node already had an incident of the same cause
open the night before (its own trouble, which goes on). ``nightly.event_share=0`` turns this off.
"""
from __future__ import annotations

import datetime as dt
import math
from collections import Counter

from hpcad.incidents import OPEN, cause_of

BIN_S = 3600  # events are found hour by hour


def _span(alarm: dict) -> tuple[int, int]:
    """An alarm's [start, end] in epoch seconds (a one-row alarm: one second)."""
    start = int(dt.datetime.fromisoformat(alarm["start"]).timestamp())
    end = int(dt.datetime.fromisoformat(alarm["end"]).timestamp())
    return start, max(end, start + 1)


def cluster_events(alarms: list[dict], scored: int, share: float, min_nodes: int) -> list[dict]:
    """The night's events from its alarm records (:func:`hpcad.nightly.night.alarm_record` form), over
    ``scored`` nodes; empty when ``share`` is 0."""
    if share <= 0 or not alarms:
        return []
    need = max(int(min_nodes), math.ceil(share * scored), 1)
    per_bin: dict[int, set[str]] = {}
    for a in alarms:
        start, end = _span(a)
        for b in range(start // BIN_S, (end - 1) // BIN_S + 1):
            per_bin.setdefault(b, set()).add(a["node"])
    hot = sorted(b for b, nodes in per_bin.items() if len(nodes) >= need)
    runs: list[list[int]] = []
    for b in hot:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    events = []
    for run in runs:
        start, end = run[0] * BIN_S, (run[-1] + 1) * BIN_S
        nodes = sorted(set().union(*(per_bin[b] for b in run)))
        inside = [a for a in alarms if _inside(a, start, end)]
        iso = dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat()
        jobs = Counter(j for node in nodes for j in {j for a in inside if a["node"] == node for j in a.get("jobs", [])})
        events.append({"id": f"cluster/{iso}", "start": iso,
                       "end": dt.datetime.fromtimestamp(end, dt.timezone.utc).isoformat(),
                       "nodes": len(nodes), "scored": scored, "share": round(len(nodes) / max(scored, 1), 4),
                       "peak_nodes": max(len(per_bin[b]) for b in run), "alarms": len(inside),
                       "causes": dict(Counter(cause_of(a) for a in inside).most_common(5)),
                       "jobs": {j: c for j, c in jobs.most_common(5) if c > 1},
                       "node_list": nodes[:200]})
    return events


def _inside(alarm: dict, start: int, end: int) -> bool:
    """Whether half the alarm's span or more lies in [start, end)."""
    a0, a1 = _span(alarm)
    return 2 * max(0, min(a1, end) - max(a0, start)) >= a1 - a0


def mark(alarms: list[dict], events: list[dict], previous: list[dict]) -> None:
    """Mark each alarm that lies mostly within an event with its id (``cluster_event``), unless its
    node had an incident of the alarm's cause open on the ``previous`` night (its own trouble, which
    goes on); alarms already held (``settling``) are left as they are."""
    going_on = {(i["node"], i["cause"]) for i in previous if i["state"] in OPEN}
    for a in alarms:
        e = None if "settling" in a else event_of(a, events)
        if e is not None and (a["node"], cause_of(a)) not in going_on:
            a["cluster_event"] = e["id"]


def event_of(alarm: dict, events: list[dict]) -> dict | None:
    """The event the alarm lies mostly within, if any."""
    for e in events:
        if _inside(alarm, *_span({"start": e["start"], "end": e["end"]})):
            return e
    return None
