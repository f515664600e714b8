"""Batch jobs on a real SLURM (slurm/dev-cluster.sh): requeue, scoring with trained models, the
nightly job through sbatch. Split from test_slurm.py so that `pytest -n` runs the two side by side."""
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import torch

from conftest import ROOT, generate, hpcad, job_state, sbatch_wait, slurm_models, small_exports
from hpcad.dist import step_port
from hpcad.model.files import NodeModel, model_path
from hpcad.model.light import LightMaps, fit_light_map


def test_requeued_job_skips_finished_nodes_and_ends_with_the_same_result(tmp_path, slurm_env):
    import time

    exports = tmp_path / "exports"
    generate(exports, nodes=12, rows=1000)
    # one node per chunk, each about 0.4 s on one thread here: 6 per rank, so the signal below lands
    # while a rank still has nodes to train (the window used to come from oversubscribed threads)
    args = [f"data.source={exports}", "train.epochs=40", "train.patience=40", "compute.max_nodes_per_chunk=1",
            "compute.progress=false", "baselines.methods=[]", "report.enabled=false"]
    run = tmp_path / "run"
    env = dict(slurm_env, HPCAD_RUN_DIR=str(run), HPCAD_PREFLIGHT="0")  # preflight: the sbatch training test
    sub = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "-o", str(tmp_path / "job-%j.out"),
                          str(ROOT / "slurm" / "train_all_nodes.sh"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    job = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while time.time() < deadline and not list((run / "models").glob("node*.pt")):
        time.sleep(0.1)
    done_before = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("node*.pt")}
    assert 0 < len(done_before) < 12, "job finished before it could be interrupted"
    # The pre-timeout signal (--signal=B:USR1@300) sent now: the script's trap requeues the job.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    while time.time() < deadline and job_state(job, env) in ("RUNNING", "COMPLETING", "CONFIGURING"):
        time.sleep(0.2)
    # Start it again soon, but not within the same second: SLURM revokes the old launch credential
    # and kills a batch job relaunched in the second it was requeued ("Job credential revoked").
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now+3"], env=env)
    while time.time() < deadline and job_state(job, env) not in ("COMPLETED", "FAILED", "GONE"):
        time.sleep(1)
    assert job_state(job, env) == "COMPLETED", (tmp_path / f"job-{job}.out").read_text()[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("node*.pt")}
    assert len(after) == 12
    assert all(after[n] == t for n, t in done_before.items())  # finished nodes were not retrained
    logs = " ".join(p.read_text() for p in (run / "logs").glob("train-rank*.log"))
    resumed = [(int(k), int(n)) for k, n in re.findall(r"resuming: (\d+) of (\d+) nodes already have a model", logs)]
    assert resumed and any(k < n for k, n in resumed), resumed  # interrupted mid-training: some nodes were left
    out = (tmp_path / f"job-{job}.out").read_text()
    assert "requeueing job" in out  # the USR1 trap did it
    assert "(no report: report.enabled=false)" in out and "report at" not in out  # #16 item 13
    single = tmp_path / "single"
    hpcad("train", f"hydra.run.dir={single}", *args)
    a, b = slurm_models(single), slurm_models(run)
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_score_all_nodes_scores_new_data_with_trained_models(tmp_path, slurm_env):
    exports = small_exports(tmp_path)
    train = tmp_path / "train"
    hpcad("train", f"data.source={exports}", f"hydra.run.dir={train}", "train.epochs=1", "compute.progress=false")
    run = tmp_path / "scored"
    # a site whose sbatch passes no environment on (SBATCH_EXPORT=NONE): hpcad comes from HPCAD_ENV,
    # and the steps get the script's environment (before, they started without it: "execve(): hpcad")
    site_env = tmp_path / "env.sh"
    site_env.write_text(f'export PATH="{Path(shutil.which("hpcad")).parent}:$PATH"\n')
    # two nodes of two tasks: ranks meet at the step's first node, on a port of the job's own
    job = sbatch_wait(["--nodes=2", "--ntasks-per-node=2", "-o", str(tmp_path / "score.out"),
                       f"--export=HPCAD_ENV={site_env},HPCAD_RUN_DIR={run}",
                       str(ROOT / "slurm" / "score_all_nodes.sh"), f"train_run={train}", f"data.source={exports}",
                       "compute.progress=false", "baselines.methods=[]"],
                      env=dict(slurm_env, SBATCH_EXPORT="NONE"), cwd=tmp_path)
    log = (tmp_path / "score.out").read_text()
    assert job.returncode == 0, log[-3000:]
    assert len(list(run.glob("errors-rank*.h5"))) == 4 and (run / "report.html").exists()
    job_id = int(re.search(r"Submitted batch job (\d+)", job.stdout).group(1))
    port = re.search(r"process group: gloo, 4 ranks, rank 0 at localhost:(\d+),", log).group(1)  # n1's NodeAddr
    assert int(port) in {step_port(job_id, step) for step in range(4)}, port  # the job's and the step's own
    # a cluster-wide result is said once (rank 0), not once per rank; each rank's own share still shows
    assert log.count("] - signal: signal.excess_weight=") == 1 and log.count("hpcad: score outputs in") == 1, log[-3000:]
    assert len(re.findall(r"\[rank \d/4\]\[hpcad.score\]\[INFO\] - scored 1 nodes", log)) == 4
    assert "srun --gpu-bind=per_task:1 (2 tasks, 4 GPUs per node)" in log
    bound = set(re.findall(r"rank (\d) of 4 on \S+: 1 of 4 nodes, device cpu, CUDA_VISIBLE_DEVICES=([^\s,]+)", log))
    assert bound == {("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")}, bound  # GPUs 0 and 1 of each node
    assert not (run / "models").exists()
    no_run = sbatch_wait(["-o", str(tmp_path / "bad.out"), str(ROOT / "slurm" / "score_all_nodes.sh"),
                          f"data.source={exports}"], env=slurm_env, cwd=tmp_path, timeout=300)
    assert no_run.returncode != 0 and "train_run=" in (tmp_path / "bad.out").read_text()


