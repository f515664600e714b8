"""Cluster-wide events: many nodes, of the cluster or of one rack, alarmed in the same hours.

Each node's model alarms on its own node, so a cause the nodes share (the machine room's cooling or
power, a software or firmware roll-out, a job spread over many nodes, the telemetry pipeline itself)
alarms on all of them at once: without this, one incident per node, a notification listing them
all, and, once they stay open, drain commands for nodes that are not at fault.

An hour of the night is *cluster-wide* when at least ``nightly.event_share`` of the scored nodes,
and at least ``nightly.event_min_nodes``, have an alarm overlapping it; consecutive such hours are
one *event* (``<night>/events.json``: its hours, how many nodes, their causes and the jobs most of
them ran). With ``nightly.groups`` (a CSV ``node,group``: rack, chassis, PDU, cooling loop) the same
rule also runs within each group, so a rack's cooling fault is one event of that rack
(``<group>/<start>``) though the rest of the cluster is fine; a group's event inside a cluster-wide
one is not repeated. An alarm that lies mostly (half its span or more) within an event is marked
with the event's id and opens no node incident, unless its node already had an incident open the
night before (its own trouble, which goes on). ``nightly.event_share=0`` turns
this off.

A fault across midnight (cooling that fails at 22:00 and is fixed at 03:00) is scored on two
nights. Tonight's event of the same scope that starts within an hour of the end of one of last
night's events *continues* it: it keeps that event's id and first start, counts its ``nights``, and
names the night before (``continues``), so the notify hook is not run again for it alone
(``HPCAD_NEW_CLUSTER_EVENTS``) and the report and log say it goes on.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter
from pathlib import Path

from hpcad.errors import ConfigError
from hpcad.incidents import OPEN, cause_of

BIN_S = 3600  # events are found hour by hour


def _span(alarm: dict) -> tuple[int, int]:
    """An alarm's [start, end] in epoch seconds (a one-row alarm: one second)."""
    start = int(dt.datetime.fromisoformat(alarm["start"]).timestamp())
    end = int(dt.datetime.fromisoformat(alarm["end"]).timestamp())
    return start, max(end, start + 1)


def read_groups(path: str | Path | None) -> dict[str, str]:
    """``nightly.groups`` as node -> group; empty without a file. Errors name the file and line."""
    if not path:
        return {}
    from hpcad.data.tables import read_node_map

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"nightly.groups={str(path)!r}: no such file (a CSV node,group: each node's rack, "
                          f"chassis or PDU; docs/operations.md)")
    return read_node_map(p, "group", "nightly.groups", " (group: the node's rack, chassis or PDU)")


def cluster_events(alarms: list[dict], scored: list[str], share: float, min_nodes: int,
                   groups: dict[str, str] | None = None) -> list[dict]:
    """The night's events from its alarm records (:func:`hpcad.threshold.evaluate.alarm_record` form) over the
    ``scored`` nodes: the cluster's, then each group's (``groups``: node -> group) not inside one of
    the cluster's; empty when ``share`` is 0."""
    if share <= 0 or not alarms:
        return []
    events = _events(alarms, "cluster", scored, share, min_nodes)
    members: dict[str, list[str]] = {}
    for node in scored:
        if node in (groups or {}):
            members.setdefault(groups[node], []).append(node)
    for group, nodes in sorted(members.items()):
        events += [e for e in _events(alarms, group, nodes, share, min_nodes)
                   if not any(c["scope"] == "cluster" and c["start"] <= e["start"] and e["end"] <= c["end"]
                              for c in events)]
    return events


def _events(alarms: list[dict], scope: str, scored: list[str], share: float, min_nodes: int) -> list[dict]:
    """The events of one scope: the cluster, or a group of nodes."""
    mine = set(scored)
    alarms = [a for a in alarms if a["node"] in mine]
    need = max(int(min_nodes), math.ceil(share * len(scored)), 1)
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
        node_jobs: dict[str, set[str]] = {}
        for a in inside:
            node_jobs.setdefault(a["node"], set()).update(a.get("jobs", []))
        jobs = Counter(j for js in node_jobs.values() for j in js)  # how many of its nodes ran each job
        events.append({"id": f"{scope}/{iso}", "scope": scope, "start": iso,
                       "end": dt.datetime.fromtimestamp(end, dt.timezone.utc).isoformat(),
                       "nodes": len(nodes), "scored": len(scored), "share": round(len(nodes) / max(len(scored), 1), 4),
                       "peak_nodes": max(len(per_bin[b]) for b in run), "alarms": len(inside),
                       "causes": dict(Counter(cause_of(a) for a in inside).most_common(5)),
                       "jobs": {j: c for j, c in jobs.most_common(5) if c > 1},
                       "node_list": nodes[:200]})
    return events


EVENTS = "events.json"  # in each night folder


def continue_from(events: list[dict], out: Path, day: dt.date) -> None:
    """Mark tonight's ``events`` that go on from one of the night before's (``out/<day - 1>/events.json``):
    the same scope, starting no later than an hour after it ended. Such an event takes its id,
    ``first_start`` and ``nights`` + 1, and ``continues`` names the night before; others start at 1."""
    before = Path(out) / (day - dt.timedelta(days=1)).isoformat() / EVENTS
    previous = json.loads(before.read_text()) if before.is_file() else []
    for e in events:
        e.update(first_start=e["start"], nights=1)
        start = _span(e)[0]
        for p in previous:
            p_start, p_end = _span(p)
            if p["scope"] == e["scope"] and p_start <= start <= p_end + BIN_S:
                e.update(id=p["id"], first_start=p.get("first_start", p["start"]), nights=p.get("nights", 1) + 1,
                         continues=before.parent.name)
                break


def new_events(events: list[dict]) -> list[dict]:
    """The events that do not continue one of the night before."""
    return [e for e in events if not e.get("continues")]


def _inside(alarm: dict, start: int, end: int) -> bool:
    """Whether half the alarm's span or more lies in [start, end)."""
    a0, a1 = _span(alarm)
    return 2 * max(0, min(a1, end) - max(a0, start)) >= a1 - a0


def mark(alarms: list[dict], events: list[dict], previous: list[dict]) -> None:
    """Mark each alarm that lies mostly within an event with its id (``cluster_event``), unless its
    node had an incident open on the ``previous`` night (its own trouble, which goes on); alarms
    already held (``settling``) are left as they are."""
    going_on = {i["node"] for i in previous if i["state"] in OPEN}
    for a in alarms:
        e = None if "settling" in a else event_of(a, events)
        if e is not None and a["node"] not in going_on:
            a["cluster_event"] = e["id"]


def event_of(alarm: dict, events: list[dict]) -> dict | None:
    """The event the alarm lies mostly within, if any."""
    for e in events:
        if _inside(alarm, *_span({"start": e["start"], "end": e["end"]})):
            return e
    return None
