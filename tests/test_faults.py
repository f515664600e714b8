"""Fault injection: a run killed (SIGKILL, or SIGTERM as SLURM preempts) at several points, then run
again, ends with the outputs of an uninterrupted run and nothing stale (docs/pipeline.md)."""
import json
import re
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, SMALL, hpcad

# one node per chunk: a kill lands mid-train; no report but where the report's own fault point is tested
ARGS = [*SMALL, "baselines.methods=[]", "compute.max_nodes_per_chunk=1", "report.enabled=false"]


def _models(run):
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run / "models").glob("*.pt"))}


def _signals(run):
    with h5py.File(run / "errors.h5") as f:
        return {n: f[f"nodes/{n}/signal"][()] for n in f["nodes"]}


def _thresholds(run):  # less the time stamp of the errors.h5 they were applied to
    th = json.loads((run / "thresholds.json").read_text())
    assert th["details"].pop("applied_to")
    return th


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "reference"
    hpcad("run", *ARGS, f"hydra.run.dir={run}")
    return run


@pytest.mark.parametrize("sig, trigger", [(signal.SIGKILL, "trained 1/3 nodes"),  # mid-training
                                          (signal.SIGTERM, "trained 2/3 nodes"),  # preempted by SLURM
                                          (signal.SIGKILL, "scored 3 nodes")])  # thresholds, alarms
def test_a_killed_run_reruns_to_the_uninterrupted_result(reference, tmp_path, sig, trigger):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hpcad", "run", *ARGS, f"hydra.run.dir={run}"], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # the kill follows an event of the run, not a timer
        seen.append(line)
        if trigger in line:
            proc.send_signal(sig)
            break
    proc.stdout.close()
    assert proc.wait(timeout=300) != 0, "".join(seen)[-2000:]
    assert any(trigger in s for s in seen), "".join(seen)[-2000:]
    _rerun_matches(reference, run, resumed="trained" in trigger)


@pytest.mark.parametrize("fault", ["store.h5", "errors.h5", "thresholds.json:TERM", "alarms.json",  # each stage
                                   "report.html"])
def test_a_run_killed_as_it_publishes_an_output_reruns_to_the_uninterrupted_result(reference, tmp_path, fault):
    """The worst moment of each stage: its output fully written under a temporary name, not yet
    renamed (hpcad.atomic's fault point, HPCAD_FAULT)."""
    run, extra = tmp_path / "run", ["report.enabled=true"] if fault == "report.html" else []
    killed = subprocess.run([sys.executable, "-m", "hpcad", "run", *ARGS, *extra, f"hydra.run.dir={run}"], cwd=ROOT,
                            env=dict(os.environ, HPCAD_FAULT=fault), capture_output=True, text=True, timeout=300)
    expected = -signal.SIGTERM if fault.endswith(":TERM") else -signal.SIGKILL
    assert killed.returncode == expected, killed.stderr[-2000:]
    name = fault.split(":")[0]
    assert not (run / name).exists() and list(run.glob(f".{name}.*.tmp"))  # killed before publishing it
    _rerun_matches(reference, run, resumed=name != "store.h5", extra=extra)


def test_a_run_killed_inside_a_chunk_resumes_the_chunk_from_its_last_epoch_saved(reference, tmp_path):
    """A chunk's state is saved after epochs (compute.checkpoint_every_s; 0: every epoch): killed as
    the first chunk's third checkpoint is written, the rerun goes on from the second (epoch 2 of
    4) and ends with the uninterrupted run's models, bit for bit; no checkpoint is left."""
    run, every_epoch = tmp_path / "run", "compute.checkpoint_every_s=0"
    killed = subprocess.run([sys.executable, "-m", "hpcad", "run", *ARGS, every_epoch, f"hydra.run.dir={run}"],
                            cwd=ROOT, env=dict(os.environ, HPCAD_FAULT=".chunk-*@3"), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list((run / "models").glob("*.pt")) and len(list((run / "models").glob(".chunk-*.ckpt"))) == 1
    out = _rerun_matches(reference, run, resumed=False, extra=[every_epoch])
    assert "at epoch 2 from .chunk-" in out, out[-2000:]
    assert not list((run / "models").glob(".chunk-*"))


def test_a_baseline_killed_as_it_publishes_reruns_to_the_uninterrupted_result(reference, tmp_path):
    """The baselines stage killed with its signal file fully written, not yet renamed: the rerun
    writes what an uninterrupted `hpcad baselines` does, and leaves no temporary file."""
    import shutil

    kde = [a if a != "baselines.methods=[]" else "baselines.methods=[kde]" for a in ARGS]
    clean, run = tmp_path / "clean", tmp_path / "run"
    for d in (clean, run):
        shutil.copytree(reference, d)
    hpcad("baselines", *kde, f"hydra.run.dir={clean}")
    killed = subprocess.run([sys.executable, "-m", "hpcad", "baselines", *kde, f"hydra.run.dir={run}"], cwd=ROOT,
                            env=dict(os.environ, HPCAD_FAULT="kde.h5"), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "baselines" / "kde.h5").exists() and list((run / "baselines").glob(".kde.h5.*.tmp"))
    hpcad("baselines", *kde, f"hydra.run.dir={run}")
    with h5py.File(clean / "baselines" / "kde.h5") as a, h5py.File(run / "baselines" / "kde.h5") as b:
        assert sorted(a["nodes"]) == sorted(b["nodes"])
        for n in a["nodes"]:
            assert np.array_equal(a[f"nodes/{n}/signal"][()], b[f"nodes/{n}/signal"][()]), n
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def _rerun_matches(reference, run, resumed: bool, extra: list[str] = ()) -> str:
    rerun = hpcad("run", *ARGS, *extra, f"hydra.run.dir={run}")
    if resumed:  # finished nodes are kept, not retrained
        assert "resuming:" in rerun.stdout + rerun.stderr
    ref, got = _models(reference), _models(run)
    assert ref.keys() == got.keys()
    for name in ref:
        for a, b in zip(ref[name]["members"][0], got[name]["members"][0]):
            assert torch.equal(a, b), name  # resumed or retrained: the same weights bit for bit
        assert ref[name]["signal_scale"] == got[name]["signal_scale"]
        assert torch.equal(ref[name]["holdout_error"], got[name]["holdout_error"]), name
    s_ref, s_got = _signals(reference), _signals(run)
    assert s_ref.keys() == s_got.keys() and all(np.array_equal(s_ref[n], s_got[n]) for n in s_ref)
    assert _thresholds(run) == _thresholds(reference)
    assert (run / "alarms.csv").read_text() == (reference / "alarms.csv").read_text()
    assert (run / "alarms.json").read_text() == (reference / "alarms.json").read_text()
    assert (run / "report.html").exists() == ("report.enabled=true" in extra)
    stale = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".ingest-")]
    assert not stale, stale
    return rerun.stdout + rerun.stderr


