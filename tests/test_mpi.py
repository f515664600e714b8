"""Cluster-wide threshold fitting over MPI ranks equals the single-process fit on the same errors, and so
do the alarms, figures, class profiles and alarm budget the ranks compute from them; and the ranks an
``mpiexec`` starts outside SLURM meet at a port of their own job."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import generate, hpcad
from hpcad.preprocess import VAL

pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py mpich)")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    if shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec on PATH (pip install mpich)")
    tmp = tmp_path_factory.mktemp("mpi")
    exports = tmp / "exports"
    generate(exports, nodes=5, rows=300)
    run = tmp / "run"
    hpcad("run", f"data.source={exports}", f"hydra.run.dir={run}", "train.epochs=2", "compute.progress=false",
          "baselines.methods=[pca]", "report.enabled=false")
    return run, exports


@pytest.mark.parametrize("rule", [["threshold=cost", "threshold.scope=cluster"],
                                  ["threshold=cost", "threshold.scope=node"],
                                  ["threshold=quantile", "threshold.scope=cluster"],
                                  ["threshold=pot", "threshold.scope=cluster", "threshold.init_q=0.9",
                                   "threshold.risk=0.001"]])
def test_mpiexec_two_ranks_fit_the_same_thresholds(scored_run, rule):
    run, exports = scored_run
    args = ["threshold", f"hydra.run.dir={run}", f"data.source={exports}", *rule]
    hpcad(*args)
    single_text = (run / "thresholds.json").read_text()
    single = json.loads(single_text)
    p = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "hpcad", *args], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "logs" / "threshold-rank1.log").exists()  # really two ranks
    assert not list(run.glob("*rank*.log")) and (run / "threshold.log").exists()  # the ranks' logs in logs/ only
    multi = json.loads((run / "thresholds.json").read_text())
    if "threshold.scope=cluster" in rule:  # one threshold, reduced over the ranks
        assert single["cluster"] is not None and single["nodes"] == {}
        assert multi["cluster"] == pytest.approx(single["cluster"])
    else:  # one per node, each rank fitting its share and the ranks merging them
        assert single["cluster"] is None and len(single["nodes"]) == 5
        # the same file, byte for byte: nodes in name order however the ranks dealt them (one process
        # listed them in its dealing order, 12 ranks in name order)
        assert (run / "thresholds.json").read_text() == single_text
        assert list(multi["nodes"]) == sorted(multi["nodes"])
    assert multi["nodes"] == pytest.approx(single["nodes"])
    assert multi["rule"] == single["rule"] and multi["scope"] == single["scope"]
    assert multi["details"]["check"] == single["details"]["check"]


def _mpiexec_two_ranks(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "hpcad", *args], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _copy_with_last_node_corrupt(src, tmp_path, dataset: str):
    """A copy of the run whose last node (rank 1's share under two ranks) has a corrupt ``dataset`` chunk."""
    import h5py

    run = tmp_path / "run"
    shutil.copytree(src, run)
    with h5py.File(run / "errors.h5", "r") as f:
        node = sorted(f["nodes"])[-1]
        chunk = f[f"nodes/{node}/{dataset}"].id.get_chunk_info(0)
    with open(run / "errors.h5", "r+b") as fh:
        fh.seek(chunk.byte_offset + 4)
        fh.write(b"\xff" * min(64, chunk.size - 8))
    return run, node


def _hide_mpi4py(folder) -> None:
    """``folder`` on PYTHONPATH gives an environment where ``import mpi4py`` fails."""
    (folder / "mpi4py").mkdir()
    (folder / "mpi4py" / "__init__.py").write_text("raise ImportError('mpi4py is not installed here')\n")


def _torchrun_two_ranks(args: list[str], tmp_path) -> tuple[list[int], list[str]]:
    """``hpcad <args>`` as two ranks started the way torchrun starts them (its variables, no MPI),
    ``tmp_path`` first on their PYTHONPATH: their exit codes and outputs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-m", "hpcad", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONPATH": str(tmp_path), "RANK": str(r),
                                              "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    said = [p.communicate(timeout=300)[0] for p in ranks]
    return [p.returncode for p in ranks], said


def test_two_ranks_apply_the_thresholds_to_their_own_nodes_and_rank_zero_writes_what_one_process_writes(
        scored_run):
    """Applying the thresholds is shared out like the fit (each rank reads only its nodes' signals and
    per-metric errors; about 0.4 s of one core per node-year, docs/benchmarks.md): alarms.csv and
    metrics.json (per-node figures, totals, the baseline's fit and figures, the class profiles) are
    what one process writes."""
    run, exports = scored_run
    args = ["threshold", f"hydra.run.dir={run}", f"data.source={exports}", "threshold.scope=node"]
    hpcad(*args)
    alarms, single = (run / "alarms.csv").read_text(), json.loads((run / "metrics.json").read_text())
    quoted = (run / "alarms.json").read_text()  # with observed and expected values, each rank quoting its nodes'
    assert alarms.count("\n") > 3 and len(single["nodes"]) == 5 and "pca" in single["baselines"]
    assert '"expected": ' in quoted
    assert set(single["class_profiles"]) == {"0", "1", "2", "3", "4"}
    _mpiexec_two_ranks(*args)
    from hpcad.dist import shard
    from hpcad.errorstore import ErrorStore

    for rank, nodes in enumerate(shard(ErrorStore(run / "errors.h5").rows, 2)):  # each rank its own share
        said = (run / "logs" / f"threshold-rank{rank}.log").read_text()
        assert 0 < len(nodes) < 5 and f"thresholds applied to {len(nodes)} of 5 nodes here (alarms, figures, " \
                                      f"class profiles, 1 baseline(s))" in said, said
    multi = json.loads((run / "metrics.json").read_text())
    assert (run / "alarms.csv").read_text() == alarms  # every node's alarms, in the same order
    assert (run / "alarms.json").read_text() == quoted
    assert multi["nodes"] == single["nodes"] and multi["splits"] == single["splits"]
    assert multi["baselines"] == single["baselines"]
    for c, profile in single["class_profiles"].items():  # sums added over the ranks: the last bits may differ
        assert multi["class_profiles"][c]["rows"] == profile["rows"]
        assert multi["class_profiles"][c]["mean_error"] == pytest.approx(profile["mean_error"], rel=1e-12)
        assert [m for m, _ in multi["class_profiles"][c]["top"]] == [m for m, _ in profile["top"]]


def test_two_ranks_count_the_alarm_budget_of_an_unlabelled_run_as_one_process_does(scored_run, tmp_path):
    """Without labels the ranks add their nodes' alarm counts at each multiple of the normal level."""
    import h5py

    src, exports = scored_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    with h5py.File(run / "errors.h5", "r+") as f:
        for node in f["nodes"]:
            del f[f"nodes/{node}/labels"]
    (run / "metrics.json").unlink()
    args = ["threshold", f"hydra.run.dir={run}", f"data.source={exports}"]
    hpcad(*args)
    single = json.loads((run / "thresholds.json").read_text())["details"]["by_level"]
    assert single["nodes"] == 5 and any(level["alarm_events"] for level in single["levels"])
    _mpiexec_two_ranks(*args)
    assert json.loads((run / "thresholds.json").read_text())["details"]["by_level"] == single
    assert not (run / "metrics.json").exists()


def test_a_rank_failing_as_it_applies_the_thresholds_ends_the_mpi_job_instead_of_hanging(scored_run, tmp_path):
    """Rank 1 cannot read its last node's per-metric errors (read only once the thresholds are fitted):
    it says which node and ends the MPI job; rank 0, waiting for its share, does not hang."""
    src, exports = scored_run
    run, node = _copy_with_last_node_corrupt(src, tmp_path, "error")
    p = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "hpcad", "threshold", f"hydra.run.dir={run}",
                        f"data.source={exports}"], capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    said = p.stdout + p.stderr
    assert f"node {node} errors: cannot read (corrupt file" in said and "every rank of the MPI job stops" in said, \
        said[-3000:]


def test_a_rank_failing_as_it_applies_the_thresholds_over_a_torch_group_stops_both(scored_run, tmp_path):
    """The same failure with ranks that MPI does not join (torchrun, no mpi4py): rank 1 names the node,
    rank 0, waiting in a collective, stops with one line saying another rank stopped."""
    src, exports = scored_run
    run, node = _copy_with_last_node_corrupt(src, tmp_path, "error")
    _hide_mpi4py(tmp_path)
    codes, said = _torchrun_two_ranks(["threshold", f"hydra.run.dir={run}", f"data.source={exports}"], tmp_path)
    assert codes == [2, 2], said
    assert f"node {node} errors: cannot read (corrupt file" in said[1], said[1][-3000:]
    assert "hpcad threshold: error: rank 0 of 2: another rank of this step stopped" in said[0], said[0][-3000:]
    assert "Traceback" not in said[0] + said[1]


def test_the_models_are_checked_once_by_rank_zero_not_by_every_rank(scored_run, tmp_path):
    """A run folder copied with new file times: the model files' contents decide (each file hashed), once
    by rank 0, not once more by every other rank (hundreds of ranks on one file system's metadata)."""
    src, exports = scored_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for f in (run / "models").iterdir():
        os.utime(f, (1_000_000_000, 1_000_000_000))
    # a user's log level (a common debugging override) leaves the ranks' logs where they go, prefixed
    _mpiexec_two_ranks("threshold", f"hydra.run.dir={run}", f"data.source={exports}", "hydra.job_logging.root.level=DEBUG")
    said = "the model files' times changed since scoring (copied or moved?), their contents did not"
    assert said in (rank0 := (run / "logs" / "threshold-rank0.log").read_text()) and "[rank 0/2][" in rank0
    assert said not in (run / "logs" / "threshold-rank1.log").read_text()


def test_a_users_own_log_handler_or_format_is_kept_under_ranks():
    """Under ranks hpcad puts each rank's log in <run>/logs/ with the rank on every line, except
    where the command line sets that part of Hydra's logging itself."""
    from hpcad.logfiles import rank_log_overrides

    def keys(given: list[str]) -> list[str]:
        return [o.split("=", 1)[0] for o in rank_log_overrides("train", 1, 4, given)]

    ours = ["hydra.job.name", "hydra.job_logging.handlers.file.class", "hydra.job_logging.handlers.file.filename",
            "hydra.job_logging.formatters.simple.format"]
    assert keys([]) == keys(["hydra.job_logging.root.level=DEBUG"]) == ours
    assert keys(["hydra.job_logging.handlers.file.filename=/scratch/x.log"]) == ["hydra.job.name", ours[3]]
    assert keys(["hydra.job_logging.formatters.simple.format=%(message)s"]) == ours[:3]
    assert keys(["hydra/job_logging=disabled"]) == ["hydra.job.name"]
    assert rank_log_overrides("train", 1, 4, [])[0] == "hydra.job.name=train-rank1"


def test_nodes_fitted_on_a_period_that_is_not_normal_are_named_across_ranks(scored_run, tmp_path):
    """Two nodes (one in each rank's share) whose validation period sits 50x above their normal level:
    the check of an unsupervised fit names both, with their level, once, as one process does."""
    import h5py

    src, exports = scored_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    with h5py.File(run / "errors.h5", "r+") as f:
        for node in ("node0000", "node0004"):
            g = f[f"nodes/{node}"]
            val = g["split"][()] == VAL
            for name in ("signal", "signal_norm"):
                g[name][val] = g[name][()][val] * 50
    from hpcad.dist import shard
    from hpcad.errorstore import ErrorStore

    shares = shard(ErrorStore(run / "errors.h5").rows, 2)
    assert [("node0000" in s, "node0004" in s) for s in shares] in ([(True, False), (False, True)],
                                                                    [(False, True), (True, False)])
    args = ["threshold", f"hydra.run.dir={run}", f"data.source={exports}", "threshold=quantile"]
    hpcad(*args)
    single = json.loads((run / "thresholds.json").read_text())["details"]["check"]
    assert single["not_normal_fit_node_count"] == 2 and sorted(single["not_normal_fit_nodes"]) == ["node0000",
                                                                                                    "node0004"]
    p = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "hpcad", *args], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "thresholds.json").read_text())["details"]["check"] == single
    said = (p.stdout + p.stderr).splitlines()  # said by rank 0, for both ranks' nodes
    assert sum("autoencoder threshold" in line and "took as normal" in line for line in said) == 1


