"""Ingestion: every accepted source gives the same store; bad input fails clearly and writes nothing."""
import re
import shutil
from pathlib import Path
import subprocess

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import data_cfg, hpcad
from hpcad.data.ingest import ingest
from hpcad.data.store import TelemetryStore
from hpcad.data.synthetic import generate_node, metric_names, node_frame
from hpcad.errors import ConfigError, InputError, StoreError


def _export(tmp_path, n=3, rows=120, fmt="csv"):
    d = tmp_path / "exports"
    d.mkdir()
    frames = {}
    for i in range(n):
        node = generate_node(f"cn{i:03d}", rows + 10 * i, seed=5)
        frames[node.name] = node_frame(node).iloc[:, :12].assign(anomaly=node.labels)
        f = frames[node.name]
        f.to_csv(d / f"{node.name}.csv", index=False) if fmt == "csv" else f.to_parquet(d / f"{node.name}.parquet")
    return d, frames


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_directory_of_per_node_files(tmp_path, fmt):
    src, frames = _export(tmp_path, fmt=fmt)
    store = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "store.h5"))
    assert store.nodes == sorted(frames)
    assert store.metrics == list(frames["cn000"].columns[1:-1])
    nd = store.read("cn001")
    np.testing.assert_allclose(nd.values, frames["cn001"].iloc[:, 1:-1].to_numpy(np.float32))
    assert nd.labels.tolist() == frames["cn001"]["anomaly"].tolist()
    assert nd.timestamp[0] == pd.Timestamp(frames["cn001"]["timestamp"].iloc[0]).value // 10**9


def test_single_file_with_node_column_equals_directory(tmp_path):
    src, frames = _export(tmp_path)
    long = pd.concat([f.assign(node=n) for n, f in frames.items()]).sample(frac=1.0, random_state=0)
    long = long.sort_values("timestamp", kind="stable")  # interleaved nodes, each in time order
    long.to_csv(tmp_path / "all.csv", index=False)
    a = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "a.h5"))
    b = TelemetryStore(ingest(data_cfg(source=str(tmp_path / "all.csv")), tmp_path / "b.h5"))
    assert a.nodes == b.nodes
    for n in a.nodes:
        np.testing.assert_array_equal(a.read(n).values, b.read(n).values)
        np.testing.assert_array_equal(a.read(n).timestamp, b.read(n).timestamp)


def test_a_folder_of_daily_exports_of_every_node_reads_as_one_file(tmp_path):
    """Daily (or monthly) exports of the whole cluster, a node column in each: before, every file was
    taken for one node named after its date ("node 2025-01-01: duplicated timestamp")."""
    src, frames = _export(tmp_path)
    every = pd.concat([f.assign(node=n) for n, f in frames.items()]).sort_values("timestamp", kind="stable")
    days = tmp_path / "days"
    days.mkdir()
    stamps = pd.to_datetime(every["timestamp"]).dt.floor("6h").to_numpy()
    for i, (_, day) in enumerate(every.groupby(stamps, sort=True)):
        (day.drop(columns=["cmbw_p0_3"]) if i == 1 else day).to_csv(days / f"2025-01-{i + 1:02d}.csv", index=False)
    a = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "a.h5"))
    b = TelemetryStore(ingest(data_cfg(source=str(days)), tmp_path / "b.h5"))
    assert a.nodes == b.nodes == sorted(frames) and a.metrics == b.metrics and len(list(days.iterdir())) >= 3
    missing = 0
    for n in a.nodes:
        x, y = a.read(n), b.read(n)
        np.testing.assert_array_equal(x.timestamp, y.timestamp)
        np.testing.assert_array_equal(x.labels, y.labels)
        gone = np.isnan(y.values[:, a.metrics.index("cmbw_p0_3")])  # missing in the second file's rows only
        np.testing.assert_array_equal(np.isnan(x.values[:, a.metrics.index("cmbw_p0_3")]), False)
        np.testing.assert_array_equal(x.values[~gone], y.values[~gone])
        missing += int(gone.sum())
    assert missing == (len(pd.read_csv(days / "2025-01-02.csv")))
    frames["cn000"].to_csv(days / "2025-01-09.csv", index=False)  # a per-node file among them
    with pytest.raises(InputError, match=r"2025-01-09.csv: no 'node' column, unlike 2025-01-01.csv"):
        ingest(data_cfg(source=str(days)), tmp_path / "c.h5")


@pytest.mark.parametrize("how", [{"sep": ";", "decimal": ","}, {"sep": ";"}, {"sep": "\t"}, {"sep": "|"},
                                 {"encoding": "utf-8-sig"}, {"blanks": True}, {"trailing": 1}, {"trailing": 2}])
def test_exports_separated_by_semicolons_tabs_or_bars_read_the_same(tmp_path, how):
    """Spreadsheet exports in European locales write `;`-separated fields with decimal commas
    (`21,5`), and often a UTF-8 byte-order mark; other tools write tabs, `|`, or `a, b`. Each reads
    as the comma export does, per-node files (one of them gzipped) and one file with a node column
    alike. Before, a `;` file was one column named after the whole header line (a 10 kB error), a
    byte-order mark added a phantom metric, and `, ` hid the timestamp column; a separator at the end of
    every line added an empty metric named "Unnamed: k", and two were refused as one name given twice."""
    import gzip

    src, frames = _export(tmp_path)
    ref = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "ref.h5"))

    def write(f: pd.DataFrame, path):
        if how.get("blanks") or how.get("trailing"):
            text = f.to_csv(index=False)
            text = text.replace(",", ", ") if how.get("blanks") else text.replace("\n", "," * how["trailing"] + "\n")
            path.write_bytes(gzip.compress(text.encode())) if path.suffix == ".gz" else path.write_text(text)
        else:
            f.to_csv(path, index=False, **how)

    other = tmp_path / "other"
    other.mkdir()
    for i, (n, f) in enumerate(frames.items()):
        write(f, other / (f"{n}.csv.gz" if i == 0 else f"{n}.csv"))
    one = tmp_path / "all.csv"
    write(pd.concat([f.assign(node=n) for n, f in frames.items()]), one)
    for source in (other, one):
        got = TelemetryStore(ingest(data_cfg(source=str(source)), tmp_path / f"{source.name}.h5"))
        assert got.nodes == ref.nodes and got.metrics == ref.metrics
        for n in ref.nodes:
            a, b = ref.read(n), got.read(n)
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.timestamp, b.timestamp)
            np.testing.assert_array_equal(a.labels, b.labels)


def test_a_column_without_a_name_that_holds_values_is_refused(tmp_path):
    (tmp_path / "n1.csv").write_text("timestamp,a,,b\n0,1,7,2\n300,1.5,7,2.5\n")
    with pytest.raises(InputError, match=r"n1.csv: column 3 holds values but has no name in the header line"):
        ingest(data_cfg(source=str(tmp_path)), tmp_path / "s.h5")


