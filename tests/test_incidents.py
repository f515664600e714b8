"""Alarm state across nights (hpcad.incidents) and the Prometheus textfile (hpcad.nightly.prometheus)."""
import datetime as dt
import json

import pytest

from prometheus_client.parser import text_string_to_metric_families

from hpcad.errors import InputError
from hpcad.incidents import FILE, night_incidents, previous_incidents
from hpcad.nightly.drain import candidates as drain_candidates
from hpcad.nightly.events import cluster_events, mark, read_groups
from hpcad.nightly.prometheus import render, write_textfile

D = dt.date(2025, 3, 1)


def alarm(node: str, metric: str, peak: float = 5.0, jobs=()) -> dict:
    return {"node": node, "start": "s", "end": "e", "peak_score": peak, "peak_time": "t",
            "top_metrics": [{"metric": metric, "error": 1.0}], "jobs": list(jobs)}


def test_a_nodes_alarms_on_consecutive_nights_are_one_incident_whatever_their_causes():
    n1 = night_incidents(D, [alarm("n1", "ips_p0_3"), alarm("n1", "ips_p0_1", 9.0, ["7"]), alarm("n2", "power_dc")], [])
    assert [(i["node"], i["cause"], i["state"], i["alarms"]) for i in n1] == [("n1", "ips", "new", 2),
                                                                             ("n2", "power", "new", 1)]
    assert n1[0]["id"] == "n1/ips/2025-03-01" and n1[0]["peak_score"] == 9.0 and n1[0]["jobs"] == ["7"]
    d2 = D + dt.timedelta(days=1)
    n2 = night_incidents(d2, [alarm("n1", "ips_p1_0"), alarm("n1", "temp_cpu", 6.0)], n1)
    by = {i["node"]: i for i in n2}
    # one fault moves between families night to night (a governor: util, pwr, ips): the node's
    # incident goes on. Before, each family was its own incident: on the real DAVIDE node nine
    # incidents in 19 nights of one alarming stretch, and a drain countdown that restarted each time.
    assert by["n1"]["state"] == "ongoing" and by["n1"]["id"] == "n1/ips/2025-03-01" and by["n1"]["nights"] == 2
    assert by["n1"]["cause"] == "temp" and by["n1"]["causes"] == ["ips", "temp"] and by["n1"]["alarms"] == 2
    assert by["n2"]["state"] == "resolved" and by["n2"]["resolved_night"] == "2025-03-02"
    assert [i["node"] for i in drain_candidates(n2, 2)] == ["n1"]
    gauges = render([], n2, night_start=0, unscored=0, finished=0.0)  # an alert on the gauge lasts as long as the incident
    assert 'hpcad_incident_nights{node="n1",cause="ips"} 2.0' in gauges and 'cause="temp"' not in gauges
    n3 = night_incidents(d2 + dt.timedelta(days=1), [alarm("n2", "power_dc")], n2)
    assert {i["node"]: i["state"] for i in n3} == {"n2": "new", "n1": "resolved"}  # resolved stays closed
    assert night_incidents(d2, [alarm("n1", "ips_p1_0"), alarm("n1", "temp_cpu", 6.0)], n1) == n2  # a rerun


def test_an_incident_of_a_node_that_goes_silent_stays_open_until_the_node_is_scored_again():
    """A node that alarms, then sends nothing (it went down with its fault, or its collector did):
    nothing was seen to end the incident. Before, it was resolved on the first silent night, and the
    node's next alarm opened a new incident: notified again, its drain countdown restarted."""
    n1 = night_incidents(D, [alarm("n1", "ips_p0_3"), alarm("n2", "power_dc")], [])
    n2 = night_incidents(D + dt.timedelta(days=1), [alarm("n1", "ips_p0_1")], n1)
    dark = night_incidents(D + dt.timedelta(days=2), [], n2, silent=["n1", "n2"])
    assert [(i["node"], i["state"], i["nights"], i.get("silent_since")) for i in dark] == [
        ("n1", "ongoing", 2, "2025-03-03")]  # n2's was resolved on 03-02: a silent node opens nothing
    assert [i["node"] for i in drain_candidates(dark, 2)] == ["n1"]  # still confirmed (SLURM says if it is down)
    gauges = render([], dark, night_start=0, unscored=0, finished=0.0)  # an alert on it does not end either
    assert 'hpcad_node_alarm{node="n1"} 1.0' in gauges and 'hpcad_incident_nights{node="n1",cause="ips"} 2.0' in gauges
    darker = night_incidents(D + dt.timedelta(days=3), [], dark, silent=["n1"])
    assert darker[0]["silent_since"] == "2025-03-03" and darker[0]["nights"] == 2  # since its first silent night
    back = night_incidents(D + dt.timedelta(days=4), [alarm("n1", "util_p0")], darker)
    assert [(i["id"], i["state"], i["nights"], "silent_since" in i) for i in back] == [
        ("n1/ips/2025-03-01", "ongoing", 3, False)]  # the same incident goes on: no second notification
    well = night_incidents(D + dt.timedelta(days=4), [], darker)  # back, scored, and quiet
    assert [(i["state"], i["resolved_night"], "silent_since" in i) for i in well] == [("resolved", "2025-03-05", False)]