@pytest.mark.parametrize("mpi4py_here", [False, True])
def test_ranks_that_mpi_does_not_join_share_the_work_over_their_torch_group(scored_run, tmp_path, mpi4py_here):
    """Two ranks started by a launcher other than MPI (torchrun's variables), in an environment without
    mpi4py or with it: they fit and apply over a torch.distributed (gloo) group instead, each its own
    share, and write what one process writes; rank 0 says once why MPI was not used. Before
    (2026-12-04), every such rank fitted on all nodes and rank 0 applied them alone."""
    src, exports = scored_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    args = ["threshold", f"hydra.run.dir={run}", f"data.source={exports}", "threshold.scope=cluster"]
    hpcad(*args)
    single = json.loads((run / "thresholds.json").read_text())
    alarms = (run / "alarms.csv").read_text()
    (run / "alarms.csv").unlink()
    if not mpi4py_here:
        _hide_mpi4py(tmp_path)
    codes, said = _torchrun_two_ranks(args, tmp_path)
    assert codes == [0, 0], said[0][-3000:] + said[1][-3000:]
    # torchrun's ranks are never MPI's: MPI is not started in them, mpi4py or not (before, each started an
    # MPI singleton only to find a world of one, and finalized it at exit beside torch's process group)
    why = "torchrun starts ranks that MPI does not join (MPI is not started in them)"
    assert said[0].count(why) == 1 and why not in said[1]  # rank 0 says it for both
    assert said[0].count("the ranks reduce over their torch.distributed process group instead") == 1
    assert "MPI world of" not in said[0] + said[1] and "srun, its --mpi plugin" not in said[0]
    shares = [re.search(r"thresholds applied to (\d+) of 5 nodes here", out) for out in said]
    assert all(shares) and sum(int(m.group(1)) for m in shares) == 5, said  # each rank its own nodes
    assert json.loads((run / "thresholds.json").read_text())["cluster"] == pytest.approx(single["cluster"])
    assert (run / "alarms.csv").read_text() == alarms


