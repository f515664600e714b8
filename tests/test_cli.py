"""The pipeline as users run it: `hpcad <stage> [overrides]` in a subprocess."""
import csv
import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import SMALL, generate, hpcad


def test_run_on_the_embedded_default_writes_every_output(tmp_path, monkeypatch):
    run = tmp_path / "run"
    every_baseline = [a for a in SMALL if not a.startswith("baselines.methods")]  # the default: all five
    out = hpcad("run", f"hydra.run.dir={run}", *every_baseline).stdout
    assert f"report at {run / 'report.html'}" in out
    for name in ("store.h5", "errors.h5", "thresholds.json", "alarms.csv", "metrics.json", "report.html",
                 "models/node0000.pt", "baselines/kde.h5", ".hydra/config.yaml"):
        assert (run / name).exists(), name
    assert "run done" in (run / "run.log").read_text() and not (run / "cli.log").exists()  # the log names the stage
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["splits"]) == {"train", "val", "test", "eval"}
    assert set(m["baselines"]) == {"kde", "iforest", "pca", "knn", "range"}
    assert {"cost", "false_alarms", "missed", "precision", "recall", "f1", "mean_delay_s",
            "false_alarms_per_node_day", "ranking"} <= set(m["splits"]["test"])
    for part in (m["splits"]["eval"], *(b["splits"]["eval"] for b in m["baselines"].values())):
        r = part["ranking"]  # threshold-free figures, for the autoencoder and every baseline
        assert r["nodes"] >= 1 and 0 < r["ap"] <= 1 and 0 < r["roc_auc"] <= 1 and 0 < r["best_f1"] <= 1
    assert m["threshold_check"]["verdict"] in ("ok", "always_alarm", "never_alarm")
    assert "0" in m["class_profiles"] and len(m["class_profiles"]) >= 3  # normal + anomaly classes
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Detection quality" in html
    assert "<b>range</b> is no model" in html  # the baseline a reader would not know, explained beside the table
    with open(run / "alarms.csv") as fh:
        rows = list(csv.DictReader(fh))
    alarmed = len({r["node"] for r in rows})  # the summary line: nodes, metrics, alarms and alarmed nodes
    assert f"{len(rows)} alarm events on {alarmed} node{'s' * (alarmed != 1)};" in html
    # the terminal's last lines: the alarms, the test split's cost and average precision, the baselines' cost
    t, b = m["splits"]["test"], m["baselines"]
    assert f"hpcad: {len(rows)} alarm events on {alarmed} of 3 nodes -> {run / 'alarms.csv'}\n" in out  # SMALL: 3
    assert (f"hpcad: test split: cost {t['cost']:,.0f} ({t['false_alarms']:,} false-alarm rows x 1 + {t['missed']:,} "
            f"missed rows x 5), {t['events_detected']} of {t['events']} labelled anomalies found") in out, out
    assert f"average precision {m['splits']['eval']['ranking']['ap']:.3f} (validation and test rows)" in out
    assert "hpcad: the baselines' cost there, same rule: " + ", ".join(
        f"{k} {v['splits']['test']['cost']:,.0f}" for k, v in b.items()) in out
    # the threshold stage again, in a log (no terminal): a line on how far its passes got, at most one
    # a minute (here every node), for the alarms and for each baseline's figures
    from hpcad import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    again = [a for a in every_baseline if a != "compute.progress=false"]
    said = hpcad("threshold", f"hydra.run.dir={run}", *again).stdout  # the log (Hydra's console: stdout)
    for what in ("alarms", *(f"baseline {k}" for k in b)):
        assert f"threshold: {what}: 1/3 nodes" in said and f"threshold: {what}: 2/3 nodes" in said, (what, said[-2000:])
    assert rows and rows[0]["top_metrics"].count(":") == 8  # top-k metrics per alarm
    assert len(rows[0]["top_x_normal"].split()) == 8  # and how many times their normal error each carries
    with h5py.File(run / "errors.h5") as f:
        g = f["nodes/node0000"]
        T = g["signal"].shape[0]
        assert g["error"].shape == (T, 160) and g["split"].shape == g["labels"].shape == (T,)
        row = float(g["signal_row"][5])
        assert abs(float(g["error"][5].sum()) - row) < 1e-3 * max(1.0, row)  # the row's signal: its errors' sum
        assert g.attrs["smooth"] >= 1 and g["signal"].shape == (T,) and g["normal_error"].shape == (160,)
    # alarms.json: the same alarms, each top metric with what it read at the alarm's loudest row, what the
    # node's model expected there (computed over the node's whole series, as the node pages do) and its
    # training range, in the metric's own units (a run's, as a night's: before 2026-12-05 only the nightly)
    from hpcad.data.store import TelemetryStore
    from hpcad.explain import expected_values
    from hpcad.model.files import NodeModel

    js = json.loads((run / "alarms.json").read_text())
    fill = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["preprocess"]["nan_fill_limit"]
    assert [(a["node"], a["start"], a["split"]) for a in js] == [(r["node"], r["start"], r["split"]) for r in rows]
    store = TelemetryStore(run / "store.h5")
    for a in js:
        data, model = store.read(a["node"]), NodeModel.load(run / "models" / f"{a['node']}.pt")
        row = int(np.flatnonzero(data.timestamp == int(np.datetime64(a["loudest_time"][:19], "s").astype(int)))[0])
        expected = expected_values(model, data.values, np.array([row]), fill)[0]
        lo, hi = model.scaler.training_range()
        assert len(a["top_metrics"]) == 8 and a["start"] <= a["loudest_time"] <= a["end"]
        for m in a["top_metrics"]:
            j = model.metrics.index(m["metric"])
            assert m["observed"] == pytest.approx(float(data.values[row, j]), rel=1e-5, abs=1e-9)
            assert m["expected"] == pytest.approx(float(expected[j]), rel=1e-5, abs=1e-6 * float(hi[j] - lo[j]))
            assert m["training_range"] == pytest.approx([float(lo[j]), float(hi[j])], rel=1e-5)
    obj = torch.load(run / "models/node0000.pt", weights_only=True)  # no pickled code in model files
    assert obj["format"] == "hpcad-node-model" and obj["spec"]["hidden"] == [64]
    # how often the alarms' causes name the synthetic faults, under both rankings of the top metrics
    # (the same alarms under each)
    hpcad("bench", "bench.mode=explain", f"train_run={run}", "compute.progress=false", f"hydra.run.dir={tmp_path / 'b'}")
    b = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert b["mode"] == "explain" and b["top_k"] == 8
    count = {rk: {(sp, c): n for sp, d in b[rk].items() for c, (_, n) in d.items()} for rk in ("times_normal", "error")}
    assert count["times_normal"] == count["error"] and sum(count["error"].values()) > 0
    assert all(0 <= right <= n for rk in ("times_normal", "error") for d in b[rk].values() for right, n in d.values())
    assert {c for sp, c in count["error"]} <= {"1", "2", "3", "4"}
    bad = hpcad("bench", "bench.mode=explain", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and "bench.mode=explain: set train_run" in bad.stderr
    # new thresholds, the report turned off: the report.html left in the folder is an earlier one,
    # said so, and not pointed at as the run's report (before: "hpcad: report at .../report.html")
    earlier = (run / "report.html").read_bytes()
    hpcad("threshold", f"hydra.run.dir={run}", *every_baseline, "threshold.drift=0")
    p = hpcad("report", f"hydra.run.dir={run}", *every_baseline, "report.enabled=false")
    assert "report at" not in p.stdout and "(no report: report.enabled=false)" in p.stdout
    assert f"report.enabled=false: {run / 'report.html'} is an earlier report" in (run / "report.log").read_text()
    assert (run / "report.html").read_bytes() == earlier  # left as it was


def test_seed_ensemble_and_windowed_model_train_and_score_end_to_end(tmp_path):
    run = tmp_path / "run"
    hpcad("run", f"hydra.run.dir={run}", *SMALL, "model.members=2", "model.window=3", "report.enabled=false")
    obj = torch.load(run / "models/node0000.pt", weights_only=True)
    assert obj["spec"]["members"] == 2 and obj["spec"]["window"] == 3 and len(obj["members"]) == 2
    assert obj["members"][0][0].shape == (3 * 160, 64)  # a member's first layer reads the 3-row window
    assert len(obj["history"]["members"]) == 2 and obj["signal_scale"] > 0
    # the members' per-metric held-out errors (signal.metric_scales): their sum is the node's level
    assert obj["holdout_error"].shape == (160,) and obj["holdout_error"].min() >= 0
    assert float(obj["holdout_error"].double().sum()) == pytest.approx(obj["signal_scale"], rel=1e-4)
    with h5py.File(run / "errors.h5") as f:
        g = f["nodes/node0001"]
        assert g["error"].shape == (g["signal"].shape[0], 160) and np.isfinite(g["signal"][()]).all()
    assert json.loads((run / "metrics.json").read_text())["splits"]["eval"]["ranking"]["nodes"] >= 1
    # one member: its level and held-out errors are the newest row's too, as scoring measures them
    # (before: the training pass's, over the whole 3-row window: 480 errors, a level ~3x too high)
    one = tmp_path / "one"
    hpcad("train", f"hydra.run.dir={one}", *SMALL, "model.window=3")
    from hpcad.model.files import NodeModel

    m = NodeModel.load(one / "models/node0000.pt")
    assert m.holdout_error.shape == (160,) and float(m.holdout_error.sum()) == pytest.approx(m.signal_scale, rel=1e-4)
    m.holdout_error, m.signal_scale = np.ones(480, np.float32), 3 * m.signal_scale  # as an older hpcad wrote it
    m.save(one / "models/node0000.pt")
    hpcad("train", f"hydra.run.dir={one}", *SMALL, "model.window=3")
    assert "node0000.pt: a windowed model whose normal level was measured over its whole window" in \
        (one / "train.log").read_text()
    assert NodeModel.load(one / "models/node0000.pt").holdout_error.shape == (160,)


def test_stages_one_by_one_and_resume(tmp_path):
    run = tmp_path / "run"
    common = [f"hydra.run.dir={run}", *SMALL]
    hpcad("ingest", *common)
    assert (run / "store.h5").exists() and not (run / "models").exists()
    assert "3 node models" in hpcad("train", *common).stdout
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    (run / "models" / "node0001.pt").unlink()  # as if the job was preempted before this node finished
    hpcad("train", *common)
    after = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    assert after["node0000.pt"] == mtimes["node0000.pt"] and after["node0002.pt"] == mtimes["node0002.pt"]
    assert "node0001.pt" in after
    for stage in ("score", "threshold", "report"):
        hpcad(stage, *common)
    assert (run / "report.html").exists() and (run / "thresholds.json").exists()
    first = (run / "alarms.csv").read_text()
    hpcad("threshold", *common)
    assert (run / "alarms.csv").read_text() == first  # rerun is idempotent
    assert oct((run / "alarms.csv").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600
    # A truncated model file is retrained, not taken as finished.
    (run / "models" / "node0002.pt").write_bytes((run / "models" / "node0002.pt").read_bytes()[:100])
    out = hpcad("train", *common)
    assert "node0002.pt: cannot load model file" in out.stderr + out.stdout
    assert torch.load(run / "models/node0002.pt", weights_only=True)["format"] == "hpcad-node-model"
    # Other settings: every model is retrained (a stale model never serves a new configuration).
    kept = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    out = hpcad("train", *common, "model.hidden=[16]")
    assert "trained with other settings or data" in out.stderr + out.stdout
    for p in (run / "models").glob("*.pt"):
        assert p.stat().st_mtime_ns != kept[p.name]
        assert torch.load(p, weights_only=True)["spec"]["hidden"] == [16]
    # train.trim reaches the trainer: every model retrained, to other weights
    plain = {p.name: torch.load(p, weights_only=True)["members"][0][0] for p in (run / "models").glob("*.pt")}
    hpcad("train", *common, "model.hidden=[16]", "train.trim=0.3")
    for p in (run / "models").glob("*.pt"):
        assert not torch.equal(torch.load(p, weights_only=True)["members"][0][0], plain[p.name]), p.name
    bad = hpcad("train", *common, "train.epochs=0", check=False)
    assert bad.returncode == 2 and "train.epochs=0: must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


def test_nodes_added_to_the_input_train_alone_and_the_others_keep_their_models(tmp_path):
    """A site adds new nodes' exports to the training input (new hardware): the store is ingested
    again, but only the new nodes train; the others' models stay as they are, since a model keys on
    its own node's data, not on the whole input. They are what a training from scratch gives."""
    exports = generate(tmp_path / "exports", nodes=4, rows=300)
    aside = tmp_path / "later"
    aside.mkdir()
    (exports / "node0003.csv").rename(aside / "node0003.csv")
    run = tmp_path / "run"
    common = [f"data.source={exports}", f"hydra.run.dir={run}", "train.epochs=2", "compute.progress=false"]
    hpcad("train", *common)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    assert sorted(mtimes) == ["node0000.pt", "node0001.pt", "node0002.pt"]
    (aside / "node0003.csv").rename(exports / "node0003.csv")
    (exports / "node0000.csv").write_text((exports / "node0000.csv").read_text())  # re-exported, same rows
    out = hpcad("train", *common)
    assert "resuming: 3 of 4 nodes already have a model" in out.stderr + out.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    assert {k: after[k] for k in mtimes} == mtimes and "node0003.pt" in after
    # one node's data changed: that node alone trains again
    lines = (exports / "node0001.csv").read_text().splitlines()
    lines[5] = ",".join(lines[5].split(",")[:2] + ["0.5"] + lines[5].split(",")[3:])
    (exports / "node0001.csv").write_text("\n".join(lines) + "\n")
    out = hpcad("train", *common)
    assert "resuming: 3 of 4 nodes already have a model" in out.stderr + out.stdout
    again = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    assert again["node0001.pt"] != after["node0001.pt"]
    assert all(again[k] == after[k] for k in after if k != "node0001.pt")
    fresh = tmp_path / "fresh"
    hpcad("train", *common[:1], f"hydra.run.dir={fresh}", *common[2:])
    for name in again:
        kept, new = (torch.load(r / "models" / name, weights_only=True) for r in (run, fresh))
        assert kept["fingerprint"] == new["fingerprint"]
        for a, b in zip(kept["members"][0], new["members"][0]):
            assert torch.equal(a, b), name


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_scoring_new_data_with_a_trained_run(tmp_path):
    exports = tmp_path / "exports"
    generate(exports, nodes=2, rows=400)
    train = tmp_path / "train"
    hpcad("train", f"data.source={exports}", f"hydra.run.dir={train}", "train.epochs=3", "compute.progress=false")
    early = hpcad("threshold", f"hydra.run.dir={train}", check=False)  # no errors.h5 yet: a clear message
    assert early.returncode == 2 and "run `hpcad score`" in early.stderr and "Traceback" not in early.stderr
    scored = tmp_path / "scored"
    (exports / "node0007.csv").write_text((exports / "node0001.csv").read_text())  # new hardware since training
    p = hpcad("run", f"data.source={exports}", f"train_run={train}", f"hydra.run.dir={scored}",
              "baselines.methods=[]", "compute.progress=false", "split.train=0", "split.val=0.5", "report.enabled=false")
    assert not (scored / "models").exists()  # the trained run's models were used
    # before: "no model for nodes ['node0007'] ... train them first", nothing scored
    assert f"1 node(s) have no model in the training run ({train / 'models'}; nodes added since it trained?) and are " \
           "not scored: node0007" in p.stdout + p.stderr
    with h5py.File(scored / "errors.h5") as f:
        assert sorted(f["nodes"]) == ["node0000", "node0001"]
    hpcad("report", f"data.source={exports}", f"train_run={train}", f"hydra.run.dir={scored}", "split.train=0",
          "split.val=0.5")
    assert "<h2>Nodes without a model (1)</h2>" in (scored / "report.html").read_text()
    m = json.loads((scored / "metrics.json").read_text())
    assert m["splits"]["train"]["rows"] == 0 and m["splits"]["val"]["rows"] > 0
    # half-size errors.h5: float16 per-metric errors, the same float32 signal, thresholds and alarms
    half = tmp_path / "half"
    hpcad("run", f"data.source={exports}", f"train_run={train}", f"hydra.run.dir={half}", "score.error_dtype=float16",
          "baselines.methods=[]", "compute.progress=false", "split.train=0", "split.val=0.5", "report.enabled=false")
    with h5py.File(scored / "errors.h5") as a, h5py.File(half / "errors.h5") as b:
        for node in a["nodes"]:
            assert b[f"nodes/{node}/error"].dtype == np.float16 and a[f"nodes/{node}/error"].dtype == np.float32
            np.testing.assert_array_equal(a[f"nodes/{node}/signal"][()], b[f"nodes/{node}/signal"][()])
            np.testing.assert_allclose(b[f"nodes/{node}/error"][()], a[f"nodes/{node}/error"][()], rtol=1e-3, atol=1e-4)
    def fitted(run):  # less the time stamp of the errors.h5 they were applied to
        th = json.loads((run / "thresholds.json").read_text())
        th["details"].pop("applied_to")
        return th

    assert fitted(half) == fitted(scored)
    def alarms(run):  # the top metrics' errors and times-normal are printed to 3 digits: names, and the figures apart
        rows = list(csv.DictReader(open(run / "alarms.csv")))
        return [{**r, "top_metrics": [t.rsplit(":", 1)[0] for t in r["top_metrics"].split()],
                 "top_x_normal": None} for r in rows]

    def times_normal(run):
        return [float(x) for r in csv.DictReader(open(run / "alarms.csv")) for x in r["top_x_normal"].split()]

    assert alarms(half) == alarms(scored) and alarms(scored)
    np.testing.assert_allclose(times_normal(half), times_normal(scored), rtol=2e-3)
    assert (half / "errors.h5").stat().st_size < 0.6 * (scored / "errors.h5").stat().st_size


def test_stale_errors_or_thresholds_are_refused_with_the_stage_to_rerun(tmp_path):
    """The run folder never mixes artefacts: errors.h5 records the models and data it was scored from,
    thresholds.json the errors.h5 it belongs to; a stage reading a stale one names the stage to rerun."""
    run = tmp_path / "run"
    args = [*SMALL, "baselines.methods=[]", f"hydra.run.dir={run}"]
    hpcad("run", *args, "report.enabled=false")  # the report is drawn once, at the end
    # copied with new file times (`cp -r` off a purged scratch file system): the same models by content.
    # Before, the copy's errors.h5 was refused as scored with other models, to be scored again.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    p = hpcad("threshold", *SMALL, "baselines.methods=[]", f"hydra.run.dir={copy}")
    assert "the model files' times changed since scoring (copied or moved?), their contents did not" in p.stdout + p.stderr
    hpcad("train", *args, "model.hidden=[16]")  # retrains every node; errors.h5 is now stale
    p = hpcad("threshold", *args, "model.hidden=[16]", check=False)
    assert p.returncode == 2 and "scored with other models" in p.stderr and "rerun `hpcad score`" in p.stderr
    assert "node(s) changed since, e.g. node0000" in p.stderr
    hpcad("score", *args, "model.hidden=[16]")  # new errors: thresholds.json and alarms.csv are now stale
    p = hpcad("report", *args, "model.hidden=[16]", check=False)
    assert p.returncode == 2 and "earlier errors.h5" in p.stderr and "rerun `hpcad threshold`" in p.stderr
    hpcad("threshold", *args, "model.hidden=[16]")
    hpcad("report", *args, "model.hidden=[16]")
    assert (run / "report.html").exists()
    # other data options (another synthetic cluster here; a forgotten data.labels alike): refused before
    # the run's store is ingested again, which used to replace it and then fail
    before = (run / "store.h5").stat().st_mtime_ns
    p = hpcad("threshold", *args, "model.hidden=[16]", "data.synthetic.seed=7", check=False)
    assert p.returncode == 2 and "scored from other data than the data.* options now give" in p.stderr
    assert "nothing was changed" in p.stderr and (run / "store.h5").stat().st_mtime_ns == before
    # the store ingested again from other data after scoring: the report's node pages would plot the new
    # data's values beside the old scores (they did, silently); refused, naming the stages to rerun
    hpcad("ingest", *args, "data.synthetic.seed=7")
    p = hpcad("report", *args, "model.hidden=[16]", check=False)
    assert p.returncode == 2 and "holds other data than" in p.stderr and "rerun `hpcad score` and `hpcad threshold`" in p.stderr


def test_cfg_job_prints_the_config_and_unknown_keys_fail():
    out = hpcad("run", "--cfg", "job").stdout
    assert "hidden:" in out and "c_missed:" in out and "_target_: hpcad.threshold.rules.CostRule" in out
    bad = hpcad("run", "model.hiden=[32]", check=False)
    assert bad.returncode == 2 and "hiden" in bad.stderr  # 2: every option error, Hydra's and hpcad's own
    bad = hpcad("run", "threshold=magic", check=False)
    assert bad.returncode == 2 and "magic" in bad.stderr
    # options with a fixed set of values are checked when the config is composed, naming the choices
    for override, choices in (("data.format=csv", "[wide, ldms, long]"), ("compute.precision=fp16", "[fp32, tf32, bf16]"),
                              ("split.unit=days", "[fraction, rows, time]")):
        bad = hpcad("run", override, check=False)
        assert bad.returncode == 2 and f"expected one of {choices}" in bad.stderr and "Traceback" not in bad.stderr
    # an option of an earlier layout is named with its new place, before anything runs
    old = hpcad("run", "train.device=cpu", "+train.progress=false", check=False)
    assert old.returncode == 2 and "train.device -> compute.device, train.progress -> compute.progress" in old.stderr


def test_bad_source_is_reported_without_traceback(tmp_path):
    p = hpcad("run", f"data.source={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_multirun_sweep_gives_one_folder_per_point(tmp_path):
    hpcad("train", "-m", "model.hidden=[8],[16]", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL[:4])
    for i in (0, 1):
        cfg = (tmp_path / "sweep" / str(i) / ".hydra" / "config.yaml").read_text()
        assert (tmp_path / "sweep" / str(i) / "models" / "node0000.pt").exists()
        assert f"- {8 if i == 0 else 16}" in cfg
    summary = (tmp_path / "sweep" / "sweep_summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "mean_best_val_loss" in summary[1]  # points ranked by validation loss
    assert not (tmp_path / "sweep" / "sweep_settings.csv").exists()  # no seeds swept: nothing to average


def test_a_command_composes_its_config_once_and_hydra_mode_still_sweeps(tmp_path, monkeypatch):
    """Hydra composed the whole config twice per command, the first time only to read ``hydra.mode``
    (0.12 s of every command and rank start). hpcad's configs never set it, so a command line that
    cannot set it either is composed once; one that can (``hydra.mode=MULTIRUN``) is still obeyed."""
    import yaml
    from hydra._internal.hydra import Hydra

    from hpcad.resources import resource_dir

    for f in resource_dir("conf").rglob("*.yaml"):  # the shortcut's premise
        assert "mode" not in ((yaml.safe_load(f.read_text()) or {}).get("hydra") or {}), f
    composed = []
    compose = Hydra.compose_config
    monkeypatch.setattr(Hydra, "compose_config", lambda self, *a, **k: composed.append(k) or compose(self, *a, **k))
    hpcad("ingest", f"hydra.run.dir={tmp_path / 'once'}", *SMALL[:2])
    assert len(composed) == 1 and (tmp_path / "once" / "store.h5").exists()
    composed.clear()
    hpcad("ingest", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path / 'sweep'}", "data.synthetic.nodes=2,3",
          *SMALL[1:2])
    assert len(composed) > 1  # read first, as Hydra does
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/store.h5")) == ["0", "1"]


def test_seed_sweep_reports_mean_and_spread_per_setting_beside_the_baseline(tmp_path):
    sweep = tmp_path / "sweep"
    hpcad("run", "-m", "train.seed=0,1,2", "model.hidden=[8],[16]", f"hydra.sweep.dir={sweep}", *SMALL[:5],
          "report.enabled=false")
    rows = list(csv.DictReader((sweep / "sweep_settings.csv").open()))
    assert sorted(r["detector"] for r in rows) == ["autoencoder", "autoencoder", "kde", "kde"]  # beside the baseline
    assert {r["setting"] for r in rows} == {"model.hidden=[8]", "model.hidden=[16]"}  # named by what varies
    for r in rows:
        points = [p for p in sweep.iterdir() if (p / "metrics.json").exists()
                  and f"- {r['setting']}" in (p / ".hydra" / "overrides.yaml").read_text()]
        assert len(points) == 3 and r["seed_values"] == "0 1 2"
        splits = [json.loads((p / "metrics.json").read_text()) for p in points]
        splits = [m["splits"] if r["detector"] == "autoencoder" else m["baselines"]["kde"]["splits"] for m in splits]
        for col, values in (("ap_val", [s["val"]["ranking"]["ap"] for s in splits]),
                            ("cost_test", [s["test"]["cost"] for s in splits])):
            assert float(r[col]) == pytest.approx(np.mean(values))
            assert float(r[col + "_std"]) == pytest.approx(np.std(values))
    ae = [float(r["cost_val"]) for r in rows if r["detector"] == "autoencoder"]
    assert ae == sorted(ae)  # settings ranked by the autoencoder's mean validation cost
    table = (sweep / "sweep_settings.md").read_text()
    assert "| `model.hidden=[8]` | autoencoder | 3 |" in table and " +- " in table and "Every point: `" in table
    png = (sweep / "sweep_settings.png").read_bytes()  # the validation figures as a plot, linked from the table
    assert png.startswith(b"\x89PNG") and len(png) > 5000 and "](sweep_settings.png)" in table


def test_model_files_from_before_the_held_out_errors_are_retrained_only_when_scales_are_asked_for(tmp_path):
    """Model files written before hpcad recorded each metric's held-out error still resume (the
    default scores without metric scales); `signal.metric_scales=true` retrains just those nodes."""
    run = tmp_path / "run"
    # unwhitened: whitened errors' scales come from the whitening's own held-out errors (the next test)
    common = [f"hydra.run.dir={run}", *SMALL, "baselines.methods=[]", "report.enabled=false", "signal.whiten=false"]
    hpcad("train", *common)
    old = run / "models" / "node0001.pt"
    obj = torch.load(old, weights_only=True)
    del obj["holdout_error"]  # as an older hpcad wrote it
    torch.save(obj, old)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    hpcad("train", *common)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")} == mtimes
    refused = hpcad("score", *common, "signal.metric_scales=true", check=False)
    assert refused.returncode == 2 and "have no per-metric held-out errors" in refused.stderr
    assert "run `hpcad train` with signal.metric_scales=true" in refused.stderr and "Traceback" not in refused.stderr
    out = hpcad("train", *common, "signal.metric_scales=true")
    assert "has no per-metric held-out errors" in out.stdout + out.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    assert after["node0001.pt"] != mtimes["node0001.pt"]
    assert all(after[n] == t for n, t in mtimes.items() if n != "node0001.pt")
    assert torch.load(old, weights_only=True)["holdout_error"].shape == (160,)
    hpcad("score", *common, "signal.metric_scales=true")


def test_model_files_from_before_the_whitening_are_refused_by_name_until_train_retrains_them(tmp_path):
    """Model files written before hpcad whitened the residuals (2026-12-05): `signal.whiten=true`
    refuses them naming the node and the option; `auto` (the default) chooses without whitening,
    saying so; `false` scores them as before; the next `hpcad train` retrains just those nodes."""
    run = tmp_path / "run"
    common = [f"hydra.run.dir={run}", *SMALL, "baselines.methods=[]", "report.enabled=false"]
    hpcad("train", *common)
    old = run / "models" / "node0001.pt"
    obj = torch.load(old, weights_only=True)
    assert obj["whitening"]["matrix"].shape == (160, 160) and 0 <= obj["whitening"]["shrinkage"] <= 1
    del obj["whitening"]  # as an older hpcad wrote it
    torch.save(obj, old)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    refused = hpcad("score", *common, "signal.whiten=true", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "node node0001: its model file has no residual whitening" in refused.stderr
    assert "or score with signal.whiten=false" in refused.stderr and not (run / "errors.h5").exists()
    auto = hpcad("score", *common)
    assert "signal.whiten=auto: 1 node model(s) have no residual whitening" in auto.stdout + auto.stderr
    with h5py.File(run / "errors.h5") as f:
        assert f.attrs["whiten"] == 0
    hpcad("score", *common, "signal.whiten=false")
    with h5py.File(run / "errors.h5") as f:
        assert f.attrs["whiten"] == 0
    out = hpcad("train", *common)
    assert "node0001.pt has no residual whitening of this hpcad's (trained by an older one)" in out.stdout + out.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    assert [n for n in after if after[n] != mtimes[n]] == ["node0001.pt"]
    hpcad("score", *common, "signal.whiten=true")
    with h5py.File(run / "errors.h5") as f:
        assert f.attrs["whiten"] == 1


def test_an_unlabelled_site_gets_thresholds_at_five_times_each_nodes_normal_level(tmp_path):
    """Exports without labels (most sites): the cost rule falls back to the level rule, 5 x each
    node's normal level (signal_scale in errors.h5), and ``threshold.fallback=quantile`` refits the
    same run with the rule before it (the 0.995 quantile of each node's validation signal)."""
    import pandas as pd

    exports = tmp_path / "exports"
    generate(exports, nodes=2, rows=400)
    for f in exports.glob("*.csv"):
        pd.read_csv(f).drop(columns="anomaly").to_csv(f, index=False)
    run = tmp_path / "run"
    out = hpcad("run", f"data.source={exports}", f"hydra.run.dir={run}", "train.epochs=2", "compute.progress=false",
                "baselines.methods=[]", "report.enabled=false").stdout
    th = json.loads((run / "thresholds.json").read_text())
    assert th["rule"] == "cost" and th["details"]["fallback"] == {"rule": "level", "times": 5.0}
    with open(run / "alarms.csv") as fh:  # the run's last lines: its alarms; no labels, so no figures
        rows = list(csv.DictReader(fh))
    alarmed = len({r["node"] for r in rows})
    said = f"hpcad: {len(rows)} alarm event{'s' * (len(rows) != 1)} on {alarmed} of 2 nodes -> {run / 'alarms.csv'}\n"
    assert said in out and "split: cost" not in out and "baselines' cost" not in out, out
    assert "hpcad: no labels: thresholds at 5x each node's normal level (threshold.times); on the validation rows " \
           "2x / 3x / 5x / 10x / 20x raise " in out, out  # the alarm budget, checked below
    assert th["details"]["unlabelled_nodes"] == 2 and not (run / "metrics.json").exists()
    with h5py.File(run / "errors.h5") as f:
        scale = {n: float(f[f"nodes/{n}"].attrs["signal_scale"]) for n in f["nodes"]}
        val = {n: f[f"nodes/{n}/signal"][()][f[f"nodes/{n}/split"][()] == 1] for n in f["nodes"]}
    assert th["nodes"] == pytest.approx({n: 5.0 * v for n, v in scale.items()})
    budget = th["details"]["by_level"]  # the alarm budget: what other multiples raise on the validation rows
    assert budget["nodes"] == 2 and budget["node_days"] > 0 and [lv["times"] for lv in budget["levels"]] == [
        2.0, 3.0, 5.0, 10.0, 20.0]
    said = " / ".join(str(lv["alarm_events"]) for lv in budget["levels"])  # as the run's last lines say it
    assert f" raise {said} alarm events (the alarm budget: thresholds.json, the report)\n" in out
    # a higher multiple alarms on fewer nodes (its alarm rows are a subset); its events may be more: one
    # long event split in two where the signal dips between 2x and 3x
    alarmed = [lv["nodes_alarmed"] for lv in budget["levels"]]
    assert alarmed == sorted(alarmed, reverse=True) and alarmed[0] <= 2
    assert all(lv["per_node_day"] == pytest.approx(lv["alarm_events"] / budget["node_days"], rel=1e-2, abs=1e-4)
               for lv in budget["levels"])
    hpcad("threshold", f"data.source={exports}", f"hydra.run.dir={run}", "threshold.fallback=quantile")
    th = json.loads((run / "thresholds.json").read_text())
    assert th["details"]["fallback"] == {"rule": "quantile", "q": 0.995}
    assert th["nodes"] == pytest.approx({n: float(np.quantile(v, 0.995)) for n, v in val.items()}, rel=1e-5)


def test_unlabelled_data_uses_the_trained_runs_thresholds(tmp_path):
    import pandas as pd

    exports = tmp_path / "exports"
    generate(exports, nodes=2, rows=400)
    train = tmp_path / "train"
    hpcad("run", f"data.source={exports}", f"hydra.run.dir={train}", "train.epochs=3", "compute.progress=false",
          "baselines.methods=[]", "threshold=quantile", "threshold.scope=cluster", "report.enabled=false",
          "signal.excess_grid=[10,1000]", "signal.metric_scales=auto")  # auto picks one on the validation rows
    fitted = json.loads((train / "thresholds.json").read_text())
    assert fitted["rule"] == "quantile" and fitted["scope"] == "cluster" and fitted["cluster"] > 0
    chosen, scaled = fitted["details"]["excess_weight"], fitted["details"]["metric_scales"]
    whitened = fitted["details"]["whiten"]
    choice = json.loads((train / "metrics.json").read_text())["signal"]["choice"]
    assert chosen in (10, 1000) and choice["nodes"] == 2
    assert choice["chosen"] == {"excess_weight": chosen, "metric_scales": scaled, "whiten": whitened}
    assert len(choice["validation_ap"]) == 8  # two weights, without and with per-metric scales and whitening
    today = tmp_path / "today"
    today.mkdir()
    for f in exports.glob("*.csv"):
        pd.read_csv(f).drop(columns="anomaly").iloc[-288:].to_csv(today / f.name, index=False)
    scored = tmp_path / "scored"
    out = hpcad("run", f"data.source={today}", f"train_run={train}", f"hydra.run.dir={scored}",
                "compute.progress=false", "baselines.methods=[]", "split.train=0", "split.val=0",
                "signal.metric_scales=auto").stdout
    assert json.loads((scored / "thresholds.json").read_text())["cluster"] == fitted["cluster"]
    assert f"hpcad: no labels: the thresholds {train / 'thresholds.json'} holds (fitted by the training run)\n" in out
    assert not (scored / "metrics.json").exists()  # no labels, no detection scores
    assert (scored / "alarms.csv").exists() and (scored / "report.html").exists()
    with h5py.File(scored / "errors.h5") as f:  # scored on the signal the thresholds were fitted on
        assert f.attrs["excess_weight"] == chosen and bool(f.attrs["metric_scales"]) == scaled
        assert bool(f.attrs["whiten"]) == whitened
    other = hpcad("run", f"data.source={today}", f"train_run={train}", f"hydra.run.dir={tmp_path / 'other'}",
                  "baselines.methods=[]", "split.train=0", "split.val=0", f"signal.excess_weight={chosen * 2}",
                  check=False)
    assert other.returncode == 2 and f"signal.excess_weight={chosen:g}" in other.stderr
    assert not (tmp_path / "other" / "errors.h5").exists()  # refused before scoring, not after
    flipped = hpcad("run", f"data.source={today}", f"train_run={train}", f"hydra.run.dir={tmp_path / 'flipped'}",
                    "baselines.methods=[]", "split.train=0", "split.val=0", f"signal.metric_scales={not scaled}",
                    check=False)
    assert flipped.returncode == 2 and f"signal.metric_scales={str(scaled).lower()}" in flipped.stderr
    assert "Traceback" not in other.stderr + flipped.stderr


def test_help_and_a_misspelt_stage_answer_without_loading_the_pipeline():
    import subprocess
    import sys

    from hpcad.cli import STAGES
    from hpcad.stages import RUNNERS

    assert set(STAGES) == set(RUNNERS)  # the fast list and the real one cannot drift apart
    probe = ("import sys, hpcad.cli as c; rc = c.main(['--help']); bad = c.main(['trian']); v = c.main(['--version']); "
             "heavy = [m for m in ('torch', 'sklearn', 'matplotlib', 'hpcad.pipeline') if m in sys.modules]; "
             "print(rc, bad, v, heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 2 0 []" and "unknown stage 'trian'" in out.stderr
    # what a bug report quotes (before, `hpcad --version` was an unknown stage), torch's from its metadata
    assert re.search(r"^hpcad 0\.1\.0 \(torch 2\.\d+\.\d+\S*, Python 3\.\d+\.\d+\)$", out.stdout, re.M), out.stdout
    # the stages after scoring (threshold, report) never load torch: 1.2 s of every rank's start
    probe = ("import sys, hpcad.pipeline, hpcad.report.page, hpcad.threshold.evaluate, hpcad.explain, hpcad.signal_choice, "
             "hpcad.model.files; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def test_an_option_forced_in_with_plus_is_refused_not_ignored(tmp_path):
    """Hydra's hint after a misspelt key is to add it with '+': hpcad refuses what no schema declares."""
    p = hpcad("train", "+train.epoch=3", "+threshold.c_alarms=2", f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode == 2 and "unknown options train.epoch, threshold.c_alarms" in p.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "store.h5").exists()


def test_an_unwritable_run_folder_is_one_line_not_a_logging_traceback(tmp_path, monkeypatch, capsys):
    """Hydra sets up its log file in the run folder first ("Unable to configure handler 'file'")."""
    from pathlib import Path

    from hpcad import cli

    ro = tmp_path / "read-only"
    ro.mkdir()
    monkeypatch.setattr(cli.os, "access", lambda p, mode: Path(p) != ro)  # tests run as root: pretend
    assert cli.unwritable_run_dir([f"hydra.run.dir={ro}/run1"]) == ro
    assert cli.unwritable_run_dir([f"hydra.run.dir={ro}"]) == ro
    assert cli.unwritable_run_dir([f"hydra.run.dir={tmp_path}/new/run"]) is None
    assert cli.unwritable_run_dir([f"hydra.run.dir={ro}", "--cfg", "job"]) is None  # prints only
    assert cli.main(["train", f"hydra.run.dir={ro}/run1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{ro} is not writable" in err[0]


def test_a_path_under_the_home_folder_may_start_with_a_tilde(tmp_path, monkeypatch):
    """`data.source=~/exports`: the shell leaves the tilde (the word is no variable assignment) and
    Hydra's grammar refused it ("LexerNoViableAltException"); hpcad spells the home folder out."""
    from hpcad.cli import expand_home

    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_home("data.source=~/exports") == f"data.source={tmp_path}/exports"
    assert expand_home("hydra.run.dir=~") == f"hydra.run.dir={tmp_path}"
    assert expand_home("~data.jobs") == "~data.jobs"  # Hydra's deletion of a key
    assert expand_home("data.source=/srv/~/x") == "data.source=/srv/~/x"
    assert expand_home("data.source=~nosuchuser_hpcad/x") == "data.source=~nosuchuser_hpcad/x"
    exports = tmp_path / "exports"
    exports.mkdir()
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"timestamp": 1_736_121_600 + 300 * np.arange(20), "power": np.arange(20.0)}).to_csv(
        exports / "cn01.csv", index=False)
    hpcad("ingest", "data.source=~/exports", "hydra.run.dir=~/run", "compute.progress=false")
    assert (tmp_path / "run" / "store.h5").exists()


def test_an_override_hydra_cannot_read_is_named_with_the_quoting_that_reads_it(tmp_path, capsys):
    """`nightly.input=/exports/{date}`, as an operator types it: Hydra's grammar reads the braces as a
    dictionary and said only "mismatched input '{' expecting <EOF>" (exit 2, no option named)."""
    from hpcad import cli

    out = tmp_path / "nightly"
    assert cli.main(["nightly", f"nightly.input={tmp_path}/exports/{{date}}", f"nightly.out={out}",
                     f"hydra.run.dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot read the override 'nightly.input={tmp_path}/exports/{{date}}'" in err[0], err
    quoted = f"nightly.input='{tmp_path}/exports/{{date}}'"
    assert err[0].endswith(f'"{quoted}"') and not out.exists()
    # the form it names is read: the nightly then stops on what is really wrong (no trained run there)
    p = hpcad("nightly", quoted, f"nightly.out={out}", "nightly.date=2025-01-10", f"train_run={tmp_path}/none",
              f"hydra.run.dir={tmp_path}/run", check=False)
    assert p.returncode == 2 and "cannot read the override" not in p.stderr and "none: no models" in p.stderr, p.stderr
    assert cli.main(["run", "baselines.methods=[kde"]) == 2  # a list left open: named, no quoting hint
    err = capsys.readouterr().err
    assert "cannot read the override 'baselines.methods=[kde'" in err and "quote it" not in err
    # Hydra's flags after the overrides (hpcad adds overrides of its own: they go with the user's)
    assert cli.main(["run", "train.seed=7", "--cfg", "job"]) == 0 and "seed: 7" in capsys.readouterr().out
    assert cli.main(["run", "--cfg", "job", "train.seed=8"]) == 0 and "seed: 8" in capsys.readouterr().out
    argv = list(sys.argv)
    assert cli.main(["run", "--version"]) == 0  # Hydra's flags reach Hydra: said once (the check reads them too)
    assert capsys.readouterr().out.count("Hydra") == 1
    assert sys.argv == argv  # a caller's own arguments are left as they were (a later main() reads them)
