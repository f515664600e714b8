"""Labels from a file of intervals (``data.labels``): a site's incident list instead of a label column."""
import logging

import numpy as np
import pandas as pd
import pytest

from conftest import SMALL, data_cfg, hpcad
from hpcad.data.exports import write_long
from hpcad.data.ingest import ingest
from hpcad.data.labelfile import read_labels
from hpcad.data.store import TelemetryStore
from hpcad.data.synthetic import generate_cluster, metric_names, node_frame
from hpcad.errors import InputError


def _iso(t: int) -> str:
    return pd.Timestamp(int(t), unit="s").isoformat() + "Z"


def _intervals(nodes) -> pd.DataFrame:
    """Each node's labelled runs as incident lines: node, first and last row's time, class, a ticket."""
    rows = []
    for nd in nodes:
        edges = np.flatnonzero(np.diff(np.r_[0, nd.labels, 0]) != 0)
        for a, b in zip(edges[:-1], edges[1:]):
            if nd.labels[a]:
                rows.append((nd.name, _iso(nd.timestamp[a]), _iso(nd.timestamp[b - 1]), int(nd.labels[a]),
                             f"INC-{len(rows)}"))
    return pd.DataFrame(rows, columns=["node", "start", "end", "class", "ticket"])


def _unlabelled_exports(tmp_path, nodes):
    d = tmp_path / "exports"
    d.mkdir()
    for nd in nodes:
        node_frame(nd).drop(columns=["anomaly"]).to_csv(d / f"{nd.name}.csv", index=False)
    return d


def test_an_incident_list_labels_exports_as_a_label_column_would(tmp_path):
    """Node files without labels plus the incident list give the generator's labels row for row, in the
    wide format and in the long format (rows stand for 5-minute periods there); a node the list does
    not name is labelled normal throughout, so its rows count as normal for the thresholds."""
    nodes = list(generate_cluster(3, 500, seed=4))
    assert all(nd.labels.any() for nd in nodes[:2])
    inc = _intervals(nodes[:2])  # node 2's anomalies are not in the list
    labels = tmp_path / "incidents.csv"
    inc.to_csv(labels, index=False)
    wide = TelemetryStore(ingest(data_cfg(source=str(_unlabelled_exports(tmp_path, nodes)), labels=str(labels)),
                                 tmp_path / "w.h5"))
    for nd in nodes:
        nd.labels = nd.labels if nd.name != nodes[2].name else np.zeros_like(nd.labels)
    long_dir = tmp_path / "long"
    unlabelled = [type(nd)(nd.name, nd.timestamp, nd.values, None) for nd in nodes]
    write_long(unlabelled, metric_names(), long_dir)
    grid = TelemetryStore(ingest(data_cfg(source=str(long_dir), format="long", labels=str(labels)),
                                 tmp_path / "g.h5"))
    for store in (wide, grid):
        assert all(store.labelled.values())
        for nd in nodes:
            np.testing.assert_array_equal(store.read(nd.name).labels, nd.labels, err_msg=nd.name)


def test_incident_lines_name_host_lists_open_ends_text_classes_and_row_numbers(tmp_path, caplog):
    stamps = 1_736_121_600 + 300 * np.arange(12)
    d = tmp_path / "exports"
    d.mkdir()
    for name in ("cn01", "cn02", "cn03"):
        pd.DataFrame({"timestamp": stamps, "power": np.arange(12.0)}).to_csv(d / f"{name}.csv", index=False)
    labels = tmp_path / "tickets.csv"
    labels.write_text("Ticket,Node,Start,End,Class,Note\n"
                      f"T1,cn[01-02],{_iso(stamps[2])},{_iso(stamps[3])},powersave,governor reset by an update\n"
                      f"T2,cn03,{_iso(stamps[9])},,performance,still open\n"  # no end: still open
                      f"T3,cn01,{_iso(stamps[6])},{_iso(stamps[6] + 60)},normal,false alarm\n"  # class 0: skipped
                      f"T4,cn99,{_iso(stamps[0])},{_iso(stamps[1])},powersave,decommissioned\n")
    cfg = data_cfg(source=str(d), labels=str(labels), label_names=["normal", "powersave", "performance"])
    with caplog.at_level(logging.INFO):
        store = TelemetryStore(ingest(cfg, tmp_path / "s.h5"))
    expect = {"cn01": [0, 0, 1, 1] + [0] * 8, "cn02": [0, 0, 1, 1] + [0] * 8, "cn03": [0] * 9 + [2, 2, 2]}
    assert {n: store.read(n).labels.tolist() for n in store.nodes} == expect
    assert "1 interval(s) of class 0 (normal) skipped" in caplog.text
    assert "1 node(s) in the labels file have no telemetry (their intervals are ignored), e.g. ['cn99']" in caplog.text
    # telemetry without timestamps: intervals in row numbers (both ends included)
    rows = tmp_path / "msl"
    rows.mkdir()
    pd.DataFrame({"m00": np.arange(10.0)}).to_csv(rows / "ch1.csv", index=False)
    (tmp_path / "rows.csv").write_text("node,start,end\nch1,3,5\n")
    store = TelemetryStore(ingest(data_cfg(source=str(rows), labels=str(tmp_path / "rows.csv")), tmp_path / "r.h5"))
    assert store.read("ch1").labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    (tmp_path / "times.csv").write_text(f"node,start,end\nch1,{_iso(stamps[0])},{_iso(stamps[1])}\n")
    with pytest.raises(InputError, match=r"times.csv: node ch1 has no timestamps .* give its intervals as row numbers"):
        ingest(data_cfg(source=str(rows), labels=str(tmp_path / "times.csv")), tmp_path / "t.h5")