def test_decimal_commas_the_first_rows_do_not_show_are_named_in_the_error(tmp_path):
    src = tmp_path / "exports"
    src.mkdir()
    rows = [f"{1_700_000_000 + 300 * i};{i};{2 * i}" for i in range(30)]  # whole numbers in the rows looked at
    rows += [f"{1_700_000_000 + 300 * i};{i},5;{2 * i},25" for i in range(30, 40)]
    (src / "n1.csv").write_text("timestamp;a;b\n" + "\n".join(rows) + "\n")
    with pytest.raises(InputError, match=r"n1.csv \(node n1\): non-numeric metric columns \['a', 'b'\] .*numbers "
                                         r"with a decimal comma are read as such where the fields are separated by "
                                         r"';', tab or '\|' and one shows in the first 20 rows"):
        ingest(data_cfg(source=str(src)), tmp_path / "store.h5")


def test_store_is_used_in_place_and_rerun_is_skipped(tmp_path):
    src, _ = _export(tmp_path)
    path = ingest(data_cfg(source=str(src)), tmp_path / "store.h5")
    mtime = path.stat().st_mtime_ns
    assert ingest(data_cfg(source=str(src)), tmp_path / "store.h5") == path
    assert path.stat().st_mtime_ns == mtime  # up to date: not rewritten
    assert ingest(data_cfg(source=str(path)), tmp_path / "other.h5") == path


def test_a_run_folder_inside_the_data_folder_does_not_make_the_input_look_changed(tmp_path):
    """`hpcad run data.source=exports hydra.run.dir=exports/run-1`: the input's fingerprint took every
    file below the folder, the run's own outputs included, so each stage ingested again and the
    threshold stage stopped ("errors.h5 was scored from other data"). Only the files the format's
    reader takes count now; a log or notes beside the exports do not."""
    src, _ = _export(tmp_path)
    (src / "README.txt").write_text("exports of rack 1\n")
    p = hpcad("run", f"data.source={src}", f"hydra.run.dir={src / 'run-1'}", "train.epochs=2",
              "baselines.methods=[]", "compute.progress=false", "report.enabled=false")
    log = (src / "run-1" / "run.log").read_text()
    assert p.returncode == 0 and log.count("ingested 3 nodes") == 1 and (src / "run-1" / "alarms.csv").exists(), log
    store = src / "run-1" / "store.h5"
    mtime = store.stat().st_mtime_ns
    (src / "README.txt").write_text("exports of rack 1, January\n")
    assert ingest(data_cfg(source=str(src)), store) == store and store.stat().st_mtime_ns == mtime  # kept
    (src / "cn000.csv").write_text((src / "cn000.csv").read_text())  # an export rewritten: ingested again
    ingest(data_cfg(source=str(src)), store)
    assert store.stat().st_mtime_ns != mtime


def test_store_layout_is_documented_and_readable_with_standard_tools(tmp_path):
    src, _ = _export(tmp_path)
    path = ingest(data_cfg(source=str(src)), tmp_path / "store.h5")
    with h5py.File(path) as f:
        assert f.attrs["hpcad_format"] == "telemetry-store"
        v = f["nodes/cn000/values"]
        assert v.chunks is not None and (v.compression, v.compression_opts, v.shuffle) == ("gzip", 1, True)  # docs/data.md
        assert {"timestamp", "values", "labels"} <= set(f["nodes/cn000"])
    if shutil.which("h5ls") is None:
        pytest.skip("h5ls not installed (Debian package hdf5-tools); .ci/run installs it")
    out = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True, check=True).stdout
    assert "/nodes/cn000/values" in out and "/metrics" in out
    dump = subprocess.run(["h5dump", "-A", str(path)], capture_output=True, text=True, check=True).stdout
    assert "telemetry-store" in dump


def _write(tmp_path, frames):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    for n, f in frames.items():
        f.to_csv(d / f"{n}.csv", index=False)
    return d


def _frame(rows=20, cols=("a", "b"), start=0):
    return pd.DataFrame({"timestamp": np.arange(start, start + rows) * 300 + 1_700_000_000,
                         **{c: np.random.default_rng(0).normal(size=rows) for c in cols}})


@pytest.mark.parametrize("case, expect", [
    ("non_numeric", r"n1.*non-numeric metric columns \['b'\]"),
    ("empty", r"n1.*no rows \(empty node\)"),
    ("all_nan", r"n1.*metric columns \['b'\] hold no value"),
    ("duplicate_ts", r"n1.*duplicated timestamp"),
    ("unsorted_ts", r"n1.*timestamps not increasing at row"),
    ("mismatch", r"n1.*missing \['b'\], extra \['c'\]"),
    ("bad_label", r"n1.*label column 'anomaly' must hold integers .* data.label_names; row 0 holds 0.5$"),
    ("bad_timestamp", r"n1.*column 'timestamp' holds 'yesterday' \(data row 6\), which is no time"),
    ("duplicate_header", r"n1.csv: the header names column\(s\) \['a'\] more than once"),
])
def test_bad_input_names_the_culprit_and_keeps_the_old_store(tmp_path, case, expect):
    good = {"n0": _frame()}
    store_path = ingest(data_cfg(source=str(_write(tmp_path, good))), tmp_path / "store.h5")
    before = store_path.read_bytes()
    bad = _frame()
    if case == "non_numeric":
        bad["b"] = bad["b"].astype(str)
        bad.loc[3, "b"] = "broken"
    elif case == "empty":
        bad = bad.iloc[:0]
    elif case == "all_nan":
        bad["b"] = np.nan
    elif case == "duplicate_ts":
        bad.loc[5, "timestamp"] = bad.loc[4, "timestamp"]
    elif case == "unsorted_ts":
        bad = bad.iloc[[1, 0, *range(2, len(bad))]]
    elif case == "mismatch":
        bad = bad.rename(columns={"b": "c"})
    elif case == "bad_label":
        bad["anomaly"] = 0.5
        good = {"n0": _frame().assign(anomaly=0)}
    elif case == "bad_timestamp":  # was "mixes timestamps with a time zone ... and without one ('yesterday')"
        bad["timestamp"] = pd.to_datetime(bad["timestamp"], unit="s", utc=True).astype(str)
        bad.loc[5, "timestamp"] = "yesterday"
    elif case == "duplicate_header":  # pandas alone would ingest the copy as a metric "a.1"
        bad = pd.concat([bad, bad[["a"]] * 2], axis=1)
    src = _write(tmp_path, {**good, "n1": bad})
    strict = {"on_missing_metric": "error"} if case in ("all_nan", "mismatch") else {}  # default: union
    with pytest.raises(InputError, match=expect):
        ingest(data_cfg(source=str(src), **strict), store_path)
    assert store_path.read_bytes() == before  # nothing already written was changed
    assert not [p for p in store_path.parent.iterdir() if p.name.startswith(".store.h5")]  # no temp left