def test_a_night_written_with_incidents_per_cause_goes_on_as_one_incident_per_node():
    """Nights written before 2026-12-03 hold an incident per node and cause: the oldest goes on with
    their nights and causes, the others are resolved into it (once, on the first night after)."""
    old = [{"id": "n1/ips/2025-02-26", "node": "n1", "cause": "ips", "state": "ongoing", "first_night": "2025-02-26",
            "nights": 3, "peak_score": 4.0},
           {"id": "n1/temp/2025-02-27", "node": "n1", "cause": "temp", "state": "ongoing", "first_night": "2025-02-27",
            "nights": 2, "peak_score": 5.0}]
    inc = night_incidents(D, [alarm("n1", "pow_node")], old)
    assert [(i["id"], i["state"]) for i in inc] == [("n1/ips/2025-02-26", "ongoing"), ("n1/temp/2025-02-27", "resolved")]
    assert inc[0]["nights"] == 4 and inc[0]["causes"] == ["ips", "temp", "pow"] and inc[0]["cause"] == "pow"
    assert inc[1]["merged_into"] == "n1/ips/2025-02-26"


def test_cause_is_the_family_with_most_error_among_the_top_metrics():
    a = {"node": "n1", "peak_score": 1.0, "peak_time": "t", "top_metrics": [
        {"metric": "temp_cpu", "error": 50.0}, {"metric": "ips_p0_1", "error": 30.0}, {"metric": "ips_p0_2", "error": 30.0}]}
    assert night_incidents(D, [a], [])[0]["cause"] == "ips"
    assert night_incidents(D, [{**a, "top_metrics": []}], [])[0]["cause"] == "signal"


def test_previous_night_bridges_a_missing_night_but_not_a_long_gap(tmp_path):
    (tmp_path / D.isoformat()).mkdir()
    (tmp_path / D.isoformat() / FILE).write_text(json.dumps(night_incidents(D, [alarm("n1", "ips_x")], [])))
    assert previous_incidents(tmp_path, D + dt.timedelta(days=2), gap_days=2)[0]["id"] == "n1/ips/2025-03-01"
    assert previous_incidents(tmp_path, D + dt.timedelta(days=3), gap_days=2) == []
    assert previous_incidents(tmp_path, D, gap_days=2) == []  # only earlier nights


def test_prometheus_textfile_parses_and_escapes_node_names(tmp_path):
    levels = [{"node": 'odd"node\\1', "level": 1.25, "alarmed_rows": 0, "rows": 288},
              {"node": "n2", "level": float("nan"), "alarmed_rows": 12, "rows": 288}]
    inc = night_incidents(D, [alarm("n2", "ips_a")], [])
    path = tmp_path / "textfile" / "hpcad.prom"
    write_textfile(path, render(levels, inc, night_start=1_740_787_200, unscored=3, finished=1_740_880_000.0))
    fams = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert val[("hpcad_node_signal_level", (("node", 'odd"node\\1'),))] == 1.25
    assert val[("hpcad_node_alarm", (("node", "n2"),))] == 1 and val[("hpcad_node_alarm", (("node", 'odd"node\\1'),))] == 0
    assert val[("hpcad_incident_nights", (("cause", "ips"), ("node", "n2")))] == 1
    assert val[("hpcad_nightly_incidents", (("state", "new"),))] == 1
    assert val[("hpcad_nightly_nodes", (("outcome", "without_model"),))] == 3
    assert val[("hpcad_nightly_night_timestamp_seconds", ())] == 1_740_787_200
    assert val[("hpcad_nightly_cluster_events", ())] == 0 and val[("hpcad_nightly_cluster_event_nodes", ())] == 0
    assert val[("hpcad_nightly_input_warnings", ())] == 0
    assert all(f.type == "gauge" and f.documentation for f in fams.values())
    assert oct(path.stat().st_mode & 0o777) != oct(0o600) and not list(path.parent.glob("*.tmp"))


def timed(node: str, metric: str, start: str, end: str, jobs=()) -> dict:
    return {**alarm(node, metric, jobs=jobs), "start": f"2025-03-01T{start}:00+00:00", "end": f"2025-03-01T{end}:00+00:00"}


