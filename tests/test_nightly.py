"""The nightly job as cron runs it (`env -i`, minimal PATH, one env file), drift and light retraining."""
import csv
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FEW_PLOTS, cron, hpcad, nightly_env_file as _env_file, write_site
from hpcad.data.synthetic import metric_names
from hpcad.errors import InputError
from hpcad.nightly.changes import read_changes
from hpcad.nightly.drift import assess, write_levels
from hpcad.model.light import LightMaps, fit_light_map
from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
from hpcad.model.files import model_nodes

CUT = "2025-01-09"  # training: the days before; nightly exports: this day on


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """3 nodes reporting every 5 minutes: 3 days of training exports, then one folder per day;
    node0002's levels shift from the second nightly day on (new cooling)."""
    root = tmp_path_factory.mktemp("site")
    write_site(root, nodes=3, days=8, cut=CUT, drift_node="node0002", drift_row=288 * 4)
    hpcad("run", f"data.source={root / 'train'}", f"hydra.run.dir={root / 'trainrun'}", "train.epochs=8",
          "compute.progress=false", "baselines.methods=[]", "report.enabled=false")
    return root


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_cron_run_finds_injected_anomalies_and_a_rerun_replaces_the_day(site, tmp_path):
    out = tmp_path / "nightly"
    day = "2025-01-10"
    (tmp_path / "sacct").mkdir()  # the day's sacct dump, as an earlier cron line would write it
    (tmp_path / "sacct" / f"{day}.txt").write_text("JobID|NodeList|Start|End|State\n"
                                                   f"777|node[0000-0002]|{day}T00:00:00|{day}T23:59:59|COMPLETED\n")
    notify = tmp_path / "notify.sh"  # the site's hook: records what it was given
    notify.write_text(f'#!/bin/sh\necho "$HPCAD_NIGHT $HPCAD_NEW_INCIDENTS $1" >> {tmp_path / "notified.txt"}\n')
    notify.chmod(0o755)
    env = _env_file(site, out, extra=f"nightly.notify={notify}", more=f"HPCAD_JOBS={tmp_path / 'sacct'}/{{date}}.txt\n")
    labels = pd.concat(pd.read_csv(p, usecols=["timestamp", "anomaly"]).assign(node=p.stem) for p in (site / "daily" / day).glob("*.csv"))
    assert (labels.anomaly != 0).any()  # the generator injected anomalies on this day
    p = cron(env, "--date", day)
    assert p.returncode == 0, p.stderr
    assert f"hpcad nightly {day}: 3 nodes" in p.stdout
    folder = out / day
    alarms = list(csv.DictReader(open(folder / "alarms.csv")))
    hits = [a for a in alarms if a["label_classes"]]
    assert hits, alarms  # an alarm overlaps an injected anomaly
    for a in hits:
        anomalous = labels[(labels.node == a["node"]) & (labels.anomaly != 0)]
        assert not anomalous.empty
    js = json.loads((folder / "alarms.json").read_text())
    assert len(js) == len(alarms) and {"node", "start", "end", "peak_score", "top_metrics", "jobs"} <= set(js[0])
    assert all(a["jobs"] == ["777"] for a in js)  # the job that ran during each alarm
    assert js[0]["top_metrics"][0]["metric"] in metric_names() and js[0]["top_metrics"][0]["error"] > 0
    # what a ticket quotes: each top metric's value at the alarm's loudest row, what the node's model
    # expected there, and the node's training range, in the metric's own units (the day's files)
    for a in js:
        rows = pd.read_csv(site / "daily" / day / f"{a['node']}.csv")
        at = rows[pd.to_datetime(rows.timestamp, utc=True) == pd.Timestamp(a["loudest_time"])]
        assert len(at) == 1 and a["start"] <= a["loudest_time"] <= a["end"]
        for m in a["top_metrics"]:
            assert m["observed"] == pytest.approx(float(at[m["metric"]].iloc[0]), rel=1e-5)
            assert m["expected"] is not None and len(m["training_range"]) == 2
    top = js[0]["top_metrics"][0]  # the metric most above its normal error: outside its training range, or
    lo, hi = top["training_range"]  # far from what the model expected of it
    assert not lo <= top["observed"] <= hi or abs(top["observed"] - top["expected"]) > 0.05 * (hi - lo)
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    # incidents (the first night of this output folder: all new), one JSON line per alarm
    incidents = json.loads((folder / "incidents.json").read_text())
    assert incidents and {i["state"] for i in incidents} == {"new"}
    lines = [json.loads(x) for x in (folder / "alarms.jsonl").read_text().splitlines()]
    assert len(lines) == len(js) and {x["incident"] for x in lines} == {i["id"] for i in incidents}
    # the Prometheus textfile: parsed by the reference parser
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families((out / "hpcad.prom").read_text()) for s in f.samples]
    alarm_state = {s.labels["node"]: s.value for s in samples if s.name == "hpcad_node_alarm"}
    assert set(alarm_state) == {"node0000", "node0001", "node0002"}
    assert {n for n, v in alarm_state.items() if v == 1} == {i["node"] for i in incidents}
    # the notify hook ran once, with the night's alarms.jsonl, and the history says so
    assert (tmp_path / "notified.txt").read_text() == f"{day} {len(incidents)} {folder / 'alarms.jsonl'}\n"
    assert _history(out)[-1]["notify"] == "ok" and _history(out)[-1]["new_incidents"] == str(len(incidents))
    first = (folder / "alarms.csv").read_bytes()
    first_incidents = (folder / "incidents.json").read_bytes()
    (logs := sorted((out / "logs").iterdir()))[0].rename(out / "logs" / "20240101T000000Z-123")  # a run 100+ days ago
    for name in ("20240101T000000Z-123", "notes"):  # hpcad's log folder goes, anything else stays
        (out / "logs" / name).mkdir(exist_ok=True)
        os.utime(out / "logs" / name, (time.time() - 100 * 86400,) * 2)
    p = cron(env, "--date", day)  # the same night again
    assert p.returncode == 0, p.stderr
    kept = sorted(x.name for x in (out / "logs").iterdir())
    assert len(logs) == 1 and len(kept) == 2 and kept[1] == "notes" and kept[0] > "2025", kept  # HPCAD_LOG_DAYS=90
    assert (folder / "alarms.csv").read_bytes() == first  # replaced, not appended: no duplicate alarms
    assert (folder / "incidents.json").read_bytes() == first_incidents  # the same state
    assert [h["status"] for h in _history(out)] == ["ok", "ok"]
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".*old*"))


@pytest.fixture(scope="module")
def uninterrupted_night(site, tmp_path_factory) -> Path:
    """The nightly output folder of 2025-01-10 run once, uninterrupted (what a killed night's rerun must give)."""
    ref = tmp_path_factory.mktemp("uninterrupted") / "nightly"
    assert cron(_env_file(site, ref), "--date", "2025-01-10").returncode == 0
    return ref


def test_a_folder_per_node_of_day_files_is_read_each_night_through_a_pattern(site, uninterrupted_night, tmp_path):
    """Collectors that keep each node's days in the node's folder (``/exports/<node>/<date>.csv``) have
    no folder per day to name in ``nightly.input``; a glob pattern does (``/exports/*/{date}.csv``): the
    night's alarms are those read from day folders, and a night the pattern finds no file for is one
    without exports."""
    day, by_node = "2025-01-10", tmp_path / "by-node"
    for f in (site / "daily").glob("*/*.csv"):
        (by_node / f.stem).mkdir(parents=True, exist_ok=True)
        (by_node / f.stem / f"{f.parent.name}.csv").symlink_to(f)
    out = tmp_path / "nightly"
    env = _env_file(site, out, more=f"HPCAD_INPUT={by_node}/*/{{date}}.csv\n")
    p = cron(env, "--date", day)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / day / "alarms.csv").read_bytes() == (uninterrupted_night / day / "alarms.csv").read_bytes()
    p = cron(env, "--date", "2025-02-10")
    assert p.returncode == 2 and f"no exports at {by_node}/*/2025-02-10.csv" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("fault", [None, "report.html"])