def test_overlapping_daily_exports_drop_identical_repeats_and_refuse_rows_that_differ(tmp_path, caplog):
    """Daily dumps of the whole cluster overlap (a dump taken a few minutes past midnight repeats the
    next day's first rows): an identical repeat of a row is dropped with a warning (before: the ingest
    stopped on "duplicated timestamp"), a repeat with other values stops naming the node, the time and
    the option; ``first`` / ``last`` keep the earlier or the later file's row; ``error`` refuses any."""
    t0 = 1_735_689_600  # 2025-01-01T00:00:00 UTC
    rng = np.random.default_rng(0)
    every = pd.concat([pd.DataFrame({"timestamp": t0 + 300 * np.arange(24), "node": n,
                                     "a": rng.normal(size=24), "b": rng.normal(size=24)}) for n in ("x", "y")])
    days = tmp_path / "days"
    days.mkdir()
    every[every.timestamp < t0 + 300 * 14].to_csv(days / "2025-01-01.csv", index=False)  # 2 rows past "midnight"
    later = every[every.timestamp >= t0 + 300 * 12]
    later.to_csv(days / "2025-01-02.csv", index=False)
    whole = tmp_path / "whole.csv"
    every.to_csv(whole, index=False)
    want = TelemetryStore(ingest(data_cfg(source=str(whole)), tmp_path / "want.h5"))
    with caplog.at_level("WARNING"):
        got = TelemetryStore(ingest(data_cfg(source=str(days)), tmp_path / "got.h5"))
    for n in ("x", "y"):
        np.testing.assert_array_equal(got.read(n).values, want.read(n).values)
        np.testing.assert_array_equal(got.read(n).timestamp, want.read(n).timestamp)
    assert "(node x): 2 row(s) with a repeated timestamp dropped, identical repeats of earlier rows (first at " \
           "2025-01-01T01:00:00 UTC" in caplog.text
    with pytest.raises(InputError, match=r"\(node x\): duplicated timestamp .* data.duplicates=error"):
        ingest(data_cfg(source=str(days), duplicates="error"), tmp_path / "e.h5")
    # the later dump re-read a sample that changed since: which row is right is the operator's call
    later = later.copy()
    later.loc[(later.node == "y") & (later.timestamp == t0 + 300 * 13), "a"] = 99.0
    later.to_csv(days / "2025-01-02.csv", index=False)
    with pytest.raises(InputError, match=r"\(node y\): duplicated timestamp 2025-01-01T01:05:00 UTC \(1735693500\) "
                                         r"in column 'timestamp' with other values .* differ from the first\): set "
                                         r"data.duplicates=last \(or first\)"):  # no daylight-saving hint for one row
        ingest(data_cfg(source=str(days)), tmp_path / "clash.h5")
    assert not (tmp_path / "clash.h5").exists()
    first = TelemetryStore(ingest(data_cfg(source=str(days), duplicates="first"), tmp_path / "first.h5")).read("y")
    last = TelemetryStore(ingest(data_cfg(source=str(days), duplicates="last"), tmp_path / "last.h5")).read("y")
    np.testing.assert_array_equal(first.values, want.read("y").values)
    assert last.values[13, 0] == 99.0 and np.array_equal(np.delete(last.values, 13, 0), np.delete(first.values, 13, 0))
    np.testing.assert_array_equal(last.timestamp, want.read("y").timestamp)
    # every repeat differs: two nodes' rows under one name (a node column or file names that do not
    # name the node), where data.duplicates=last would interleave two nodes; the error says so instead
    every.assign(node="x").to_csv(tmp_path / "one-name.csv", index=False)
    with pytest.raises(InputError, match=r"\(node x\): duplicated timestamp .* every one of its 24 repeated rows "
                                         r"differs from the first\), as when two nodes' rows are read as one node's"):
        ingest(data_cfg(source=str(tmp_path / "one-name.csv")), tmp_path / "one.h5")
    # local times without an offset across a daylight-saving fall-back (the hour 02:00-03:00 twice), read
    # as UTC: the error asks for the zone, and with it the rows are placed by their order
    local = pd.date_range("2025-10-26 00:00", periods=72, freq="5min", tz="Europe/Rome")
    pd.DataFrame({"timestamp": local.tz_localize(None).strftime("%Y-%m-%d %H:%M:%S"),
                  "a": rng.normal(size=72)}).to_csv(tmp_path / "rome.csv", index=False)
    with pytest.raises(InputError, match=r"12 of its 12 repeated rows differ from the first\); all within one hour: a "
                                         r"daylight-saving fall-back's repeated hour\? .* data.timezone \(now UTC\)"):
        ingest(data_cfg(source=str(tmp_path / "rome.csv")), tmp_path / "rome.h5")
    rome = TelemetryStore(ingest(data_cfg(source=str(tmp_path / "rome.csv"), timezone="Europe/Rome"), tmp_path / "rome.h5"))
    np.testing.assert_array_equal(rome.read("rome").timestamp, local.as_unit("s").asi8)


def test_empty_label_cells_name_the_option_and_a_node_without_any_is_unlabelled(tmp_path):
    """Labels exported from incident tickets: the class where an incident was, empty cells elsewhere,
    and no cell at all for nodes nobody labelled (one file of the whole cluster). Before, any empty
    cell stopped the ingest ("must hold integers ... row 0 holds np.float64(nan)")."""
    rows = _frame(rows=20)
    lab = pd.Series([np.nan] * 20)
    lab[5:8] = 2
    every = pd.concat([rows.assign(node="x", anomaly=lab), rows.assign(node="y", anomaly=np.nan)])
    src = tmp_path / "all.csv"
    every.to_csv(src, index=False)
    with pytest.raises(InputError, match=r"\(node x\): label column 'anomaly' is empty on 17 of 20 rows \(first: row 0\)"
                                         r".*set data.blank_labels=normal"):
        ingest(data_cfg(source=str(src)), tmp_path / "s.h5")
    st = TelemetryStore(ingest(data_cfg(source=str(src), blank_labels="normal"), tmp_path / "s.h5"))
    assert st.labelled == {"x": True, "y": False} and st.read("y").labels is None
    np.testing.assert_array_equal(st.read("x").labels, (np.arange(20) >= 5) * (np.arange(20) < 8) * 2)