def test_nightly_job_scores_through_sbatch(tmp_path, slurm_env):
    from conftest import cron, nightly_env_file, write_site

    write_site(tmp_path, nodes=4, days=3, cut="2025-01-08")
    hpcad("run", f"data.source={tmp_path / 'train'}", f"hydra.run.dir={tmp_path / 'trainrun'}", "train.epochs=2",
          "compute.progress=false", "baselines.methods=[]", "report.enabled=false")
    out = tmp_path / "nightly"
    # light maps of node0001 from earlier nights, valid from this night and from the next: the job
    # applies the one valid tonight, as in-process scoring does (before, it applied none of the
    # nightly job's maps, only the newest beside the models)
    model = NodeModel.load(model_path(tmp_path / "trainrun" / "models", "node0001"))
    for version, valid_from in ((1, "2025-01-08"), (2, "2025-01-09")):
        lm = fit_light_map(model.members, len(model.spec.hidden), np.zeros((10, len(model.metrics)), np.float32),
                           10.0, ["2025-01-07"], valid_from=valid_from)
        lm.version = version
        LightMaps(out / "light").save("node0001", lm)
    # new hardware (no model: before, the scoring job stopped at "no model for nodes ['node0009']"), and a
    # node retired in the maintenance log whose collector still sends: neither is in the night's outputs
    day = tmp_path / "daily" / "2025-01-08"
    shutil.copy(day / "node0003.csv", day / "node0009.csv")
    (tmp_path / "changes.csv").write_text("node,since,note,kind\nnode0002,2025-01-08,to the test partition,retired\n")
    env = nightly_env_file(tmp_path, out, extra="nightly.job_tasks=2 nightly.job_mem_mb=1500",
                           more=f"HPCAD_SLURM=1\nSLURM_CONF={slurm_env['SLURM_CONF']}\n"
                                f"HPCAD_CHANGES={tmp_path / 'changes.csv'}\n")
    p = cron(env, "--date", "2025-01-08")
    assert p.returncode == 0, p.stderr[-3000:]
    night = out / "2025-01-08"
    assert [r["node"] for r in csv.DictReader(open(night / "levels.csv"))] == ["node0000", "node0001", "node0003"]
    assert not [a for a in json.loads((night / "alarms.json").read_text()) if a["node"] in ("node0002", "node0009")]
    with h5py.File(night / "errors.h5") as f:
        assert [f[f"nodes/node000{i}"].attrs["light_version"] for i in range(4)] == [0, 1, 0, 0]
    logs = list(night.glob("slurm-*.out"))
    assert len(list(night.glob("errors-rank*.h5"))) == 2 and logs  # 2 SLURM ranks (nightly.job_tasks)
    # the scoring job's own size (#16 item 14), not the training script's 4 tasks x 4 GPUs x 8 CPUs
    job = subprocess.run(["scontrol", "show", "job", logs[0].stem.split("-")[1]], env=slurm_env,
                         capture_output=True, text=True).stdout
    assert "NumTasks=2" in job and "MinMemoryNode=3000M" in job and "gres/gpu" not in job and "CPUs/Task=8" in job, job
    assert (night / "alarms.json").exists() and (night / "report.html").exists()
    assert json.loads((night / "thresholds.json").read_text()) == \
        json.loads((tmp_path / "trainrun" / "thresholds.json").read_text())  # the trained run's thresholds