def test_a_night_killed_mid_way_reruns_to_the_same_outputs(site, uninterrupted_night, tmp_path, fault):
    """kill -9 after the night is scored (a cron job killed by the OOM killer or a reboot), or as its
    report is written (hpcad.atomic's fault point, HPCAD_FAULT): the old outputs stay as they
    were, and the rerun publishes what an uninterrupted night does."""
    import signal

    day, ref = "2025-01-10", uninterrupted_night
    out = tmp_path / "nightly"
    env = _env_file(site, out)
    if fault:
        # with every node's light map refitted (step 4, before the report): a killed night leaves no map
        # either (before, its maps were in place, valid from the next night, though it never published)
        killed = cron(_env_file(site, out, "nightly.light_retrain=all", name="faulty",
                                more=f"export HPCAD_FAULT={fault}\n"), "--date", day)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert list(out.glob(f".{day}.tmp-*/.{fault}.*.tmp"))  # killed as it was about to publish the report
        assert list(out.glob(f".{day}.tmp-*/.light-new/*/*.pt")) and not (out / "light").exists()
    else:
        proc = subprocess.Popen(["env", "-i", "PATH=/usr/bin:/bin", str(Path(__file__).parents[1] / "jobs" /
                                 "nightly_rescore.sh"), "--env", str(env), "--date", day], cwd="/", text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen = []
        for line in proc.stdout:  # the script execs hpcad: this is its log
            seen.append(line)
            if "scored 3 nodes" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.stdout.close()
        assert proc.wait(timeout=300) == -signal.SIGKILL, "".join(seen)[-2000:]
    assert not (out / day).exists() and list(out.glob(f".{day}.tmp-*"))  # nothing published, the scratch left
    assert cron(env, "--date", day).returncode == 0
    for name in ("alarms.csv", "alarms.json", "alarms.jsonl", "incidents.json", "levels.csv", "drift.json",
                 "thresholds.json", "drain.txt"):
        assert (out / day / name).read_text() == (ref / day / name).read_text(), name
    assert not list(out.glob(".*tmp*"))  # the killed run's scratch was removed by the rerun
    assert [h["status"] for h in _history(out)] == ["ok"]  # the killed run never got to its history line


def test_missing_or_partial_input_fails_clearly_and_changes_nothing(site, tmp_path):
    out = tmp_path / "nightly"
    env = _env_file(site, out)
    assert cron(env, "--date", "2025-01-09").returncode == 0
    def outputs() -> dict:  # the day folders (not logs, the history or the lock file)
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "logs" not in p.parts
                and p.name not in ("history.csv", ".nightly.lock")}

    before = outputs()
    p = cron(env, "--date", "2024-12-31")
    assert p.returncode == 2
    assert "nightly 2024-12-31: no exports at" in p.stderr and str(site / "daily" / "2024-12-31") in p.stderr
    partial = tmp_path / "partial" / "2025-01-09"
    shutil.copytree(site / "daily" / "2025-01-09", partial)
    (partial / "node0001.csv").unlink()
    p = cron(_env_file(site, out, "nightly.input='" + str(tmp_path / "partial") + "/{date}'", name="partial"),
             "--date", "2025-01-09")
    assert p.returncode == 2 and "partial input: 2 of 3 trained nodes" in p.stderr
    early = tmp_path / "early" / "2025-01-09"  # cron ran while the exporter was still writing the evening
    early.mkdir(parents=True)
    for f in (site / "daily" / "2025-01-09").glob("*.csv"):
        pd.read_csv(f).iloc[:-24].to_csv(early / f.name, index=False)  # the day's last 2 hours not there yet
    p = cron(_env_file(site, out, "nightly.input='" + str(tmp_path / "early") + "/{date}'", name="early"),
             "--date", "2025-01-09")
    assert p.returncode == 2 and "partial input: the newest sample in" in p.stderr
    assert "2025-01-09T21:55:00+00:00, more than 3600 s before the day ends (midnight in nightly.timezone=UTC" in p.stderr
    assert outputs() == before
    assert [h["status"] for h in _history(out)] == ["ok", "failed", "failed", "failed"]
    # no --date: yesterday in the site's zone
    yesterday = (dt.datetime.now(dt.timezone(dt.timedelta(hours=14))) - dt.timedelta(days=1)).date()
    p = cron(_env_file(site, out, tz="Pacific/Kiritimati", name="kiritimati"))
    assert p.returncode == 2 and f"nightly {yesterday.isoformat()}: no exports" in p.stderr
    # a backfill goes on past a night without exports (before: it stopped there, the later nights unscored),
    # then fails naming it
    p = cron(env, "--from", "2025-01-08", "--to", "2025-01-09")
    assert p.returncode == 2 and "1 of 2 nights failed (the other 1 were scored" in p.stderr, p.stderr[-2000:]
    assert "nightly 2025-01-08: no exports at" in p.stderr
    assert [(h["date"], h["status"]) for h in _history(out)][-2:] == [("2025-01-08", "failed"), ("2025-01-09", "ok")]
    assert (out / "2025-01-09" / "report.html").stat().st_mtime_ns > before[out / "2025-01-09" / "report.html"]


def test_cron_catches_up_the_nights_it_missed_oldest_first(site, tmp_path, monkeypatch):
    """The cron host was down for two nights (or a night's exports came late and it failed): the next
    run scores the unpublished nights of the last nightly.catch_up_days with exports, oldest first,
    then yesterday; it names those without exports, and older ones with the backfill command.
    Before, a missed night stayed unscored unless someone noticed and ran a backfill."""
    from hpcad.nightly import days

    inp, out = tmp_path / "in", tmp_path / "nightly"
    for d in ("2025-01-09", "2025-01-10", "2025-01-12"):  # 2025-01-11's exports are not there
        shutil.copytree(site / "daily" / d, inp / d)
    args = [f"train_run={site / 'trainrun'}", f"nightly.input='{inp}/{{date}}'", f"nightly.out={out}",
            "compute.progress=false", f"hydra.run.dir={tmp_path / 'log'}", "report.enabled=false"]
    hpcad("nightly", *args, "nightly.date=2025-01-09")  # the output's first night; cron then down until 01-13
    monkeypatch.setattr(days, "yesterday", lambda tz: dt.date(2025, 1, 12))
    p = hpcad("nightly", *args, "nightly.catch_up_days=2")
    said = p.stdout + p.stderr
    assert [(h["date"], h["status"]) for h in _history(out)] == [("2025-01-09", "ok"), ("2025-01-10", "ok"),
                                                                 ("2025-01-12", "ok")]
    assert sorted(x.name for x in out.glob("2025-*")) == ["2025-01-09", "2025-01-10", "2025-01-12"]
    assert "catching up 1 night(s) before 2025-01-12 not published" in said, said[-3000:]
    assert "1 night(s) of the last 2 days not published and without exports at nightly.input: 2025-01-11" in said
    # the lost night's exports turn up later, beyond a shorter window: named with the backfill that scores it
    shutil.copytree(site / "daily" / "2025-01-11", inp / "2025-01-11")
    p = hpcad("nightly", *args, "nightly.catch_up_days=0")
    said = p.stdout + p.stderr
    assert "catching up" not in said and [h["date"] for h in _history(out)][3:] == ["2025-01-12"]
    assert "1 older night(s) from 2025-01-11 to 2025-01-11 not published, beyond nightly.catch_up_days=0" in said
    assert "nightly_rescore.sh --from 2025-01-11 --to 2025-01-11" in said


