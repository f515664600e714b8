"""``hpcad <stage> [hydra overrides]``: each stage is a Hydra app over the same config tree.

Hydra's conventions hold: one output folder per run (``hydra.run.dir=...``), ``-m`` multirun,
``--cfg job`` prints the composed config, ``--help`` lists the groups.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

USAGE = """usage: hpcad <stage> [hydra overrides...]

stages: run (all of them), ingest, train, score, baselines, threshold, report, generate, bench, nightly,
        preflight (what every rank of an allocation sees: srun hpcad preflight)
        where [conf|slurm|jobs]: the installed config groups and SLURM / cron scripts
        --version: hpcad's version, and torch's and Python's
examples:
  hpcad run                                   # synthetic cluster, report in the run folder
  hpcad run experiment=davide data.source=davide.csv
  hpcad train data.source=exports/ hydra.run.dir=runs/train
  hpcad run data.source=today/ train_run=runs/train
  hpcad nightly train_run=runs/train "nightly.input='/exports/{date}'" nightly.out=/srv/hpcad/nightly
  hpcad run --cfg job                         # print the configuration
"""


def where(args: list[str]) -> int:
    """``hpcad where [conf|slurm|jobs]``: the folders a wheel installs (e.g. for ``sbatch``)."""
    from hpcad.resources import KINDS, resource_dir

    kinds = args or list(KINDS)
    if any(k not in KINDS for k in kinds):
        print(f"hpcad where: unknown folder {[k for k in kinds if k not in KINDS][0]!r}; one of {', '.join(KINDS)}",
              file=sys.stderr)
        return 2
    for k in kinds:
        print(resource_dir(k) if args else f"{k}: {resource_dir(k)}")
    return 0


# The stages (hpcad.stages.RUNNERS), listed here so that `hpcad --help` and a misspelt stage
# answer without importing the pipeline (torch, scikit-learn, matplotlib: seconds).
STAGES = ("run", "ingest", "train", "score", "baselines", "threshold", "report", "generate", "bench", "nightly",
          "preflight")
# seconds a rank other than 0 waits before exiting on an option error that rank 0 reports for all of them
QUIET_RANK_GRACE_S = 3.0


def version() -> str:
    """``hpcad 0.1.0 (torch 2.13.0, Python 3.11.2)``: what a bug report or a site's check quotes; the
    installed torch's version from its metadata (importing it takes a second)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from hpcad import __version__

    try:
        torch = installed("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"hpcad {__version__} (torch {torch}, Python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "where":
        return where(argv[1:])
    if argv and argv[0] in ("-V", "--version", "version"):
        print(version())
        return 0
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in STAGES:
        print(USAGE if not argv or argv[0] in ("-h", "--help", "help") else f"hpcad: unknown stage {argv[0]!r}\n\n{USAGE}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help", "help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help", "help") else 2
    stage = argv.pop(0)
    return run_stage(stage, argv)


# ``key=~/path`` or ``key=~user/path``: the shell leaves ``~`` after ``key=`` as it is (``data.source``
# is not a shell variable), and Hydra's override grammar refuses it ("LexerNoViableAltException")
_HOME_VALUE = re.compile(r"^(\+{0,2}[\w.@/-]+=)(~[\w.-]*)(?=/|$)")


def expand_home(override: str) -> str:
    """``data.source=~/exports`` with the home folder spelled out, as a shell would for a variable;
    other overrides (and ``~key``, Hydra's deletion) unchanged."""
    m = _HOME_VALUE.match(override)
    if m is None:
        return override
    home = os.path.expanduser(m.group(2))
    return override if home == m.group(2) else m.group(1) + home + override[m.end():]


def unreadable_override(overrides: list[str]) -> str | None:
    """Why Hydra's override grammar cannot read one of ``overrides``, naming it and the quoting that
    reads it, or None. Hydra's own message names neither ("mismatched input '{' expecting <EOF>"):
    a value with ``{ } [ ] ( )`` outside a list (``nightly.input=/exports/{date}``) needs quotes that
    reach Hydra, inside the shell's."""
    import io

    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:  # the overrides among Hydra's flags (``--cfg job``, ``-m``), as hydra.main separates them
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            flags, rest = get_args_parser().parse_known_args(overrides)
    except SystemExit:  # a flag Hydra refuses, or --version: Hydra says it itself
        return None
    parser = OverridesParser.create()
    for o in [*flags.overrides, *(r for r in rest if not r.startswith("-"))]:
        try:
            parser.parse_overrides([o])
        except OverrideParseException as exc:
            reason = str(exc).splitlines()[0]
            key, eq, value = o.partition("=")
            hint = (f"; a value with {{ }} [ ] ( ) in it is read as Hydra syntax: quote it for Hydra inside the "
                    f"shell's quotes, \"{key}='{value}'\"" if eq and "'" not in value and not value.startswith("[")
                    else "")
            return (f"cannot read the override {o!r} ({reason}; "
                    f"https://hydra.cc/docs/advanced/override_grammar/basic){hint}")
    return None


def unwritable_run_dir(overrides: list[str]) -> Path | None:
    """The folder that stops this run from creating or writing its run folder (``hydra.run.dir``,
    else the current folder where the default ``runs/...`` goes), or None when it can go ahead."""
    if any(o.startswith("-") for o in overrides):
        return None  # --multirun: each point has its own folder; --cfg, --help...: nothing is written
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    p = Path(given[-1]).expanduser() if given else Path.cwd()
    p = p if p.is_absolute() else Path.cwd() / p
    while not p.exists() and p != p.parent:
        p = p.parent
    return None if os.access(p, os.W_OK | os.X_OK) else p


def ranks_run_dir(stage: str, overrides: list[str], env: dict | None = None) -> str | None:
    """The override naming the folder every rank of a multi-rank launch writes to, when the command
    names none: the default (``runs/<date>/<time>``, each process's own start time; ``multirun/...``
    for ``-m``) would split the ranks over two folders whenever they start across a second's
    boundary. Inside a SLURM job: ``runs/slurm-<jobid>`` (``multirun/slurm-<jobid>``), shared by the
    job's steps (``srun hpcad train``, then ``srun hpcad score``); elsewhere (torchrun, mpiexec)
    there is no common name, so the command must give one."""
    key, default = (("hydra.sweep.dir", "multirun") if any(o in ("-m", "--multirun") for o in overrides)
                    else ("hydra.run.dir", "runs"))
    if any(o.startswith(f"{key}=") for o in overrides) or any(o.startswith("--") and o != "--multirun"
                                                              for o in overrides):
        return None  # named by the user; or --cfg, --help...: nothing is written
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env:
        return f"{key}={default}/slurm-{env['SLURM_JOB_ID']}"
    from hpcad.errors import ConfigError

    raise ConfigError(f"several ranks and no {key}: give every rank the same folder (hpcad {stage} "
                      f"{key}={default}/<name> ...); the default, named after each process's start time, can "
                      f"differ between ranks")


def _close_bars() -> None:
    """Close the progress bars a failed stage left open (its frame lives on in the error's
    traceback), so that their last state is printed before the error line, not after it at exit."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except (OSError, ValueError):  # stderr on a full file system (the error to say may be that), or closed
            pass


def run_stage(stage: str, overrides: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from hpcad.atomic import out_of_room
    from hpcad.config import register_configs, unknown_keys
    from hpcad.errors import ConfigError, HpcadError, OutputError
    from hpcad.launch.local import LocalLauncher
    from hpcad.options import check_options
    from hpcad.stages import RUNNERS

    register_configs()
    status = {"rc": 0, "started": False}
    overrides = [expand_home(o) for o in overrides]

    from hpcad.resources import resource_dir

    @hydra.main(config_path=str(resource_dir("conf")), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        status["started"] = True
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        log = logging.getLogger("hpcad")
        from hydra.utils import instantiate

        rank = world().rank
        rank_zero_says(rank)  # Hydra has set up the log handlers: cluster-wide lines from rank 0 only
        checked = False  # until the options pass, an error is the same on every rank: said once (rank 0)

        try:
            unknown = unknown_keys(cfg)
            if unknown:
                raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not part of "
                                  f"hpcad's configuration (misspelt? `hpcad {stage} --cfg job` prints the options)")
            if cfg.train_run:  # new data read as the training run read its own (time zone, counters, ...)
                from hpcad.runfolder import inherit_reading

                inherit_reading(cfg, list(HydraConfig.get().overrides.task))
            launcher = instantiate(cfg.launcher)
            # every value the stage will use, before it starts (hpcad/options.py); the paths it reads too
            # when it runs here in one process (a launcher's job checks its own)
            here = isinstance(launcher, LocalLauncher) and not world().distributed
            check_options(cfg, stage, single_process=here)
            checked = True
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():  # log lines go above a running progress bar, never onto it
                result = launcher.launch(RUNNERS[stage], cfg, run_dir)
        except (HpcadError, OSError) as exc:
            if isinstance(exc, OSError):  # a write outside hpcad's atomic outputs (a scratch file, a log)
                exc = out_of_room(exc, run_dir) or exc
                if isinstance(exc, OSError):
                    raise
            if isinstance(exc, OutputError):  # the log file may be on the full file system too: no traceback per line
                logging.raiseExceptions = False  # (hpcad.atomic does the same where it raises one)
            _close_bars()
            log.error("%s", exc, extra={} if checked else CLUSTER_WIDE)
            if checked or rank == 0:
                print(f"hpcad {stage}: error: {exc}", file=sys.stderr)
            else:  # rank 0 says it. Under srun --kill-on-bad-exit this rank's exit ends the step, rank 0
                # included: leaving at once, it now and then killed rank 0 before its line was written (the
                # job log then held srun's lines only; seen once on the dev cluster)
                time.sleep(QUIET_RANK_GRACE_S)
            status["rc"] = 2
            return
        log.info("%s done; outputs in %s", stage, run_dir)
        if stage in ("run", "threshold") and rank == 0 and isinstance(result, dict):
            from hpcad.pipeline import threshold_summary

            said = result.get("threshold") if stage == "run" else result
            if isinstance(said, dict) and "alarms" in said:
                print("\n".join(threshold_summary(said, run_dir)))
        if stage in ("run", "report") and not cfg.report.enabled:
            if rank == 0:  # a report.html there is an earlier run's (stage_report said so): not pointed at
                print(f"hpcad: {stage} outputs in {run_dir} (no report: report.enabled=false)")
        elif stage in ("run", "report") and (run_dir / "report.html").exists():
            if rank == 0:
                print(f"hpcad: report at {run_dir / 'report.html'}")
        elif stage == "bench":
            keys = ("speedup_vs_naive", "node_epochs_per_s", "samples_per_s", "nodes_per_s", "score_s", "report_s",
                    "report_mb", "fit_s", "threshold_s", "node_years_per_s", "peak_rss_mb")
            print("hpcad bench: " + ", ".join(f"{k}={result[k]:.4g}" for k in keys if result.get(k) is not None))
            print(f"hpcad: {run_dir / 'bench.json'}")
        elif stage == "nightly":
            for d in result["days"]:
                night = Path(result["out"]) / d["date"]
                page = night / "report.html" if (night / "report.html").exists() else night  # report.enabled=false
                print(f"hpcad nightly {d['date']}: {d['nodes']} nodes, {d['alarms']} alarms, {d['drifted']} drifted, "
                      f"{d['light_refits']} light refits -> {page}")
        elif stage == "preflight":
            if rank == 0:
                print("\n".join(result["lines"]))
                print(f"hpcad: {run_dir / 'preflight.json'}")
        elif stage == "generate":
            print(f"hpcad: wrote {len(result)} files, e.g. {result[0]}")
        elif stage == "train" and isinstance(result, dict):
            who = f"rank {result['rank']}/{result['world_size']}: " if "rank" in result else ""
            of = f" of {result['cluster_nodes']}" if "cluster_nodes" in result else ""
            print(f"hpcad: {who}{result.get('nodes')}{of} node models in {run_dir / 'models'}")
        elif rank == 0:  # every rank wrote into the one run folder: said once
            print(f"hpcad: {stage} outputs in {run_dir}")

    from hpcad.config import moved_options
    from hpcad.dist import CLUSTER_WIDE, finish, rank_zero_says, world

    moved = moved_options(overrides)
    if moved:
        print(f"hpcad {stage}: error: option{'s' if len(moved) > 1 else ''} moved to the compute group (where and how "
              f"stages run): {', '.join(moved)}", file=sys.stderr)
        return 2
    unreadable = unreadable_override(overrides)
    if unreadable is not None:
        print(f"hpcad {stage}: error: {unreadable}", file=sys.stderr)
        return 2
    blocked = unwritable_run_dir(overrides)
    if blocked is not None:  # Hydra would fail setting up the log file, with a traceback
        print(f"hpcad {stage}: error: cannot write the run folder: {blocked} is not writable (choose another "
              f"hydra.run.dir, or fix its permissions)", file=sys.stderr)
        return 2
    try:
        w = world()
        shared = ranks_run_dir(stage, overrides) if w.distributed else None
    except HpcadError as exc:
        print(f"hpcad {stage}: error: {exc}", file=sys.stderr)
        return 2
    user = list(overrides)
    if shared is not None:
        overrides = [*overrides, shared]
    if w.distributed:  # one log per rank (<run>/logs/), lines prefixed with the rank; only rank 0 records the config
        from hpcad.logfiles import rank_log_overrides

        overrides = [*overrides, *rank_log_overrides(stage, w.rank, w.size, overrides)]
        if w.rank > 0:
            overrides.append("hydra.output_subdir=null")
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    if not any(o.startswith("hydra.job.name=") for o in overrides):
        # the log names what ran (<stage>.log; Hydra's default is the module's name: cli.log), and a
        # sweep's points are hpcad-<stage> (their SLURM jobs' name too)
        overrides.append(f"hydra.job.name={'hpcad-' if multirun else ''}{stage}")
    argv_before = sys.argv  # Hydra reads its arguments there; a caller's own (a notebook, a test) come back after
    sys.argv = [f"hpcad {stage}", *hydra_argv(user, overrides[len(user):])]
    if multirun:
        from hpcad.sweep import FAILED_POINTS

        FAILED_POINTS.clear()  # of an earlier sweep in this process (main() called again: a notebook, a test)
    try:
        with _mode_read_from_flags(user):
            app()
    except SystemExit as exc:  # hydra exits on --help, --cfg and config errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 1 and not status["started"]:  # the options could not be composed (Hydra said why): a usage
            return 2  # error, with the status of hpcad's own option errors (a crash inside a stage stays 1)
        return code
    finally:  # the command's stages shared one process group (hpcad.dist): it ends with the command
        sys.argv = argv_before
        finish()
    if multirun:
        from hpcad.sweep import FAILED_POINTS

        if FAILED_POINTS:  # e.g. points run as SLURM jobs, whose own exit status Hydra does not see
            print(f"hpcad {stage}: error: {len(FAILED_POINTS)} sweep point(s) produced no result: "
                  f"{'; '.join(FAILED_POINTS[:10])} (their logs: sweep folder, <point>/ and .submitit/)",
                  file=sys.stderr)
            return 2
    return status["rc"]


# Arguments after which Hydra's own config could set ``hydra.mode`` (hpcad's conf/ never does;
# tests/test_cli.py checks): another config folder or name, or a Hydra option other than the folders.
_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
_HYDRA_FOLDERS = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra.sweep.subdir=", "hydra.job.")


@contextlib.contextmanager
def _mode_read_from_flags(user: list[str]) -> Iterator[None]:
    """Hydra composes the whole config a first time only to read ``hydra.mode`` (``Hydra.get_mode``),
    then again to run: 0.12 s of every command, and of every rank's start. hpcad's configs leave it
    unset, so where the command line cannot set it (``user``: no Hydra option but the run folders,
    no other config folder), the first compose is skipped with the answer it gives (unset): Hydra
    then runs or sweeps as ``-m`` says, as before."""
    from hydra._internal.hydra import Hydra

    original = getattr(Hydra, "get_mode", None)  # a private API: another Hydra may lack it (then: as Hydra does)
    if original is None or any(a.split("=", 1)[0] in _CONFIG_FLAGS or
                               ("hydra" in a and not a.lstrip("+").startswith(_HYDRA_FOLDERS)) for a in user):
        yield
        return
    Hydra.get_mode = lambda self, config_name, overrides: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = original  # type: ignore[method-assign]


def hydra_argv(user: list[str], extra: list[str]) -> list[str]:
    """The command's arguments with hpcad's own overrides ``extra`` placed among the user's: Hydra reads
    overrides only as one run of arguments (``a=1 --cfg job b=2`` is refused), so hpcad's appended
    after ``experiment=x --cfg job`` or ``train.seed=0,1 -m`` made Hydra refuse a command it takes."""
    if not extra:
        return user
    import io

    try:
        from hydra._internal.utils import get_args_parser  # the parser hydra.main reads sys.argv with

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ours = get_args_parser().parse_args(user).overrides
    except (ImportError, SystemExit):  # --help, --version, or the user's own arguments wrong: Hydra says
        return [*extra, *user]  # (naming the user's own, not hpcad's, as unrecognised)
    if not ours:
        return [*extra, *user]
    for i in range(len(user) - len(ours) + 1):
        if user[i:i + len(ours)] == ours:
            return [*user[:i + len(ours)], *extra, *user[i + len(ours):]]
    return [*user, *extra]


def entry() -> None:
    rc = main()
    h5 = sys.modules.get("hpcad.data.h5")
    if h5 is not None and h5.out_of_room_seen():  # HDF5 would crash in its clean-up at exit (hpcad/data/h5.py)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 2)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