def test_a_failed_step_ends_the_job_log_with_the_step_and_its_first_error(tmp_path, slurm_env):
    """The log of a failed job ended in srun's "Terminated" lines for the ranks it stopped, the job
    with exit 143, and the cause was somewhere among every rank's lines above. Now the last line
    names the step and repeats the first hpcad error of this run (not of an earlier run whose
    lines a requeued job's log also holds), and the job ends with hpcad's exit 2."""
    log = tmp_path / "job.out"
    log.write_text("hpcad train: error: from an earlier run of this job (a requeue appends)\n")
    wrong = ["threshold=pot", "threshold.risk=0.5"]
    for preflight, tasks, args, step, said in (
            ("1", 2, [*wrong, "compute.progress=false"], "preflight",
             ["hpcad preflight: error: threshold.init_q=0.98, threshold.risk=0.5"]),
            # the ranks' own error, not the option's: rank 0's or another rank's "rank 0 stopped: ...",
            # whichever reached the log first
            ("0", 2, [*wrong, "data.source=/nonexistent/exports"], "training",
             ["hpcad train: error: ", "data.source: /nonexistent/exports does not exist"]),
            # no data.source: before, the job trained on the embedded synthetic cluster and said "done"
            ("1", 1, ["compute.progress=false"], "preflight",
             ["hpcad preflight: error: data.source: not given, so this job would run on the embedded synthetic"])):
        env = dict(slurm_env, HPCAD_RUN_DIR=str(tmp_path / f"run{preflight}{tasks}"), HPCAD_PREFLIGHT=preflight)
        job = sbatch_wait([f"--ntasks-per-node={tasks}", "--open-mode=append", "-o", str(log),
                           str(ROOT / "slurm" / "train_all_nodes.sh"), *args], env=env, cwd=tmp_path)
        last = log.read_text().rstrip().splitlines()[-1]
        assert job.returncode == 2, log.read_text()[-3000:]
        assert last.startswith(f"train_all_nodes: the {step} step failed (exit ") and all(s in last for s in said), last