def test_a_node_on_the_sites_maintenance_log_settles_on_nights_since_its_change(site, tmp_path):
    """node0002 got new cooling on 2025-01-10 (its levels shift from then on). Before, its model alarmed
    on its new normal night after night, each night a new incident (for draining once one stayed open
    two nights), until drift (3 reference nights, then 3 nights over) refitted a light map on nights
    on both sides of the change. Listed in nightly.changes, it settles: its alarms are kept but open no
    incident until a light map fitted on nightly.light_days nights since the change scores it."""
    changes = tmp_path / "changes.csv"
    changes.write_text("node,since,note\nnode0002,2025-01-10,new cooling\nnode0009,2025-01-10,\n")
    out = tmp_path / "nightly"
    args = [f"train_run={site / 'trainrun'}", f"nightly.input='{site / 'daily'}/{{date}}'", f"nightly.out={out}",
            "compute.progress=false", f"hydra.run.dir={tmp_path / 'log'}", f"nightly.changes={changes}",
            "nightly.light_days=2"]
    p = hpcad("nightly", *args, "nightly.date=2025-01-09..2025-01-10", "report.enabled=false")
    assert "nightly.changes names 1 node(s) without a trained model: node0009" in p.stdout + p.stderr
    assert f"light refits -> {out / '2025-01-10'}\n" in p.stdout  # no report.html to point at (report.enabled=false)
    q = hpcad("nightly", *args, "nightly.date=2025-01-11")
    said = q.stdout + q.stderr
    hpcad("nightly", *args, "nightly.date=2025-01-12", "report.enabled=false")
    days = ["2025-01-09", "2025-01-10", "2025-01-11", "2025-01-12"]
    alarms = {d: [a for a in json.loads((out / d / "alarms.json").read_text()) if a["node"] == "node0002"] for d in days}
    inc = {d: [i["state"] for i in json.loads((out / d / "incidents.json").read_text()) if i["node"] == "node0002"]
           for d in days}
    light = {d: {r["node"]: r["days"] for r in json.loads((out / d / "light.json").read_text())} for d in days}
    assert alarms["2025-01-10"] and alarms["2025-01-11"]  # still alarmed, and kept
    assert all(a["settling"] == {"since": "2025-01-10", "note": "new cooling"}
               for a in alarms["2025-01-10"] + alarms["2025-01-11"])
    assert not any("settling" in a for a in alarms["2025-01-09"] + alarms["2025-01-12"])
    assert inc["2025-01-09"] == ["new"] and inc["2025-01-10"] == ["resolved"] and inc["2025-01-11"] == []
    # the map fitted on the two nights since the change scores 2025-01-12: the node alarms as any other again
    assert alarms["2025-01-12"] and inc["2025-01-12"] == ["new"]
    assert light["2025-01-09"] == {} and light["2025-01-10"] == {"node0002": ["2025-01-10"]}  # never 01-09
    assert light["2025-01-11"] == {"node0002": ["2025-01-10", "2025-01-11"]} and light["2025-01-12"] == {}
    import h5py

    with h5py.File(out / "2025-01-12" / "errors.h5") as f:
        assert f["nodes/node0002"].attrs["light_version"] == 2
    assert "1 node(s) changed (nightly.changes) settle on a light map" in said and "node0002 (since 2025-01-10: new cooling)" in said
    report = (out / "2025-01-11" / "report.html").read_text()
    # the node's page says why those nights' alarms opened no incident (levels.csv keeps it)
    page = (out / "2025-01-11" / "nodes" / "node0002.html").read_text()
    assert page.count("alarms held: settling after its change of 2025-01-10") == 2  # 01-11 and 01-10
    assert "<h2>Changed nodes (1)</h2>" in report
    assert ("<td>node0002</td><td>2025-01-10</td><td>new cooling</td><td>settling: its alarms open no incident; light "
            "map refitted on 2 night(s) since, scores from 2025-01-12</td>") in report
    # a log the job cannot read stops it before any night, naming the line
    changes.write_text("node,since\nnode0002,10/01/2025\n")
    p = hpcad("nightly", *args, "nightly.date=2025-01-13", check=False)
    assert p.returncode == 2 and f"{changes}, line 2: since='10/01/2025' for node node0002 is not a night as YYYY-MM-DD" in p.stderr
    p = hpcad("nightly", *args[:-2], f"nightly.changes={tmp_path / 'none.csv'}", "nightly.date=2025-01-13", check=False)
    assert p.returncode == 2 and "nightly.changes=" in p.stderr and "no such file" in p.stderr
    assert not (out / "2025-01-13").exists()


def test_a_maintenance_log_row_may_name_many_nodes_as_a_slurm_host_list(tmp_path):
    """A firmware or cooling change across racks is one row, written the way admins write node sets.
    Before, the host list was read as one node's name (named in the log as a node without a model),
    so the change applied to none: each node needed its own row."""
    log = tmp_path / "changes.csv"
    log.write_text('node,since,note\n"cn[0001-0003],gpu7",2025-02-01,BIOS 2.3\ncn0002,2025-03-01,DIMMs\n')
    changes = read_changes(log)
    assert sorted(changes) == ["cn0001", "cn0002", "cn0003", "gpu7"]
    assert [c.since for c in changes["cn0002"]] == ["2025-02-01", "2025-03-01"] and changes["gpu7"][0].note == "BIOS 2.3"
    log.write_text("node,since\ncn[0001-,2025-02-01\n")
    with pytest.raises(InputError, match=r"changes.csv, line 2: cannot expand node list 'cn\[0001-'"):
        read_changes(log)


def test_a_node_retired_in_the_maintenance_log_is_not_expected_nor_scored(site, tmp_path):
    """node0001 left service on 2025-01-11 (moved to another partition). Before, every night from then
    on failed as partial input (2 of 3 trained nodes: under nightly.min_node_fraction), or, on a large
    cluster, listed it as silent night after night; the way out was deleting its model from the
    training run. Listed as retired, it is not expected and not scored, even when it sends rows; a
    later row of kind changed brings it back, settling."""
    inp = tmp_path / "in"
    for day in ("2025-01-10", "2025-01-11", "2025-01-12"):
        shutil.copytree(site / "daily" / day, inp / day)
    (inp / "2025-01-11" / "node0001.csv").unlink()  # 01-12: its collector still sends
    changes = tmp_path / "changes.csv"
    changes.write_text("node,since,note,kind\nnode[0001],2025-01-11,moved to the test partition,retired\n")  # host list
    out = tmp_path / "nightly"
    args = [f"train_run={site / 'trainrun'}", f"nightly.input='{inp}/{{date}}'", f"nightly.out={out}",
            "compute.progress=false", f"hydra.run.dir={tmp_path / 'log'}", f"nightly.changes={changes}",
            *FEW_PLOTS]
    p = hpcad("nightly", *args, "nightly.date=2025-01-10..2025-01-12")
    said = p.stdout + p.stderr
    levels = {d: [r["node"] for r in csv.DictReader(open(out / d / "levels.csv"))]
              for d in ("2025-01-10", "2025-01-11", "2025-01-12")}
    assert levels == {"2025-01-10": ["node0000", "node0001", "node0002"], "2025-01-11": ["node0000", "node0002"],
                      "2025-01-12": ["node0000", "node0002"]}
    assert "1 node(s) retired in nightly.changes sent rows tonight, not scored: node0001" in said
    assert "sent no telemetry" not in said and "without a trained model" not in said
    for d in ("2025-01-11", "2025-01-12"):
        report = (out / d / "report.html").read_text()
        assert "1 node(s) retired in the maintenance log (<code>nightly.changes</code>) are not expected" in report
        assert "Telemetry gaps" not in report
        assert not [i for i in json.loads((out / d / "incidents.json").read_text())
                    if i["node"] == "node0001" and i["state"] != "resolved"]
    prom = dict(line.rsplit(" ", 1) for line in (out / "hpcad.prom").read_text().splitlines() if not line.startswith("#"))
    assert float(prom['hpcad_nightly_nodes{outcome="retired"}']) == 1
    assert float(prom['hpcad_nightly_nodes{outcome="silent"}']) == 0 and 'hpcad_node_alarm{node="node0001"}' not in prom
    # back in service on 01-12: scored again, settling after its change
    changes.write_text(changes.read_text() + "node0001,2025-01-12,back from the test partition,changed\n")
    hpcad("nightly", *args, "nightly.date=2025-01-12", "report.enabled=false")
    assert [r["node"] for r in csv.DictReader(open(out / "2025-01-12" / "levels.csv"))] == [
        "node0000", "node0001", "node0002"]
    assert all(a["settling"]["since"] == "2025-01-12"
               for a in json.loads((out / "2025-01-12" / "alarms.json").read_text()) if a["node"] == "node0001")
    changes.write_text("node,since,kind\nnode0001,2025-01-11,gone\n")
    p = hpcad("nightly", *args, "nightly.date=2025-01-12", check=False)
    assert p.returncode == 2 and f"{changes}, line 2: kind='gone' for node node0001: one of changed, retired" in p.stderr


