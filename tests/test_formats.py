"""The telemetry clusters really export: LDMS CSV stores, long format, counters, SLURM job context."""
import csv
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SMALL, data_cfg, hpcad
from hpcad.data.exports import write_ldms, write_long
from hpcad.data.ingest import ingest, source_signature
from hpcad.data.jobs import expand_nodelist, read_jobs
from hpcad.data.store import TelemetryStore
from hpcad.data.node import NodeData
from hpcad.data.synthetic import generate_cluster, metric_names, node_frame
from hpcad.errors import ConfigError, InputError

EXAMPLES = Path(__file__).parent / "data"
T0 = 1736121600  # 2025-01-06T00:00:00Z


def _ldms(**kw):
    return data_cfg(format="ldms", node_column="ProducerName", timestamp_column="Time", **kw)


def _long(**kw):
    return data_cfg(format="long", **kw)


def test_ldms_example_merges_samplers_and_skips_the_repeated_header(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    store = TelemetryStore(ingest(_ldms(source=str(EXAMPLES / "ldms")), tmp_path / "s.h5"))
    assert store.nodes == ["n001", "n002"]
    assert store.metrics == ["Active::meminfo", "MemFree::meminfo", "ctxt::procstat", "processes::procstat"]
    n2 = store.read("n002")
    # 1736121600.998 falls in the first period; procstat's header came from the .HEADER side file
    assert n2.timestamp.tolist() == [T0, T0 + 300]
    np.testing.assert_array_equal(n2.values, [[1.3e6, 3.3e7, 7000, 220], [1.31e6, 3.29e7, 7600, 250]])
    assert "skipped 1 repeated header line(s)" in caplog.text
    assert not list(tmp_path.glob(".ingest-*"))  # scratch removed


def test_ldms_default_node_column_is_component_id(tmp_path):
    cfg = data_cfg(format="ldms", node_column="component_id", timestamp_column="Time", source=str(EXAMPLES / "ldms"))
    assert TelemetryStore(ingest(cfg, tmp_path / "s.h5")).nodes == ["1", "2"]


def test_long_example_averages_each_period(tmp_path):
    store = TelemetryStore(ingest(_long(source=str(EXAMPLES / "long")), tmp_path / "s.h5"))
    n1 = store.read("n001")
    assert store.metrics == ["pow_cpu", "temp_cpu"] and n1.timestamp.tolist() == [T0, T0 + 300]
    np.testing.assert_array_equal(n1.values, [[212.5, 61.0], [190.0, 60.0]])  # 210.5 and 214.5 averaged


def _cluster(n=3, rows=700):
    return list(generate_cluster(n, rows, seed=3))


def test_one_cluster_in_all_three_formats_gives_identical_stores(tmp_path):
    nodes, metrics = _cluster(), metric_names()
    wide = tmp_path / "wide"
    wide.mkdir()
    for nd in nodes:
        node_frame(nd).to_csv(wide / f"{nd.name}.csv", index=False)
    write_ldms(nodes, metrics, tmp_path / "ldms", samplers=3)
    write_long(nodes, metrics, tmp_path / "long", plugins=2)
    assert len(list((tmp_path / "long").rglob("*.parquet"))) > 2  # per plugin and day
    # the long rows as Spark's partitionBy("metric", "node") writes them: metric=<m>/node=<n>/part-*.parquet,
    # without either column
    rows = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "long").rglob("*.parquet")))
    for (metric, node), part in rows.groupby(["metric", "node"]):
        (tmp_path / "hive" / f"metric={metric}" / f"node={node}").mkdir(parents=True)
        part.drop(columns=["metric", "node"]).to_parquet(tmp_path / "hive" / f"metric={metric}" / f"node={node}" /
                                                          "part-00000-c000.snappy.parquet")
    stores = {
        "wide": TelemetryStore(ingest(data_cfg(source=str(wide)), tmp_path / "w.h5")),
        "ldms": TelemetryStore(ingest(_ldms(source=str(tmp_path / "ldms")), tmp_path / "l.h5")),
        "long": TelemetryStore(ingest(_long(source=str(tmp_path / "long")), tmp_path / "g.h5")),
        "long by metric and node folders": TelemetryStore(ingest(_long(source=str(tmp_path / "hive")), tmp_path / "h.h5")),
        "long by pattern": TelemetryStore(ingest(_long(source=str(tmp_path / "long" / "**" / "*.parquet")),
                                                 tmp_path / "p.h5")),
    }
    for name, store in stores.items():
        assert store.nodes == [nd.name for nd in nodes], name
        assert sorted(store.metrics) == sorted(metrics), name
        order = [store.metrics.index(m) for m in metrics]
        for nd in nodes:
            got = store.read(nd.name)
            np.testing.assert_array_equal(got.timestamp, nd.timestamp, err_msg=name)
            np.testing.assert_array_equal(got.values[:, order], nd.values, err_msg=name)
            np.testing.assert_array_equal(got.labels, nd.labels, err_msg=name)


