"""The night's state for node_exporter's textfile collector (Prometheus text format 0.0.4).

Point the collector at the file's folder (``--collector.textfile.directory``), or set
``nightly.prometheus`` to a path inside the folder it already reads. The file is replaced
atomically and only by the newest night, so a backfill of older nights never turns the gauges back.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from hpcad.atomic import atomic_path
from hpcad.incidents import OPEN, STATES
from hpcad.report.markup import rows_missing_share

FAMILIES = {
    "hpcad_node_signal_level": "Median alarm signal of the node over the night, relative to its normal level "
                               "(signal_norm; about 1 when normal).",
    "hpcad_node_alarmed_rows": "Rows of the night above the node's threshold.",
    "hpcad_node_alarm": "1 when the node has an open hpcad incident (new or ongoing) after the night, else 0 "
                        "(a node silent tonight: 1 while its incident stays open, else absent).",
    "hpcad_node_missing_share": "Share of the node's metric values missing in the night's input (0 to 1).",
    "hpcad_node_rows_missing_share": "Share of the rows the node should have sent over the night (its length over "
                                     "the node's sampling step) that it did not send (0 to 1).",
    "hpcad_node_metrics_lost": "Metrics the node reported in training that sent no value in the night's input.",
    "hpcad_incident_nights": "Nights an open incident has lasted, by node and its first cause (metric family).",
    "hpcad_nightly_night_timestamp_seconds": "Start (midnight, site time zone) of the newest night scored.",
    "hpcad_nightly_last_success_timestamp_seconds": "When the newest night's run finished.",
    "hpcad_nightly_nodes": "Nodes in the newest night, by outcome (scored, without_model, silent: trained, "
                           "no row tonight; retired: out of service in the maintenance log).",
    "hpcad_nightly_incidents": "Incidents of the newest night, by state (new, ongoing, resolved).",
    "hpcad_nightly_cluster_events": "Cluster-wide events of the newest night (many nodes alarmed in the same hours).",
    "hpcad_nightly_cluster_event_nodes": "Nodes alarmed in the newest night's largest cluster-wide event (0: none).",
    "hpcad_nightly_input_warnings": "Warnings the readers logged ingesting the newest night's input (rows cut short "
                                    "or repeated, rows without a node...; listed in the night's report).",
}


def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    v = float(v)
    return "NaN" if math.isnan(v) else ("+Inf" if v == math.inf else ("-Inf" if v == -math.inf else repr(v)))


def render(levels: list[dict], incidents: list[dict], night_start: int, unscored: int,
           finished: float | None = None, silent: int = 0, events: list[dict] | None = None, retired: int = 0,
           input_warnings: int = 0) -> str:
    samples: dict[str, list[tuple[dict, float]]] = {k: [] for k in FAMILIES}
    open_nodes = {i["node"] for i in incidents if i["state"] in OPEN}
    for lv in levels:
        samples["hpcad_node_signal_level"].append(({"node": lv["node"]}, lv["level"]))
        samples["hpcad_node_alarmed_rows"].append(({"node": lv["node"]}, lv["alarmed_rows"]))
        samples["hpcad_node_alarm"].append(({"node": lv["node"]}, 1.0 if lv["node"] in open_nodes else 0.0))
        samples["hpcad_node_missing_share"].append(({"node": lv["node"]}, lv.get("missing_share", 0.0)))
        samples["hpcad_node_rows_missing_share"].append(({"node": lv["node"]}, rows_missing_share(lv)))
        samples["hpcad_node_metrics_lost"].append(({"node": lv["node"]}, len(lv.get("metrics_lost", []))))
    scored = {lv["node"] for lv in levels}
    for node in sorted(open_nodes - scored):  # silent tonight, its incident still open (hpcad.incidents)
        samples["hpcad_node_alarm"].append(({"node": node}, 1.0))
    for i in incidents:
        if i["state"] in OPEN:
            # the incident's first cause: a series (and an alert on it) lasts as long as the incident,
            # though tonight's cause may be another family
            first = (i.get("causes") or [i["cause"]])[0]
            samples["hpcad_incident_nights"].append(({"node": i["node"], "cause": first}, i["nights"]))
    samples["hpcad_nightly_night_timestamp_seconds"].append(({}, night_start))
    samples["hpcad_nightly_last_success_timestamp_seconds"].append(({}, time.time() if finished is None else finished))
    samples["hpcad_nightly_nodes"] += [({"outcome": "scored"}, len(levels)), ({"outcome": "without_model"}, unscored),
                                       ({"outcome": "silent"}, silent), ({"outcome": "retired"}, retired)]
    for state in STATES:
        samples["hpcad_nightly_incidents"].append(({"state": state}, sum(i["state"] == state for i in incidents)))
    samples["hpcad_nightly_cluster_events"].append(({}, len(events or [])))
    samples["hpcad_nightly_cluster_event_nodes"].append(({}, max((e["nodes"] for e in events or []), default=0)))
    samples["hpcad_nightly_input_warnings"].append(({}, input_warnings))
    lines = []
    for name, help_text in FAMILIES.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for labels, v in samples[name]:
            lab = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
            lines.append(f"{name}{{{lab}}} {_value(v)}" if lab else f"{name} {_value(v)}")
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Atomic replace (the collector must never read half a file), readable by node_exporter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