@pytest.mark.parametrize("where", ["cluster", "rack"])
def test_a_cooling_fault_across_the_cluster_is_one_event_not_an_incident_per_node(site, tmp_path, where):
    """The machine room's cooling fails from 02:00 to 05:00: every node runs hotter and draws more power.
    Before, each node's model opened its own incident (for draining once they stayed open) and the
    notification listed them one by one; now those hours are one cluster-wide event. ``rack``: only
    rack r1's two nodes (nightly.groups), an event of that rack."""
    hot = ["node0000", "node0001", "node0002"] if where == "cluster" else ["node0000", "node0001"]
    day = "2025-01-09"
    (tmp_path / "in" / day).mkdir(parents=True)
    for f in sorted((site / "daily" / day).glob("*.csv")):
        x = pd.read_csv(f)
        cols = [c for c in x.columns if c.startswith(("temp", "pow", "fan"))]
        if f.stem in hot:
            x.loc[24:59, cols] *= 1.3
        x.to_csv(tmp_path / "in" / day / f.name, index=False)
    racks = tmp_path / "racks.csv"
    racks.write_text("node,group\nnode0000,r1\nnode0001,r1\nnode0002,r2\n")
    hook = tmp_path / "notify.sh"
    hook.write_text(f'#!/bin/sh\necho "$HPCAD_NEW_INCIDENTS $HPCAD_CLUSTER_EVENTS $1" > {tmp_path / "notified"}\n')
    hook.chmod(0o755)
    out = tmp_path / "nightly"
    p = hpcad("nightly", f"train_run={site / 'trainrun'}", f"nightly.input='{tmp_path}/in/{{date}}'", f"nightly.out={out}",
              f"nightly.date={day}", "compute.progress=false", f"hydra.run.dir={tmp_path / 'log'}",
              "nightly.event_min_nodes=2", "nightly.event_share=0.9", f"nightly.notify={hook}",
              f"nightly.groups={racks}")
    events = json.loads((out / day / "events.json").read_text())
    # the cooling fault's hours (a rack: node0002's own alarm at 04:xx makes that hour cluster-wide too, by the rule)
    (event,) = [e for e in events if e["start"] <= f"{day}T02:00:00+00:00" and e["end"] >= f"{day}T05:00:00+00:00"]
    assert event["scope"] == ("cluster" if where == "cluster" else "r1") and event["nodes"] == len(hot)
    alarms = json.loads((out / day / "alarms.json").read_text())
    held = sorted(a["node"] for a in alarms if a.get("cluster_event") == event["id"])
    assert held == hot
    incidents = json.loads((out / day / "incidents.json").read_text())
    # what is left are the nodes' own alarms (node0001's of the afternoon, utilisation), none of the cooling fault's
    left = [(i["node"], i["cause"], i["peak_time"][11:13]) for i in incidents]
    assert ("node0001", "util", "17") in left and not [x for x in left if "02" <= x[2] < "05"], incidents
    said = p.stdout + p.stderr
    assert ("cluster-wide event 2025-01-09T" in said and "3 of 3 scored nodes alarmed" in said if where == "cluster"
            else "group event 2025-01-09T" in said and "2 of 2 scored nodes of group r1 alarmed" in said), said[-3000:]
    assert (tmp_path / "notified").read_text().split()[:2] == [str(len(incidents)), str(len(events))]
    assert f"hpcad_nightly_cluster_events {len(events)}" in (out / "hpcad.prom").read_text()
    report = (out / day / "report.html").read_text()
    assert f"<h2>Cluster-wide events ({len(events)})</h2>" in report and f"{len(hot)} of {len(hot)} (100%)" in report
    held_in = {r["node"]: r["held"] for r in csv.DictReader(open(out / day / "levels.csv"))}
    assert all(f"event {event['id']}" in held_in[node] for node in hot)
    assert f"alarms held: event {event['id']}" in (out / day / "nodes" / "node0000.html").read_text()
    lines = [json.loads(x) for x in (out / day / "alarms.jsonl").read_text().splitlines()]
    assert all(x["incident"] is None for x in lines if x.get("cluster_event"))


def test_a_cooling_fault_across_midnight_is_one_event_over_two_nights_notified_once(site, tmp_path):
    """The machine room's cooling fails at 22:00 and is fixed at 03:00: two nights score it. Before,
    the second night's hours were a new event with a new id and the notify hook paged again; now
    they continue the first night's event (its id, first start, two nights), the hook is not run
    for it alone, and the report and the log say it goes on."""
    days = ["2025-01-09", "2025-01-10"]
    for day, rows in zip(days, [slice(264, 288), slice(0, 36)]):
        (tmp_path / "in" / day).mkdir(parents=True)
        for f in sorted((site / "daily" / day).glob("*.csv")):
            x = pd.read_csv(f)
            cols = [c for c in x.columns if c.startswith(("temp", "pow", "fan"))]
            x.loc[x.index[rows], cols] *= 1.3
            x.to_csv(tmp_path / "in" / day / f.name, index=False)
    hook = tmp_path / "notify.sh"
    hook.write_text(f'#!/bin/sh\necho "$HPCAD_NIGHT $HPCAD_CLUSTER_EVENTS $HPCAD_NEW_CLUSTER_EVENTS" >> '
                    f'{tmp_path / "notified"}\n')
    hook.chmod(0o755)
    out = tmp_path / "nightly"
    p = hpcad("nightly", f"train_run={site / 'trainrun'}", f"nightly.input='{tmp_path}/in/{{date}}'", f"nightly.out={out}",
              f"nightly.date={days[0]}..{days[1]}", "compute.progress=false", f"hydra.run.dir={tmp_path / 'log'}",
              "nightly.event_min_nodes=2", "nightly.event_share=0.9", f"nightly.notify={hook}", *FEW_PLOTS)
    first, second = (json.loads((out / d / "events.json").read_text()) for d in days)
    (evening,) = [e for e in first if e["end"] == "2025-01-10T00:00:00+00:00"]
    assert evening["start"] <= "2025-01-09T22:00:00+00:00" and evening["nights"] == 1 and "continues" not in evening
    (morning,) = [e for e in second if e["start"] == "2025-01-10T00:00:00+00:00"]
    # the fault ends at 03:00; node0000's alarm ends with the hour before (02:00 whitened, 02:10 unwhitened: its
    # threshold sits at the fault's fading end)
    assert morning["end"] >= "2025-01-10T02:00:00+00:00" and morning["scope"] == "cluster"
    assert (morning["id"], morning["first_start"], morning["nights"], morning["continues"]) == \
        (evening["id"], evening["start"], 2, days[0])
    assert {a["cluster_event"] for a in json.loads((out / days[1] / "alarms.json").read_text())
            if a["start"] < "2025-01-10T03:00:00+00:00" and "cluster_event" in a} == {evening["id"]}
    calls = (tmp_path / "notified").read_text().splitlines() if (tmp_path / "notified").exists() else []
    assert f"{days[0]} {len(first)} {len(first)}" in calls  # the evening's event paged
    assert not [c for c in calls if c.startswith(days[1]) and c.split()[2] != str(len(second) - 1)], calls
    assert f"(continued from the night before: since {evening['start']})" in (out / days[1] / "report.html").read_text()
    assert f"to {morning['end']} (continued from the night before: since {evening['start']})" in p.stdout + p.stderr


def test_a_one_row_glitch_at_midnight_is_no_alarm_and_a_fault_at_the_nights_end_still_is(site, tmp_path):
    """The collector restarts at midnight (a row of zeros at 00:00) and a value is read twice at 23:55
    (a row three times too high) on a night node0000 is otherwise normal. Before, the signal's
    centred smoothing repeated a night's first and last row for the rows beyond it, so a one-row
    glitch there weighed 13 of the 25 rows and alarmed (the same row at noon weighs one and does
    not); now the window holds the rows there are. A fault over node0001's last two hours of rows
    tonight still alarms."""
    day = "2025-01-13"
    src = tmp_path / "in" / day
    shutil.copytree(site / "daily" / day, src)
    f = pd.read_csv(src / "node0000.csv")
    assert (f.anomaly == 0).all()  # a normal night for node0000
    metrics = [c for c in f.columns if c not in ("timestamp", "anomaly")]
    f.loc[f.index[0], metrics] = 0.0
    f.loc[f.index[-1], metrics] *= 3
    assert f.timestamp.iloc[0].endswith("T00:00:00Z") and f.timestamp.iloc[-1].endswith("T23:55:00Z")
    f.to_csv(src / "node0000.csv", index=False)
    g = pd.read_csv(src / "node0001.csv")
    assert (g.anomaly == 0).all()
    g.loc[g.index[-24:], [c for c in metrics if c.startswith(("temp", "pow", "fan"))]] *= 1.5
    g.to_csv(src / "node0001.csv", index=False)
    out = tmp_path / "nightly"
    hpcad("nightly", f"train_run={site / 'trainrun'}", f"nightly.input='{tmp_path}/in/{{date}}'", f"nightly.out={out}",
          f"nightly.date={day}", "compute.progress=false", f"hydra.run.dir={tmp_path / 'log'}",
          "nightly.min_node_fraction=0.5", "report.enabled=false")
    alarms = list(csv.DictReader(open(out / day / "alarms.csv")))
    assert not [a for a in alarms if a["node"] == "node0000"], alarms
    (fault,) = [a for a in alarms if a["node"] == "node0001"]
    assert fault["end"] == g.timestamp.iloc[-1].replace("Z", "+00:00"), fault