def test_a_rank_failing_in_the_fit_ends_the_mpi_job_instead_of_hanging(scored_run, tmp_path):
    """One rank cannot read its share (a corrupt node in errors.h5): it says why and ends the MPI job
    (MPI_Abort). Before, the other rank waited in a reduction for ever and the failed one in
    MPI_Finalize: the step hung until the job's time limit (SLURM's --kill-on-bad-exit never fired)."""
    src, exports = scored_run
    run, node = _copy_with_last_node_corrupt(src, tmp_path, "signal")
    p = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "hpcad", "threshold", f"hydra.run.dir={run}",
                        f"data.source={exports}", "threshold.scope=cluster"], capture_output=True, text=True,
                       timeout=240)  # the old code hung here
    assert p.returncode != 0
    # the reason: always in the failing rank's log in the run folder (written before MPI_Abort)...
    logs = "".join(f.read_text() for f in (run / "logs").glob("threshold-rank*.log"))
    assert f"node {node}: cannot read (corrupt file" in logs and "every rank of the MPI job stops (MPI_Abort)" in logs
    # ...and on the terminal (mpiexec drops output it has not forwarded when it kills the job; hpcad pauses first)
    said = p.stdout + p.stderr
    assert f"node {node}: cannot read (corrupt file" in said and "every rank of the MPI job stops" in said, said[-3000:]