@pytest.mark.parametrize("zeroed, zipped", [("mid_row", False), ("mid_row", True), ("whole_rows", False)])
def test_nul_bytes_a_crash_left_in_a_file_are_said_and_no_row_is_joined_from_two(tmp_path, caplog, zeroed, zipped):
    """A crash while a file was written can leave a stretch of its blocks zeroed (ext4 after a power
    loss). A stretch from the middle of one row to the middle of a later one joins the first row's
    beginning to the later row's end, NUL bytes between: pandas kept them in the value, which was no
    number, and the ingest refused the whole file ("non-numeric metric columns"). Such a row is now
    left out, and the warning names the file, the NUL bytes and the line; rows zeroed whole are
    missing, and a row the stretch ends exactly before is read as written."""
    import gzip

    nd, metrics = _cluster(n=1, rows=120)[0], metric_names()[:6]
    frame = node_frame(nd)[["timestamp", *metrics]]
    text = frame.to_csv(index=False)
    lines = text.splitlines(keepends=True)
    k = 40  # data row k is line k + 1
    start = sum(map(len, lines[:k + 1]))  # where data row k starts
    later = start + len(lines[k + 1]) + len(lines[k + 2])  # where data row k + 2 starts

    def inside(row: str) -> int:  # where the row's fourth value starts
        return [i for i, c in enumerate(row) if c == ","][2] + 1

    # mid_row: the joined line has the header's field count, its fourth value NUL bytes and a number
    a, b = (start + inside(lines[k + 1]), later + inside(lines[k + 3])) if zeroed == "mid_row" else (start, later)
    damaged = bytearray(text.encode())
    damaged[a:b] = b"\0" * (b - a)
    gone = [k, k + 1, k + 2] if zeroed == "mid_row" else [k, k + 1]  # the rows the store must lack
    (tmp_path / "bad").mkdir(), (tmp_path / "good").mkdir()
    name = f"{nd.name}.csv" + (".gz" if zipped else "")
    path = tmp_path / "bad" / name
    path.write_bytes(gzip.compress(bytes(damaged)) if zipped else bytes(damaged))
    frame.drop(index=frame.index[gone]).to_csv(tmp_path / "good" / f"{nd.name}.csv", index=False)
    with caplog.at_level(logging.WARNING):
        got = TelemetryStore(ingest(data_cfg(source=str(tmp_path / "bad")), tmp_path / "bad.h5")).read(nd.name)
    want = TelemetryStore(ingest(data_cfg(source=str(tmp_path / "good")), tmp_path / "good.h5")).read(nd.name)
    np.testing.assert_array_equal(got.timestamp, want.timestamp)
    np.testing.assert_array_equal(got.values, want.values)
    left_out = 1 if zeroed == "mid_row" else 0
    assert re.search(rf"{re.escape(str(path))}: {b - a} NUL byte\(s\), the first on line {k + 2} \(a crash while "
                     rf"the file was written leaves blocks zeroed\): left out {left_out} row\(s\) they cut into",
                     caplog.text), caplog.text