def test_silent_nodes_and_missing_values_are_telemetry_gaps(site, tmp_path):
    """A node that sends nothing, one whose collector sends rows without values, and one whose
    collector lost two metrics and stopped part-way cannot alarm on what is missing. Before, the first
    went unmentioned (up to 10 % of the cluster, nightly.min_node_fraction), the second looked
    perfectly normal (a model sees no error where it sees no value), and so did the third (1 % of its
    values missing; until 2026-12-05 its stopping after a third of the night went unmentioned too)."""
    day = "2025-01-10"
    src = tmp_path / "in" / day
    shutil.copytree(site / "daily" / day, src)
    (src / "node0001.csv").unlink()
    f = pd.read_csv(src / "node0000.csv")
    f.loc[f.index[: int(len(f) * 0.8)], [c for c in f.columns if c not in ("timestamp", "anomaly")]] = np.nan
    f.to_csv(src / "node0000.csv", index=False)
    g = pd.read_csv(src / "node0002.csv")
    lost = ["ips_p1_3", "pow_p0"]  # in the store's metric order
    g.drop(columns=lost).iloc[:100].to_csv(src / "node0002.csv", index=False)  # its collector stopped at 08:20
    cut = (src / "node0002.csv").read_text()[:-25]  # and its collector was still writing the night's last row
    (src / "node0002.csv").write_text(cut)
    out = tmp_path / "nightly"
    # node0001 had an incident open the night before: with no rows tonight nothing ended it (before,
    # the night said it was resolved), so it stays open and the report says since when it is silent
    (out / "2025-01-09").mkdir(parents=True)
    (out / "2025-01-09" / "incidents.json").write_text(json.dumps([
        {"id": "node0001/ips/2025-01-08", "node": "node0001", "cause": "ips", "causes": ["ips"], "state": "ongoing",
         "first_night": "2025-01-08", "last_night": "2025-01-09", "nights": 2, "alarms": 3, "peak_score": 40.0,
         "peak_time": "2025-01-09T03:00:00+00:00", "top_metrics": [], "jobs": []}]))
    p = cron(_env_file(site, out, "nightly.min_node_fraction=0.5 nightly.input='" + str(tmp_path / "in") + "/{date}'"),
             "--date", day)
    assert p.returncode == 0, p.stderr[-3000:]
    silent = [i for i in json.loads((out / day / "incidents.json").read_text()) if i["node"] == "node0001"]
    assert [(i["state"], i["nights"], i["silent_since"]) for i in silent] == [("ongoing", 2, day)]
    assert "<td>ongoing (no rows since 2025-01-10)</td><td>node0001</td>" in (out / day / "report.html").read_text()
    levels = {r["node"]: float(r["missing_share"]) for r in csv.DictReader(open(out / day / "levels.csv"))}
    assert levels["node0000"] == pytest.approx(0.8, abs=0.01) and 0 < levels["node0002"] < 0.02 and "node0001" not in levels
    assert [(r["metrics_lost"], r["rows"], r["rows_expected"]) for r in csv.DictReader(open(out / day / "levels.csv"))] \
        == [("", "288", "288"), ("ips_p1_3;pow_p0", "99", "288")]  # 288 5-minute rows in a night
    page = (out / day / "report.html").read_text()
    assert "<h2>Telemetry gaps (3)</h2>" in page
    assert "<td>node0001</td><td>no rows tonight</td>" in page and "<td>node0000</td><td>80% of its values missing" in page
    assert ("<td>node0002</td><td>sent 99 of its 288 rows; 2 metric(s) reported in training sent no value: "
            "ips_p1_3, pow_p0</td>") in page
    prom = dict(line.rsplit(" ", 1) for line in (out / "hpcad.prom").read_text().splitlines() if not line.startswith("#"))
    assert float(prom['hpcad_nightly_nodes{outcome="silent"}']) == 1
    assert float(prom['hpcad_node_missing_share{node="node0000"}']) == pytest.approx(levels["node0000"])
    assert float(prom['hpcad_node_metrics_lost{node="node0002"}']) == 2
    assert float(prom['hpcad_node_metrics_lost{node="node0000"}']) == 0  # its share says it: not each metric again
    assert float(prom['hpcad_node_rows_missing_share{node="node0002"}']) == pytest.approx(1 - 99 / 288)
    assert float(prom['hpcad_node_rows_missing_share{node="node0000"}']) == 0
    assert float(prom['hpcad_node_alarm{node="node0001"}']) == 1  # silent, its incident still open
    # the row cut short is left out, and said where the operator looks: the night's report and a gauge
    assert re.search(r"<h2>Input warnings \(\d\)</h2>.*node0002\.csv: the last line has \d+ of \d+ fields", page, re.S)
    assert float(prom["hpcad_nightly_input_warnings"]) == int(re.search(r"Input warnings \((\d)\)", page).group(1))
    log = "".join(f.read_text() for f in (out / "logs").rglob("*") if f.is_file())
    assert "1 trained node(s) sent no telemetry: ['node0001']" in log
    assert "2 node(s) with telemetry gaps: node0000 (80% of its values missing), node0002 (sent 99 of its 288 rows; " \
           "2 metric(s)" in log


def test_a_sites_exports_in_local_time_are_read_in_the_zone_the_training_run_read_them_in(site, tmp_path):
    """A site whose exporter writes naive local times trains with data.timezone=Europe/Rome and sets
    HPCAD_TZ=Europe/Rome for the nightly job. Before, the night's exports were read as UTC (the data
    option's default): an hour of every night "outside the day" and every alarm time an hour off."""
    from omegaconf import OmegaConf

    trainrun = tmp_path / "trainrun"  # the site's training run, as trained with data.timezone=Europe/Rome:
    shutil.copytree(site / "trainrun", trainrun)  # its models and thresholds are the same (the zone moves
    tcfg = OmegaConf.load(trainrun / ".hydra" / "config.yaml")  # timestamps, not rows or values)
    tcfg.data.timezone = "Europe/Rome"
    OmegaConf.save(tcfg, trainrun / ".hydra" / "config.yaml")
    rows = pd.concat(pd.read_csv(site / "daily" / d / "node0000.csv") for d in ("2025-01-09", "2025-01-10"))
    local = pd.to_datetime(rows["timestamp"], utc=True).dt.tz_convert("Europe/Rome").dt.tz_localize(None)
    day = "2025-01-10"
    (tmp_path / "in" / day).mkdir(parents=True)
    rows.assign(timestamp=local.dt.strftime("%Y-%m-%d %H:%M:%S"))[local.dt.strftime("%Y-%m-%d") == day].to_csv(
        tmp_path / "in" / day / "node0000.csv", index=False)  # local midnight to 23:55, local time
    out = tmp_path / "nightly"
    env = _env_file(site, out, tz="Europe/Rome", extra="nightly.min_node_fraction=0.3")
    env.write_text(env.read_text().replace(str(site / "trainrun"), str(trainrun))
                   .replace(str(site / "daily"), str(tmp_path / "in")))
    p = cron(env, "--date", day)
    assert p.returncode == 0, p.stderr
    log = p.stdout + p.stderr
    assert "read its own: data.timezone=Europe/Rome" in log and "outside the day" not in log, log[-3000:]
    from hpcad.data.store import TelemetryStore

    ts = TelemetryStore(out / day / "store.h5").timestamps("node0000")
    first, last = (dt.datetime.fromtimestamp(int(t), dt.timezone.utc).isoformat() for t in (ts[0], ts[-1]))
    assert (first, last) == ("2025-01-09T23:00:00+00:00", "2025-01-10T22:55:00+00:00")  # CET is UTC+1
    # alarms.csv stays in UTC for the site's tools; the report shows the site's clock (HPCAD_TZ)
    starts = [a["start"] for a in csv.DictReader(open(out / day / "alarms.csv"))]
    assert starts and all(x.endswith("+00:00") for x in starts)
    page = (out / day / "report.html").read_text()
    local = [dt.datetime.fromisoformat(x).astimezone(dt.timezone(dt.timedelta(hours=1))).isoformat() for x in starts]
    assert all(f">{x}<" in page for x in local) and not any(f">{x}<" in page for x in starts), page[-3000:]