def test_text_labels_are_read_by_the_class_names_given_and_unnamed_ones_are_refused_with_the_option(tmp_path):
    """Incident tickets and spreadsheets label rows with words ("normal", "powersave"); before,
    they stopped the ingest with "must hold integers" and no way through but editing the export."""
    rows = _frame(rows=20)
    words = pd.Series(["normal"] * 20)
    words[5:8], words[12:14] = "powersave", " performance "
    one = tmp_path / "all.csv"  # a file of the whole cluster, and a folder of one file per node
    pd.concat([rows.assign(node="x", anomaly=words), rows.assign(node="y", anomaly=0)]).to_csv(one, index=False)
    per_node = _write(tmp_path, {"x": rows.assign(anomaly=words), "y": rows.assign(anomaly=0)})
    want = np.zeros(20, np.int8)
    want[5:8], want[12:14] = 1, 2
    for i, (src, where) in enumerate(((one, "all.csv"), (per_node, r"x.csv \(node x\)"))):
        with pytest.raises(InputError, match=where + r": label column 'anomaly' must hold integers .* or text named in "
                                             r"data.label_names, the normal one first, e.g. "
                                             r"'data.label_names=\[normal,performance,powersave\]'; row 0 holds 'normal'"):
            ingest(data_cfg(source=str(src)), tmp_path / f"s{i}.h5")
        with pytest.raises(InputError, match=r"data.label_names=\['normal', 'powersave'\] does not name "
                                             r"\['performance'\]; row 12 holds ' performance '"):
            ingest(data_cfg(source=str(src), label_names=["normal", "powersave"]), tmp_path / f"s{i}.h5")
        st = TelemetryStore(ingest(data_cfg(source=str(src), label_names=["normal", "powersave", "performance"]),
                                   tmp_path / f"s{i}.h5"))
        np.testing.assert_array_equal(st.read("x").labels, want)
        np.testing.assert_array_equal(st.read("y").labels, np.zeros(20, np.int8))  # numbers stay numbers
    with pytest.raises(ConfigError, match=r"data.label_names=\['ok', 'bad', 'ok'\]: a name given twice"):
        ingest(data_cfg(source=str(one), label_names=["ok", "bad", "ok"]), tmp_path / "s.h5")


def test_timestamp_and_node_columns_under_other_names_are_suggested_by_the_error(tmp_path):
    """Exports call the columns `time` and `hostname`; before, the error only said "non-numeric
    columns ['time', 'hostname']; ... list them in data.ignore_columns", which loses both."""
    rows = _frame(rows=20).rename(columns={"timestamp": "time"})
    rows["time"] = pd.to_datetime(rows["time"], unit="s").astype(str)
    one = tmp_path / "all.csv"
    pd.concat([rows.assign(hostname="x"), rows.assign(hostname="y")]).to_csv(one, index=False)
    with pytest.raises(InputError, match=r"all.csv: non-numeric columns \['time', 'hostname'\] \(e.g. \{'time': "
                                         r"'2023-11-14 22:13:20', 'hostname': 'x'\}\); 'time' holds times: set "
                                         r"data.timestamp_column=time; if 'hostname' names the nodes, set "
                                         r"data.node_column=hostname; else fix the export"):
        ingest(data_cfg(source=str(one)), tmp_path / "s.h5")
    with pytest.raises(InputError, match=r"x.csv \(node x\): non-numeric metric columns \['time'\] .*'time' holds "
                                         r"times: set data.timestamp_column=time; else"):
        ingest(data_cfg(source=str(_write(tmp_path, {"x": rows, "y": rows}))), tmp_path / "s.h5")
    st = TelemetryStore(ingest(data_cfg(source=str(one), node_column="hostname", timestamp_column="time"),
                               tmp_path / "s.h5"))
    assert st.nodes == ["x", "y"] and st.read("x").timestamp[1] - st.read("x").timestamp[0] == 300


def test_a_clock_column_under_another_name_is_not_trained_on_as_a_metric(tmp_path):
    """Exports without a `timestamp` column are read by row (MSL's channels); before, one whose
    clock was named `time` (or held epoch milliseconds under any name) was ingested with rows
    numbered and the clock as a metric, which rises out of its training range: alarms everywhere."""
    rng = np.random.default_rng(0)
    n = 50
    frame = pd.DataFrame({"time": 1_735_689_600 + 300 * np.arange(n), "a": rng.normal(size=n),
                          "energy_j": np.cumsum(rng.uniform(1e9, 2e9, n)),  # a counter: uneven steps
                          "uptime_s": 300.0 * np.arange(n)})  # even steps, but no epoch time nor clock name
    for i, (frame_i, clock) in enumerate(((frame, "time"),
                                          (frame.rename(columns={"time": "collected"}).assign(
                                              collected=lambda f: f["collected"] * 1000), "collected"))):
        (tmp_path / f"case{i}").mkdir()
        src = _write(tmp_path / f"case{i}", {"n1": frame_i, "n2": frame_i})
        with pytest.raises(InputError, match=rf"n1.csv \(node n1\): no 'timestamp' column, and '{clock}' counts up "
                                             rf"like a clock .*set data.timestamp_column={clock}"):
            ingest(data_cfg(source=str(src)), tmp_path / f"s{i}.h5")
    unit = "ms"
    st = TelemetryStore(ingest(data_cfg(source=str(src), timestamp_column="collected", epoch_unit=unit),
                               tmp_path / "s.h5"))
    assert st.metrics == ["a", "energy_j", "uptime_s"] and st.read("n1").timestamp[0] == 1_735_689_600
    st = TelemetryStore(ingest(data_cfg(source=str(src), ignore_columns=["collected"]), tmp_path / "t.h5"))
    assert st.metrics == ["a", "energy_j", "uptime_s"]  # rows numbered, as the user asked


def test_one_minute_exports_are_said_and_averaged_into_five_minute_rows_on_request(tmp_path, caplog):
    """The defaults count rows (signal.smooth=25 rows: 2 h of 5-minute rows; the cost tolerance
    +-12 rows): a 1-minute export shrank both fivefold without a word."""
    import logging

    n = 20
    frame = pd.DataFrame({"timestamp": 1_735_689_600 + 60 * np.arange(n), "a": np.arange(n, dtype=float),
                          "b": 1.0, "anomaly": 0})
    frame.loc[7, "anomaly"] = 2  # in the second period
    frame.loc[10:14, "b"] = np.nan  # the third period has no b at all
    frame.loc[15, "a"] = np.nan
    frame = frame.drop(index=[16, 17, 18, 19])  # the fourth period: one row left
    src = _write(tmp_path, {"n1": frame})
    with caplog.at_level(logging.WARNING, logger="hpcad.data.convert"):
        ingest(data_cfg(source=str(src)), tmp_path / "rows.h5")
    assert "rows are 60s apart (median)" in caplog.text and "data.resample_s=300" in caplog.text
    nd = TelemetryStore(ingest(data_cfg(source=str(src), resample_s=300), tmp_path / "s.h5")).read("n1")
    np.testing.assert_array_equal(nd.timestamp, 1_735_689_600 + 300 * np.arange(4))
    np.testing.assert_allclose(nd.values[:, 0], [2.0, 7.0, 12.0, np.nan], equal_nan=True)  # row 15: a missing
    np.testing.assert_allclose(nd.values[:, 1], [1.0, 1.0, np.nan, 1.0], equal_nan=True)
    np.testing.assert_array_equal(nd.labels, [0, 2, 0, 0])
    with pytest.raises(InputError, match=r"data.resample_s=300 needs timestamps"):
        ingest(data_cfg(source=str(_write(tmp_path, {"n1": frame.drop(columns="timestamp")})), resample_s=300),
               tmp_path / "t.h5")


def test_unsorted_timestamps_can_be_sorted_on_request(tmp_path):
    f = _frame().iloc[[1, 0, *range(2, 20)]]
    src = _write(tmp_path, {"n0": f})
    nd = TelemetryStore(ingest(data_cfg(source=str(src), sort_timestamps=True), tmp_path / "s.h5")).read("n0")
    assert np.all(np.diff(nd.timestamp) > 0)