def test_a_fleet_model_resumes_from_its_last_epoch_saved_and_is_not_trained_twice(tmp_path):
    """model.scope=fleet (one model over all nodes): killed as its third epoch checkpoint is written,
    the rerun goes on from epoch 2 and ends with the uninterrupted run's weights, bit for bit (a
    further rerun trains nothing: tests/test_slurm.py, with two ranks that must agree on it)."""
    args = ["train", "model.scope=fleet", "data.synthetic.nodes=3", "data.synthetic.rows=400", "train.epochs=6",
            "compute.progress=false", "compute.checkpoint_every_s=0"]
    ref, run = tmp_path / "reference", tmp_path / "run"
    hpcad(*args, f"hydra.run.dir={ref}")
    killed = subprocess.run([sys.executable, "-m", "hpcad", *args, f"hydra.run.dir={run}"], cwd=ROOT,
                            env=dict(os.environ, HPCAD_FAULT=".chunk-*@3"), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list((run / "models").glob("*.pt"))
    out = hpcad(*args, f"hydra.run.dir={run}")
    assert "resuming the fleet model of 3 nodes (node0000 ...) at epoch 2" in out.stdout + out.stderr
    a, b = _models(ref), _models(run)
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:  # the history first: where they part says which epoch did (a flake seen once, 2026-12-04)
        assert a[name]["history"] == b[name]["history"], (name, a[name]["history"], b[name]["history"])
        for k, (x, y) in enumerate(zip(a[name]["members"][0], b[name]["members"][0])):
            assert torch.equal(x, y), (name, k, float((x - y).abs().max()))
    assert not list((run / "models").glob(".*"))  # no checkpoint or temporary file left


@pytest.mark.parametrize("full_at", ["models", "errors.h5"])
def test_a_run_folder_that_fills_up_stops_clearly_and_the_rerun_resumes(reference, tmp_path, full_at):
    """The run folder's file system fills up (a full $SCRATCH, a quota) while training writes its
    models (torch.save) or scoring writes errors.h5 (HDF5, which crashes the process with a
    segmentation fault on any close after a failed write: h5py#914). The run stops with exit 2 and
    one error naming the file; no partial file is left; once there is room, the rerun keeps what was
    finished and ends with the uninterrupted run's result. Stood in for by a tmpfs of a chosen size
    over the run folder, in a private mount namespace."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (a small tmpfs stands in for a full file system)")
    model = (reference / "models" / "node0000.pt").stat().st_size
    room = (reference / "store.h5").stat().st_size + 64 * 1024  # the store, the logs and .hydra
    room += model * 3 // 2 if full_at == "models" else model * 3 + (reference / "errors.h5").stat().st_size // 2
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir(), out.mkdir()
    hpcad_run = " ".join([sys.executable, "-m", "hpcad", "run", *ARGS, f"hydra.run.dir={run}"])
    script = f"""set -u
mount -t tmpfs -o size={room} none {run} || exit 99
cd {ROOT}
{hpcad_run} > {out}/first.log 2>&1; echo $? > {out}/first.rc
find {run} -name '*.tmp' -o -name '.chunk-*' > {out}/left.txt
mount -o remount,size=256m {run}
{hpcad_run} > {out}/rerun.log 2>&1; echo $? > {out}/rerun.rc
cp -a {run} {out}/run
"""
    p = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    first = (out / "first.log").read_text()
    assert (out / "first.rc").read_text().strip() == "2", first[-3000:]  # not 139 (SIGSEGV) nor a traceback
    errors = [line for line in first.splitlines() if line.startswith("hpcad run: error:")]
    where = r"models/node000\d\.pt" if full_at == "models" else r"errors\.h5"
    assert len(errors) == 1 and re.match(rf"hpcad run: error: {run}/{where}: could not be written: no space left on "
                                         r"its file system\. Partial files were removed", errors[0]), first[-3000:]
    assert "Traceback" not in first and "Logging error" not in first, first[-3000:]
    assert (out / "left.txt").read_text() == ""  # no temporary file takes the room
    rerun = (out / "rerun.log").read_text()
    assert (out / "rerun.rc").read_text().strip() == "0", rerun[-3000:]
    kept = re.search(r"resuming: (\d) of 3 nodes already have a model", rerun)  # finished models not redone
    assert kept and (0 < int(kept.group(1)) < 3 if full_at == "models" else kept.group(1) == "3"), rerun[-3000:]
    done = out / "run"
    assert _models(done).keys() == _models(reference).keys()
    assert _thresholds(done) == _thresholds(reference)
    assert (done / "alarms.csv").read_text() == (reference / "alarms.csv").read_text()