def test_a_second_run_waits_for_nobody_and_bad_setup_is_named(site, tmp_path):
    out = tmp_path / "nightly"
    out.mkdir()
    env = _env_file(site, out)
    with open(out / ".nightly.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = cron(env, "--date", "2025-01-09")
    assert p.returncode == 2 and "another nightly run holds the lock" in p.stderr
    assert not (out / "2025-01-09").exists() and not (out / "logs").exists()  # refused: touches nothing
    p = cron(tmp_path / "absent.env")
    assert p.returncode == 78 and "absent.env not readable" in p.stderr
    bad = tmp_path / "bad.env"
    bad.write_text("HPCAD_VENV=/nonexistent\n")
    p = cron(bad)
    assert p.returncode == 78 and "HPCAD_TRAIN_RUN is not set" in p.stderr
    p = cron(_env_file(site, out, name="days", more="HPCAD_LOG_DAYS=90d\n"))
    assert p.returncode == 78 and "HPCAD_LOG_DAYS=90d in " in p.stderr and not (out / "logs").exists()


def _listing(folder: Path) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _shifted(site: Path, dest: Path, node: str, since: str, scale: float) -> Path:
    """A copy of the site's day folders in which ``node``'s levels shift from the day ``since`` on
    (hpcad.bench.drift.apply_drift, ``scale`` times its shift)."""
    from hpcad.bench.drift import apply_drift
    from hpcad.data.node import NodeData

    shutil.copytree(site / "daily", dest)
    names = metric_names()
    for day in sorted(d.name for d in dest.iterdir() if d.name >= since):
        f = dest / day / f"{node}.csv"
        x = pd.read_csv(f)
        nd = NodeData(node, np.zeros(len(x), np.int64), x[names].to_numpy(np.float32), None)
        x[names] = apply_drift(nd, 0, names, scale).values
        x.to_csv(f, index=False)
    return dest


def test_backfill_detects_drift_and_light_retrains_only_later_nights(site, tmp_path):
    out = tmp_path / "nightly"
    trained = _listing(site / "trainrun")
    # from 2025-01-10 on node0002's levels shift (the site's: every row an alarm on 01-11) and
    # node0000's by 0.6 of that (most rows under its threshold); baseline = the first night; drift =
    # 2 nights at >= 1.5x it
    daily = _shifted(site, tmp_path / "daily", "node0000", "2025-01-10", 0.6)
    env = _env_file(site, out, "nightly.drift_ratio=1.5 nightly.drift_days=2 nightly.drift_reference_nights=1 "
                    "nightly.light_days=2 nightly.keep_data_days=2 nightly.notify=/bin/false nightly.drain=true",
                    daily=daily)
    p = cron(env, "--from", "2025-01-09", "--to", "2025-01-12")
    assert p.returncode == 0, p.stderr
    hist = _history(out)
    assert [h["date"] for h in hist] == ["2025-01-09", "2025-01-10", "2025-01-11", "2025-01-12"]
    last = (out / "2025-01-12" / "report.html").read_text()  # the newest report lists the nights so far
    assert "<h2>Last nights</h2>" in last and all(f"<td>{d}</td>" in last for d in
                                                   ("2025-01-09", "2025-01-10", "2025-01-11", "2025-01-12"))
    assert last.split("<h2>Last nights</h2>")[1].startswith('<img alt="plot" src="data:image/png;base64,')  # trend
    # each alarmed node's page shows the node over the nights so far, newest first (#15)
    pages = {d: sorted((out / d / "nodes").glob("*.html")) for d in ("2025-01-09", "2025-01-10", "2025-01-11",
                                                                        "2025-01-12")}
    assert any(pages.values())
    for d, files in pages.items():
        for page in files:
            text = page.read_text()
            assert "<h2>This node over the last nights</h2>" in text
            shown = [n for n in ("2025-01-12", "2025-01-11", "2025-01-10", "2025-01-09") if f"<td>{n}</td>" in text]
            assert shown == [n for n in ("2025-01-12", "2025-01-11", "2025-01-10", "2025-01-09") if n <= d], page
    # a failing notify hook is recorded and never fails a night
    assert all(h["status"] == "ok" for h in hist) and any(h["new_incidents"] not in ("", "0") for h in hist)
    assert all(h["notify"] == ("failed" if h["new_incidents"] != "0" else "") for h in hist)
    logged = p.stdout + p.stderr + "".join(f.read_text() for f in (out / "logs").rglob("*.log"))
    assert "nightly.notify failed" in logged
    # incidents carry over night to night: an ongoing one was open the night before, with the same id
    days = [h["date"] for h in hist]
    inc = {d: json.loads((out / d / "incidents.json").read_text()) for d in days}
    for before, after in zip(days, days[1:]):
        open_before = {i["id"] for i in inc[before] if i["state"] in ("new", "ongoing")}
        assert {i["id"] for i in inc[after] if i["state"] in ("ongoing", "resolved")} <= open_before
        assert all(i["first_night"] < after for i in inc[after] if i["state"] == "ongoing")
    # SLURM drain lines for incidents open 2+ nights, written but not run even with nightly.drain=true:
    # these nights are long past (a backfill, or cron catching up), and SLURM acts on a node as it is now.
    # Before, a backfill of last month drained nodes for last month's incidents.
    assert any("NodeName=" in (out / d / "drain.txt").read_text() for d in days)
    for d in days:
        confirmed = {i["node"] for i in inc[d] if i["state"] != "resolved" and i["nights"] >= 2}
        drain_txt = (out / d / "drain.txt").read_text()
        assert {ln.split()[2].removeprefix("NodeName=") for ln in drain_txt.splitlines()} == confirmed
        assert not (out / d / "drain.json").exists()
        assert "(an older night: not run; only last night's are)" in (out / d / "report.html").read_text()
    assert "drain command(s) are in drain.txt, not run (only last night's are)" in logged
    # telemetry and errors are kept for 2 nights before the newest, the rest of each night for good
    assert not (out / "2025-01-09" / "errors.h5").exists() and not (out / "2025-01-09" / "store.h5").exists()
    assert (out / "2025-01-10" / "errors.h5").exists() and (out / "2025-01-09" / "alarms.csv").exists()
    drift = {d: {v["node"]: v for v in json.loads((out / d / "drift.json").read_text())["nodes"]}
             for d in ("2025-01-09", "2025-01-10", "2025-01-11")}
    assert not drift["2025-01-09"]["node0002"]["drifted"] and not drift["2025-01-09"]["node0000"]["drifted"]
    assert drift["2025-01-11"]["node0002"]["drifted"] and drift["2025-01-11"]["node0000"]["drifted"]
    assert not drift["2025-01-11"]["node0001"]["drifted"]
    refits = json.loads((out / "2025-01-11" / "light.json").read_text())
    assert [r["node"] for r in refits] == ["node0000"] and refits[0]["valid_from"] == "2025-01-12"
    # node0002 alarmed on every row: a map fitted on them would learn its fault (or a change nobody
    # logged) as normal. Before, it got one, and from the next night its alarms faded; on the real
    # DAVIDE node that silenced 614 of 1,227 governor-fault rows (docs/operations.md).
    assert drift["2025-01-11"]["node0002"]["light"] == "withheld: 288 of 288 rows alarmed tonight"
    assert "light" not in drift["2025-01-11"]["node0000"]
    from hpcad.errorstore import ErrorStore
    from hpcad.threshold.rules import Thresholds

    th, fitted_on = Thresholds.load(site / "trainrun" / "thresholds.json"), 0
    for d in refits[0]["days"]:  # node0000's map learned its rows under its threshold only
        s = next(ErrorStore(out / d / "errors.h5").signals(["node0000"]))
        fitted_on += int(((s.signal <= np.quantile(s.signal, 0.9)) & (s.labels == 0)
                          & (th.signal_of(s) <= th.threshold_for("node0000"))).sum())
    assert refits[0]["days"] == ["2025-01-10", "2025-01-11"] and refits[0]["rows"] == fitted_on
    assert "no light map: 288 of 288 rows alarmed tonight" in (out / "2025-01-11" / "report.html").read_text()
    assert "get no light map: alarmed on most of their rows tonight" in logged
    tonight = json.loads((out / "2025-01-12" / "incidents.json").read_text())
    assert any(i["node"] == "node0002" and i["state"] in ("new", "ongoing") for i in tonight)  # still alarms
    # the maps are the nightly job's: in its output, not in the training run, which stays as trained
    # (another account may own it; two nightly outputs may share it). Before, they went into
    # trainrun/models, and a nightly run by a user who cannot write there stopped with a traceback.
    assert (out / "light" / "node0000" / f"v{refits[0]['version']}-from-2025-01-12.pt").exists()
    assert not (out / "light" / "node0002").exists()
    assert _listing(site / "trainrun") == trained
    import h5py

    with h5py.File(out / "2025-01-12" / "errors.h5") as f:
        assert f["nodes/node0000"].attrs["light_version"] >= 1  # later nights use the map
        assert f["nodes/node0002"].attrs["light_version"] == 0
    lv = {d: {r["node"]: float(r["level"]) for r in csv.DictReader(open(out / d / "levels.csv"))}
          for d in ("2025-01-11", "2025-01-12")}
    assert lv["2025-01-12"]["node0000"] < lv["2025-01-11"]["node0000"] / 1.5  # the map absorbed the shift
    from hpcad.model.light import model_digest

    assert {r["node"]: r["model"] for r in csv.DictReader(open(out / "2025-01-12" / "levels.csv"))} == \
        {n: model_digest(site / "trainrun" / "models" / f"{n}.pt") for n in ("node0000", "node0001", "node0002")}
    prom = (out / "hpcad.prom").read_text()
    p = cron(env, "--date", "2025-01-10")  # re-scoring an earlier night ignores maps fitted after it
    assert p.returncode == 0, p.stderr
    with h5py.File(out / "2025-01-10" / "errors.h5") as f:
        assert f["nodes/node0000"].attrs["light_version"] == 0
    assert (out / "hpcad.prom").read_text() == prom  # an older night never turns the gauges back
    maps = sorted(f.name for f in (out / "light").rglob("*.pt"))
    p = cron(env, "--date", "2025-01-11")  # the night that refitted, again: its map replaced, none added
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (out / "light").rglob("*.pt")) == maps
    assert _listing(site / "trainrun") == trained


