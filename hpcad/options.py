"""Option values checked before a stage starts, so that a wrong one stops the run in seconds.

Each stage checks the options it uses when it reaches them; before, a wrong value surfaced only
there: ``hpcad run threshold=pot threshold.risk=0.5`` ingested, trained and scored the whole
cluster, then failed in the threshold stage (with Hydra's "Error in call to target", exit 1), and
``split.val=1.5`` failed after the ingest. :func:`check_options` applies the same checks (the
functions the stages call, imported from them) to the composed configuration first: on a SLURM job
at the preflight step, which checks every stage's options. Checks that need the data (a time split
on a node without timestamps, too few training rows) stay where the data is read. In a single
process the paths a stage reads are checked too (``PATHS``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig


def _split(cfg: HpcadConfig) -> None:
    from hpcad.preprocess import check_preprocess, check_split

    check_split(cfg.split)
    check_preprocess(cfg.preprocess)


def _training(cfg: HpcadConfig) -> None:
    from hpcad.train import check_train_config, model_spec

    check_train_config(cfg.train, model_spec(cfg).scope)


def _compute(cfg: HpcadConfig) -> None:
    from hpcad.model.budget import check_compute_config

    check_compute_config(cfg.compute)


def _scoring(cfg: HpcadConfig) -> None:
    from hpcad import signal_choice
    from hpcad.model.light import check_light_options
    from hpcad.signals import smooth_window

    smooth_window(cfg.signal.smooth)
    check_light_options(cfg.score)
    signal_choice.candidates(cfg.signal)  # checks excess_weight, excess_grid and metric_scales


def _baselines(cfg: HpcadConfig) -> None:
    from hpcad.baselines import check_options as check_baseline_options

    check_baseline_options(cfg.baselines)


def _threshold(cfg: HpcadConfig) -> None:
    from hpcad.config import build

    build(cfg.threshold, "threshold")


def _report(cfg: HpcadConfig) -> None:
    from hpcad.report.markup import report_zone  # not page: its plots import matplotlib

    _report_counts(cfg)
    report_zone(cfg)


def _report_counts(cfg: HpcadConfig) -> None:
    """``report.top_k`` and the report's limits (the threshold stage names each alarm's top metrics)."""
    from hpcad.report.markup import check_report_options

    check_report_options(cfg.report)


def _data(cfg: HpcadConfig) -> None:
    from hpcad.data.ingest import check_data_options

    check_data_options(cfg.data)


def _nightly(cfg: HpcadConfig) -> None:
    from hpcad.config import JOB_LEAST, NIGHTLY_LEAST, check_at_least
    from hpcad.errors import ConfigError
    from hpcad.nightly.changes import read_changes
    from hpcad.nightly.events import read_groups

    n = cfg.nightly
    if not 0 <= n.event_share <= 1:
        raise ConfigError(f"nightly.event_share={n.event_share}: a share of the scored nodes in [0, 1] (0: no events)")
    if not 0 <= n.min_node_fraction <= 1:
        raise ConfigError(f"nightly.min_node_fraction={n.min_node_fraction}: a share of the trained nodes in [0, 1]")
    if not n.drift_ratio > 1:
        raise ConfigError(f"nightly.drift_ratio={n.drift_ratio}: must be > 1 (a multiple of the node's baseline level)")
    if not n.light_ridge >= 0:
        raise ConfigError(f"nightly.light_ridge={n.light_ridge}: must be >= 0")
    check_at_least("nightly", n, {**NIGHTLY_LEAST, **JOB_LEAST})  # taken unchecked before (the job's: at night)
    read_changes(n.changes)
    read_groups(n.groups)


def _bench(cfg: HpcadConfig) -> None:
    """``hpcad bench``'s sizes (a count of 0 had ended in a traceback)."""
    from hpcad.config import check_at_least
    from hpcad.errors import ConfigError

    b = cfg.bench
    check_at_least("bench", b, {"nodes": 1, "rows": 1, "metrics": 1, "epochs": 1, "pool": 1, "seed": 0, "days": 1,
                                "ranks": 1, "alarms": 0})
    if b.naive_nodes is not None and not b.naive_nodes >= 0:
        raise ConfigError(f"bench.naive_nodes={b.naive_nodes}: must be >= 0 (0: skip the naive loop; unset: all)")