def test_no_timestamp_means_row_order_and_epoch_numbers_are_accepted(tmp_path):
    src = _write(tmp_path, {"n0": _frame().drop(columns="timestamp")})
    nd = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "s.h5")).read("n0")
    assert nd.time_unit == "row" and nd.timestamp.tolist() == list(range(20))


def test_truncated_store_gives_a_clear_error(tmp_path):
    src, _ = _export(tmp_path)
    path = ingest(data_cfg(source=str(src)), tmp_path / "store.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(StoreError, match=r"cut\.h5: cannot open"):
        TelemetryStore(cut)
    with pytest.raises(StoreError, match="not found"):
        TelemetryStore(tmp_path / "missing.h5")


def test_ignore_columns_drops_text_columns(tmp_path):
    src = _write(tmp_path, {"n0": _frame().assign(host="x")})
    with pytest.raises(InputError, match="host"):
        ingest(data_cfg(source=str(src)), tmp_path / "s.h5")
    store = TelemetryStore(ingest(data_cfg(source=str(src), ignore_columns=["host"]), tmp_path / "s.h5"))
    assert store.metrics == ["a", "b"] and metric_names()  # only the numeric metrics remain


@pytest.mark.parametrize("bad", ["cn000", "cn001"])  # the first file too: its header decides nothing then
def test_skip_policy_ingests_the_other_nodes_and_records_the_bad_one(tmp_path, bad):
    src, frames = _export(tmp_path)
    (src / f"{bad}.csv").write_bytes(b"\x00\x01garbage\xff" * 10)  # a corrupt export
    with pytest.raises(InputError, match=bad):
        ingest(data_cfg(source=str(src)), tmp_path / "strict.h5")
    assert not (tmp_path / "strict.h5").exists()
    store = TelemetryStore(ingest(data_cfg(source=str(src), on_bad_node="skip"), tmp_path / "store.h5"))
    assert store.nodes == sorted({"cn000", "cn001", "cn002"} - {bad})
    assert store.skipped[0][0] == bad and bad in store.skipped[0][1]


def test_rows_without_a_node_are_dropped_and_said_with_the_file(tmp_path, caplog):
    """A daily export cut short (the dump job killed mid-write) ends in part of a row, without its
    node value: before, that row went silently; now the file and its cut last line are in the log
    (``csvtext.cut_reason``). A row inside a file without its node value is dropped and said too:
    the file, the count and the first such row."""
    src, frames = _export(tmp_path)
    every = pd.concat([f.assign(node=n) for n, f in frames.items()]).sort_values("timestamp", kind="stable")
    days = tmp_path / "days"
    days.mkdir()
    first = every.iloc[:200].copy()
    first.iloc[49, first.columns.get_loc("node")] = ""  # data row 50
    first.to_csv(days / "2025-01-01.csv", index=False)
    text = every.iloc[200:].to_csv(index=False)
    (days / "2025-01-02.csv").write_text(text[:len(text) // 2].rsplit(",", 1)[0])  # cut before the last node
    whole = text[:len(text) // 2].count("\n") - 1  # the second file's complete data rows
    with caplog.at_level("WARNING"):
        store = TelemetryStore(ingest(data_cfg(source=str(days)), tmp_path / "s.h5"))
    assert sum(store.rows(n) for n in store.nodes) == 199 + whole
    assert ("2025-01-01.csv: 1 of 200 row(s) have no 'node' value and were dropped (the first: data row 50; a "
            "truncated export ends so)") in caplog.text
    assert re.search(r"2025-01-02\.csv: the last line has \d+ of 14 fields and no line end", caplog.text)
    assert "2025-01-02.csv: 1 of" not in caplog.text


def test_a_labelled_row_cut_short_inside_a_file_is_left_out_and_rows_run_together_are_explained(tmp_path, caplog):
    """A labelled node file with a row cut short inside it (its writer stopped mid-row, then went on
    after a line end): before, the ingest stopped with "label column 'anomaly' is empty" and proposed
    ``data.blank_labels=normal``, which would have read the row's cut value as it stood. Now the row is
    left out with a warning naming the file and the line. Rows without the header's trailing empty
    column are not cut short. Two rows run together (no line end after the cut) stop the ingest with
    the file, the line and that likely cause."""
    src, frames = _export(tmp_path, n=1)
    path, frame = src / "cn000.csv", frames["cn000"]
    lines = path.read_text().splitlines(keepends=True)
    lines[31] = lines[31][: len(lines[31]) // 2] + "\n"  # data row 31
    path.write_text("".join(lines))
    with caplog.at_level("WARNING"):
        store = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "s.h5"))
    kept = frame.drop(index=30)
    np.testing.assert_allclose(store.read("cn000").values, kept.iloc[:, 1:-1].to_numpy(np.float32))
    assert store.read("cn000").labels.tolist() == kept["anomaly"].tolist()
    assert (f"{path}: left out 1 row(s) with fewer than the 13 fields the header names, the first at line 32 (a "
            "writer that stopped mid-row and went on?)") in caplog.text
    assert any("line 32" in w for w in store.warnings[1])  # kept for the report
    # a header that ends in a separator (an unnamed empty column) over rows without it: nothing left out
    lines = frame.to_csv(index=False).splitlines(keepends=True)
    path.write_text(lines[0].replace("\n", ",\n") + "".join(lines[1:]))
    caplog.clear()
    with caplog.at_level("WARNING"):
        store = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "t.h5"))
    assert store.rows("cn000") == len(frame) and "left out" not in caplog.text
    # the cut row and the next one run together: more fields than the header
    lines[31] = lines[31][: len(lines[31]) // 2] + lines.pop(32)
    path.write_text("".join(lines))
    with pytest.raises(InputError, match=re.escape(f"{path}: cannot read table: Error tokenizing data. C error: "
                                                   "Expected 13 fields in line 32, saw ") + r"\d+ \(a row with more "
                       "fields than the header: two rows run together where a writer stopped mid-row"):
        ingest(data_cfg(source=str(src)), tmp_path / "u.h5")


def test_exports_joined_with_cat_read_as_the_files_themselves(tmp_path, caplog):
    """``cat day1.csv day2.csv > node.csv``: each day's header line lands inside the file. pandas read
    it as a row of text, so every metric column was non-numeric and the error suggested each metric
    as the node column. The readers skip lines that repeat the header (a byte-order mark or CRLF line
    ends as the first line has them), for a node's own file and a file of many nodes alike, gzip'd
    too (``cat day1.csv.gz day2.csv.gz``: before, an error); and comment lines (``# exported by
    ...``, which was read as a timestamp)."""
    import gzip

    src, frames = _export(tmp_path)
    every = pd.concat([f.assign(node=n) for n, f in frames.items()]).sort_values("timestamp", kind="stable")
    joined = tmp_path / "joined"
    joined.mkdir()
    for i, (name, f) in enumerate(frames.items()):
        parts = [f.iloc[:40], f.iloc[40:90], f.iloc[90:]]
        text = [p.to_csv(index=False, lineterminator="\r\n" if i == 1 else "\n").encode() for p in parts]
        if i == 2:
            text = [b"\xef\xbb\xbf" + t for t in text]  # spreadsheets' "UTF-8 with BOM", on each part
        (joined / f"{name}.csv").write_bytes(b"".join(text) + (b"# exported by dumper 1.2" if i == 0 else b""))  # no line end
    (tmp_path / "every.csv").write_bytes(every.iloc[:150].to_csv(index=False).encode() + b"#,part 2\n"
                                         + every.iloc[150:].to_csv(index=False).encode())
    zipped = tmp_path / "zipped"  # cat a.csv.gz b.csv.gz > node.csv.gz: gzip members one after the other
    zipped.mkdir()
    for name, f in frames.items():
        (zipped / f"{name}.csv.gz").write_bytes(b"".join(gzip.compress(p.to_csv(index=False).encode())
                                                        for p in (f.iloc[:40], f.iloc[40:])))
    with caplog.at_level("INFO"):
        a = TelemetryStore(ingest(data_cfg(source=str(joined)), tmp_path / "a.h5"))
        b = TelemetryStore(ingest(data_cfg(source=str(tmp_path / "every.csv")), tmp_path / "b.h5"))
        c = TelemetryStore(ingest(data_cfg(source=str(zipped)), tmp_path / "c.h5"))
    one = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "one.h5"))
    for store in (a, b, c):
        assert store.nodes == one.nodes and store.metrics == one.metrics
        for n in one.nodes:
            np.testing.assert_array_equal(store.read(n).values, one.read(n).values)
            np.testing.assert_array_equal(store.read(n).timestamp, one.read(n).timestamp)
            np.testing.assert_array_equal(store.read(n).labels, one.read(n).labels)
    assert "cn000.csv: skipped 2 line(s) repeating the header line (files joined with cat?), the first at line 42" \
        in caplog.text
    assert "every.csv: skipped 1 line(s) repeating the header line" in caplog.text
    assert "cn000.csv: skipped 1 comment line(s) (starting with #), the first at line 124" in caplog.text
    assert "every.csv: skipped 1 comment line(s) (starting with #), the first at line 152" in caplog.text
    # a header with other columns (a metric added between the days) is not skipped: an error saying what it is
    f = frames["cn000"]
    (joined / "cn000.csv").write_text(f.iloc[:40].to_csv(index=False) + f.iloc[40:].drop(columns=f.columns[3]).to_csv(
        index=False))
    with pytest.raises(InputError, match=r"cn000\.csv \(node cn000\): non-numeric .* a line inside the file holds "
                                         r"column names, not values \(another export's header line, joined on "
                                         r"with cat") as err:
        ingest(data_cfg(source=str(joined)), tmp_path / "c.h5")
    assert "names the nodes" not in str(err.value)