def _browse(chromium: str, page: Path, script: str = "") -> str:
    """The DOM of ``page`` in headless Chromium after load, with ``script`` run first and the count of
    decoded images in ``data-images``."""
    probe = page.with_name(f".probe-{page.name}")  # beside the page: its relative links still resolve
    probe.write_text(page.read_text().replace("</body>", "<script>window.addEventListener('load', () => {"
                     + script + "document.body.setAttribute('data-images', [...document.images].filter("
                     "i => i.complete && i.naturalWidth > 0).length + '/' + document.images.length);});"
                     "</script></body>"))
    try:
        return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--disable-background-networking", "--virtual-time-budget=10000", "--dump-dom",
                               probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()


def test_nightly_report_renders_in_headless_chromium(uninterrupted_night, chromium):
    folder = uninterrupted_night / "2025-01-10"  # a night as cron runs it (_browse leaves the folder as it was)
    page = (folder / "report.html").read_text()
    alarms = json.loads((folder / "alarms.json").read_text())
    node = alarms[0]["node"]
    # sort by peak score (two clicks: descending), then filter on one node, the way a person would
    dom = _browse(chromium, folder / "report.html",
                  "const t=document.getElementById('alarms'),th=[...t.tHead.rows[0].cells];"
                  "const peak=th.findIndex(h=>h.textContent==='peak_score');th[peak].click();th[peak].click();"
                  "document.body.setAttribute('data-first-peak',t.tBodies[0].rows[0].cells[peak].dataset.v);"
                  f"const f=document.getElementById('alarms-filter');f.value='{node}';"
                  "f.dispatchEvent(new Event('input'));"
                  "document.body.setAttribute('data-shown',[...t.tBodies[0].rows].filter(r=>r.style.display!=='none')"
                  ".length);document.body.setAttribute('data-link',t.querySelector('a').getAttribute('href'));")
    n = page.count("<img ")
    assert n >= 4 and f'data-images="{n}/{n}"' in dom  # every plot decoded
    assert "<h2>Alarmed nodes" not in page  # a night's node view is its Incidents section
    for section in ("Last nights", "Cluster overview", "Incidents", "Drift", "Alarm signal", "Mean error profile per class",
                    "Training", f"Alarms ({len(alarms)})"):
        assert f"<h2>{section}</h2>" in dom
    first = float(dom.split('data-first-peak="')[1].split('"')[0])
    assert first == pytest.approx(max(a["peak_score"] for a in alarms), rel=1e-6)  # sorted, highest first
    assert f'data-shown="{sum(a["node"] == node for a in alarms)}"' in dom  # filtered to one node's alarms
    link = dom.split('data-link="')[1].split('"')[0]
    node_page = folder / link
    assert node_page.is_file() and node_page.parent.name == "nodes"  # an alarm leads to its node's page
    dom = _browse(chromium, node_page)
    n = node_page.read_text().count("<img ")
    assert n == 3 and f'data-images="{n}/{n}"' in dom and "report.html" in dom  # signal, errors, values


def test_light_map_fits_a_level_shift_in_closed_form_and_loads_safely(tmp_path):
    spec = AutoencoderSpec([8])
    params = [glorot_init(spec, 6, seed=1)]  # a one-member model
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    shifted = x + np.float32(2.0)
    lm = fit_light_map(params, 1, shifted, ridge=10.0, fitted_on=["d1"])
    from hpcad.model.light import recon_and_code

    recon, code = recon_and_code(params, 1, shifted)
    before = float(((recon - torch.from_numpy(shifted).double()) ** 2).mean())
    after = float(((lm.apply(recon.float(), code.float()).double() - torch.from_numpy(shifted).double()) ** 2).mean())
    assert after < 0.5 * before
    huge = fit_light_map(params, 1, shifted, ridge=1e9, fitted_on=["d1"])
    assert float(huge.delta[:-1].abs().max()) < 1e-3  # strong ridge: the old model, plus only a bias
    maps = LightMaps(tmp_path / "light")
    maps.save("n1", lm)  # version 1, valid from any night
    lm2 = fit_light_map(params, 1, shifted, 10.0, ["d2"], previous=lm, valid_from="2025-01-05")
    assert lm2.version == 2 == maps.next_version("n1", "2025-01-05")
    maps.save("n1", lm2)
    assert maps.for_night("n1", "2025-01-04").version == 1
    assert maps.for_night("n1", "2025-01-05").version == 2 and maps.for_night("n1").version == 2
    # A night of 01-03 scored late (a backfill) refits a map valid from 01-04 (version 3): it scores
    # 01-04 on, but the map fitted on later nights keeps scoring from 01-05 (before: version 3 scored
    # every later night, the newest version wins). Its rerun replaces it (the same files after a rerun)
    rerun = fit_light_map(params, 1, shifted, 10.0, ["d3"], valid_from="2025-01-04")
    rerun.version = maps.next_version("n1", "2025-01-04")
    maps.save("n1", rerun)
    assert [maps.for_night("n1", d).version for d in ("2025-01-03", "2025-01-04", "2025-01-05")] == [1, 3, 2]
    assert maps.for_night("n1").version == 2
    assert maps.next_version("n1", "2025-01-04") == 3 and maps.next_version("n1", "2025-01-07") == 4
    maps.save("n3", fit_light_map(params, 1, shifted, 10.0, ["d9"], valid_from="2025-01-09"))
    assert maps.for_night("n3", "2025-01-08") is None  # a rerun of an earlier night scores without it
    assert maps.for_night("n4", "2025-01-08") is None and maps.next_version("n4", "2025-01-08") == 1  # never refitted
    # maps an older hpcad wrote beside the models are still read (never written); versions go on after them
    models = tmp_path / "models"
    models.mkdir()
    (models / "n5.pt").write_bytes(b"")
    old = fit_light_map(params, 1, shifted, 10.0, ["d1"], valid_from="2025-01-02")
    old.version = 7
    old.save(models / "n5.light-v7.pt")
    old.save(models / "n5.light.pt")
    both = LightMaps(tmp_path / "light", models)
    assert both.for_night("n5", "2025-01-03").version == 7 and both.for_night("n5", "2025-01-01") is None
    assert both.next_version("n5", "2025-01-03") == 8 and both.next_version("n1", "2025-01-09") == 4
    assert model_nodes(models) == ["n5"]  # light maps beside a model are not models (sweeps, nightly)
    assert both.for_night("n5").model == ""  # an older hpcad did not record the model: applied
    # a map fitted for another model file of the node (the job pointed at a new training run, the node
    # retrained) is not applied: it corrects the reconstructions of a model that no longer scores
    (models / "n1.pt").write_bytes(b"the trained model")
    fitted = LightMaps(tmp_path / "light", models)
    lm4 = fit_light_map(params, 1, shifted, 10.0, ["d4"], valid_from="2025-01-06")
    lm4.version, lm4.model = fitted.next_version("n1", "2025-01-06"), fitted.digest("n1")
    fitted.save("n1", lm4)
    assert fitted.for_night("n1", "2025-01-06").version == 4
    assert maps.for_night("n1", "2025-01-06").version == 4  # without the models to check against: applied
    (models / "n1.pt").write_bytes(b"another training run's model")
    assert LightMaps(tmp_path / "light", models).for_night("n1", "2025-01-06") is None
    (tmp_path / "light" / "n2").mkdir()
    torch.save({"format": "hpcad-light-map", "evil": object()}, tmp_path / "light" / "n2" / "v1-from-any.pt")
    with pytest.raises(Exception, match="cannot load light map"):
        maps.for_night("n2")  # weights_only refuses pickled objects


