"""Shared helpers: small synthetic data, and the CLI run the way a user runs it (its own code, in this
process or in a new one: :func:`hpcad`)."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcad.config import DataConfig

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
# One thread per process (torch, numpy, the hpcad subprocesses, which inherit it): the two test
# workers already keep both cores busy, and two processes each spinning two OpenMP threads on two
# cores slowed some tests 2-3x. A value set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _process_settings_restored():
    """Each test leaves its worker process's environment and torch's thread count as it found them.
    Later tests run hpcad in this process and in subprocesses, which inherit the environment: a test
    that left ``MKL_NUM_THREADS=2`` behind (``share_cpu_threads`` sets it) made its worker's later
    subprocesses run two torch threads where in-process runs ran one (``OMP_NUM_THREADS=1`` above),
    so that what a test compared between the two depended on which files the worker had run before.
    (Libraries that set variables when first imported, such as scikit-learn's ``KMP_*``, are reset
    too; they read them at import.)"""
    import torch

    env, threads = dict(os.environ), torch.get_num_threads()
    yield
    for name in set(os.environ) - set(env) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[name]
    os.environ.update({k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST" and os.environ.get(k) != v})
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# The longest test files first (seconds of test time on 2 cores, measured 2026-12-02, later: 169, 122,
# 90, 55, 54, 39, 26, 19 of 644 in all): `--dist loadfile` hands files to the two workers in this order
# (pyproject's `--no-loadscope-reorder`: xdist >= 3.5 would otherwise order files by their number of
# tests), each worker taking the next file as it finishes one; a long file taken last leaves one
# worker idle while the other finishes it (longest-first keeps the two within about one short file).
LONGEST_FIRST = ["test_slurm.py", "test_slurm_jobs.py", "test_nightly.py", "test_faults.py", "test_cli.py",
                 "test_ingest_ranks.py", "test_bench.py", "test_mpi.py", "test_options.py", "test_runfolder.py",
                 "test_formats.py",
                 "test_report.py", "test_experiments.py", "test_ensemble.py", "test_wheel.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


# Small, fast settings for end-to-end runs on generated data. A report's plots are most of a small
# run's time (matplotlib, ~0.12 s a figure): two nodes plotted on the report and one node page (three
# figures) keep every report's parts drawn, for a third of the time; tests of the pages ask for more.
FEW_PLOTS = ["report.max_nodes_plotted=2", "report.max_node_pages=1"]
SMALL = ["data.synthetic.nodes=3", "data.synthetic.rows=400", "train.epochs=4", "compute.progress=false",
         "baselines.methods=[kde]", *FEW_PLOTS]


def hpcad(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None,
          process: bool = False) -> subprocess.CompletedProcess:
    """Run ``hpcad ARGS``; returns the completed run (exit status, stdout and stderr text).

    It runs in this test process by default: ``hpcad.cli.main``, the console script's own code, with
    the given folder, environment and arguments, and its output captured as a new process's would
    be. A new interpreter costs 2-3 s of CPU before hpcad starts (torch's import), more than most of
    these small stages take. ``process=True`` starts a real ``python -m hpcad``: for what only a
    process shows (the console script's exit path, a launcher's rank variables, signals, threads);
    so does an ``env`` that makes hpcad one rank of several (or that hpcad/dist.py refuses)."""
    if process or _ranked(env or {}):
        e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        proc = subprocess.run([*hpcad_cmd(), *args], cwd=cwd or ROOT, env=e, capture_output=True, text=True,
                              timeout=600)
    else:
        proc = _hpcad_here(list(args), cwd or ROOT, env or {})
    if check and proc.returncode != 0:
        raise AssertionError(f"hpcad {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _ranked(env: dict) -> bool:
    """True when ``env`` makes hpcad one rank of several, as hpcad.dist.world() reads it (a process
    group must not start in the test process), or is a rank environment it refuses."""
    from unittest import mock

    from hpcad.dist import world
    from hpcad.errors import HpcadError

    with mock.patch.dict(os.environ, env):
        try:
            return world().distributed
        except HpcadError:
            return True


def _hpcad_here(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``hpcad ARGS`` in this process, leaving the process as it found it: folder, environment,
    ``sys.argv`` and the root logger's handlers and settings (Hydra sets its own up for each run)."""
    import contextlib
    import io
    import logging
    import traceback

    from hpcad.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = (os.getcwd(), dict(os.environ), list(sys.argv), list(root.handlers), root.level, logging.raiseExceptions)
    try:
        os.chdir(cwd)
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # as the interpreter does with an uncaught exception
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
        sys.argv[:] = saved[2]
        for handler in root.handlers:
            if handler not in saved[3]:
                handler.close()
        root.handlers[:] = saved[3]
        root.setLevel(saved[4])
        logging.raiseExceptions = saved[5]  # a stage that found its disk full turns it off (hpcad/cli.py)
    return subprocess.CompletedProcess(["hpcad", *args], rc, out.getvalue(), err.getvalue())


def hpcad_on_terminal(*args: str) -> subprocess.CompletedProcess:
    """``hpcad ARGS`` with stderr on a pseudo-terminal, as a person at a shell runs it (progress bars
    are drawn only there): stdout as text, and the terminal's text as ``stderr`` (its "\\r\\n" as "\\n")."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column window (0 draws no bar)
    proc = subprocess.Popen([*hpcad_cmd(), *args], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    seen: list[bytes] = []

    def pump() -> None:  # read as it comes: a full terminal buffer would block the process
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal's last writer
                break
            if not data:
                break
            seen.append(data)

    reader = threading.Thread(target=pump)
    reader.start()
    out = proc.communicate(timeout=600)[0]
    reader.join(60)
    os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out,
                                       b"".join(seen).decode(errors="replace").replace("\r\n", "\n"))


def data_cfg(**kw) -> DataConfig:
    """The data config a user gets from conf/ (the dataclass defaults), with overrides."""
    return dataclasses.replace(DataConfig(), **kw)


@pytest.fixture
def msl_dir() -> Path:
    if not (SHARED / "msl" / "train").is_dir():
        pytest.skip(f"real MSL data not found at {SHARED / 'msl'} (the shared data folder beside the checkout)")
    return SHARED / "msl"


@pytest.fixture(scope="session")
def davide_csv() -> Path:
    path = SHARED / "davide" / "hpc.csv"
    if not path.is_file():
        pytest.skip(f"the seed lecture's DAVIDE file not found at {path} (the shared data folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for looking at reports the way a person does (.ci/run installs it)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless chromium not installed (Debian package chromium; .ci/run installs it)")


def write_site(root: Path, nodes: int, days: int, cut: str, drift_node: str | None = None, drift_row: int = 0) -> None:
    """A site's exports: nodes reporting every 5 minutes (labelled synthetic telemetry) from
    2025-01-06; rows before ``cut`` in ``root/train/<node>.csv``, later days in
    ``root/daily/<YYYY-MM-DD>/<node>.csv``; ``drift_node``'s levels shift from ``drift_row`` on."""
    import numpy as np
    import pandas as pd

    from hpcad.data.synthetic import START_EPOCH, generate_cluster, metric_names, node_frame
    from hpcad.bench.drift import apply_drift

    for nd in generate_cluster(nodes, 288 * days, seed=7, clean_fraction=0.35):
        nd.timestamp = START_EPOCH + 300 * np.arange(len(nd.timestamp))
        if nd.name == drift_node:
            nd = apply_drift(nd, drift_row, metric_names())
        f = node_frame(nd)
        day = pd.to_datetime(f["timestamp"]).dt.strftime("%Y-%m-%d")
        (root / "train").mkdir(parents=True, exist_ok=True)
        f[day < cut].to_csv(root / "train" / f"{nd.name}.csv", index=False)
        for d, part in f[day >= cut].groupby(day[day >= cut]):
            (root / "daily" / d).mkdir(parents=True, exist_ok=True)
            part.to_csv(root / "daily" / d / f"{nd.name}.csv", index=False)


def nightly_env_file(site: Path, out: Path, extra: str = "", tz: str = "UTC", name: str = "", more: str = "",
                     daily: Path | None = None) -> Path:
    """An env file for jobs/nightly_rescore.sh over a :func:`write_site` site trained in site/trainrun
    (its day folders: site/daily, or ``daily``)."""
    f = out.parent / f"{name or out.name}.env"
    f.write_text(f"HPCAD_VENV={Path(sys.executable).parent.parent}\nHPCAD_TRAIN_RUN={site / 'trainrun'}\n"
                 f"HPCAD_INPUT={daily or site / 'daily'}/{{date}}\nHPCAD_OUT={out}\nHPCAD_TZ={tz}\nHPCAD_THREADS=1\n"
                 f'HPCAD_OVERRIDES="{" ".join(FEW_PLOTS)} {extra}"\n{more}')  # as SMALL draws
    return f


def cron(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    """jobs/nightly_rescore.sh the way cron starts it: empty environment, minimal PATH, cwd /."""
    return subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", str(ROOT / "jobs" / "nightly_rescore.sh"), "--env",
                           str(env_file), *args], cwd="/", capture_output=True, text=True, timeout=600)