@pytest.mark.parametrize("text, message", [
    ("node,begin,end\nn1,0,1\n", r"lacks column\(s\) \['start'\] .* node, start, end and optionally class"),
    ("node,start,end\nn1,2025-01-06T01:00,2025-01-06T00:00\n", r"line 2 ends before it starts"),
    ("node,start,end,class\nn1,2025-01-06T00:00,2025-01-06T02:00,1\nn2,2025-01-06T00:00,2025-01-06T01:00,1\n"
     "n1,2025-01-06T01:00,2025-01-06T03:00,2\n", r"lines 2 and 4 overlap on node n1 with different classes"),
    ("node,start,end,class\nn1,2025-01-06T00:00,2025-01-06T02:00,fan\n",
     r"label column 'class' must hold integers .* 'data.label_names=\[fan\]'; row 0 holds 'fan'"),
    ("node,start,end,class\nn1,2025-01-06T00:00,2025-01-06T02:00,300\n", r"line 2: class 300 \(classes are 1..127"),
    ("node,start,end\nn1,,2025-01-06T02:00\n", r"line 2 has no start"),
    ("node,start,end\n,2025-01-06T00:00,2025-01-06T02:00\n", r"line 2 names no node"),
    ("node,start,end\nn[1-,2025-01-06T00:00,2025-01-06T02:00\n", r"line 2: cannot expand node list"),
])
def test_a_bad_labels_file_is_refused_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "incidents.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        read_labels(path, data_cfg())
    assert str(path) in str(err.value)
    # overlapping intervals of one class are one incident written twice: accepted
    path.write_text("node,start,end\nn1,2025-01-06T00:00,2025-01-06T02:00\nn1,2025-01-06T01:00,2025-01-06T03:00\n")
    assert read_labels(path, data_cfg()).by_node == {"n1": [0, 1]}


def test_a_labels_file_that_names_no_node_writes_no_store_and_a_changed_one_is_read_again(tmp_path, caplog):
    """The check runs before the store is renamed into place: the rerun does not find a store "up to
    date" and say nothing (the same for a job file naming no node). A label column in the telemetry
    and a labels file together are refused; editing the labels file makes the next run ingest again."""
    nodes = list(generate_cluster(2, 300, seed=2))
    exports = _unlabelled_exports(tmp_path, nodes)
    labels, store = tmp_path / "incidents.csv", tmp_path / "s.h5"
    labels.write_text(f"node,start,end\nnode-a,{_iso(nodes[0].timestamp[5])},{_iso(nodes[0].timestamp[9])}\n")
    cfg = data_cfg(source=str(exports), labels=str(labels))
    for _ in range(2):
        with pytest.raises(InputError, match=r"none of the labels file's nodes is in the telemetry .*'node-a'"):
            ingest(cfg, store)
        assert not store.exists()
    jobs = tmp_path / "sacct.txt"
    jobs.write_text("JobID|NodeList|Start|End\n7|other[1-2]|2025-01-06T00:00:00|2025-01-06T01:00:00\n")
    with pytest.raises(InputError, match="none of the job file's nodes is in the telemetry"):
        ingest(data_cfg(source=str(exports), jobs=str(jobs)), store)
    assert not store.exists()
    labels.write_text(f"node,start,end\n{nodes[0].name},{_iso(nodes[0].timestamp[5])},"
                      f"{_iso(nodes[0].timestamp[9] + 30)}\n{nodes[1].name},2020-01-01T00:00:00Z,2020-01-02T00:00:00Z\n")
    with caplog.at_level(logging.WARNING):
        got = TelemetryStore(ingest(cfg, store)).read(nodes[0].name).labels
    assert np.flatnonzero(got).tolist() == [5, 6, 7, 8, 9]
    assert f"1 interval(s) cover no row of their node (outside the export, or in a gap), the first: line 3 " \
           f"({nodes[1].name}; its rows run from 2025-01-06" in caplog.text
    labels.write_text(f"node,start,end\n{nodes[0].name},{_iso(nodes[0].timestamp[5])},{_iso(nodes[0].timestamp[6])}\n")
    got = TelemetryStore(ingest(cfg, store)).read(nodes[0].name).labels
    assert np.flatnonzero(got).tolist() == [5, 6]
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    node_frame(nodes[0]).to_csv(labelled / f"{nodes[0].name}.csv", index=False)
    with pytest.raises(InputError, match=r"its telemetry has a label column \('anomaly'\) and data.labels gives "
                                         r"labels too; use one \(data.ignore_columns=\[anomaly\]"):
        ingest(data_cfg(source=str(labelled), labels=str(labels)), tmp_path / "l.h5")
    with pytest.raises(InputError, match="data.labels=.*labels are read while telemetry exports are ingested"):
        ingest(data_cfg(labels=str(labels)), tmp_path / "syn.h5")
    # job records and node renames are read at the same time: on a store used as it is they had been
    # ignored without a word
    for option in ("jobs", "node_names"):
        with pytest.raises(InputError, match=f"data.{option}=.* are read while telemetry exports are ingested, but "
                                             "data.source is an hpcad store"):
            ingest(data_cfg(source=str(store), **{option: str(labels)}), tmp_path / "again.h5")
    # every node skipped for bad input: that is the error, not "none of the labels file's nodes"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / f"{nodes[0].name}.csv").write_text("timestamp,power\n0,1.5\n300,oops\n")
    with pytest.raises(InputError, match=r"bad: no usable node \(1 skipped for bad input, the first: node0000: .*oops"):
        ingest(data_cfg(source=str(bad), labels=str(labels), on_bad_node="skip"), tmp_path / "b.h5")