def test_only_last_nights_drain_commands_run():
    from zoneinfo import ZoneInfo

    from hpcad.nightly.days import yesterday
    from hpcad.nightly.drain import last_night

    last = yesterday(ZoneInfo("Europe/Rome"))
    assert last_night(last, "Europe/Rome") and last_night(last + dt.timedelta(days=1), "Europe/Rome")
    assert not last_night(last - dt.timedelta(days=1), "Europe/Rome")
    from hpcad.config import NightlyConfig
    from hpcad.nightly.sections import _drain_said

    rome = dict(timezone="Europe/Rome")  # with nightly.drain off, not even last night's run
    assert _drain_said(last.isoformat(), NightlyConfig(drain=False, **rome)) == " (nightly.drain=false: not run)"
    assert _drain_said(last.isoformat(), NightlyConfig(drain=True, **rome)) == " and were run (drain.json)"
    assert _drain_said((last - dt.timedelta(days=1)).isoformat(), NightlyConfig(drain=True, **rome)) == \
        " (an older night: not run; only last night's are)"


def test_drift_is_a_sustained_rise_over_the_nodes_baseline(tmp_path):
    day = dt.date(2025, 1, 10)
    for k, level in ((4, 1.0), (3, 1.2), (2, 0.9), (1, 2.5)):  # three baseline nights, then a rise
        d = tmp_path / (day - dt.timedelta(days=k)).isoformat()
        d.mkdir()
        write_levels(d / "levels.csv", [{"node": "a", "rows": 288, "alarmed_rows": 0, "level": level}])
    v = assess(tmp_path, day, [{"node": "a", "level": 3.0}], ratio=2.0, days=2, reference=3)
    assert v[0]["baseline"] == 1.0 and v[0]["streak"] == 2 and v[0]["drifted"]
    v = assess(tmp_path, day, [{"node": "a", "level": 3.0}], ratio=2.0, days=3, reference=3)
    assert v[0]["streak"] == 2 and not v[0]["drifted"]  # the night before the rise was normal
    v = assess(tmp_path, day, [{"node": "a", "level": 1.5}], ratio=2.0, days=1, reference=3)
    assert not v[0]["drifted"]
    v = assess(tmp_path, day, [{"node": "new", "level": 9.0}], ratio=2.0, days=1, reference=3)
    assert v[0]["baseline"] is None and not v[0]["drifted"]  # no baseline nights yet: no verdict


def test_drift_compares_a_node_with_the_nights_of_the_model_that_scores_it(tmp_path):
    """The docs' full retraining (HPCAD_TRAIN_RUN pointed at a new run): the new models' levels were
    compared with the old models' first nights, another model's errors (here the old model ran at
    level 1 and the new one runs at 3: "drifted" on its first nights, and its light maps refitted
    for no shift at all). A node's baseline is now its first nights with tonight's model, so the new
    run's nights start their own; a node first scored on a later night gets one too (before, only
    the output's first three nights counted)."""
    day = dt.date(2025, 1, 20)
    for k in range(9, 0, -1):  # nights 01-11 .. 01-19: model "old" for 6 nights, then "new" for 3
        d = tmp_path / (day - dt.timedelta(days=k)).isoformat()
        d.mkdir()
        rows = [{"node": "a", "rows": 288, "alarmed_rows": 0, "level": 1.0 if k > 3 else 3.0,
                 "model": "old" if k > 3 else "new"}]
        if k <= 4:  # node b joined on 01-16, with the new run's model
            rows.append({"node": "b", "rows": 288, "alarmed_rows": 0, "level": 2.0, "model": "new"})
        write_levels(d / "levels.csv", rows)
    tonight = [{"node": "a", "level": 3.1, "model": "new"}, {"node": "b", "level": 2.1, "model": "new"}]
    v = {x["node"]: x for x in assess(tmp_path, day, tonight, ratio=2.0, days=3, reference=3)}
    assert v["a"]["baseline"] == 3.0 and v["a"]["streak"] == 0 and not v["a"]["drifted"]
    assert v["b"]["baseline"] == 2.0 and not v["b"]["drifted"]
    # the new model drifting: compared with its own first nights
    v = {x["node"]: x for x in assess(tmp_path, day, [{"node": "a", "level": 7.0, "model": "new"}], 2.0, 1, 3)}
    assert v["a"]["baseline"] == 3.0 and v["a"]["drifted"]
    # retrained once more tonight: no baseline yet, and the report says why (a new node just has none)
    v = {x["node"]: x for x in assess(tmp_path, day, [{"node": "a", "level": 3.1, "model": "newer"},
                                                      {"node": "c", "level": 1.0, "model": "c1"}], 2.0, 1, 3)}
    assert v["a"]["baseline"] is None and v["a"]["new_model"] and not v["c"]["new_model"]
    from hpcad.nightly.sections import _no_baseline

    assert _no_baseline(v["a"]) == "no baseline yet (new model)" and _no_baseline(v["c"]) == "no baseline yet"
    # levels.csv written before models were recorded count as tonight's model's
    (tmp_path / "2025-01-11" / "levels.csv").write_text("node,rows,alarmed_rows,level\na,288,0,1.0\n")
    v = assess(tmp_path, day, [{"node": "a", "level": 3.1, "model": "old"}], 2.0, 1, 3)
    assert v[0]["baseline"] == 1.0 and v[0]["drifted"]


def test_overview_bins_hours_days_or_rows():
    from hpcad.report.plots import overview_grid
    from hpcad.errorstore import NodeSignal
    from hpcad.threshold.rules import Thresholds

    th = Thresholds("cost", "node", nodes={"a": 10.0, "b": 10.0})
    day = [NodeSignal("a", np.array([5.0, 30.0, 1.0]), np.full(3, 2), None, np.array([0, 300, 7200])),
           NodeSignal("b", np.array([2.0]), np.full(1, 2), None, np.array([3600]))]
    grid, t0, step = overview_grid(day, th)
    assert (t0, step) == (0, 3600)
    np.testing.assert_array_equal(grid, [[3.0, np.nan, 0.1], [np.nan, 0.2, np.nan]])  # hourly peak / threshold
    month = [NodeSignal("a", np.ones(2), np.full(2, 2), None, np.array([0, 30 * 86400]))]
    assert overview_grid(month, th)[2] == 86400
    rows = [NodeSignal("a", np.ones(1000), np.full(1000, 2), None, np.arange(1000))]  # no timestamps: row numbers
    grid, t0, step = overview_grid(rows, th, "row")
    assert step == 5 and grid.shape == (1, 200)
    late = [NodeSignal("a", np.array([5.0, 30.0]), np.full(2, 2), None, np.array([9 * 3600 + 900, 10 * 3600 + 600]))]
    grid, t0, step = overview_grid(late, th)  # a night starting at 09:15: hours from 09:00, as labelled
    assert (t0, step) == (9 * 3600, 3600)
    np.testing.assert_array_equal(grid, [[0.5, 3.0]])


def test_the_nightly_scoring_job_has_its_own_size():
    """#16 item 14: one CPU task with --mem by default, not the training script's 4 tasks x 4 GPUs."""
    from omegaconf import OmegaConf

    from hpcad.config import HpcadConfig
    from hpcad.errors import ConfigError
    from hpcad.nightly import scoring_job_size

    cfg = OmegaConf.structured(HpcadConfig)
    assert scoring_job_size(cfg) == ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=8",
                                     "--mem=4096M", "--time=01:00:00"]
    cfg.nightly.job_tasks, cfg.nightly.job_mem_mb = 4, 2000
    assert "--mem=8000M" in scoring_job_size(cfg)  # per node: tasks x per task
    cfg.nightly.job_mem_mb = 0
    with pytest.raises(ConfigError, match="nightly.job_mem_mb=0"):
        scoring_job_size(cfg)