def test_an_mpiexec_job_meets_at_a_port_of_its_own_beside_another_jobs_ranks(tmp_path):
    """Outside SLURM every ``mpiexec`` job met at 127.0.0.1:29511: beside a job already there (a second
    run on a workstation, two test workers at once), rank 0 could not listen, and the job's other ranks
    joined the first job's process group (a wrong "run folder is not one folder for all ranks" error)
    or waited on its port for ever (this test, old code: until its time-out). Now rank 0 offers a
    free port over MPI."""
    if shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec on PATH (pip install mpich)")
    with socket.socket() as other_job:  # another job's rank 0, listening at 29511
        try:
            other_job.bind(("127.0.0.1", 29511))
            other_job.listen()
        except OSError:  # something on this host holds the port already: the same situation
            pass
        p = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "hpcad", "preflight",
                            f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=180)
    said = p.stdout + p.stderr
    met = re.findall(r"rank 0 at 127\.0\.0\.1:(\d+)", said)
    assert p.returncode == 0 and met and "29511" not in met, said[-3000:]
    assert json.loads((tmp_path / "run" / "preflight.json").read_text())["rendezvous"] == f"127.0.0.1:{met[0]}"


def test_baselines_skipped_beyond_their_node_limit_is_said_once_for_the_job(scored_run, tmp_path):
    """More nodes than ``baselines.max_nodes``: the baselines are skipped with one warning for the
    job (rank 0's), not one per rank; the baseline fitted earlier in the run folder is removed (it is
    not this run's figure)."""
    run, exports = scored_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    p = _mpiexec_two_ranks("baselines", f"hydra.run.dir={copy}", f"data.source={exports}", "baselines.methods=[pca]",
                           "baselines.max_nodes=3")
    said = p.stdout + p.stderr
    assert said.count("baselines skipped: 5 nodes > baselines.max_nodes=3") == 1, said
    assert "baselines skipped" in (copy / "logs" / "baselines-rank0.log").read_text()
    assert "baselines skipped" not in (copy / "logs" / "baselines-rank1.log").read_text()
    assert (run / "baselines" / "pca.h5").exists() and not list((copy / "baselines").glob("pca*.h5"))