def test_run_with_an_incident_list_fits_cost_thresholds_and_reports_the_classes(tmp_path):
    """The user's path: `hpcad run data=files data.source=... data.labels=...` with text classes: the
    threshold is fitted on the labels, alarms name the classes they overlap."""
    nodes = list(generate_cluster(3, 400, seed=0))
    names = ["normal", "powersave", "performance", "memleak", "cpu_contention"]
    inc = _intervals(nodes).assign(**{"class": lambda f: [names[c] for c in f["class"]]})
    labels = tmp_path / "incidents.csv"
    inc.to_csv(labels, index=False)
    run = tmp_path / "run"
    hpcad("run", f"hydra.run.dir={run}", "data=files", f"data.source={_unlabelled_exports(tmp_path, nodes)}",
          f"data.labels={labels}", f"data.label_names=[{','.join(names)}]",
          *[o for o in SMALL if not o.startswith("data.synthetic")])
    alarms = pd.read_csv(run / "alarms.csv")
    assert alarms["label_classes"].notna().any()
    page = (run / "report.html").read_text()
    assert "memleak" in page or "powersave" in page or "cpu_contention" in page
    assert f"labels from the incident list <code>{labels}</code>" in page
    # the explanation bench knows the faults of the synthetic cluster only, not of these exports
    bad = hpcad("bench", "bench.mode=explain", f"train_run={run}", f"hydra.run.dir={tmp_path / 'b'}", check=False)
    assert bad.returncode == 2 and "was not run on the synthetic cluster" in bad.stderr


def test_rows_that_stand_for_periods_are_inside_an_interval_their_period_overlaps(tmp_path):
    """1-minute rows averaged into 5-minute rows (data.resample_s=300, each row's time its period's
    start): an incident from 00:12 to 00:13 labels the 00:10 row; without resampling, a row is
    inside when its own time is."""
    d = tmp_path / "exports"
    d.mkdir()
    t0 = 1_736_121_600  # 2025-01-06T00:00:00Z
    pd.DataFrame({"timestamp": t0 + 60 * np.arange(30), "power": np.arange(30.0)}).to_csv(d / "cn01.csv", index=False)
    labels = tmp_path / "incidents.csv"
    labels.write_text(f"node,start,end\ncn01,{_iso(t0 + 720)},{_iso(t0 + 780)}\n")
    five = TelemetryStore(ingest(data_cfg(source=str(d), labels=str(labels), resample_s=300), tmp_path / "5.h5"))
    assert five.read("cn01").labels.tolist() == [0, 0, 1, 0, 0, 0]
    one = TelemetryStore(ingest(data_cfg(source=str(d), labels=str(labels)), tmp_path / "1.h5"))
    assert np.flatnonzero(one.read("cn01").labels).tolist() == [12, 13]


def test_node_names_of_digits_keep_their_leading_zeros(tmp_path):
    """Nodes named 007 and 012: a labels CSV read with pandas' type guessing made them the numbers 7
    and 12, which name no node; its cells are read as text, epoch times still as numbers."""
    d = tmp_path / "exports"
    d.mkdir()
    t0 = 1_736_121_600
    for name in ("007", "012"):
        pd.DataFrame({"timestamp": t0 + 300 * np.arange(10), "power": np.arange(10.0)}).to_csv(d / f"{name}.csv",
                                                                                             index=False)
    labels = tmp_path / "incidents.csv"
    labels.write_text(f"node,start,end\n007,{t0 + 600},{t0 + 900}\n")
    store = TelemetryStore(ingest(data_cfg(source=str(d), labels=str(labels)), tmp_path / "s.h5"))
    assert store.read("007").labels.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0] and not store.read("012").labels.any()