def test_node_names_padded_with_blanks_are_the_names_themselves(tmp_path):
    """A database's fixed-width CHAR column pads node names (``'cn000   '``), on some rows or all:
    before, that was an error ("node name 'cn000 ' may hold only letters..."). A file of many nodes
    and a long-format export read as their unpadded copies."""
    src, frames = _export(tmp_path)
    every = pd.concat([f.assign(node=n) for n, f in frames.items()]).sort_values("timestamp", kind="stable")
    every = every.reset_index(drop=True)
    padded = every.assign(node=[f"{n}   " if i % 3 else f" {n}" if i % 5 == 0 else n for i, n in enumerate(every["node"])])
    every.to_csv(tmp_path / "plain.csv", index=False)
    padded.to_csv(tmp_path / "padded.csv", index=False)
    metric = every.columns[1]
    for name, df in (("plain", every), ("padded", padded)):
        df[["timestamp", "node", metric]].rename(columns={metric: "value"}).assign(metric=metric).to_csv(
            tmp_path / f"long-{name}.csv", index=False)
    for source, fmt in (("{}.csv", "wide"), ("long-{}.csv", "long")):
        a, b = (TelemetryStore(ingest(data_cfg(source=str(tmp_path / source.format(n)), format=fmt),
                                      tmp_path / f"{fmt}-{n}.h5")) for n in ("plain", "padded"))
        assert a.nodes == b.nodes == sorted(frames), fmt
        for n in a.nodes:
            np.testing.assert_array_equal(a.read(n).values, b.read(n).values, err_msg=fmt)
            np.testing.assert_array_equal(a.read(n).timestamp, b.read(n).timestamp, err_msg=fmt)


def test_empty_timestamps_are_refused_naming_the_first_row(tmp_path):
    """An export with a timestamp left empty (or N/A) is refused naming the file, the column, how many
    and the first one's data row (before: the count alone), in a node's file and a file of many nodes."""
    src, frames = _export(tmp_path)
    f = frames["cn001"].astype({"timestamp": str})
    f.loc[f.index[[30, 70]], "timestamp"] = ["", "N/A"]
    f.to_csv(src / "cn001.csv", index=False)
    with pytest.raises(InputError, match=r"cn001\.csv \(node cn001\): column 'timestamp' has 2 empty timestamp\(s\) "
                                         r"\(the first: data row 31\)"):
        ingest(data_cfg(source=str(src)), tmp_path / "s.h5")
    every = pd.concat([g.assign(node=n) for n, g in frames.items()]).sort_values("timestamp", kind="stable")
    every = every.reset_index(drop=True).astype({"timestamp": str})
    every.loc[250, "timestamp"] = ""
    every.to_csv(tmp_path / "every.csv", index=False)
    with pytest.raises(InputError, match=r"every\.csv: column 'timestamp' has 1 empty timestamp\(s\) \(the first: "
                                         r"data row 251\)"):
        ingest(data_cfg(source=str(tmp_path / "every.csv")), tmp_path / "e.h5")