def _cut_line(path: Path, how: str) -> None:
    """``path`` with its last line cut: ``short`` (a third of it gone and no line end: the file is
    still being written), ``gone`` (the line not written yet) or ``no_end`` (whole, no line end); or a
    line in its middle: ``mid_short`` (a third of it gone, its line end kept: a writer that stopped
    mid-row and went on) or ``mid_gone`` (the line left out)."""
    import gzip

    zipped = path.suffix == ".gz"  # a gzip file whole, of a CSV cut (compressed while it was written)
    text = gzip.decompress(path.read_bytes()).decode() if zipped else path.read_text()
    if how.startswith("mid_"):
        lines = text.splitlines(keepends=True)
        k, line = len(lines) // 2, lines[len(lines) // 2]
        lines[k] = "" if how == "mid_gone" else line[: 2 * len(line) // 3] + "\n"
        text = "".join(lines)
    else:
        head, last = text[:-1].rsplit("\n", 1)
        text = {"short": f"{head}\n{last[: 2 * len(last) // 3]}", "gone": f"{head}\n", "no_end": text[:-1]}[how]
    path.write_bytes(gzip.compress(text.encode())) if zipped else path.write_text(text)


def test_a_row_cut_short_is_left_out_at_a_files_end_or_inside_it(tmp_path, caplog):
    """A file still being written (or gzip'd while it was) (an LDMS store's current file, an export read while it is copied)
    ends in part of a row, its last value perhaps cut mid-number: before, pandas read that row with
    missing values and the cut number as it stood, and nothing said so. Each reader (a node's own
    file, a file of many nodes, LDMS) leaves the row out and logs the file; a whole last row without a
    line end is kept. So is a row cut short inside a file (a writer that stopped mid-row and went on
    after a line end: an LDMS store restarted, an exporter killed and rerun appending): it was read
    with missing values as well (with a label column: "label column is empty", proposing to read
    blank labels as normal); now it is left out, and the warning names the file and the line."""
    import gzip

    nodes, metrics = _cluster(rows=300), metric_names()[:20]
    wide, every = node_frame(nodes[1])[["timestamp", *metrics]], pd.concat(
        [node_frame(nd)[["timestamp", *metrics]].assign(node=nd.name) for nd in nodes]).sort_values("timestamp")

    def write(folder: Path) -> dict[str, tuple]:
        (folder / "wide").mkdir(parents=True)
        node_frame(nodes[0])[["timestamp", *metrics]].to_csv(folder / "wide" / f"{nodes[0].name}.csv", index=False)
        wide.to_csv(folder / "wide" / f"{nodes[1].name}.csv", index=False)
        every.to_csv(folder / "every.csv", index=False)
        every.to_csv(folder / "every.csv.gz", index=False)
        write_ldms(nodes, metrics, folder / "ldms", samplers=1)
        return {"wide": (data_cfg(source=str(folder / "wide")), folder / "wide" / f"{nodes[1].name}.csv"),
                "every": (data_cfg(source=str(folder / "every.csv")), folder / "every.csv"),
                "every_gz": (data_cfg(source=str(folder / "every.csv.gz")), folder / "every.csv.gz"),
                "ldms": (_ldms(source=str(folder / "ldms")), max((folder / "ldms").rglob("sampler0.[0-9]*")))}

    def store(cfg, name) -> dict:
        s = TelemetryStore(ingest(cfg, tmp_path / f"{name}.h5"))
        return {n: (s.read(n).timestamp, s.read(n).values) for n in s.nodes}

    whole = {fmt: store(cfg, f"whole-{fmt}") for fmt, (cfg, _) in write(tmp_path / "whole").items()}
    expected = {}
    expected: dict[str, dict] = {"short": {}, "mid_short": {}}
    for how in ("gone", "short", "no_end", "mid_gone", "mid_short"):
        for fmt, (cfg, path) in write(tmp_path / how).items():
            _cut_line(path, how)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                got = store(cfg, f"{how}-{fmt}")
            said = re.search(rf"{re.escape(str(path))}: (the last line has|left out 1 row\(s\) with fewer than the "
                             rf"\d+ fields the header names, the first at line (\d+))", caplog.text)
            want = {"gone": whole, "short": expected["short"], "no_end": whole, "mid_gone": whole,
                    "mid_short": expected["mid_short"]}[how][fmt]
            if how.endswith("gone"):  # the store without that row: a node's rows fewer, or a period of it
                expected[how.replace("gone", "short")][fmt], want = got, whole[fmt]
                assert any(len(got[n][0]) < len(want[n][0]) or not np.array_equal(got[n][1], want[n][1],
                                                                                    equal_nan=True) for n in got)
                assert not said, caplog.text
                continue
            assert got.keys() == want.keys(), (how, fmt)
            for n in got:
                np.testing.assert_array_equal(got[n][0], want[n][0], err_msg=f"{how} {fmt} {n}")
                np.testing.assert_array_equal(got[n][1], want[n][1], err_msg=f"{how} {fmt} {n}")
            assert bool(said) == how.endswith("short"), (how, fmt, caplog.text)
            if how == "mid_short":  # the line, counted from 1 as editors do
                text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
                k = len(text.splitlines()) // 2 + 1
                assert said.group(2) == str(k), (fmt, caplog.text)


@pytest.mark.parametrize("block", [7, 64, 1 << 24])
def test_a_csvs_lines_are_scanned_across_blocks_as_line_by_line(block):
    """``scan_lines`` reads a CSV's bytes as they come (16 MiB at a time from a plain or gzip file);
    here in blocks of 7 and 64 bytes as well, so that lines span and outgrow blocks: the rows cut
    short, the repeated header lines and the comment lines are those a line-by-line reading finds,
    whatever the line ends, quotes, comments and blank lines, and the last line without a line end
    is handed on."""
    from hpcad.data.linescan import scan_lines

    rng = np.random.default_rng(3)
    lines = ["time,a,b,c,d"]
    for i in range(400):
        row = f"{i},{rng.random():.6f},{rng.random():.3f},{rng.integers(0, 99)},{rng.random():.9f}"
        kind = rng.random()
        if kind < 0.05:
            row = row[: int(rng.integers(1, len(row) - 1))]  # cut short
        elif kind < 0.07:
            row = "# a comment, line " + str(i)
        elif kind < 0.08:
            row = ""
        elif kind < 0.09:
            row = f'{i},"x,y",1'  # a quoted separator: 3 fields
        elif kind < 0.10:
            row = f"{i}," + "9" * 150 + ",1,2,3"  # longer than a block
        elif kind < 0.11:
            row = lines[0]  # the header again (files joined with cat)
        lines.append(row)
    lines[200], lines[201] = "1,2", "3,4"  # short one after the other: no cut rows
    for end in ("\n", "\r\n"):
        data = (end.join(lines) + end + "7,8").encode()  # and a last line without a line end
        got = scan_lines((data[i:i + block] for i in range(0, len(data), block)), ",", 5, 5)
        rows = {k: line for k, line in enumerate(lines) if k and line and not line.startswith("#")}
        short = {k for k, line in rows.items() if len(next(csv.reader([line]))) < 5 and line.count('"') % 2 == 0}
        want = [k for k in sorted(short) if k - 1 not in short and k + 1 not in short]
        assert got.short == want and 200 not in got.short and len(want) > 10, (end, got.short, want)
        assert got.repeats == [k for k, line in rows.items() if line == lines[0]] and got.repeats
        assert got.comments == [k for k, line in enumerate(lines) if line.startswith("#")] and got.comments
        assert got.tail == b"\n7,8"
        data = (end.join(lines) + end + "# exported by dumper 1.2").encode()  # a comment last, no line end
        got = scan_lines((data[i:i + block] for i in range(0, len(data), block)), ",", 5, 5)
        assert got.comments[-1] == len(lines) and got.tail == b""


def test_hidden_files_and_folders_among_exports_are_not_read(tmp_path):
    """A folder of exports copied from a Mac holds ``._node.csv`` (AppleDouble, binary); a filer's
    ``.snapshot/`` holds yesterday's copy of every file; an editor leaves ``.node.csv.swp``. Before,
    the wide reader took ``._cn001.csv`` for node ``._cn001`` ("no rows") and the long and LDMS
    readers read ``.snapshot``'s copies as more rows (repeats, or another node). Each reader leaves
    hidden files and folders out, and so does the input's fingerprint (the rerun skips the ingest)."""
    import shutil

    wide = tmp_path / "wide"
    wide.mkdir()
    for nd in _cluster(n=2, rows=120):
        node_frame(nd).to_csv(wide / f"{nd.name}.csv", index=False)
    sources = {"wide": (wide, data_cfg), "long": (EXAMPLES / "long", _long), "ldms": (EXAMPLES / "ldms", _ldms)}
    for fmt, (src, cfg) in sources.items():
        clean = TelemetryStore(ingest(cfg(source=str(src)), tmp_path / f"{fmt}-clean.h5"))
        messy = shutil.copytree(src, tmp_path / f"{fmt}-messy")
        first = sorted(p for p in messy.rglob("*") if p.is_file())[0]
        (messy / f"._{first.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        shutil.copytree(first.parent, messy / ".snapshot" / "hourly.0" / first.parent.name)
        (messy / ".snapshot" / "hourly.0" / "extra.csv").write_text(first.read_text()[:200])
        got = TelemetryStore(ingest(cfg(source=str(messy)), tmp_path / f"{fmt}-messy.h5"))
        assert got.nodes == clean.nodes and got.metrics == clean.metrics, fmt
        for n in clean.nodes:
            np.testing.assert_array_equal(got.read(n).values, clean.read(n).values, err_msg=fmt)
        before = source_signature(messy, fmt)
        (messy / ".snapshot" / "hourly.0" / "extra.csv").write_text("changed")
        assert source_signature(messy, fmt) == before, fmt  # a hidden file changing is no new input


def _sadf(node: str, samples: int, reboot_at: int, per_cpu: bool = False) -> tuple[str, np.ndarray]:
    """What ``sadf -d -- -u -r`` (``-P ALL -r``: ``per_cpu``) writes of a node's day (sysstat's
    sadf_misc.c): each report under its ``#`` header, its rows ``host;interval;time;...``, a reboot's mark
    and the header again after it; and the values it holds, per sample [%user, %idle, kbmemfree]."""
    rng = np.random.default_rng(len(node))
    vals = np.round(rng.uniform(0, 100, size=(samples, 3)), 2)
    vals[:, 2] = np.round(vals[:, 2] * 1e4)  # kB
    times = [f"2025-01-06 {(10 * k) // 60:02d}:{(10 * k) % 60:02d}:01 UTC" for k in range(1, samples + 1)]
    text = ""
    for report in ("cpu", "mem"):
        head = ("# hostname;interval;timestamp;CPU;%user;%idle\n" if report == "cpu"
                else "# hostname;interval;timestamp;kbmemfree;%memused\n")
        text += head
        for k in range(samples):
            if k == reboot_at:
                text += f"{node};-1;{times[k][:-7]}00:00 UTC;LINUX-RESTART\t(64 CPU)\n" + head
            for cpu in ([-1, 0, 1] if per_cpu and report == "cpu" else [-1]):
                text += (f"{node};600;{times[k]};{cpu};{vals[k, 0]:.2f};{vals[k, 1]:.2f}\n" if report == "cpu"
                         else f"{node};600;{times[k]};{vals[k, 2]:.0f};12.50\n")
    return text, vals


def test_sar_data_as_sadf_exports_it_is_one_row_per_sample(tmp_path):
    """sysstat's sar data, kept on every Linux node, as ``sadf -d -- -u -r`` exports it: each report
    under a header line starting with ``#``, the headers again after a reboot and the reboot's
    ``LINUX-RESTART`` mark. Before, the first column was named ``# hostname``, the later headers were
    skipped as comments and the next report's rows read under the first one's columns (refused by
    pandas where they had more fields: ``sadf -d -- -u -r``, "Expected 10 fields in line 6, saw 14";
    read into the wrong columns where they had fewer). Now a node's file is one table, its
    reports joined by sample; a file of every node's exports (``cat``) is read by its host column; a
    per-CPU report (``-P ALL``) has each column per CPU."""
    folder = tmp_path / "sar"
    folder.mkdir()
    texts = {}
    for node in ("cn01", "cn02"):
        texts[node], _ = _sadf(node, 30, reboot_at=17)
        (folder / f"{node}.csv").write_text(texts[node])
    (tmp_path / "all.csv").write_text("".join(texts.values()))
    opts = dict(node_column="hostname", ignore_columns=["interval", "CPU"])
    for src in (folder, tmp_path / "all.csv"):
        store = TelemetryStore(ingest(data_cfg(source=str(src), **opts), tmp_path / f"{src.stem}.h5"))
        assert store.nodes == ["cn01", "cn02"] and store.metrics == ["%user", "%idle", "kbmemfree", "%memused"]
        for node in store.nodes:
            got, vals = store.read(node), _sadf(node, 30, 17)[1]
            np.testing.assert_allclose(got.values[:, :3], vals, rtol=1e-6)
            np.testing.assert_array_equal(np.diff(got.timestamp), 600)
            assert got.timestamp[0] == 1736122201  # 2025-01-06 00:10:01 UTC
    # the file still being written: its last row cut short is left out, as in any CSV
    (folder / "cn01.csv").write_text(texts["cn01"][:-9])
    cut = TelemetryStore(ingest(data_cfg(source=str(folder), **opts), tmp_path / "cut.h5"))
    assert cut.rows("cn01") == 30 and np.isnan(cut.read("cn01").values[-1, 3])  # its memory report: 29 rows
    assert "cn01.csv: the last line has 4 of 5 fields and no line end" in cut.warnings[1][0]
    # a per-CPU report (sadf -d -- -u -P ALL): each of its columns per CPU, sadf's all-CPU row as "all"
    (folder / "cn01.csv").write_text(texts["cn01"])
    (folder / "cn02.csv").write_text(_sadf("cn02", 30, 17, per_cpu=True)[0])
    cpus = TelemetryStore(ingest(data_cfg(source=str(folder), **opts), tmp_path / "cpu.h5"))
    assert cpus.metrics == ["%user", "%idle", "kbmemfree", "%memused", "%user.all", "%user.cpu0", "%user.cpu1",
                            "%idle.all", "%idle.cpu0", "%idle.cpu1"]  # the union of the two nodes' metrics
    got, vals = cpus.read("cn02"), _sadf("cn02", 30, 17)[1]
    np.testing.assert_allclose(got.values[:, [5, 9, 2]], vals, rtol=1e-6)  # %user.cpu0, %idle.cpu1, kbmemfree
    assert np.isnan(got.values[:, :2]).all()  # its report has no all-CPU-only columns: absent on this node
    np.testing.assert_array_equal(np.diff(got.timestamp), 600)
    (folder / "cn02.csv").write_text(_sadf("cn02", 30, 17, per_cpu=True)[0].replace(";1;", ";0;"))
    with pytest.raises(InputError, match=r"cn02.csv: the report of \['%user', '%idle'\] has a 'CPU' repeated within "
                                         r"one sample"):
        ingest(data_cfg(source=str(folder), **opts), tmp_path / "cpu2.h5")


def test_generate_and_run_long_format_with_job_context(tmp_path):
    exports = tmp_path / "long"
    hpcad("generate", f"generate.out={exports}", "generate.format=long", f"hydra.run.dir={tmp_path / 'g'}",
          "data.synthetic.nodes=3", "data.synthetic.rows=400")
    store = TelemetryStore(ingest(_long(source=str(exports)), tmp_path / "probe.h5"))
    t_end = max(int(store.read(n).timestamp[-1]) for n in store.nodes)
    jobs = tmp_path / "sacct.txt"
    iso = lambda t: pd.Timestamp(t, unit="s").strftime("%Y-%m-%dT%H:%M:%S")  # sacct: no zone
    jobs.write_text("JobID|NodeList|Start|End|State|User\n"
                    f"900|node[0000-0002]|{iso(T0)}|{iso(t_end + 300)}|COMPLETED|dana\n")
    run = tmp_path / "run"
    hpcad("run", f"hydra.run.dir={run}", "data=long", f"data.source={exports}", f"data.jobs={jobs}",
          *[o for o in SMALL if not o.startswith("data.synthetic")])
    with open(run / "alarms.csv") as fh:
        alarms = list(csv.DictReader(fh))
    assert alarms and all(a["jobs"] == "900" and a["users"] == "dana" for a in alarms)
    page = (run / "report.html").read_text()
    assert ">900</td>" in page and ">dana</td>" in page  # the jobs and users columns of the alarms table
    assert (TelemetryStore(run / "store.h5").read("node0001").job == 0).all()


def test_counters_become_rates_and_resets_stay_missing(tmp_path, caplog):
    d = tmp_path / "w"
    d.mkdir()
    ts = pd.date_range("2025-01-06", periods=6, freq="5min", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    pd.DataFrame({"timestamp": ts, "instr_total": [0, 300, 900, 1200, 60, 360], "temp": [50.0] * 6}
                 ).to_csv(d / "n1.csv", index=False)
    store = TelemetryStore(ingest(data_cfg(source=str(d), counters=["*_total"]), tmp_path / "s.h5"))
    rate = store.read("n1").values[:, 0]
    np.testing.assert_array_equal(rate, [np.nan, 1.0, 2.0, 1.0, np.nan, 1.0])  # per second; reset -> NaN
    assert "counter resets" in caplog.text and "'instr_total': 1" in caplog.text
    with pytest.raises(ConfigError, match="'cum_\\*' matches no metric"):
        ingest(data_cfg(source=str(d), counters=["cum_*"]), tmp_path / "t.h5")


def test_metric_missing_on_some_nodes_is_absent_there_dropped_or_an_error(tmp_path):
    f = tmp_path / "long.csv"
    rows = pd.read_csv(EXAMPLES / "long" / "examon-2025-01.csv")
    rows[~((rows.node == "n002") & (rows.metric == "temp_cpu"))].to_csv(f, index=False)
    with pytest.raises(InputError, match=r"'temp_cpu' on 1 of 2 nodes \(\['n002'\]\).*union.*drop"):
        ingest(_long(source=str(f), on_missing_metric="error"), tmp_path / "s.h5")
    assert not (tmp_path / "s.h5").exists()
    store = TelemetryStore(ingest(_long(source=str(f), on_missing_metric="drop"), tmp_path / "s.h5"))
    assert store.metrics == ["pow_cpu"]
    store = TelemetryStore(ingest(_long(source=str(f)), tmp_path / "u.h5"))  # default: union
    assert store.metrics == ["pow_cpu", "temp_cpu"]
    assert np.isnan(store.read("n002").values[:, 1]).all() and not np.isnan(store.read("n001").values[:, 1]).all()


def _stray(path: Path, column: str, line: int, value: str = "err") -> None:
    """Write ``value`` into ``column`` of the ``line``-th data line of a CSV (a header line first, '#' kept)."""
    lines = path.read_text().splitlines(keepends=True)
    fields = next(csv.reader([lines[0].lstrip("#")]))
    rows = [i for i, text in enumerate(lines) if i and not text.startswith("#")]
    if column in fields:  # wide and LDMS: a column per metric
        cells = next(csv.reader([lines[rows[line]]]))
        cells[fields.index(column)] = value
    else:  # long: a row per value; the line-th of the metric's rows
        at = [i for i in rows if next(csv.reader([lines[i]]))[fields.index("metric")] == column][line]
        cells = next(csv.reader([lines[at]]))
        cells[fields.index("value")] = value
        rows = {line: at}
    lines[rows[line]] = ",".join(cells) + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize("layout", ["node files", "one file of every node", "ldms", "long"])
def test_a_few_cells_that_are_no_number_are_missing_samples_and_a_column_of_text_an_error(tmp_path, layout):
    """A collector that wrote 'err' or '-' in place of a sample: those cells are missing, said in the
    store's input warnings (the report's "Input warnings"), the rest as read. Before, one such cell
    refused the whole file (with data.on_bad_node=skip: the node's rows or the file's every node)."""
    nodes, metrics = _cluster(n=2, rows=300), metric_names()
    src = tmp_path / "src"
    if layout == "node files":
        src.mkdir()
        for nd in nodes:
            node_frame(nd).to_csv(src / f"{nd.name}.csv", index=False)
        files, cfg = [src / "node0001.csv"], data_cfg
    elif layout == "one file of every node":
        src.mkdir()
        pd.concat(node_frame(nd).assign(node=nd.name) for nd in nodes).to_csv(src / "all.csv", index=False)
        files, cfg = [src / "all.csv"], data_cfg
    elif layout == "ldms":
        files, cfg = [p for p in write_ldms(nodes, metrics, src, samplers=2) if "sampler1" in str(p)][:1], _ldms
    else:
        files, cfg = [p for p in write_long(nodes, metrics, src, plugins=2, fmt="csv") if "plugin1" in str(p)][:1], _long
    clean = TelemetryStore(ingest(cfg(source=str(src)), tmp_path / "clean.h5"))
    column = metrics[-1]  # in every layout's second file (LDMS sampler1, long plugin1)
    _stray(files[0], column, 40)
    _stray(files[0], column, 41, "-")
    store = TelemetryStore(ingest(cfg(source=str(src)), tmp_path / "s.h5"))
    assert store.warnings[0] == 1 and re.search(r"2 (cell|value)\(s\) that are no number .*" + column, store.warnings[1][0])
    j = store.metrics.index(column)
    changed = 0
    for nd in store.nodes:
        got, want = store.read(nd).values, clean.read(nd).values
        diff = ~((got == want) | (np.isnan(got) & np.isnan(want)))
        assert np.isnan(got[diff]).all() and set(np.flatnonzero(diff.any(axis=0))) <= {j}
        changed += int(diff.sum())
    assert changed == 2
    # more than 1 % of a column's cells: a column of text, refused naming the file as before
    for k in range(2, 40):
        _stray(files[0], column, k, "on")
    with pytest.raises(InputError, match=re.escape(files[0].name) + r".*non-numeric.*'?" + column):
        ingest(cfg(source=str(src)), tmp_path / "t.h5")


def test_bad_long_and_ldms_input_names_file_and_place(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("timestamp,node,metric,value\n2025-01-06T00:00:00Z,n1,pow,1.5\n2025-01-06T00:05:00Z,n1,pow,oops\n")
    with pytest.raises(InputError, match=r"bad.csv: non-numeric value 'oops'.*'pow'.*'n1'"):
        ingest(_long(source=str(f)), tmp_path / "s.h5")
    f.write_text("time,host,metric,value\n")
    with pytest.raises(InputError, match=r"missing column\(s\).*data.node_column"):
        ingest(_long(source=str(f)), tmp_path / "s.h5")
    d = tmp_path / "ldms"
    d.mkdir()
    (d / "meminfo.1").write_text("#Time,Time_usec,ProducerName,component_id,Active::meminfo\n"
                                 "1736121601,1,n1,1,5\n#Time,Time_usec,ProducerName,component_id,Other::meminfo\n"
                                 "1736121901,1,n1,1,6\n")
    with pytest.raises(InputError, match=r"meminfo.1: line 3: header differs"):
        ingest(_ldms(source=str(d)), tmp_path / "s.h5")


def test_time_zones_policy(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    pd.DataFrame({"timestamp": ["2025-01-06T01:00:00+01:00", "2025-01-06T00:05:00Z", "2025-01-06T00:10:00"],
                  "x": [1.0, 2.0, 3.0]}).to_csv(d / "n1.csv", index=False)
    with pytest.raises(InputError, match=r"mixes timestamps with a time zone .* and without one"):
        ingest(data_cfg(source=str(d)), tmp_path / "s.h5")
    pd.DataFrame({"timestamp": ["2025-01-06 01:00:00", "2025-01-06 01:05:00"], "x": [1.0, 2.0]}
                 ).to_csv(d / "n1.csv", index=False)
    store = TelemetryStore(ingest(data_cfg(source=str(d), timezone="Europe/Rome"), tmp_path / "s.h5"))
    assert store.read("n1").timestamp.tolist() == [T0, T0 + 300]  # 01:00 in Rome is 00:00 UTC
    # PostgreSQL's timestamptz as psql prints it (an hour offset alone, fractional seconds), and a
    # UTC suffix: zoned times (they were refused with pandas' "Already tz-aware")
    for k, stamps in enumerate((["2025-01-06 01:00:00+01", "2025-01-06 01:05:00.000+01"],
                                ["2025-01-05 19:00:00-05", "2025-01-05 19:05:00-05"],
                                ["2025-01-06 00:00:00 UTC", "2025-01-06 00:05:00 UTC"])):
        pd.DataFrame({"timestamp": stamps, "x": [1.0, 2.0]}).to_csv(d / "n1.csv", index=False)
        store = TelemetryStore(ingest(data_cfg(source=str(d), timezone="Europe/Rome"), tmp_path / f"z{k}.h5"))
        assert store.read("n1").timestamp.tolist() == [T0, T0 + 300], stamps


def test_dates_written_day_or_month_first_are_read_as_the_column_or_the_option_says(tmp_path):
    """06/01/2025 is 6 January in Europe and June 1 in the US; pandas alone read it as June and
    13/01/2025 as January 13, so a European export ended in "timestamps not increasing" (whose
    advice, data.sort_timestamps=true, gave wrong dates) or, within days 1-12, in wrong dates."""
    d = tmp_path / "w"
    d.mkdir()
    day = [f"{dd:02d}/01/2025 00:00" for dd in (11, 12, 13)]  # 6 January 2025 is T0's day
    want = [T0 + 86400 * k for k in (5, 6, 7)]

    def read(stamps: list[str], **kw) -> list[int]:
        pd.DataFrame({"timestamp": stamps, "x": [1.0] * len(stamps)}).to_csv(d / "n1.csv", index=False)
        return TelemetryStore(ingest(data_cfg(source=str(d), **kw), tmp_path / "s.h5")).read("n1").timestamp.tolist()

    assert read(day) == want  # 13 can only be a day: the column is day first
    assert read([f"01/{dd:02d}/2025 00:00" for dd in (11, 12, 13)]) == want  # ...month first
    assert read([s.replace("/", ".") for s in day]) == want  # 11.01.2025
    with pytest.raises(InputError, match=r"n1.csv \(node n1\): column 'timestamp' writes dates with the day and month "
                                         r"before the year \('11/01/2025 00:00'\) and no day above 12 shows which "
                                         r"comes first: set data.dayfirst=true"):
        read(day[:2])  # a night's export on 11 or 12 January: either reading is possible
    assert read(day[:2], dayfirst=True) == want[:2]
    assert read(["01/11/2025 00:00", "01/12/2025 00:00"], dayfirst=False) == want[:2]
    with pytest.raises(InputError, match=r"writes dates both day first \('13/01/2025 00:00'\) and month first "
                                         r"\('01/14/2025 00:00'\)"):
        read(["13/01/2025 00:00", "01/14/2025 00:00"])
    assert read(["2025-01-11 00:00", "2025-01-12 00:00"], dayfirst=True) == want[:2]  # ISO dates are ISO


@pytest.mark.parametrize("text,expected", [
    ("n[001-004,010]", ["n001", "n002", "n003", "n004", "n010"]),
    ("n7", ["n7"]),
    ("a[1-2]-ib[0-1]", ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]),
    ("gpu[09-11],cpu[1,3]", ["gpu09", "gpu10", "gpu11", "cpu1", "cpu3"]),
    ("lrdn[0098-0101]", ["lrdn0098", "lrdn0099", "lrdn0100", "lrdn0101"]),
])
def test_hostlist_expansion(text, expected):
    assert expand_nodelist(text) == expected


def test_malformed_hostlist_names_the_job(tmp_path):
    f = tmp_path / "sacct.txt"
    f.write_text("JobID|NodeList|Start|End|State\n77|n[3-1|2025-01-06T00:00:00|Unknown|RUNNING\n")
    with pytest.raises(InputError, match=r"job 77: cannot expand node list 'n\[3-1'"):
        read_jobs(f)


def test_sacct_file_steps_pending_running_and_rows(tmp_path, caplog):
    jobs = read_jobs(EXAMPLES / "sacct.txt")
    assert jobs.job_id == ["4711", "4712"]  # step 4711.batch and pending 4713 skipped
    assert jobs.end[1] == np.iinfo(np.int64).max  # still running
    assert "overlapping job pair(s)" in caplog.text and "4711 and 4712 on n002" in caplog.text
    node = NodeData("n002", T0 + 300 * np.arange(16), np.zeros((16, 1), np.float32), None)
    job = jobs.assign(node)
    assert job.tolist() == [0] + [1] * 15  # the later start wins from 00:05
    assert jobs.during("n002", T0, T0 + 60) == ["4711"] and jobs.during("n002", T0, T0 + 300) == ["4711", "4712"]
    assert jobs.users_during("n002", T0, T0 + 300) == ["alice", "bob"]  # sacct's User column, when asked for
    assert jobs.assign(NodeData("n001", np.array([T0]), np.zeros((1, 1), np.float32), None)).tolist() == [-1]
    caplog.clear()
    jobs.check_nodes(["n001", "n002", "n003"], "sacct.txt")
    (tmp_path / "j.txt").write_text("JobID,NodeList,Start,End,State\n5,x[1-2],2025-01-06T00:00:00,Unknown,RUNNING\n")
    other = read_jobs(tmp_path / "j.txt")  # CSV form works too
    with pytest.raises(InputError, match=r"none of the job file's nodes is in the telemetry"):
        other.check_nodes(["n001"], "j.txt")
    jobs.by_node["ghost"] = [0]
    jobs.check_nodes(["n001", "n002"], "sacct.txt")
    assert "1 node(s) in the job file have no telemetry" in caplog.text


def test_job_context_marks_idle_rows_for_training(tmp_path):
    from hpcad.preprocess import TRAIN, training_rows

    node = NodeData("n", np.arange(6), np.zeros((6, 1), np.float32), None, job=np.array([-1, 0, 0, -1, 1, 1]))
    codes = np.full(6, TRAIN)
    assert training_rows(node, codes, True, exclude_idle=True).tolist() == [False, True, True, False, True, True]
    assert training_rows(node, codes, True, exclude_idle=False).all()