def test_a_sites_copy_of_the_script_on_a_cpu_partition_runs_unedited(tmp_path, slurm_env):
    """#16 item 10: a copy kept elsewhere finds score_steps.sh, and sbatch options replace the GPU lines;
    baselines asked for by name run over the job's ranks."""
    import shutil

    exports = small_exports(tmp_path)
    site = tmp_path / "site-scripts"
    site.mkdir()
    shutil.copy(ROOT / "slurm" / "train_all_nodes.sh", site / "train_cpu.sh")  # no score_steps.sh beside it
    run = tmp_path / "run"
    job = sbatch_wait(["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                       "-o", str(tmp_path / "job.out"), str(site / "train_cpu.sh"), f"data.source={exports}",
                       "train.epochs=1", "compute.progress=false", "baselines.methods=[range]", "report.enabled=false"],
                      env=dict(slurm_env, HPCAD_RUN_DIR=str(run), HPCAD_PREFLIGHT="0", HPCAD_SRUN_MPI="pmi3"),
                      cwd=tmp_path)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert job.returncode == 0, job.stderr + log[-3000:]
    assert "hpcad preflight" not in log  # HPCAD_PREFLIGHT=0 skips it
    # an MPI plugin this SLURM does not have: the threshold step runs with --mpi=none instead of failing the
    # job, its two ranks sharing the nodes over a gloo group (before 2026-12-04: one process)
    assert "hpcad: srun --mpi=pmi3 does not start a task here" in log  # (mpi4py: a test dependency)
    assert "the ranks reduce over their torch.distributed process group instead" in log
    # baselines named on the command line run as a step of their own over the ranks, and are applied
    # (before 2026-12-04 the scripts ran none, without a word)
    assert len(re.findall(r"thresholds applied to 2 of 4 nodes here \(.*1 baseline\(s\)\)", log)) == 2, log[-3000:]
    assert "range" in json.loads((run / "metrics.json").read_text())["baselines"]
    assert (run / "thresholds.json").exists() and len(list((run / "models").glob("training-rank*.json"))) == 2
    assert "rank 1/2: 2 of 4 node models" in log  # each rank says what it trained itself
    assert "--gpu-bind" not in log and "CUDA_VISIBLE_DEVICES" not in log  # no GPU in the job: none bound
    (link,) = run.glob("slurm-*.out")  # the job log is reachable from the run folder
    assert link.is_symlink() and link.resolve() == (tmp_path / "job.out").resolve()


def test_the_gpu_check_runs_as_the_walkthrough_submits_it(tmp_path, slurm_env):
    """docs/cluster.md's step 2, `sbatch slurm/gpu_check.py`, from a shell whose environment sbatch
    does not pass on but HPCAD_ENV (as the batch scripts take it): before, the job ran the system
    python3 and ended in a ModuleNotFoundError traceback; now the script loads HPCAD_ENV first, and
    without any hpcad environment it says what to do in one line."""
    env_file = tmp_path / "env.sh"
    env_file.write_text(f'export PATH="{Path(shutil.which("hpcad")).parent}:$PATH"\n')
    bare = {"PATH": "/usr/bin:/bin", "SLURM_CONF": slurm_env["SLURM_CONF"]}  # no venv on PATH
    script = str(ROOT / "slurm" / "gpu_check.py")
    check = ["--rehearse", "--only", "end_to_end", "--out", str(tmp_path / "check")]
    job = sbatch_wait([f"--export=HPCAD_ENV={env_file}", "-o", str(tmp_path / "check.out"), script, *check],
                      env=bare, cwd=tmp_path)
    log = (tmp_path / "check.out").read_text()
    assert job.returncode == 0 and "| end_to_end | pass |" in log, log[-3000:]
    assert "| end_to_end | pass |" in (tmp_path / "check" / "gpu_check.md").read_text()
    job = sbatch_wait(["--export=NONE", "-o", str(tmp_path / "none.out"), script, *check], env=bare, cwd=tmp_path)
    log = (tmp_path / "none.out").read_text()
    assert job.returncode == 1 and log.startswith("gpu_check: cannot import ") and "HPCAD_ENV" in log, log
    assert "Traceback" not in log