def test_many_nodes_alarmed_in_the_same_hours_are_one_cluster_wide_event_not_node_incidents(tmp_path):
    """A machine-room cooling fault from 02:10 to 03:40 alarms 6 of 20 nodes (4 of them in job 77); n9 has
    its own long alarm that touches those hours; n1's temperature incident was open the night before."""
    shared = [timed(f"n{i}", "temp_cpu", "02:10", "03:40", jobs=["77"] if i < 4 else []) for i in range(6)]
    own = timed("n9", "ips_p0_1", "00:30", "23:00")
    alarms = [*shared, own]
    nodes = [f"n{i}" for i in range(20)]
    events = cluster_events(alarms, scored=nodes, share=0.25, min_nodes=5)
    assert [(e["start"], e["end"], e["nodes"], e["peak_nodes"], e["alarms"]) for e in events] == [
        ("2025-03-01T02:00:00+00:00", "2025-03-01T04:00:00+00:00", 7, 7, 6)]  # n9 counted, its alarm not inside
    assert events[0]["causes"] == {"temp": 6} and events[0]["jobs"] == {"77": 4} and events[0]["share"] == 0.35
    before = night_incidents(D - dt.timedelta(days=1), [alarm("n1", "temp_gpu")], [])
    mark(alarms, events, before)
    held = [a["node"] for a in alarms if a.get("cluster_event") == "cluster/2025-03-01T02:00:00+00:00"]
    assert held == ["n0", "n2", "n3", "n4", "n5"]  # n1's incident goes on; n9's alarm is its own
    inc = night_incidents(D, [a for a in alarms if "cluster_event" not in a], before)
    assert [(i["node"], i["cause"], i["state"]) for i in inc] == [("n9", "ips", "new"), ("n1", "temp", "ongoing")]
    # fewer nodes than event_min_nodes, fewer than event_share, or turned off: no event
    assert cluster_events(alarms, scored=nodes, share=0.25, min_nodes=8) == []
    assert cluster_events(alarms, scored=[f"n{i}" for i in range(40)], share=0.25, min_nodes=5) == []
    assert cluster_events(alarms, scored=nodes, share=0, min_nodes=5) == []
    # two hot stretches are two events; the gauges say how many and the largest
    later = [timed(f"n{i}", "pow_node", "20:05", "20:50") for i in range(10, 16)]
    events = cluster_events([*alarms, *later], scored=nodes, share=0.25, min_nodes=5)
    assert [e["start"][11:16] for e in events] == ["02:00", "20:00"] and [e["nodes"] for e in events] == [7, 7]
    text = render([], [], night_start=1_740_787_200, unscored=0, finished=1.0, events=events)
    assert "hpcad_nightly_cluster_events 2" in text and "hpcad_nightly_cluster_event_nodes 7" in text
    # the report shows them on its clock (report.timezone, else the site's), as its alarms
    from hpcad.config import NightlyConfig
    from hpcad.nightly.sections import nightly_sections

    html = "".join(nightly_sections("2025-03-01", tmp_path, [], [], [], NightlyConfig(), [], events=events,
                                    zone="Europe/Rome"))
    assert "<td>cluster</td><td>2025-03-01T03:00:00+01:00</td><td>2025-03-01T05:00:00+01:00</td>" in html


def test_a_racks_cooling_fault_is_an_event_of_that_rack_though_the_cluster_is_fine(tmp_path):
    """80 nodes in 4 racks of 20 (nightly.groups): rack r2's 6 nodes alarm from 02:10 to 03:40, too few
    for the cluster (25 % of 80 is 20) but a rack event; the cluster-wide hours of the night before are
    one cluster event, not repeated for each rack."""
    nodes = [f"n{i:02d}" for i in range(80)]
    groups = tmp_path / "racks.csv"
    groups.write_text("node,group\n" + "".join(f"{n},r{i // 20}\n" for i, n in enumerate(nodes)))
    racks = read_groups(groups)
    rack = [timed(n, "temp_cpu", "02:10", "03:40") for n in nodes[40:46]]
    events = cluster_events(rack, scored=nodes, share=0.25, min_nodes=5, groups=racks)
    assert [(e["id"], e["scope"], e["nodes"], e["scored"]) for e in events] == [
        ("r2/2025-03-01T02:00:00+00:00", "r2", 6, 20)]
    assert cluster_events(rack, scored=nodes, share=0.25, min_nodes=5) == []  # without the racks: nothing
    everywhere = [timed(n, "pow_node", "05:00", "05:30") for n in nodes[::2]]  # 40 of 80, 10 in every rack
    events = cluster_events(everywhere, scored=nodes, share=0.25, min_nodes=5, groups=racks)
    assert [e["scope"] for e in events] == ["cluster"] and events[0]["nodes"] == 40
    groups.write_text("node,group\nn00,r0\nn00,r1\n")
    with pytest.raises(InputError, match=r"racks.csv: line 3: node 'n00' has the group 'r0' on an earlier line and 'r1' here"):
        read_groups(groups)
