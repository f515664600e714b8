"""The nightly report's own parts: the last nights' trend, each node's history over them, and the
sections (incidents, drift, light retraining) put before the report's usual ones."""
from __future__ import annotations

import csv
import datetime as dt
import html
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.nightly.drain import candidates as drain_candidates, last_night
from hpcad.nightly.days import published_nights
from hpcad.nightly.drift import level_rows
from hpcad.incidents import STATES, read_night

if TYPE_CHECKING:
    from hpcad.config import NightlyConfig

REPORT_NIGHTS = 14  # nights the report's trend and the node pages' history show


def trend(out: Path, iso: str, nodes: int, alarms: int, incidents: list[dict],
           nights: int = REPORT_NIGHTS) -> list[list]:
    """This night and the last ``nights`` - 1 successful nights before it (latest run of each, from
    history.csv): date, nodes, alarms, new incidents."""
    rows: dict[str, list] = {}
    if (out / "history.csv").exists():
        with open(out / "history.csv") as fh:
            for r in csv.DictReader(fh):
                if r["status"] == "ok" and r["date"] < iso:
                    rows[r["date"]] = [r["date"], r["nodes"], r["alarms"], r.get("new_incidents", "")]
    rows[iso] = [iso, nodes, alarms, sum(i["state"] == "new" for i in incidents)]
    return [rows[d] for d in sorted(rows)[-nights:]][::-1]


def node_history(out: Path, iso: str, levels: list[dict], incidents: list[dict], nodes: set[str],
                 nights: int = REPORT_NIGHTS) -> dict[str, list[list]]:
    """For each of ``nodes``: this night and the last ``nights`` - 1 published nights before it,
    newest first: night, level (median normalised signal, levels.csv), alarmed rows, incident
    state and cause that night (incidents.json)."""
    earlier = published_nights(out, before=iso, holding="levels.csv")[-(nights - 1):] if nights > 1 else []
    per_night = [(d, level_rows(out / d / "levels.csv"), read_night(out / d) or []) for d in earlier]
    per_night.append((iso, {r["node"]: r for r in levels}, incidents))
    out_rows: dict[str, list[list]] = {}
    for node in nodes:
        rows = []
        for night, lv, inc in reversed(per_night):
            r = lv.get(node)
            state = "; ".join(f"{i['state']} ({i['cause']})" for i in inc if i["node"] == node)
            if r is not None and r.get("held"):  # alarms that opened no incident, and why
                state = "; ".join(x for x in (state, f"alarms held: {r['held']}") if x)
            if r is not None or state:
                rows.append([night, None if r is None else float(r["level"]),
                             None if r is None else int(r["alarmed_rows"]), state])
        out_rows[node] = rows
    return out_rows