def test_bad_files_among_daily_exports_are_skipped_whole_with_on_bad_node_skip(tmp_path, monkeypatch):
    """A year of daily dumps with one corrupt file (an export killed mid-write) stopped the whole
    ingest even with data.on_bad_node=skip. Now, with skip, such a file is left out whole (its rows
    rolled back if some were staged before the error), named in the log, the store and the report;
    the store is the one of the good files alone. Without skip it still stops, naming the file."""
    import gzip

    from hpcad.data import rows as rows_module
    from hpcad.data.tables import iter_table_chunks

    monkeypatch.setattr(rows_module, "iter_table_chunks",
                        lambda path, text=(): iter_table_chunks(path, rows=40, text=text))
    src, frames = _export(tmp_path)
    every = pd.concat([f.assign(node=n) for n, f in frames.items()]).sort_values("timestamp", kind="stable")
    good, days = tmp_path / "good", tmp_path / "days"
    good.mkdir()
    stamps = pd.to_datetime(every["timestamp"]).dt.floor("6h").to_numpy()
    for i, (_, day) in enumerate(every.groupby(stamps, sort=True)):
        day.to_csv(good / f"2025-01-{i + 1:02d}.csv", index=False)
    shutil.copytree(good, days)
    (days / "2025-02-01.parquet").write_bytes(b"PAR1 cut short")  # no footer: unreadable, header included
    extra = pd.concat([every] * 20)  # large enough that the cut comes after some chunks were read
    extra["node"] = ["cn999"] * 50 + list(extra["node"].iloc[50:])  # a node seen only in this file
    text = gzip.compress(extra.to_csv(index=False).encode())
    (days / "2025-02-02.csv.gz").write_bytes(text[: len(text) * 3 // 4])  # cut short: fails to decompress
    extra["node"] = ["cn998"] * 50 + list(extra["node"].iloc[50:])
    lines = extra.to_csv(index=False).splitlines(keepends=True)
    k = len(lines) * 3 // 4
    lines[k] = lines[k][: len(lines[k]) // 2] + lines.pop(k + 1)  # two rows run together: fails after 40-row
    (days / "2025-02-03.csv").write_text("".join(lines))  # chunks were staged, cn998's among them
    with pytest.raises(InputError, match=r"2025-02-01.parquet: cannot read"):
        ingest(data_cfg(source=str(days)), tmp_path / "x.h5")
    ref = TelemetryStore(ingest(data_cfg(source=str(good), on_bad_node="skip"), tmp_path / "ref.h5"))
    store = TelemetryStore(ingest(data_cfg(source=str(days), on_bad_node="skip"), tmp_path / "s.h5"))
    assert [Path(p).name for p, _ in store.skipped_files] == ["2025-02-01.parquet", "2025-02-02.csv.gz",
                                                                "2025-02-03.csv"]
    assert "cannot read table" in store.skipped_files[1][1] and store.skipped == [] and ref.skipped_files == []
    assert "two rows run together" in store.skipped_files[2][1]
    assert store.nodes == ref.nodes and store.metrics == ref.metrics  # cn999 and cn998 went with their files
    for n in ref.nodes:
        np.testing.assert_array_equal(store.read(n).values, ref.read(n).values)
        np.testing.assert_array_equal(store.read(n).timestamp, ref.read(n).timestamp)
    run = tmp_path / "run"  # what the operator reads
    hpcad("run", f"data.source={days}", "data.on_bad_node=skip", "train.epochs=1", "baselines.methods=[]",
          "compute.progress=false", "report.max_nodes_plotted=1", f"hydra.run.dir={run}")
    page = (run / "report.html").read_text()
    assert "Skipped input files (3)" in page and "2025-02-02.csv.gz" in page and "Compressed file ended" in page


def test_infinite_values_are_read_as_missing_and_said(tmp_path, caplog):
    f = _frame(cols=("a", "b"))
    f.loc[[3, 4], "b"] = np.inf
    f.loc[7, "a"] = -np.inf
    src = _write(tmp_path, {"n0": f})
    with caplog.at_level("WARNING"):
        nd = TelemetryStore(ingest(data_cfg(source=str(src)), tmp_path / "s.h5")).read("n0")
    assert np.isnan(nd.values[[3, 4], 1]).all() and np.isnan(nd.values[7, 0]) and np.isfinite(nd.values[0]).all()
    assert "3 infinite values in metric columns ['a', 'b'] read as missing" in caplog.text and "n0" in caplog.text


def test_a_file_of_many_nodes_rows_quotes_a_value_that_is_no_number_and_a_header_alone_has_no_rows(tmp_path):
    rows = pd.concat([_frame().assign(node=n) for n in ("n0", "n1")])
    rows["b"] = rows["b"].astype(str)
    rows.iloc[25, rows.columns.get_loc("b")] = "n/a?"
    rows.to_csv(tmp_path / "all.csv", index=False)
    with pytest.raises(InputError, match=re.escape("all.csv: non-numeric columns ['b'] (e.g. {'b': 'n/a?'}); fix")):
        ingest(data_cfg(source=str(tmp_path / "all.csv")), tmp_path / "s.h5")
    (tmp_path / "all.csv").write_text("timestamp,node,a,b\n")  # before: "non-numeric columns ['a', 'b']"
    with pytest.raises(InputError, match="no nodes found"):
        ingest(data_cfg(source=str(tmp_path / "all.csv")), tmp_path / "s.h5")


def test_infinite_values_in_a_file_of_many_nodes_rows_are_read_as_missing_too(tmp_path, caplog):
    """Such a file's rows are staged per node first, and a node's staged block came back as a read-only
    array: an infinite value there ended the ingest with numpy's "assignment destination is read-only"."""
    rows = pd.concat([_frame().assign(node=n) for n in ("n0", "n1")])
    rows.loc[rows.index == 5, "a"] = np.inf  # row 5 of both nodes
    rows.to_csv(tmp_path / "all.csv", index=False)
    with caplog.at_level("WARNING"):
        store = TelemetryStore(ingest(data_cfg(source=str(tmp_path / "all.csv")), tmp_path / "s.h5"))
    for n in ("n0", "n1"):
        values = store.read(n).values
        assert np.isnan(values[5, 0]) and np.isfinite(np.delete(values, 5, axis=0)).all()
    assert "1 infinite values in metric columns ['a'] read as missing" in caplog.text


@pytest.mark.parametrize("one_file", [False, True])
def test_ingest_in_a_log_file_says_how_far_it_got_every_minute(tmp_path, monkeypatch, caplog, one_file):
    """Ingesting a site's exports takes an hour and more for thousands of node-years: in a SLURM log
    (no bar) a line says how far it got at most every LOG_EVERY_S seconds, for a folder of node files
    and for one file of all nodes; progress off: nothing."""
    import io
    import sys

    from hpcad import progress

    src, frames = _export(tmp_path, n=4)
    if one_file:
        pd.concat([f.assign(node=n) for n, f in frames.items()]).to_csv(tmp_path / "all.csv", index=False)
        src = tmp_path / "all.csv"
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, also under `pytest -s` on a terminal
    with caplog.at_level("INFO", logger="hpcad.data"):
        ingest(data_cfg(source=str(src)), tmp_path / "store.h5")
        ingest(data_cfg(source=str(src), on_bad_node="skip"), tmp_path / "quiet.h5", progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ingest: ")]
    assert [line.split(" (")[0] for line in lines] == [f"ingest: {k}/4 nodes" for k in range(1, 4)], lines


@pytest.mark.parametrize("unit, scale", [("ms", 1_000), ("us", 1_000_000), ("ns", 1_000_000_000)])
def test_epoch_times_in_another_unit_than_data_epoch_unit_name_the_unit(tmp_path, unit, scale):
    """Milliseconds read as seconds are the year 56985: the ingest went through, and the threshold stage
    crashed with a traceback ("year 56985 is out of range") after training and scoring."""
    t = (1_736_121_600 + 300 * np.arange(12)) * scale
    pd.DataFrame({"timestamp": t, "a": np.arange(12.0)}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(InputError, match=rf"x.csv \(node x\): column 'timestamp' holds epoch time {t[0]} \(row 0\), "
                                         rf"which is after the year 2286 in data.epoch_unit=s: set data.epoch_unit={unit}"):
        ingest(data_cfg(source=str(tmp_path)), tmp_path / "s.h5")
    st = TelemetryStore(ingest(data_cfg(source=str(tmp_path), epoch_unit=unit), tmp_path / "s.h5"))
    np.testing.assert_array_equal(st.read("x").timestamp, t // scale)


def test_millisecond_epochs_in_files_of_many_nodes_are_converted_once(tmp_path):
    """`data.epoch_unit=ms` (Prometheus and InfluxDB exports): a file of many nodes' rows was staged
    in epoch seconds and then read in milliseconds again: every timestamp /1000, and the ingest
    stopped on "duplicated timestamp 1736121". Per-node files, one file and a folder of them agree."""
    t = (1_736_121_600 + 300 * np.arange(12)) * 1000
    frame = pd.concat([pd.DataFrame({"timestamp": t, "node": n, "a": np.arange(12.0) + k})
                       for k, n in enumerate(["x", "y"])])
    (tmp_path / "nodes").mkdir()
    (tmp_path / "days").mkdir()
    frame[frame.node == "x"].drop(columns="node").to_csv(tmp_path / "nodes" / "x.csv", index=False)
    frame.to_csv(tmp_path / "all.csv", index=False)
    rows = frame.sort_values("timestamp", kind="stable")
    for i in range(3):
        rows.iloc[8 * i:8 * (i + 1)].to_csv(tmp_path / "days" / f"{i}.csv", index=False)
    want = 1_736_121_600 + 300 * np.arange(12)
    for src in ("nodes", "all.csv", "days"):
        st = TelemetryStore(ingest(data_cfg(source=str(tmp_path / src), epoch_unit="ms"), tmp_path / f"{src}.h5"))
        np.testing.assert_array_equal(st.read("x").timestamp, want, err_msg=src)
        np.testing.assert_array_equal(st.read("x").values[:, 0], np.arange(12.0), err_msg=src)


def test_node_names_of_digits_keep_their_leading_zeros_in_files_of_many_nodes(tmp_path):
    """A node column holding 007 and 012 became the nodes 7 and 12 (pandas guessed numbers): they no
    longer matched the same nodes' own files, job files or incident lists. Wide and long format."""
    t = 1_736_121_600 + 300 * np.arange(20)
    frames = [pd.DataFrame({"node": [n] * 20, "timestamp": t, "power": np.arange(20.0)}) for n in ("007", "012")]
    pd.concat(frames).to_csv(tmp_path / "all.csv", index=False)
    assert TelemetryStore(ingest(data_cfg(source=str(tmp_path / "all.csv")), tmp_path / "w.h5")).nodes == ["007", "012"]
    long = tmp_path / "long"
    long.mkdir()
    pd.concat(f.melt(id_vars=["node", "timestamp"], var_name="metric") for f in frames).to_csv(long / "m.csv",
                                                                                               index=False)
    store = TelemetryStore(ingest(data_cfg(source=str(long), format="long"), tmp_path / "l.h5"))
    assert store.nodes == ["007", "012"]


def test_telemetry_node_names_become_slurms_for_jobs_models_and_alarms(tmp_path):
    """Host names with the domain in the telemetry, SLURM's NodeNames in sacct: data.node_names maps
    one to the other at ingest, so the job file matches (before: refused as naming none of the
    nodes) and models, alarms and drain lines carry SLURM's names; two nodes given one name are refused."""
    d, frames = _export(tmp_path)
    for name in frames:  # cn000.hpc.example.org.csv, ...
        (d / f"{name}.csv").rename(d / f"{name}.hpc.example.org.csv")
    names = tmp_path / "names.csv"
    names.write_text("node,name\n" + "".join(f"{n}.hpc.example.org,{n}\n" for n in frames))
    t0 = int(pd.Timestamp(frames["cn000"]["timestamp"].iloc[0]).timestamp())
    iso = lambda t: pd.Timestamp(t, unit="s").strftime("%Y-%m-%dT%H:%M:%S")
    jobs = tmp_path / "sacct.txt"
    jobs.write_text(f"JobID|NodeList|Start|End|State\n41|cn[000-002]|{iso(t0)}|{iso(t0 + 3000)}|COMPLETED\n")
    run = tmp_path / "run"
    p = hpcad("run", f"data.source={d}", f"data.jobs={jobs}", f"data.node_names={names}", f"hydra.run.dir={run}",
              "train.epochs=2", "compute.progress=false", "baselines.methods=[]", "report.enabled=false",
              "threshold=quantile")
    assert p.returncode == 0, p.stderr
    store = TelemetryStore(run / "store.h5")
    assert store.nodes == ["cn000", "cn001", "cn002"] and (store.read("cn000").job[:10] == 0).all()
    assert sorted(f.stem for f in (run / "models").glob("*.pt")) == ["cn000", "cn001", "cn002"]
    p = hpcad("ingest", f"data.source={d}", f"data.jobs={jobs}", f"hydra.run.dir={tmp_path / 'plain'}", check=False)
    assert p.returncode == 2 and "none of the job file's nodes is in the telemetry" in p.stderr  # without the map
    assert "data.node_names maps the telemetry's node names to SLURM's" in p.stderr
    names.write_text("node,name\ncn000.hpc.example.org,cn000\ncn001.hpc.example.org,cn000\n")
    p = hpcad("ingest", f"data.source={d}", f"data.node_names={names}", f"hydra.run.dir={tmp_path / 'twice'}",
              check=False)
    assert p.returncode == 2 and ("'cn000.hpc.example.org' and 'cn001.hpc.example.org' of the telemetry both "
                                  "become 'cn000'") in p.stderr, p.stderr
    assert not (tmp_path / "twice" / "store.h5").exists()


def test_rows_read_by_span_are_the_nodes_rows(tmp_path):
    """``TelemetryStore.values_at`` (an alarm's few rows, what alarms.json quotes): each span's rows as
    the whole node reads them, whether spans overlap, repeat, come unsorted, lie within one storage
    chunk or far apart, start at row 0 or end at the node's last row."""
    rows = 5000
    frame = pd.DataFrame({"timestamp": 1_700_000_000 + 300 * np.arange(rows), "a": np.arange(rows, dtype=float),
                          "b": np.sin(np.arange(rows)), "c": np.where(np.arange(rows) % 7 == 0, np.nan, 1.0)})
    frame.to_csv(tmp_path / "cn01.csv", index=False)
    store = TelemetryStore(ingest(data_cfg(source=str(tmp_path)), tmp_path / "store.h5"))
    whole = store.read("cn01").values
    spans = [(4990, 5000), (10, 14), (0, 4), (3000, 3004), (12, 20), (10, 14), (1030, 1031)]
    for (a, b), got in zip(spans, store.values_at("cn01", spans)):
        np.testing.assert_array_equal(got, whole[a:b])
    with pytest.raises(StoreError, match="'cn02' is not in the store"):
        store.values_at("cn02", [(0, 1)])