# SLURM (tests/test_slurm.py, tests/test_slurm_jobs.py)
@pytest.fixture(scope="session")
def slurm_env():
    """The SLURM dev cluster (slurm/dev-cluster.sh: slurmctld + 4 slurmd on this machine), shared by
    every test process (pytest -n: `up` is idempotent, and a file lock keeps two workers from
    starting it at once). Tests stop what they start: the last test process using a cluster that
    the tests started brings it down (`dev-cluster.sh down`); one that was running before is left."""
    import fcntl
    import shutil

    if os.geteuid() != 0:
        pytest.skip("SLURM dev cluster needs root to start slurmctld/slurmd")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and apt-get is unavailable")
    script = ["bash", str(ROOT / "slurm" / "dev-cluster.sh")]
    users = Path("/tmp/hpcad-dev-cluster.users")  # one file per test process using it; "ours": tests started it
    with open("/tmp/hpcad-dev-cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        users.mkdir(exist_ok=True)
        live = _live_users(users)
        if not live:  # the first user: was the cluster up before the tests?
            running = subprocess.run(["pgrep", "-f", "slurmctld -f /tmp/hpcad-slurm/slurm.conf"],
                                     capture_output=True).returncode == 0
            (users / "ours").unlink(missing_ok=True)
            if not running:
                (users / "ours").touch()
        (users / str(os.getpid())).touch()
        up = subprocess.run([*script, "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.skip(f"SLURM dev cluster did not start: {up.stderr.strip()[-500:]}")
    conf = [line.split("=", 1)[1] for line in up.stdout.splitlines() if line.startswith("export SLURM_CONF=")][0]
    yield dict(os.environ, SLURM_CONF=conf)
    with open("/tmp/hpcad-dev-cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (users / str(os.getpid())).unlink(missing_ok=True)
        if not _live_users(users) and (users / "ours").exists():
            subprocess.run([*script, "down"], capture_output=True, text=True, timeout=120)
            (users / "ours").unlink(missing_ok=True)


def _live_users(folder: Path) -> list[int]:
    """Test processes (pids) still using the dev cluster; files of dead ones (a killed run) removed."""
    live = []
    for f in folder.iterdir():
        if f.name.isdigit():
            try:
                os.kill(int(f.name), 0)
                live.append(int(f.name))
            except ProcessLookupError:
                f.unlink(missing_ok=True)
    return live


def slurm_models(run) -> dict:
    """Each model file's first member's weights, by file name."""
    import torch

    return {p.name: torch.load(p, weights_only=True)["members"][0] for p in sorted((run / "models").glob("*.pt"))}


def generate(out: Path, nodes: int, rows: int) -> Path:
    """The files `hpcad generate generate.out=OUT data.synthetic.nodes=N data.synthetic.rows=R` writes
    (wide CSV, one per node), written in this process: a test's input, not the command under test
    (tests/test_formats.py and test_experiments.py run the command itself)."""
    from hpcad.config import SyntheticConfig
    from hpcad.data.synthetic import write_exports

    write_exports(out, SyntheticConfig(nodes=nodes, rows=rows))
    return out


def small_exports(tmp_path, nodes=4):
    """``nodes`` generated nodes x 200 rows as wide CSV exports."""
    return generate(tmp_path / "exports", nodes, 200)


def hpcad_cmd() -> list[str]:
    return [sys.executable, "-m", "hpcad"]


def sbatch_wait(args: list[str], env, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``sbatch --wait ARGS`` with a faster wait: the job's end is seen within half a second.
    sbatch's own wait polls after 2, 10, 42, 74 ... s (its backoff grows to 32 s), which made the
    SLURM tests wait up to half a minute per job after it had ended. Returns the job's exit code as
    ``returncode``, sbatch's output as stdout/stderr."""
    import time

    sub = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if sub.returncode != 0:
        return sub
    job = sub.stdout.strip().split(";")[0]
    deadline = time.time() + timeout
    state = job_state(job, env)
    while state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "GONE"):
        assert time.time() < deadline, f"SLURM job {job} still {state} after {timeout} s"
        time.sleep(0.5)
        state = job_state(job, env)
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    m = re.search(r"ExitCode=(\d+):(\d+)", out)
    code = int(m.group(1)) if m else (0 if state == "COMPLETED" else 1)
    return subprocess.CompletedProcess(sub.args, code if state == "COMPLETED" or code else 1,
                                       f"Submitted batch job {job}\n", f"job {job} ended {state}\n" + sub.stderr)


def job_state(job: str, env) -> str:
    """A SLURM job's state (GONE once scontrol no longer knows it)."""
    import re

    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\w+)", out)
    return m.group(1) if m else "GONE"


def small_site(tmp_path: Path, n: int = 5, rows: int = 120, overrides: tuple[str, ...] = ()):
    """An in-process site: a store of ``n`` nodes of ``rows`` rows x 4 random metrics, and the config
    composed from conf/ (CPU, chunks of up to 4 nodes, 3 epochs, then ``overrides``)."""
    import numpy as np
    from hydra import compose, initialize_config_dir

    from hpcad.config import register_configs
    from hpcad.data.node import NodeData
    from hpcad.data.store import TelemetryStore, write_store
    from hpcad.resources import resource_dir

    rng = np.random.default_rng(0)
    nodes = [NodeData(f"n{i}", np.arange(rows, dtype=np.int64) * 300, rng.normal(size=(rows, 4)).astype(np.float32),
                      np.zeros(rows, np.int8)) for i in range(n)]
    write_store(tmp_path / "store.h5", ["a", "b", "c", "d"], nodes, "test")
    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        cfg = compose("config", ["compute.device=cpu", "compute.progress=false", "compute.max_nodes_per_chunk=4",
                                 "train.epochs=3", *overrides])
    return cfg, TelemetryStore(tmp_path / "store.h5")
