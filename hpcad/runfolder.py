"""One writer per run folder: an advisory lock, and the clean-up only its holder may do.

A stage that writes into a run folder (ingest, train, score, baselines, threshold, report, run,
bench) holds ``<run>/.hpcad.lock`` (``fcntl.flock``, released when the process ends, also when it
is killed) for as long as it runs. A second writer gets a one-line error naming the holder. The
holder removes what killed writers left behind: temporary files of atomic writes
(``.<name>.<random>.tmp``) and ingest scratch (``.ingest-*``). Under several ranks, rank 0 holds
the lock for the whole step (the ranks of one job step are one writer).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcad.atomic import NO_LOCKS
from hpcad.errors import ConfigError, HpcadError, LockedError

log = logging.getLogger(__name__)
LOCK_NAME = ".hpcad.lock"
_held: dict[Path, int] = {}  # lock files this process holds, with their nesting depth


@contextmanager
def exclusive_lock(path: Path, what: str, others: str = "another hpcad process") -> Iterator[bool]:
    """Hold ``path`` exclusively (re-entrant within one process; yields whether this call took it,
    False when an outer one already holds it); ``LockedError`` naming the holder (written into the
    file: ``what``, pid, host, SLURM job, start time) if another process has it."""
    path = Path(path).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield False
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "holder unknown"
        fh.close()
        raise LockedError(f"{others} holds the lock on {path.parent} ({holder}); not starting: wait for it "
                          f"to end or write elsewhere (lock file {path})") from None
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        log.warning("%s: the file system has no file locks (%s): going on without the run folder's lock; nothing "
                    "stops a second hpcad process from writing %s at the same time", path, exc, path.parent)
    job = os.environ.get("SLURM_JOB_ID")
    fh.seek(0)
    fh.truncate()
    fh.write(f"{what} (pid {os.getpid()} on {socket.gethostname()}{f', SLURM job {job}' if job else ''}, since "
             f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')})\n")
    fh.flush()
    _held[path] = 1
    try:
        yield True
    finally:
        del _held[path]
        fh.close()  # closing releases the lock


def remove_stale(run_dir: Path) -> list[Path]:
    """Remove temporary files and scratch folders that killed writers left in ``run_dir`` (only
    call while holding its lock: then nobody is writing them). Returns what was removed."""
    gone = []
    for p in sorted(run_dir.rglob(".*")):
        if p.name == LOCK_NAME or not (p.name.endswith(".tmp") or p.name.startswith(".ingest-")):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    if gone:
        log.warning("removed %d temporary file(s) left by an interrupted run in %s (e.g. %s)", len(gone), run_dir,
                    gone[0].relative_to(run_dir))
    return gone


@contextmanager
def writer(run_dir: Path, stage: str) -> Iterator[None]:
    """Run a writing stage in ``run_dir``: take its lock (rank 0 only under several ranks) and
    clear what interrupted runs left there."""
    from hpcad.dist import world

    if world().rank != 0:
        yield
        return
    with exclusive_lock(Path(run_dir) / LOCK_NAME, f"hpcad {stage}") as taken:
        if taken:  # not again in the stages `hpcad run` calls while it holds the lock
            remove_stale(Path(run_dir))
        yield


def train_run(cfg) -> Path | None:
    """The trained run folder ``train_run`` names (its models score this run), or None; a
    ``ConfigError`` when it holds no models."""
    if not cfg.train_run:
        return None
    p = Path(cfg.train_run).expanduser().resolve()
    if not (p / "models").is_dir():
        raise ConfigError(f"train_run={cfg.train_run}: {p / 'models'} does not exist (not a trained run folder)")
    return p


def load_run_config(run: Path):
    """The composed config a run folder was made with (Hydra's ``.hydra/config.yaml``), or None."""
    from omegaconf import OmegaConf

    p = Path(run) / ".hydra" / "config.yaml"
    return OmegaConf.load(p) if p.exists() else None


# What an input's timestamps, values and node names mean, as opposed to its layout (format, column
# names: a wrong one stops the ingest, naming it): read otherwise, naive times shift by the zone's
# offset, counters or a resampling give the models values they never saw, and renamed nodes find no
# model, without an error.
READING_OPTIONS = ("timezone", "epoch_unit", "dayfirst", "counters", "resample_s", "period_s", "ignore_columns",
                   "label_names", "node_names")


def inherit_reading(cfg, given: list[str]) -> dict[str, object]:
    """Read new data scored with a training run's models (``train_run``: ``hpcad run``, ``score``,
    ``nightly``) as that run read its own: each of ``READING_OPTIONS`` that this run leaves at its
    default (not in the overrides ``given``, nor set by an experiment) takes the training run's
    value (its ``.hydra/config.yaml``). Before, a nightly job over exports in local time scored
    them as UTC, its alarms an hour off, unless the operator repeated ``data.timezone``. Returns
    the options taken (logged); one set to another value than the training run's is logged as a
    warning and kept."""
    from omegaconf import OmegaConf

    from hpcad.config import DataConfig

    tcfg = load_run_config(Path(cfg.train_run)) if cfg.train_run else None
    if tcfg is None or "data" not in tcfg:
        return {}
    named = {o.split("=", 1)[0].lstrip("+~") for o in given}
    trained = OmegaConf.to_container(tcfg.data, resolve=True)
    default, taken, kept = DataConfig(), {}, []
    for key in READING_OPTIONS:
        if key not in trained:
            continue  # a training run from before the option
        theirs, ours = trained[key], cfg.data[key]
        ours = OmegaConf.to_container(ours, resolve=True) if OmegaConf.is_config(ours) else ours
        mine, initial = _plain(ours), _plain(getattr(default, key))
        if _plain(theirs) == mine:
            continue
        if f"data.{key}" in named or mine != initial:
            kept.append(f"data.{key}={mine} (the training run read its input with {theirs})")
            continue
        cfg.data[key] = theirs
        taken[key] = theirs
    if taken:
        log.info("reading the input as the training run %s read its own: %s (set them to read it otherwise)",
                 cfg.train_run, ", ".join(f"data.{k}={v}" for k, v in taken.items()))
    for line in kept:
        log.warning("%s: this input is read otherwise than the data its models were trained on", line)
    return taken


def _plain(value):
    """An option's value as the training run's YAML spells it (enums by name, lists as lists)."""
    if hasattr(value, "name") and not isinstance(value, (str, list)):
        return value.name
    return list(value) if isinstance(value, (list, tuple)) else value


def check_shared(run_dir: Path, wait_s: float = 5.0) -> None:
    """Under several ranks, make sure they all see one run folder: every rank ingests into it and
    writes its models there, rank 0 writes the index files. A folder on node-local storage (``/tmp``,
    ``$TMPDIR``) gives each node its own copy, and the other nodes' models vanish without an error.
    Rank 0 leaves a marker (``.ranks.<token>.tmp``) and every rank looks for it (for up to ``wait_s``
    seconds, for file systems slow to show a new file); every rank stops with the same error naming
    the ranks that do not see it. Call on every rank, after ``dist.init``."""
    from hpcad import dist

    w = dist.world()
    if not w.distributed:
        return
    marker = None
    if w.rank == 0:
        marker = Path(run_dir) / f".ranks.{secrets.token_hex(8)}.tmp"
        marker.touch()
    mine = Path(run_dir) / dist.all_objects(None if marker is None else marker.name)[0]
    deadline = time.monotonic() + wait_s
    while not mine.exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    said = dist.all_objects((mine.exists(), socket.gethostname()))
    if marker is not None:
        marker.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (seen, host) in enumerate(said) if not seen]
    if blind:
        raise HpcadError(f"run folder {Path(run_dir).resolve()} is not one folder for all ranks: "
                         f"{', '.join(blind[:8])}{' ...' if len(blind) > 8 else ''} "
                         f"{'does' if len(blind) == 1 else 'do'} not see rank 0's files in it "
                         f"(node-local storage such as /tmp or $TMPDIR?); put the run folder (hydra.run.dir, "
                         f"HPCAD_RUN_DIR) on a file system every node of the job mounts")
