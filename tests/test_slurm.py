"""Scale-out on a real SLURM (slurm/dev-cluster.sh: slurmctld + 4 slurmd on this machine); the longest
sbatch runs are in test_slurm_jobs.py, so that `pytest -n` runs both files side by side."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, generate, hpcad, hpcad_cmd, sbatch_wait, slurm_models, small_exports
from hpcad.errorstore import ErrorStore
from hpcad.dist import World, first_host, shard, world
from hpcad.errors import ConfigError, HpcadError


def test_sbatch_train_all_nodes_matches_the_single_process_run(tmp_path, slurm_env):
    exports = tmp_path / "exports"
    generate(exports, nodes=16, rows=300)
    # a node back from repair with a day of rows: too few to train on; the script trains with
    # data.on_bad_node=skip, so it is left untrained and the 16 others are trained and scored
    lines = (exports / "node0000.csv").read_text().splitlines()[:13]
    (exports / "node0016.csv").write_text("\n".join(lines) + "\n")
    args = [f"data.source={exports}", "train.epochs=2", "compute.progress=false", "baselines.methods=[]",
            "report.max_nodes_plotted=2", "report.max_node_pages=2"]  # a report, but a small one
    single = tmp_path / "single"
    hpcad("run", f"hydra.run.dir={single}", *args, "report.enabled=false", "data.on_bad_node=skip")  # the job's
    # report is checked
    run = tmp_path / "slurm-run"
    env = dict(slurm_env, HPCAD_RUN_DIR=str(run))
    job = sbatch_wait(["-o", str(tmp_path / "job.out"), str(ROOT / "slurm" / "train_all_nodes.sh"), *args],
                      env=env, cwd=tmp_path)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert job.returncode == 0, job.stderr + log[-3000:]
    assert sorted((run / "models").glob("training-rank*.json")).__len__() == 4  # 4 ranks trained shards
    # one GPU per rank: SLURM bound GPU i (of the dev cluster's 4 per node, devices in name only) to
    # task i, and each rank says so; the CPU build of torch then trains on the CPU, and says that too
    assert "srun --gpu-bind=per_task:1 (4 tasks, 4 GPUs per node)" in log
    bound = set(re.findall(r"rank (\d) of 4 on \S+: \d+ of 1[67] nodes, device cpu, CUDA_VISIBLE_DEVICES=([^\s,]+)", log))
    assert bound == {("0", "0"), ("1", "1"), ("2", "2"), ("3", "3")}, bound
    said = re.findall(r"\[WARNING\] - GPUs are allocated to this process \(CUDA_VISIBLE_DEVICES=(\d)\) but torch", log)
    assert said and set(said) == {"0"}, said  # by the host's first rank, once a step (preflight's table: each rank)
    # the script's OMP_NUM_THREADS (--cpus-per-task=8) for 4 ranks is kept where the CPUs are there
    # (the dev cluster tells SLURM 32 per node), else each rank uses its share of the real ones
    capped = "OMP_NUM_THREADS=8 for each of 4 rank(s) sharing" in log
    assert capped == (4 * 8 > len(os.sched_getaffinity(0))), log[-3000:]
    # the preflight step ran first: every rank's view (its bound GPU), and the ranks met
    assert "hpcad preflight: 4 rank(s) on 1 node(s), gloo at localhost:" in log
    report = json.loads((run / "preflight.json").read_text())
    assert [(r["rank"], r["cuda_visible_devices"]) for r in report["per_rank"]] == [(0, "0"), (1, "1"), (2, "2"),
                                                                                    (3, "3")]
    assert report["problems"] == [] and len(report["notes"]) == 4  # GPUs bound, but torch here is a CPU build
    a, b = slurm_models(single), slurm_models(run)
    assert a.keys() == b.keys() and len(a) == 16
    assert (run / "models" / "node0016.untrained.json").exists() and "Untrained nodes (1)" in (run / "report.html").read_text()
    for name in a:  # the same bits: 4 ranks with a share of the CPUs each, one process with all of them
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name
    assert (run / "report.html").exists() and (run / "thresholds.json").exists()
    # Scoring ran on every rank (one error file each); errors.h5 indexes them and matches the single run.
    from hpcad.errorstore import ErrorStore

    assert len(list(run.glob("errors-rank*.h5"))) == 4
    one, many = ErrorStore(single / "errors.h5"), ErrorStore(run / "errors.h5")
    assert one.nodes == many.nodes and one.missing == many.missing and len(many.missing) == 16  # the index's table
    for s1, s2 in zip(one.signals(), many.signals()):
        assert np.array_equal(s1.signal, s2.signal), s1.node
    h5ls = shutil.which("h5ls")
    if h5ls:
        listing = subprocess.run([h5ls, "-r", str(run / "errors.h5")], capture_output=True, text=True).stdout
        assert "/nodes/node0000" in listing and "External Link" in listing
    t1, t2 = (json.loads((d / "thresholds.json").read_text()) for d in (single, run))
    assert t1["nodes"] == t2["nodes"]  # before 2026-12-05 the whitening's sums depended on the threads


RANK_ZERO_DRIVER = """
import json, sys
from pathlib import Path
import torch
from hpcad import dist
from hpcad.errors import HpcadError, InputError

out = Path(sys.argv[1])
w = dist.init(torch.device("cpu"))
ran = []

def listing():
    ran.append(w.rank)
    return {"nodes": sorted(p.name for p in (out / "models").iterdir()), "by": w.rank}

def fails():
    ran.append(w.rank)
    raise InputError("every node (2) was left untrained by training")

said = {"value": dist.from_rank_zero(listing)}
try:
    dist.from_rank_zero(fails)
except HpcadError as exc:
    said["error"] = f"{type(exc).__name__}: {exc}"