def nightly_sections(iso: str, src: Path, new: list[str], verdicts: list[dict], refits: list[dict], n: NightlyConfig,
                      incidents: list[dict], trend: list[list] | None = None, silent: list[str] | None = None,
                      gaps: list[dict] | None = None, max_share: float = 0.5,
                      changes: list[list] | None = None, events: list[dict] | None = None,
                      zone: str | None = None, retired: list[str] | None = None) -> list[str]:
    """The nightly report's own sections; ``zone``: the report's (events' times), default the site's;
    ``retired``: nodes out of service (nightly.changes), not expected."""
    from hpcad.report.markup import gap_text, html_table, in_zone, top_names
    from hpcad.report.plots import trend_plot

    parts = [f"<p>night {iso} (site time zone {html.escape(n.timezone)}); input <code>{html.escape(str(src))}</code>.</p>"]
    if trend:
        parts.append("<h2>Last nights</h2>" + (trend_plot(trend) if len(trend) > 1 else "")
                     + html_table(trend, ["night", "nodes scored", "alarms", "new incidents"]))
    if new:
        parts.append(f"<p>{len(new)} node(s) without a trained model were not scored: "
                     f"{html.escape(', '.join(new[:50]))}</p>")
    if retired:
        parts.append(f"<p>{len(retired)} node(s) retired in the maintenance log (<code>nightly.changes</code>) are "
                     f"not expected and not scored: {html.escape(', '.join(retired[:50]))}"
                     f"{' ...' if len(retired) > 50 else ''}</p>")
    if silent or gaps:
        rows = [[node, "no rows tonight", 0] for node in silent or []]
        rows += [[g["node"], gap_text(g, max_share), g["rows"]] for g in gaps or []]
        parts.append(f"<h2>Telemetry gaps ({len(rows)})</h2><p>Trained nodes that sent nothing tonight, nodes with "
                     f"more than {max_share:.0%} of their metric values missing (report.max_missing_share), and "
                     f"nodes with a metric they reported in training that sent no value tonight. "
                     f"A model sees no error where it sees no value: these nodes cannot alarm on what is missing. "
                     f"Check the node and its collector.</p>"
                     + html_table(rows[:500], ["node", "gap", "rows tonight"]))
    if changes:
        parts.append(f"<h2>Changed nodes ({len(changes)})</h2><p>Nodes the site's maintenance log "
                     f"(<code>nightly.changes</code>) says changed on or before tonight: each settles on a light map "
                     f"fitted on its nights since the change only; until one scores it, its alarms are listed but "
                     f"open no incident (nothing drained or notified for them). docs/operations.md.</p>"
                     + html_table(changes, ["node", "since", "note", "tonight"]))
    if events:
        parts.append(f"<h2>Cluster-wide events ({len(events)})</h2><p>Hours in which at least "
                     f"{n.event_share:.0%} of the scored nodes (and {n.event_min_nodes} or more) alarmed, of the "
                     f"cluster or of one group (<code>nightly.event_share</code>, <code>nightly.groups</code>): a "
                     f"cause they share (machine-room cooling or power, a software or firmware roll-out, a job over "
                     f"many nodes, the telemetry pipeline) rather than as many node faults. Alarms within an event "
                     f"open no node incident (nothing is drained for them), except on nodes whose incident was "
                     f"already open. docs/operations.md.</p>"
                     + html_table([[e["scope"], in_zone(e["start"], zone or n.timezone)
                                    + (f" (continued from the night before: since "
                                       f"{in_zone(e['first_start'], zone or n.timezone)})"
                                       if e.get("continues") else ""),
                                    in_zone(e["end"], zone or n.timezone),
                                    f"{e['nodes']} of {e['scored']} ({e['share']:.0%})",
                                    e["alarms"], ", ".join(f"{c} ({k})" for c, k in e["causes"].items()),
                                    ", ".join(f"{j} ({k} nodes)" for j, k in e["jobs"].items()),
                                    " ".join(e["node_list"][:30]) + (" ..." if e["nodes"] > 30 else "")]
                                   for e in events],
                                  ["where", "start", "end", "nodes alarmed", "alarms", "causes", "shared jobs", "nodes"]))
    counts = {st: sum(i["state"] == st for i in incidents) for st in STATES}
    parts.append(f"<h2>Incidents</h2><p>{counts['new']} new, {counts['ongoing']} ongoing, {counts['resolved']} "
                 f"resolved (a node's alarms on consecutive nights are one incident, whatever their causes; "
                 f"docs/operations.md). "
                 f"{len(drain_candidates(incidents, n.drain_after_nights))} confirmed (open for "
                 f"{n.drain_after_nights} nights or more): their SLURM drain commands are in drain.txt"
                 f"{_drain_said(iso, n)}.</p>")
    if incidents:
        parts.append(html_table([[_state(i), i["node"], _causes(i), i["first_night"], i["nights"], i["alarms"],
                              f"{i['peak_score']:.4g}", top_names(i["top_metrics"], 3),
                              " ".join(i["jobs"][:5])] for i in incidents[:200]],
                            ["state", "node", "cause (others it named)", "since", "nights", "alarms tonight", "peak",
                             "top metrics", "jobs"]))

    def rel(v):
        return v["level"] / v["baseline"] if v["baseline"] and v["level"] == v["level"] else None

    ranked = sorted(((rel(v), v) for v in verdicts), key=lambda rv: 1.0 if rv[0] is None else -rv[0])[:50]
    rows = [[v["node"], v["level"], v["baseline"], r, v["streak"], _verdict(v)] for r, v in ranked]
    parts.append(f"<h2>Drift</h2><p>level = the night's median signal_norm; baseline = median level of the node's "
                 f"first {n.drift_reference_nights} nights; drift = level / baseline >= {n.drift_ratio} on "
                 f"{n.drift_days} consecutive nights (docs/operations.md).</p>"
                 + html_table(rows, ["node", "level", "baseline", "level / baseline", "nights >= ratio", "verdict"]))
    if refits:
        parts.append("<h2>Light retraining</h2>" + html_table(
            [[r["node"], r["version"], r["rows"], " ".join(r["days"]), r["valid_from"], r["fit_ms"]] for r in refits],
            ["node", "map version", "rows", "nights", "scores from", "fit ms"]))
    return parts


def _drain_said(iso: str, n: NightlyConfig) -> str:
    """Whether the night's drain commands run (nightly.drain, and only last night's)."""
    if not n.drain:
        return " (nightly.drain=false: not run)"
    if not last_night(dt.date.fromisoformat(iso), n.timezone):
        return " (an older night: not run; only last night's are)"
    return " and were run (drain.json)"


def _state(incident: dict) -> str:
    """The incident's state, and since when its node has sent no rows where it has not (still open)."""
    return incident["state"] + (f" (no rows since {incident['silent_since']})" if "silent_since" in incident else "")


def _causes(incident: dict) -> str:
    """Tonight's cause, then the other families the incident's alarms have named (tonight or before)."""
    others = [c for c in incident.get("causes", []) if c != incident["cause"]]
    return incident["cause"] + (f" ({', '.join(others)})" if others else "")


def _verdict(v: dict) -> str:
    """A node's drift verdict, and why it got no light map where it was withheld (its alarms, or a
    threshold fitted on rows that were not normal)."""
    said = "DRIFT" if v["drifted"] else (_no_baseline(v) if v["baseline"] is None else "")
    if v.get("light", "").startswith("withheld: "):
        said += ("; " if said else "") + "no light map: " + v["light"].removeprefix("withheld: ") + \
            " (a fault is not learned as normal; nightly.changes accepts a new normal)"
    return said


def _no_baseline(verdict: dict) -> str:
    """Why a node has no drift verdict yet: its first nights, or a new model's (a retraining)."""
    return "no baseline yet (new model)" if verdict.get("new_model") else "no baseline yet"