def _inputs(cfg: HpcadConfig) -> None:
    from hpcad.data.ingest import check_inputs

    check_inputs(cfg.data)


def _choice(group: str) -> str | None:
    """The option chosen for a config group (``data``: synthetic, files, long, ldms; ``launcher``:
    local, submitit); None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # HydraConfig not set: a configuration composed by a test or a notebook
        return None


def _real_data(cfg: HpcadConfig) -> None:
    """No ``data.source`` means the embedded synthetic cluster (the quick start's demo data), but not
    where the user asked for exports: ``data=files`` (``long``, ``ldms``; their ``source: ???``
    cannot override the schema's null), nor in a SLURM job over the cluster's nodes: the batch
    scripts (they set ``HPCAD_DATA_REQUIRED=1``) and ``launcher=submitit`` (unless
    ``HPCAD_DATA_REQUIRED=0``). Before, all of them ran on the synthetic cluster; a SLURM job ended
    with "done; report at ...", its only hint an INFO line in the log."""
    import os

    from hpcad.errors import ConfigError

    if cfg.data.source:
        return
    group = _choice("data")
    if group not in (None, "synthetic"):
        raise ConfigError(f"data.source: not given, and data={group} reads telemetry exports: pass "
                          f"data.source=PATH (a folder, a CSV/Parquet file, or an hpcad store.h5)")
    if os.environ.get("HPCAD_DATA_REQUIRED", "1" if _choice("launcher") == "submitit" else "0") == "1":
        raise ConfigError("data.source: not given, so this job would run on the embedded synthetic cluster (the "
                          "quick start's demo data), not on your nodes: pass data.source=/path/to/exports (or a "
                          "store.h5); HPCAD_DATA_REQUIRED=0 runs it on the synthetic cluster on purpose")


def _models(cfg: HpcadConfig) -> None:
    from hpcad.runfolder import train_run

    train_run(cfg)


def _exclusions(cfg: HpcadConfig) -> None:
    from hpcad.data.exclusions import read_exclusions

    read_exclusions(cfg.split.exclude, cfg.data)  # there, and readable as incident lists (file, line, column)


def _light_maps(cfg: HpcadConfig) -> None:
    from hpcad.model.light import check_light_options

    check_light_options(cfg.score, paths=True)


EVERY_STAGE = (_data, _split, _training, _compute, _scoring, _baselines, _threshold, _report, _real_data)
CHECKS: dict[str, tuple[Callable[[HpcadConfig], None], ...]] = {
    "ingest": (_data, _real_data), "train": (_data, _split, _training, _compute, _real_data),  # (each ingests
    "score": (_data, _split, _scoring, _compute, _real_data),  # data.source where the run has no store yet)
    "baselines": (_data, _split, _baselines, _compute, _real_data),
    "threshold": (_threshold, _report_counts, _real_data), "report": (_report,), "nightly": (_data, _report, _nightly),
    "bench": (_bench,),
    "run": EVERY_STAGE,
    "preflight": EVERY_STAGE,  # a SLURM job's step 0: the options of the steps that follow it
}
# The paths a stage reads: data.source and data.jobs (ingested), train_run (its models),
# split.exclude, score.light_maps. Checked
# here in a single process only: the ranks of a job may see different file systems, and a rank
# that stopped before the others meet would leave them waiting; there the preflight checks each
# rank's view (hpcad/preflight.py) and the stages share rank 0's ingest error (hpcad/dist.py).
PATHS: dict[str, tuple[Callable[[HpcadConfig], None], ...]] = {
    "ingest": (_inputs,), "train": (_inputs, _exclusions), "score": (_inputs, _models, _light_maps),
    "baselines": (_inputs, _models, _exclusions), "threshold": (_inputs, _models), "report": (_models,),
    "run": (_inputs, _models, _exclusions, _light_maps),
}


def check_options(cfg: HpcadConfig, stage: str, single_process: bool = True) -> None:
    """Raise the ``ConfigError`` (``InputError`` for a missing input) of the first option ``stage``
    would refuse; return when there is none. ``single_process``: the paths too (``PATHS``)."""
    for check in CHECKS.get(stage, ()) + (PATHS.get(stage, ()) if single_process else ()):
        check(cfg)