said["ran"] = ran
(out / f"rank{w.rank}.json").write_text(json.dumps(said))
dist.finish()
"""


def test_rank_zero_alone_reads_the_shared_folder_and_its_error_stops_every_rank(tmp_path):
    """What every rank needs from the shared file system (the training run's models folder: one
    listing and a stat per model file) is read by rank 0 alone and given to the others; before, 400
    ranks each listed it at every stage. An error there stops every rank: rank 0 with its own, the
    others naming it (two gloo ranks, started as torchrun starts them)."""
    import socket

    (tmp_path / "models").mkdir()
    for n in ("node0000.pt", "node0001.pt"):
        (tmp_path / "models" / n).write_bytes(b"")
    (tmp_path / "driver.py").write_text(RANK_ZERO_DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path)], cwd=ROOT,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["value"] == one["value"] == {"nodes": ["node0000.pt", "node0001.pt"], "by": 0}
    assert zero["ran"] == [0, 0] and one["ran"] == []  # rank 1 read nothing itself
    assert zero["error"] == "InputError: every node (2) was left untrained by training"
    assert one["error"] == "HpcadError: rank 0 stopped: every node (2) was left untrained by training"


def test_ranks_with_empty_shards_and_a_mismatched_world(tmp_path, slurm_env):
    exports = tmp_path / "exports"
    generate(exports, nodes=3, rows=200)
    # no hydra.run.dir: every rank writes into the job's folder, not one named after its own start time
    cmd = ["srun", "-N1", "-n4", "python", "-m", "hpcad", "train", f"data.source={exports}", "train.epochs=1",
           "compute.progress=false"]
    unset = {k: v for k, v in slurm_env.items() if k != "OMP_NUM_THREADS"}  # as a plain srun in a fresh shell
    p = subprocess.run(cmd, env=unset, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("slurm-"), runs
    assert len(list((runs[0] / "models").glob("*.pt"))) == 3  # rank 3 had no node and still finished
    # no CPU binding on the dev cluster and no OMP_NUM_THREADS: the 4 ranks split the CPUs they share
    threads = [int(t) for t in re.findall(r"device cpu, (\d+) CPU thread\(s\) \(its share", p.stderr + p.stdout)]
    assert len(threads) == 4 and 4 * threads[0] <= max(4, os.cpu_count()), p.stderr[-2000:]
    bad = subprocess.run(cmd, env=dict(slurm_env, HPCAD_WORLD_SIZE="2"), capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert bad.returncode != 0 and "HPCAD_WORLD_SIZE=2" in bad.stderr


def test_a_run_folder_that_is_not_shared_between_nodes_stops_every_rank(tmp_path, slurm_env):
    """HPCAD_RUN_DIR on node-local storage: rank 1 sees its own empty folder under the same path (here a
    tmpfs mounted over it in rank 1's mount namespace, as another node's /tmp would be). Before, the
    step ended with exit 0 and rank 1's models were lost; now every rank stops, naming it."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (it stands in for a second node's local disk)")
    exports = small_exports(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    local = tmp_path / "local.sh"  # rank 1: a private, empty file system at the run folder's path
    local.write_text('#!/bin/bash\nif [ "$SLURM_PROCID" = 1 ]; then\n'
                     f'  exec unshare -m bash -c \'mount -t tmpfs none {run} && exec "$@"\' - "$@"\nfi\nexec "$@"\n')
    local.chmod(0o755)
    p = subprocess.run(["srun", "-N2", "-n2", str(local), *hpcad_cmd(), "train", f"data.source={exports}",
                        f"hydra.run.dir={run}", "train.epochs=1", "compute.progress=false"],
                       env=slurm_env, capture_output=True, text=True, timeout=300)
    errors = [line for line in p.stderr.splitlines() if line.startswith("hpcad train: error:")]
    assert p.returncode != 0 and len(errors) == 2, p.stderr[-3000:]  # both ranks, with the same reason
    assert "is not one folder for all ranks: rank 1 on" in errors[0] and "does not see rank 0's files" in errors[0]
    assert not list(run.glob(".ranks.*"))  # rank 0's marker is gone


def test_whole_run_on_two_ranks_ingests_once_and_matches_one_process(tmp_path, slurm_env):
    """`srun -n2 hpcad run` on a new run folder (synthetic data): before, every rank ingested into the
    one store.h5 (rank 0's lock then removed rank 1's temporary store: a traceback, and the step hung
    in the next stage); baselines and the report were also made by every rank. Now rank 0 ingests,
    makes the baselines and the report; the result is the single-process run's. The stages share one
    process group: started again for scoring on the same port, torch's rendezvous could let rank 1
    reach rank 0's old store, and the step hung there until the collective timeout (hpcad.dist).
    Baselines: each rank fits its share (subsampled fits included), rank 0 indexes them; so do the
    thresholds (before 2026-12-04 rank 0 applied them alone)."""
    args = ["data.synthetic.nodes=3", "data.synthetic.rows=400", "train.epochs=2", "compute.progress=false",
            "baselines.methods=[kde]", "baselines.max_train_rows=100", "report.max_nodes_plotted=1"]
    single, run = tmp_path / "single", tmp_path / "run"
    one = hpcad("run", f"hydra.run.dir={single}", *args).stdout
    p = subprocess.run(["srun", "--kill-on-bad-exit=1", "-N1", "-n2", *hpcad_cmd(), "run", f"hydra.run.dir={run}",
                        *args], env=slurm_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # the closing lines (alarms, test cost, baselines' cost, report) once, by rank 0, as one process says them
    gist = [line.replace(str(single), str(run)) for line in one.splitlines() if line.startswith("hpcad: ")]
    assert len(gist) == 4 and [line for line in p.stdout.splitlines() if line.startswith("hpcad: ")] == gist, p.stdout
    rank0, rank1 = ((run / "logs" / f"run-rank{r}.log").read_text() for r in (0, 1))
    assert rank0.count("process group: gloo, 2 ranks") == 1 and rank0.count("all 2 ranks joined") == 1, rank0
    assert "generated the synthetic cluster" not in rank1 and "report: done by rank 0 of 2" in rank1
    assert f"baseline kde -> {run / 'baselines' / 'kde-rank1.h5'}" in rank1
    assert (run / "report.html").exists()
    # the thresholds too, over the command's gloo group: the dev cluster's srun starts no MPI (MpiDefault=none)
    assert "the ranks reduce over their torch.distributed process group instead" in rank0
    assert re.search(r"thresholds applied to \d of 3 nodes here", rank1), rank1[-2000:]
    with h5py.File(run / "baselines" / "kde.h5", "r") as f:  # an index of the ranks' files
        assert list(f.attrs["index_of"]) == ["kde-rank0.h5", "kde-rank1.h5"]
    kde = [list(ErrorStore(r / "baselines" / "kde.h5").signals()) for r in (single, run)]
    assert [s.node for s in kde[0]] == [s.node for s in kde[1]] == ["node0000", "node0001", "node0002"]
    for one, many in zip(*kde):
        np.testing.assert_allclose(one.signal, many.signal, rtol=1e-6)
    got, want = (json.loads((r / "thresholds.json").read_text()) for r in (run, single))
    assert got["nodes"] == pytest.approx(want["nodes"]) and got["cluster"] == want["cluster"]
    assert (run / "alarms.csv").read_text() == (single / "alarms.csv").read_text()
    got, want = (json.loads((r / "metrics.json").read_text())["baselines"]["kde"] for r in (run, single))
    # KDE chose its range-excess weight on its validation figures summed over both ranks: the one choice
    assert got["excess_weight"] == want["excess_weight"] and got["excess_choice"]["nodes"] == 3
    assert got["excess_choice"]["validation_ap"] == pytest.approx(want["excess_choice"]["validation_ap"], abs=1e-6)
    assert got["thresholds"]["nodes"] == pytest.approx(want["thresholds"]["nodes"])
    assert got["splits"]["test"]["cost"] == want["splits"]["test"]["cost"]
    # the baselines again in one process: kde.h5 is a whole file, the rank files it no longer links to go
    again = hpcad("baselines", f"hydra.run.dir={run}", *args)
    assert "removed 2 per-rank kde file(s)" in again.stdout + again.stderr
    assert sorted(p.name for p in (run / "baselines").iterdir()) == ["kde.h5"]
    # scored again in one process: errors.h5 is a whole file now; the rank files it no longer links to go
    assert len(list(run.glob("errors-rank*.h5"))) == 2
    again = hpcad("score", f"hydra.run.dir={run}", *args)
    assert not list(run.glob("errors-rank*.h5")) and "removed 2 per-rank error file(s)" in again.stdout + again.stderr
    assert sorted(ErrorStore(run / "errors.h5").nodes) == ["node0000", "node0001", "node0002"]


def test_a_rank_failing_mid_stage_stops_every_rank_with_one_line_each(tmp_path, slurm_env):
    """One rank cannot load a model file while scoring (a corrupt file): it stops naming the file;
    the rank waiting for it in a collective stops with one line saying why, where before it died in
    a gloo "Connection closed by peer" traceback (exit 1)."""
    exports = small_exports(tmp_path)
    run = tmp_path / "run"
    hpcad("train", f"data.source={exports}", f"hydra.run.dir={run}", "train.epochs=1", "compute.progress=false")
    bad = run / "models" / "node0003.pt"
    data = bytearray(bad.read_bytes())
    data[100:200] = b"x" * 100
    bad.write_bytes(bytes(data))
    p = subprocess.run(["srun", "-N1", "-n2", *hpcad_cmd(), "score", f"hydra.run.dir={run}", f"data.source={exports}",
                        "compute.progress=false"], env=slurm_env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("hpcad score: error:")]
    assert p.returncode == 2 and len(errors) == 2 and "Traceback" not in out, out[-3000:]
    assert any(f"{bad}: cannot load model file (garbled or not plain tensors" in e for e in errors), errors
    assert any("another rank of this step stopped, so this one stops too" in e for e in errors), errors


def test_ranks_share_one_run_folder_when_none_is_given():
    from hpcad.cli import ranks_run_dir

    slurm = {"SLURM_JOB_ID": "4711"}
    assert ranks_run_dir("train", ["data.source=x"], slurm) == "hydra.run.dir=runs/slurm-4711"
    assert ranks_run_dir("train", ["-m", "model.hidden=[8],[16]"], slurm) == "hydra.sweep.dir=multirun/slurm-4711"
    assert ranks_run_dir("train", ["hydra.run.dir=runs/a"], slurm) is None  # the user's wins
    assert ranks_run_dir("train", ["--cfg", "job"], slurm) is None  # nothing is written
    with pytest.raises(ConfigError, match="several ranks and no hydra.run.dir"):  # torchrun, mpiexec: no common name
        ranks_run_dir("train", ["data.source=x"], {"RANK": "1", "WORLD_SIZE": "2"})


def test_ranks_sharing_unbound_cpus_split_them():
    from hpcad.dist import cpu_share

    cpus = list(range(32))
    unbound = [("a", cpus)] * 4 + [("b", cpus)] * 2  # no CPU binding: every rank sees all of its node's CPUs
    assert cpu_share("a", cpus, unbound) == 8 and cpu_share("b", cpus, unbound) == 16
    bound = [("a", cpus[8 * i:8 * i + 8]) for i in range(4)]  # SLURM bound 8 CPUs to each task
    assert cpu_share("a", cpus[:8], bound) is None
    assert cpu_share("a", [0, 1], [("a", [0, 1])] * 4) == 1  # never fewer than one thread
    assert cpu_share("a", cpus, [("a", cpus)]) is None  # one rank on the node


def test_an_omp_num_threads_that_oversubscribes_the_cpus_is_capped(monkeypatch, caplog):
    """OMP_NUM_THREADS from --cpus-per-task is kept where it fits the CPUs the rank runs on; where it
    does not (a node with fewer CPUs than SLURM was told, as the dev cluster on a small machine:
    two trainings with 8 threads each took 51 s instead of 4.7 s on 2 cores), the CPUs are used."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from hpcad.dist import share_cpu_threads

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # restored as they were after the test (set first:
        monkeypatch.setenv(var, "")  # delenv records nothing for a variable that is not there, and the
        monkeypatch.delenv(var)  # values share_cpu_threads sets then stayed in this worker's later subprocesses)
    before = torch.get_num_threads()
    with threadpool_limits(limits=3, user_api="blas"):  # numpy's BLAS as OMP_NUM_THREADS=3 would have set it
        try:
            monkeypatch.setenv("OMP_NUM_THREADS", "2")
            assert share_cpu_threads() is None and blas_threads() == {3}  # fits: the launcher's choice stands
            monkeypatch.setenv("OMP_NUM_THREADS", "8")
            with caplog.at_level("WARNING", logger="hpcad.dist"):
                assert share_cpu_threads() == 2 and torch.get_num_threads() == 2
            assert "OMP_NUM_THREADS=8 for each of 1 rank(s) sharing 2 CPU(s)" in caplog.text
            # numpy's BLAS too (PCA and the thresholds run there: 16 ranks each running the script's 8
            # OpenBLAS threads on 2 cores made PCA's baseline 10x slower), and a BLAS loaded later
            assert blas_threads() == {2} and os.environ["OPENBLAS_NUM_THREADS"] == "2"
            monkeypatch.setenv("OMP_NUM_THREADS", "many")
            assert share_cpu_threads() is None  # not a count: left to OpenMP, which says so itself
        finally:
            torch.set_num_threads(before)


def test_rank_0_waiting_for_the_other_ranks_says_so_until_they_come(monkeypatch):
    """A rank 0 that waits long for the others (to join, to finish a stage) says so periodically, so a
    long wait for the slowest rank reads as one and a hung step shows where it waits; the other ranks
    stay quiet (hundreds of them would repeat it)."""
    import logging
    import threading

    from hpcad import dist

    said = threading.Event()
    lines: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            said.set()

    handler, logger = Seen(logging.INFO), logging.getLogger("hpcad.dist")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        with dist.waiting("for the other ranks to finish training", every_s=0.01):
            assert said.wait(60)  # the body blocks until the first line (a collective, in the stages)
        assert re.fullmatch(r"still waiting for the other ranks to finish training \(\d+ s so far\)", lines[0]), lines
        assert not [t for t in threading.enumerate() if t.name == "hpcad-waiting"]  # it stops with the wait
        lines.clear()
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with dist.waiting("for rank 0", every_s=0.01):
            assert not [t for t in threading.enumerate() if t.name == "hpcad-waiting"]
        assert lines == []
    finally:
        logger.removeHandler(handler)


def test_shard_is_balanced_deterministic_and_rank_independent():
    rows = {f"n{i}": r for i, r in enumerate([900, 100, 500, 500, 300, 300, 200, 50])}
    parts = shard(rows, 3)
    assert sorted(sum(parts, [])) == sorted(rows) and shard(rows, 3) == parts
    loads = [sum(rows[n] for n in p) for p in parts]
    assert max(loads) - min(loads) <= max(rows.values()) // 2
    assert shard({"a": 5}, 4) == [["a"], [], [], []]


def test_world_from_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "HPCAD_WORLD_SIZE",
              "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)  # the suite itself may run inside an MPI or SLURM allocation
    assert world() == World()
    from hpcad.threshold.reduce import Reducer, reducer

    assert type(reducer(world())) is Reducer  # one process: no MPI
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert world() == World(1, 3, 0, "mpi")  # Open MPI's mpirun
    for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert world() == World(2, 4, 2, "slurm")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world().source == "torchrun" and world().rank == 1
    assert first_host("n[1-4,7]") == "n1" and first_host("gpu-a,gpu-b") == "gpu-a" and first_host("x12") == "x12"
    assert first_host("lrdn[0123-0130]") == "lrdn0123"


def test_rendezvous_timeout_and_gpu_choice_for_multi_node_jobs(monkeypatch):
    """#16 items 1, 2, 4 without a GPU: where ranks meet, how long they may wait, which GPU a rank takes."""
    import datetime as dt

    from hpcad.device import gpu_index
    from hpcad.dist import rendezvous, step_port, timeout

    # n3's address as SLURM knows it (scontrol's NodeAddr; the dev cluster's is localhost, which the
    # two-node job in test_slurm_jobs.py meets at): stood in for here, so no cluster is needed
    monkeypatch.setattr("hpcad.dist.node_address", {"n3": "10.1.0.3"}.get)
    pmi_in_slurm = {"PMI_RANK": "5", "PMI_SIZE": "8", "SLURM_JOB_ID": "123457", "SLURM_STEP_NODELIST": "n[3-4]"}
    addr, port = rendezvous(World(5, 8, 1, "mpi"), pmi_in_slurm)
    assert addr == "10.1.0.3" and port == str(step_port(123457))  # rank 0's node, a port per job: not 127.0.0.1:29511
    # two steps of one job at once (srun ... & in an allocation) meet at different ports
    assert rendezvous(World(5, 8, 1, "slurm"), {**pmi_in_slurm, "SLURM_STEP_ID": "3"})[1] == str(step_port(123457, 3))
    ports = {step_port(j, s) for j in range(123400, 123500) for s in range(6)}
    assert len(ports) == 600 and min(ports) >= 20000 and max(ports) < 32768  # below Linux's ephemeral ports
    # mpiexec outside SLURM: rank 0 offers its host and a free port over MPI (a job of its own, so two
    # on one host do not meet at one port: tests/test_mpi.py runs one beside a taken 29511); a rank on
    # rank 0's host meets it at localhost, a rank elsewhere at rank 0's host
    here = socket.gethostname()
    offered = []
    assert rendezvous(World(0, 8, 0, "mpi"), {}, bcast=lambda x: offered.append(x) or x)[0] == "127.0.0.1"
    assert offered[0][0] == here and 20000 <= int(offered[0][1]) < 32000
    assert rendezvous(World(5, 8, 1, "mpi"), {}, bcast=lambda x: ("gpu-a", "23456")) == ("gpu-a", "23456")
    assert rendezvous(World(5, 8, 1, "mpi"), {"MASTER_ADDR": "ib-a"}, bcast=lambda x: (here, "23456")) == ("ib-a", "23456")
    # without MPI joining the ranks (no mpi4py): one host meets at 127.0.0.1:29511 as before; ranks on
    # several hosts cannot know where rank 0 is, and say what to set instead of waiting for ever
    monkeypatch.setattr("hpcad.dist.mpi_bcast", lambda w: None)
    one_host = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}
    assert rendezvous(World(1, 2, 1, "mpi"), one_host) == ("127.0.0.1", "29511")
    with pytest.raises(ConfigError, match="several hosts.*hpcad\\[mpi\\].*MASTER_ADDR"):
        rendezvous(World(1, 8, 1, "mpi"), {"PMI_RANK": "1", "PMI_SIZE": "8", "MPI_LOCALNRANKS": "4"})
    assert rendezvous(World(1, 8, 1, "mpi"), {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                                             "MASTER_ADDR": "h0"}) == ("h0", "29511")
    assert rendezvous(World(1, 2, 1, "slurm"), {**pmi_in_slurm, "MASTER_ADDR": "h", "MASTER_PORT": "7"}) == ("h", "7")
    monkeypatch.delenv("HPCAD_DIST_TIMEOUT_MIN", raising=False)
    assert timeout() == dt.timedelta(hours=12)  # stages behind a barrier outlast NCCL's 10-minute default
    monkeypatch.setenv("HPCAD_DIST_TIMEOUT_MIN", "90")
    assert timeout() == dt.timedelta(minutes=90)
    monkeypatch.setenv("HPCAD_DIST_TIMEOUT_MIN", "soon")
    with pytest.raises(ConfigError, match="HPCAD_DIST_TIMEOUT_MIN"):
        timeout()
    # NCCL only where GPU tensors are all-reduced (the fleet model): per-node stages wait at barriers
    # for whole stages, over gloo, with no NCCL communicator or watchdog on the GPUs
    from hpcad.dist import backend

    cuda, cpu = torch.device("cuda:1"), torch.device("cpu")
    assert (backend(cuda, False), backend(cuda, True), backend(cpu, True)) == ("gloo", "nccl", "gloo")
    assert gpu_index(3, 4) == 3 and gpu_index(3, 1) == 0  # one GPU bound per task: it is this rank's
    with pytest.raises(ConfigError, match="local rank 4 but only 4 GPUs"):
        gpu_index(4, 4)  # two ranks on one GPU would fail at NCCL's first barrier, unhelpfully


def test_rank_0_whose_rendezvous_port_is_taken_says_so(monkeypatch):
    """Another process on rank 0's node listening at the step's port: one clear error naming the port
    and MASTER_PORT, not torch's DistNetworkError (nor, in preflight, "could not join ... reach")."""
    import datetime as dt
    import socket

    import torch

    from hpcad import dist

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(HpcadError, match=f"cannot listen at port {port} .*address already in use.*MASTER_PORT"):
            dist.init(torch.device("cpu"), wait=dt.timedelta(seconds=30))
    assert not dist._started()


def test_a_failed_jobs_cause_is_taken_from_its_result_not_from_a_log_still_being_written(tmp_path):
    """submitit sees a job fail from its result file, which holds the whole traceback, while the
    job's stderr may still be being written: the launcher's error once quoted that file's tail
    without the error's last line (on a busy machine). Read from submitit's own message here (its
    local executor: no SLURM needed), the end of the trace is the error."""
    import submitit

    from hpcad.launch.submitit import _trace_end

    job = submitit.LocalExecutor(folder=tmp_path).submit(int, "nowhere")  # (the job pickles a function by name)
    with pytest.raises(submitit.core.utils.FailedJobError) as failed:
        job.result()
    end = _trace_end(str(failed.value))
    assert end.splitlines()[-1] == "ValueError: invalid literal for int() with base 10: 'nowhere'"
    assert end.startswith(("Traceback", "  File")) and "You can check full logs" not in end


def test_submitit_launcher_runs_the_stage_as_a_slurm_job(tmp_path, slurm_env):
    exports = small_exports(tmp_path)
    run = tmp_path / "run"
    p = subprocess.run([*hpcad_cmd(), "train", "launcher=submitit", "launcher.tasks_per_node=2",
                        "launcher.gpus_per_node=2", f"data.source={exports}", f"hydra.run.dir={run}", "train.epochs=1",
                        "compute.progress=false"],
                       env=slurm_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0/2" in p.stdout
    assert len(list((run / "models").glob("node*.pt"))) == 4
    assert len(list((run / "models").glob("training-rank*.json"))) == 2
    jobs = [d for d in (run / "submitit").iterdir() if d.is_dir() and d.name.isdigit()]
    assert len(jobs) == 1, list((run / "submitit").iterdir())
    job_dir = jobs[0]
    assert (job_dir / f"{job_dir.name}_0_log.out").exists() and (job_dir / f"{job_dir.name}_1_log.out").exists()
    script = next(job_dir.glob("*_submission.sh")).read_text()
    assert "srun" in script and "--kill-on-bad-exit=1" in script  # one failing rank ends the step
    assert "--export=ALL" in script  # the step gets launcher.setup's environment, whatever sbatch passes on
    # one GPU per rank (the dev cluster's GPUs exist in name only; torch here is a CPU build)
    ranks_logs = "".join((job_dir / f"{job_dir.name}_{r}_log.{x}").read_text() for r in (0, 1) for x in ("out", "err"))
    bound = set(re.findall(r"rank (\d) of 2 on \S+: \d of 4 nodes, device cpu, CUDA_VISIBLE_DEVICES=([^\s,]+)", ranks_logs))
    # which two of the node's four GPUs SLURM hands out depends on the jobs the other test worker runs
    # on the dev cluster at that moment: each rank one GPU of its own is what counts
    gpus = dict(bound)
    assert "--gpu-bind=per_task:1" in script and set(gpus) == {"0", "1"} and len(bound) == 2, bound
    assert all(g.isdigit() for g in gpus.values()) and gpus["0"] != gpus["1"], bound
    # a job that fails says why, from its error log (not only where the logs are)
    bad = subprocess.run([*hpcad_cmd(), "train", "launcher=submitit", f"data.source={tmp_path / 'nowhere'}",
                          f"hydra.run.dir={tmp_path / 'bad'}", "compute.progress=false"],
                         env=slurm_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2 and "_0_log.err" in bad.stderr and "does not exist" in bad.stderr, bad.stderr[-2000:]
    assert "asks for no GPU (launcher.gpus_per_node=0)" in bad.stdout + bad.stderr  # not silently CPU


def test_hydra_sweep_through_submitit_slurm_ranks_the_points(tmp_path, slurm_env):
    exports = small_exports(tmp_path)
    sweep = tmp_path / "sweep"
    p = subprocess.run([*hpcad_cmd(), "run", "-m", "train.epochs=1,0", "hydra/launcher=submitit_slurm",
                        f"hydra.sweep.dir={sweep}", f"data.source={exports}",
                        "compute.progress=false", "baselines.methods=[]", "report.enabled=false"],
                       env=slurm_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert (sweep / "0" / "metrics.json").exists() and not (sweep / "1" / "metrics.json").exists()
    assert list((sweep / ".submitit").iterdir())  # each point was a SLURM job
    lines = (sweep / "sweep_summary.csv").read_text().splitlines()
    assert lines[0].startswith("rank,point,status,metric") and len(lines) == 3
    assert (sweep / "0" / "hpcad-run.log").exists()  # points are named after the stage (SLURM job name too)
    assert ",0,ok,val_cost," in lines[1] and ",1,failed,," in lines[2]
    # the failed point (train.epochs=0) is not silent: exit 2, named, though its SLURM job "completed"
    assert p.returncode == 2 and "1 sweep point(s) produced no result: 1 (train.epochs=0 " in p.stderr


def test_threshold_fit_under_srun_mpi_pmi2(tmp_path, slurm_env):
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py mpich)")
    exports = small_exports(tmp_path)
    run = tmp_path / "run"
    args = ["threshold", f"hydra.run.dir={run}", f"data.source={exports}", "threshold.scope=cluster"]
    hpcad("run", f"data.source={exports}", f"hydra.run.dir={run}", "train.epochs=1", "compute.progress=false",
          "baselines.methods=[]", "report.enabled=false", "threshold.scope=cluster")
    single = json.loads((run / "thresholds.json").read_text())
    p = subprocess.run(["srun", "--mpi=pmi2", "-N1", "-n2", *hpcad_cmd(), *args], env=slurm_env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "logs" / "threshold-rank1.log").exists()
    assert "[rank 1/2][hpcad" in (run / "logs" / "threshold-rank1.log").read_text()  # each rank's lines say whose they are
    assert "[rank 0/2]" in p.stdout + p.stderr
    assert json.loads((run / "thresholds.json").read_text())["cluster"] == pytest.approx(single["cluster"])
    assert "MPI did not join" not in p.stdout + p.stderr
    # a plugin that does not match the MPI (here none: each rank is its own MPI world of one): said once,
    # the ranks share the work over a gloo group instead (before 2026-12-04: each fitted on all nodes)
    p = subprocess.run(["srun", "--mpi=none", "-N1", "-n2", *hpcad_cmd(), *args], env=slurm_env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert out.count("MPI did not join the 2 ranks (this one is rank 0 of an MPI world of 1; MPI library: ") == 1
    assert "under srun, its --mpi plugin does not match that MPI" in out
    assert len(re.findall(r"thresholds applied to 2 of 4 nodes here", out)) == 2, out[-3000:]
    assert json.loads((run / "thresholds.json").read_text())["cluster"] == pytest.approx(single["cluster"])


def test_fleet_model_trains_with_ddp_on_two_gloo_ranks_on_two_nodes(tmp_path, slurm_env):
    exports = small_exports(tmp_path, nodes=5)
    run = tmp_path / "fleet"
    cmd = ["srun", "-N2", "-n2", *hpcad_cmd(), "train", "model.scope=fleet", f"data.source={exports}",
           f"hydra.run.dir={run}", "train.epochs=3", "compute.progress=false"]
    p = subprocess.run(cmd, env=slurm_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    models = slurm_models(run)
    assert len(models) == 5
    first = next(iter(models.values()))
    for params in models.values():  # nodes of both ranks carry the same, all-reduced weights
        assert all(torch.equal(x, y) for x, y in zip(first, params))
    hist = torch.load(run / "models" / "node0000.pt", weights_only=True)["history"]
    assert hist["scope"] == "fleet" and hist["val_loss"][-1] < hist["val_loss"][0]
    # one rank per node: they meet at the first node's address (its NodeAddr, localhost on the dev cluster)
    assert re.search(r"process group: gloo, 2 ranks, rank 0 at localhost:\d+, collectives wait up to 720 min", p.stdout + p.stderr)
    # the same step again (a job requeued after training): both ranks agree there is nothing to train
    stamps = {f.name: f.stat().st_mtime_ns for f in (run / "models").glob("*.pt")}
    again = subprocess.run(cmd, env=slurm_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "fleet model already trained" in again.stdout + again.stderr, again.stderr[-2000:]
    assert stamps == {f.name: f.stat().st_mtime_ns for f in (run / "models").glob("*.pt")}
    bad = hpcad("train", "model.scope=galaxy", f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert bad.returncode == 2 and "model.scope='galaxy'" in bad.stderr
    # A share over the host budget on one rank only (one rank has 2 of the 3 nodes, ~0.65 MB each, the
    # budget 1 MB): both ranks stop with its reason, exit 2, instead of the other rank failing at the
    # first all-reduce with gloo's connection error (srun without --kill-on-bad-exit lets it get there).
    big = tmp_path / "big"
    generate(big, nodes=3, rows=2400)
    over = subprocess.run(["srun", "-N2", "-n2", *hpcad_cmd(), "train", "model.scope=fleet", f"data.source={big}",
                           f"hydra.run.dir={tmp_path / 'over'}", "compute.memory_budget_mb=1", "compute.progress=false"],
                          env=slurm_env, capture_output=True, text=True, timeout=300)
    said = over.stdout + over.stderr
    assert over.returncode == 2, said[-3000:]
    assert "model.scope=fleet: this rank's 2 nodes need about 1.3 MB of training rows in host memory, more " \
           "than its budget (host 1 MB (compute.memory_budget_mb))" in said, said[-3000:]
    assert re.search(r"rank \d stopped: model.scope=fleet: this rank's 2 nodes", said)  # the other rank fitted, and heard why
    assert "Traceback" not in said and "Connection" not in said


def test_rank_0_input_error_reaches_every_rank_as_one_clean_exit(tmp_path, slurm_env):
    """#16 item 12: a bad data.source used to end in the waiting ranks' gloo "Connection closed by
    peer" tracebacks (exit 1); now every rank exits 2 with the cause."""
    p = subprocess.run(["srun", "-N1", "-n2", *hpcad_cmd(), "train", "data.source=/nonexistent/exports",
                        f"hydra.run.dir={tmp_path / 'run'}", "compute.progress=false"],
                       env=slurm_env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out and "Connection" not in out, out[-3000:]
    assert "hpcad train: error: data.source: /nonexistent/exports does not exist" in out
    assert "hpcad train: error: rank 0 stopped: data.source: /nonexistent/exports does not exist" in out


def test_confirmed_incident_drains_the_slurm_node_with_its_reason(slurm_env, tmp_path):
    import datetime as dt

    from hpcad.nightly.drain import candidates, drain, drained_before, lines

    def inc(node, nights, peak, state="ongoing", cause="ips"):
        return {"id": f"{node}/{cause}/2025-03-01", "node": node, "cause": cause, "state": state,
                "first_night": "2025-03-01", "nights": nights, "peak_score": peak}

    def state(node):
        out = subprocess.run(["scontrol", "show", "node", "-o", node], env=slurm_env, capture_output=True,
                             text=True).stdout
        return out.split("State=")[1].split()[0], out

    def night(name, records):  # a published night's drain.json, as the nightly job writes it
        (tmp_path / name).mkdir()
        (tmp_path / name / "drain.json").write_text(json.dumps(records))

    incidents = [inc("spare1", 3, 9.0), inc("n1", 1, 50.0, "new"), inc("nosuchnode", 2, 1.0)]
    confirmed = candidates(incidents, after_nights=2)
    assert [i["node"] for i in confirmed] == ["spare1", "nosuchnode"]  # one night is not confirmed
    assert lines(confirmed).splitlines()[0] == ("scontrol update NodeName=spare1 State=DRAIN 'Reason=hpcad: ips "
                                                "anomaly since 2025-03-01 (3 nights, incident spare1/ips/2025-03-01)'")
    try:
        out = drain(confirmed, max_nodes=5, env=slurm_env)
        assert [r["outcome"] for r in out] == ["drained", "failed"] and "nosuchnode" in out[1]["message"]
        assert "DRAIN" in state("spare1")[0] and "Reason=hpcad: ips anomaly since 2025-03-01" in state("spare1")[1]
        night("2025-03-03", out)
        # The next night, the incident still open and the node still out: said so (not "put back"), and
        # it takes none of the night's drains: at a cap of 1, another node's new incident still drains.
        later = confirmed + [inc("spare2", 2, 5.0, cause="power")]
        before = drained_before(tmp_path, dt.date(2025, 3, 4), later)
        assert before == {"spare1/ips/2025-03-01": "2025-03-03"}  # nosuchnode's drain had failed
        again = drain(later, max_nodes=1, env=slurm_env, before=before)
        assert [r["outcome"] for r in again] == ["already", "failed", "drained"], again
        assert re.match(r"drained by hpcad for this incident on 2025-03-03, SLURM state \S*DRAIN", again[0]["message"])
        assert "DRAIN" in state("spare2")[0]
        # An admin checks both and puts them back (the documented way) while their incidents stay open:
        # the nights after do not drain them again for those incidents
        subprocess.run(["scontrol", "update", "NodeName=spare[1-2]", "State=RESUME"], env=slurm_env, check=True)
        night("2025-03-04", again)
        before = drained_before(tmp_path, dt.date(2025, 3, 5), later)
        resumed = drain(later, max_nodes=1, env=slurm_env, before=before)
        assert [r["outcome"] for r in resumed] == ["resumed", "failed", "resumed"], resumed
        assert "put back since" in resumed[0]["message"] and "DRAIN" not in state("spare1")[0]
        # New incidents drain them again, at most max_nodes a night, the highest peak first
        new = drain(candidates([inc("spare1", 2, 9.0, cause="temp"), inc("spare2", 2, 5.0, cause="temp")], 2), 1,
                    env=slurm_env, before=before)
        assert [r["outcome"] for r in new] == ["drained", "capped"], new
        assert "DRAIN" in state("spare1")[0] and "DRAIN" not in state("spare2")[0]
    finally:  # the documented way back (docs/operations.md); SLURM refuses it for a node not drained
        for node in ("spare1", "spare2"):
            if "DRAIN" in state(node)[0]:
                subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=slurm_env, check=True)
    assert "DRAIN" not in state("spare1")[0] and "DRAIN" not in state("spare2")[0]


@pytest.mark.parametrize("env, bind, said", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_CPUS_PER_TASK": "8"},
     "--gpu-bind=per_task:1", "4 tasks, 4 GPUs per node"),  # Leonardo booster: task i on GPU i
    ({"SLURM_JOB_GPUS": "0,1,2,3", "SLURM_TASKS_PER_NODE": "4,1"}, "--gpu-bind=per_task:1", ""),  # older SLURM
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "4", "HPCAD_GPU_BIND": "single:1"}, "--gpu-bind=single:1", ""),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "4", "HPCAD_GPU_BIND": "none"}, None, "HPCAD_GPU_BIND=none"),
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_TASKS_PER_NODE": "4(x2)"}, None, "4 tasks on a node with 2 GPUs"),
    ({"SLURM_TASKS_PER_NODE": "2"}, None, ""),  # a CPU partition
])
def test_srun_binds_one_gpu_per_task_only_where_each_task_has_one(env, bind, said):
    """#16 item 8: the scripts' srun binding, decided from the job's variables (no GPU or SLURM needed).
    Two tasks bound to one GPU would only get slurmstepd's "Not enough gpus to bind" in the log: the
    binding is left off then, so that hpcad's own check refuses with a clear message."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCAD_"))}
    p = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$1"; printf "opt %s\\n" "${srun_opts[@]}"', "-",
                        str(ROOT / "slurm" / "score_steps.sh")], env={**clean, **env}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    opts = [line[4:] for line in p.stdout.splitlines() if line.startswith("opt ")]
    assert [o for o in opts if o.startswith("--gpu-bind")] == ([bind] if bind else [])
    assert opts[:2] == ["--kill-on-bad-exit=1", "--export=ALL"]
    assert ("--cpus-per-task=8" in opts) == ("SLURM_CPUS_PER_TASK" in env)  # srun does not inherit it
    assert said in p.stdout + p.stderr


def test_preflight_ends_fast_and_says_why_when_the_ranks_cannot_meet(tmp_path, slurm_env):
    """With rank 0's address unreachable every rank of hpcad preflight ends within the short wait,
    saying what to check, instead of waiting the stages' 12 hours. (Its normal run is the first step
    of the sbatch training test.)"""
    lost = dict(slurm_env, MASTER_ADDR="192.0.2.1", HPCAD_DIST_TIMEOUT_MIN="0.05")  # TEST-NET-1: never routed
    bad = subprocess.run(["srun", "-N1", "-n2", "--kill-on-bad-exit=1", *hpcad_cmd(), "preflight",
                          f"hydra.run.dir={tmp_path / 'lost'}"], env=lost, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "could not join the ranks at 192.0.2.1:" in bad.stderr and "GLOO_SOCKET_IFNAME" in bad.stderr


def test_preflight_stops_every_rank_on_an_input_a_rank_cannot_see_or_a_wrong_option(tmp_path, slurm_env):
    """Before, the preflight passed and the job failed in its later steps: a wrong option value at
    the threshold step, after training and scoring; a missing data.source in the training step (exit
    143: srun killed the ranks still waiting); a train_run on one node's local disk when that rank
    loaded its models. Now the preflight stops, exit 2: an option error once (every rank composed
    the same options; it used to be one line per rank), what a rank sees on every rank that sees it."""
    pf = [*hpcad_cmd(), "preflight", f"hydra.run.dir={tmp_path / 'pf'}", "compute.progress=false"]
    bad = subprocess.run(["srun", "-N1", "-n2", *pf, "threshold=pot", "threshold.risk=0.5"], env=slurm_env,
                         capture_output=True, text=True, timeout=300)
    said = [ln for ln in bad.stderr.splitlines() if ln.startswith("hpcad preflight: error:")]
    assert bad.returncode == 2 and len(said) == 1 and "threshold.risk=0.5: need 0 < risk" in said[0], bad.stderr[-3000:]
    assert bad.stdout.count("threshold.risk=0.5: need 0 < risk") == 1, bad.stdout[-3000:]  # the log lines too
    gone = subprocess.run(["srun", "-N2", "-n2", *pf, "data.source=/nonexistent/exports"], env=slurm_env,
                          capture_output=True, text=True, timeout=300)
    said = [ln for ln in gone.stderr.splitlines() if ln.startswith("hpcad preflight: error:")]
    assert gone.returncode == 2 and len(said) == 2, gone.stderr[-3000:]
    # a folder of node files: every rank reads its share of them, so every rank that does not see it says so
    # (on whichever two nodes SLURM gave: other tests' jobs may hold n1)
    m = re.fullmatch(r"hpcad preflight: error: preflight: rank 0 on (n\d): data\.source: /nonexistent/exports does "
                     r"not exist; rank 1 on (n\d): data\.source: /nonexistent/exports does not exist", said[0])
    assert m and m.group(1) != m.group(2), said[0]
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (it stands in for a second node's local disk)")
    train = tmp_path / "train"
    (train / "models").mkdir(parents=True)  # a trained run folder, on the first node's local disk only
    local = tmp_path / "local.sh"
    local.write_text('#!/bin/bash\nif [ "$SLURM_PROCID" = 1 ]; then\n'
                     f'  exec unshare -m bash -c \'mount -t tmpfs none {train} && exec "$@"\' - "$@"\nfi\nexec "$@"\n')
    local.chmod(0o755)
    p = subprocess.run(["srun", "-N2", "-n2", str(local), *pf, f"train_run={train}"], env=slurm_env,
                       capture_output=True, text=True, timeout=300)
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("hpcad preflight: error:")]
    assert p.returncode == 2 and len(said) == 2, p.stderr[-3000:]
    assert re.search(rf"preflight: rank 1 on n\d: train_run={re.escape(str(train))}: "
                     rf"{re.escape(str(train / 'models'))} does not exist", said[0]), said[0]
    assert "rank 0" not in said[0]  # rank 0 sees it


def test_preflight_finds_ranks_sharing_a_gpu_and_gpus_that_compute_wrongly():
    from hpcad.preflight import problems

    def rank(r, host, uuid, ok=True):
        return {"rank": r, "host": host, "node": host, "device": "cuda:0", "gpu_uuid": uuid, "gpu_matmul_ok": ok}

    fine = [rank(0, "a", "GPU-1"), rank(1, "a", "GPU-2"), rank(2, "b", "GPU-1")]  # one UUID per host is fine
    assert problems(fine) == []
    shared = problems([*fine, rank(3, "a", "GPU-2"), rank(4, "b", "GPU-3", ok=False)])
    assert any("ranks 1, 3 on a share one GPU (GPU-2)" in s for s in shared)
    assert any("rank 4 on b: its GPU (cuda:0) computed a wrong product" in s for s in shared)
