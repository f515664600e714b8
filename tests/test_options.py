"""Option values are checked before a stage starts (hpcad/options.py): a wrong value stops the run in
seconds, naming the option, instead of after the ingest, the training and the scoring it would
otherwise have waited for."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import SMALL, hpcad
from hydra import compose, initialize_config_dir

from hpcad.config import register_configs
from hpcad.errors import ConfigError, InputError
from hpcad.options import check_options
from hpcad.resources import resource_dir


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        return compose("config", list(overrides))


# (overrides, a stage that uses the option, what the error says)
WRONG = [
    (["threshold=pot", "threshold.risk=0.5"], "threshold", "threshold.init_q=0.98, threshold.risk=0.5: need"),
    (["threshold=quantile", "threshold.q=1.5"], "threshold", "threshold.q=1.5: must be in (0, 1)"),
    (["threshold.drift=2"], "threshold", "threshold.drift=2"),
    (["threshold=level", "threshold.times=0"], "threshold", "threshold.times=0.0: must be a positive multiple"),
    (["threshold.fallback=median"], "threshold", "threshold.fallback='median': expected level or quantile"),
    (["threshold.scope=rack"], "threshold", "threshold.scope='rack': expected node, cluster or auto"),
    # a negative tolerance had been taken and changed every cost (iforest's test cost 1,977 -> 2,448)
    (["threshold.tolerance=-3"], "threshold", "threshold.tolerance=-3: must be a whole number of rows >= 0"),
    (["threshold=level", "threshold.c_missed=-1"], "threshold", "threshold.c_missed=-1.0: must be a cost >= 0"),
    (["threshold.c_alarm=0", "threshold.c_missed=0"], "threshold", "are both 0: every threshold would cost nothing"),
    (["split.val=1.5"], "train", "split.train=0.5, split.val=1.5: fractions must be >= 0 and sum to <= 1"),
    (["split.unit=rows", "split.train=-3"], "train", "split.train=-3: must be >= 0"),
    (["split.train=2025-01-01"], "score", "split.train='2025-01-01': not a number, as split.unit=fraction needs"),
    (["split.unit=time", "split.train=2025-02-01", "split.val=2025-01-01"], "baselines", "must not be before"),
    (["split.unit=time", "split.train=soon"], "train", "split.train: 'soon' is not a timestamp"),
    (["preprocess.nan_fill_limit=-1"], "score", "preprocess.nan_fill_limit=-1: must be >= 0"),
    (["model.hidden=[0]"], "train", "model.hidden=[0]: need at least one positive width"),
    (["train.epochs=0"], "train", "train.epochs=0: must be >= 1"),
    (["train.lr=0"], "train", "train.lr=0.0: must be > 0"),
    (["train.trim=1"], "train", "train.trim=1.0: must be in [0, 1)"),
    (["train.weight_decay=-1"], "train", "train.weight_decay=-1.0: must be >= 0 and below 1 / train.lr"),
    # the fleet model trains one plain model: what it would silently ignore is refused
    (["model.scope=fleet", "train.trim=0.3"], "train", "train.trim=0.3: model.scope=fleet trains one plain model"),
    (["model.scope=fleet", "train.input_noise=0.3"], "train", "train.input_noise=0.3: model.scope=fleet trains one"),
    (["model.scope=fleet", "train.weight_decay=1"], "train", "train.weight_decay=1.0: model.scope=fleet trains one"),
    (["model.scope=fleet", "model.code_l1=0.1"], "train", "model.scope=fleet trains one plain model: members and "
                                                           "window must be 1, code_l1 0"),
    (["compute.max_nodes_per_chunk=0"], "train", "compute.max_nodes_per_chunk=0: must be > 0"),
    (["compute.memory_budget_mb=-5"], "score", "compute.memory_budget_mb=-5: must be > 0"),
    (["compute.checkpoint_every_s=-1"], "train", "compute.checkpoint_every_s=-1.0: must be >= 0"),
    (["signal.smooth=0"], "score", "signal.smooth=0: must be >= 1"),
    (["signal.excess_weight=much"], "score", "signal.excess_weight='much': a number >= 0 or 'auto'"),
    (["signal.metric_scales=sometimes"], "score", "signal.metric_scales='sometimes': true, false or 'auto'"),
    (["signal.excess_grid=[]"], "score", "signal.excess_grid=[]: a non-empty list of weights >= 0"),
    (["baselines.methods=[kde,lof]"], "baselines", "baselines.methods: unknown method 'lof'"),
    # taken before 2026-12-05 (nonsense results), or a traceback after the training and scoring
    (["baselines.iforest_trees=0"], "baselines", "baselines.iforest_trees=0: must be >= 1"),
    (["baselines.max_train_rows=0"], "baselines", "baselines.max_train_rows=0: must be >= 2"),
    (["baselines.knn_window=0"], "baselines", "baselines.knn_window=0: must be >= 1"),
    (["baselines.pca_variance=2"], "baselines", "baselines.pca_variance=2.0: a share of the variance in (0, 1]"),
    (["baselines.kde_bandwidths=[1,-1]"], "baselines", "a non-empty list of bandwidths > 0"),
    (["preprocess.clip=-1"], "train", "preprocess.clip=-1.0: must be > 0"),
    (["preprocess.std_floor_abs=0"], "score", "preprocess.std_floor_abs=0.0: must be > 0"),
    (["signal.excess_margin=-1"], "score", "signal.excess_margin=-1.0: must be >= 0"),
    (["signal.scale_floor=0"], "score", "signal.scale_floor=0.0: must be > 0"),
    (["threshold.grid_points=1"], "threshold", "threshold.grid_points=1: must be >= 16"),
    (["report.top_k=0"], "threshold", "report.top_k=0: must be >= 1"),  # alarms.csv's top metrics
    (["report.max_missing_share=2"], "report", "report.max_missing_share=2.0: a share in [0, 1]"),
    (["data.period_s=0"], "ingest", "data.period_s=0: must be >= 1"),
    (["data.period_s=0"], "train", "data.period_s=0: must be >= 1"),  # a stage ingests where there is no store yet
    (["data.scratch_buckets=0"], "ingest", "data.scratch_buckets=0: must be >= 1"),
    (["data.timezone=Mars/Base"], "ingest", "data.timezone='Mars/Base': not a time zone name"),  # was report.timezone
    (["train.seed=-1"], "train", "train.seed=-1: must be >= 0"),  # was IsolationForest's traceback after training
    (["score.light_night=2025-1-8"], "score", "score.light_night='2025-1-8': a night as YYYY-MM-DD"),
]


@pytest.mark.parametrize("overrides,stage,says", WRONG, ids=[" ".join(w[0]) for w in WRONG])
def test_a_wrong_value_is_refused_by_its_stage_by_run_and_by_preflight(overrides, stage, says):
    cfg = _cfg(*overrides)
    for s in (stage, "run", "preflight"):
        with pytest.raises(ConfigError, match=re.escape(says)):
            check_options(cfg, s)


def test_stages_leave_alone_what_they_do_not_use():
    cfg = _cfg("threshold=quantile", "threshold.q=1.5", "baselines.methods=[lof]")
    for stage in ("ingest", "train", "score", "report", "generate", "nightly"):
        check_options(cfg, stage)  # the threshold and baselines options are theirs alone
    with pytest.raises(ConfigError, match="threshold.q"):
        check_options(cfg, "threshold")


def test_checking_every_stage_s_options_imports_no_plotting_library():
    """The preflight checks every stage's options on every rank of a job, as its first step: the
    report's (its time zone) imported matplotlib with the report's page, on every rank (half a
    second of CPU each here, more where a thousand ranks read it from a shared file system)."""
    code = ("import sys; from hydra import compose, initialize_config_dir; from hpcad.config import register_configs; "
            "from hpcad.options import check_options; from hpcad.resources import resource_dir; register_configs()\n"
            "with initialize_config_dir(str(resource_dir('conf')), version_base='1.3'):\n"
            "    check_options(compose('config', ['report.timezone=Europe/Rome']), 'preflight', single_process=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]
    with pytest.raises(ConfigError, match="report.timezone='Mars/Base': not a time zone name"):
        check_options(_cfg("report.timezone=Mars/Base"), "preflight")  # still checked there


def test_the_nightly_jobs_event_options_and_files_are_checked_before_any_night(tmp_path):
    for overrides, says in ((["nightly.event_share=1.5"], "nightly.event_share=1.5: a share of the scored nodes in [0, 1]"),
                            (["nightly.event_min_nodes=0"], "nightly.event_min_nodes=0: must be >= 1"),
                            # taken unchecked before 2026-12-05 (the scoring job's size: only at night)
                            (["nightly.min_node_fraction=2"], "nightly.min_node_fraction=2.0: a share of the trained"),
                            (["nightly.drift_ratio=1"], "nightly.drift_ratio=1.0: must be > 1"),
                            (["nightly.light_days=0"], "nightly.light_days=0: must be >= 1"),
                            (["nightly.keep_data_days=-1"], "nightly.keep_data_days=-1: must be >= 0"),
                            (["nightly.job_mem_mb=0"], "nightly.job_mem_mb=0: must be >= 1"),
                            ([f"nightly.groups={tmp_path / 'racks.csv'}"], "nightly.groups=")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            check_options(_cfg(*overrides), "nightly")
    (tmp_path / "racks.csv").write_text("host,rack\ncn01,r1\n")
    with pytest.raises(InputError, match="racks.csv: nightly.groups needs the columns node and group"):
        check_options(_cfg(f"nightly.groups={tmp_path / 'racks.csv'}"), "nightly")
    check_options(_cfg("nightly.event_share=0"), "nightly")  # off


def test_paths_a_stage_reads_are_checked_in_a_single_process(tmp_path):
    """data.source and data.jobs for the stages that ingest, train_run for those that load its models.
    Not under several ranks: there each rank may see other file systems (the preflight checks each
    rank's view, tests/test_slurm.py)."""
    gone = tmp_path / "gone"
    for option, stages in (("data.source", ("ingest", "train", "score", "threshold", "run")),
                           ("data.jobs", ("ingest", "train", "baselines", "run"))):
        cfg = _cfg(f"{option}={gone}")
        for stage in stages:
            with pytest.raises(InputError, match=re.escape(f"{option}: {gone} does not exist")):
                check_options(cfg, stage)
            check_options(cfg, stage, single_process=False)
        check_options(cfg, "report")  # reads neither
    cfg = _cfg(f"train_run={gone}")
    for stage in ("score", "baselines", "threshold", "report", "run"):
        with pytest.raises(ConfigError, match=re.escape(f"train_run={gone}: {gone / 'models'} does not exist")):
            check_options(cfg, stage)
    (gone / "models").mkdir(parents=True)
    check_options(cfg, "run")
    cfg = _cfg(f"score.light_maps={tmp_path / 'nightly' / 'light'}")  # a typo would apply no light map at all
    for stage in ("score", "run"):
        with pytest.raises(ConfigError, match=re.escape(f"score.light_maps={tmp_path / 'nightly' / 'light'}: not a folder")):
            check_options(cfg, stage)
        check_options(cfg, stage, single_process=False)


def test_no_data_source_where_exports_are_asked_for_is_refused(tmp_path):
    """`data=long` (files, ldms) without data.source, the batch scripts' HPCAD_DATA_REQUIRED=1 and
    `launcher=submitit`: before, all ran on the embedded synthetic cluster (data/files.yaml's `source: ???` could not
    override the schema's null). The quick start (no data.source, data=synthetic) still runs on it."""
    run = tmp_path / "run"
    p = hpcad("ingest", "data=long", f"hydra.run.dir={run}", check=False)
    assert p.returncode == 2 and "hpcad ingest: error: data.source: not given, and data=long reads telemetry " \
                                 "exports: pass data.source=PATH" in p.stderr, p.stderr[-2000:]
    p = hpcad("run", *SMALL, f"hydra.run.dir={run}", check=False, env={"HPCAD_DATA_REQUIRED": "1"})
    assert p.returncode == 2 and "hpcad run: error: data.source: not given, so this job would run on the embedded " \
                                 "synthetic cluster" in p.stderr and "HPCAD_DATA_REQUIRED=0" in p.stderr, p.stderr[-2000:]
    # a SLURM job from Python: refused before anything is submitted (no SLURM is needed to see it)
    p = hpcad("train", "launcher=submitit", f"hydra.run.dir={run}", check=False)
    assert p.returncode == 2 and "hpcad train: error: data.source: not given, so this job" in p.stderr, p.stderr[-2000:]
    assert not (run / "store.h5").exists() and not (run / "submitit").exists()
    hpcad("ingest", "data.synthetic.nodes=2", "data.synthetic.rows=100", f"hydra.run.dir={run}",
          env={"HPCAD_DATA_REQUIRED": "0"})
    assert (run / "store.h5").exists()


def _shipped() -> list[list[str]]:
    """The default, every YAML option of every config group, and two non-default settings."""
    conf = resource_dir("conf")
    groups = [[f"{g.name}={y.stem}"] for g in sorted(conf.iterdir()) if g.is_dir() for y in sorted(g.glob("*.yaml"))]
    return [[], *groups, ["compute.precision=bf16", "train.input_noise=0.3"]]


@pytest.mark.parametrize("overrides", _shipped(), ids=str)
def test_shipped_configurations_pass(overrides):
    check_options(_cfg(*overrides), "run")


def test_run_stops_before_the_ingest_with_one_clear_line(tmp_path):
    """Before: the synthetic cluster was generated, trained and scored, then Hydra's "Error in call to
    target 'hpcad.threshold.rules.PotRule'" ended the process with exit 1."""
    run = tmp_path / "run"
    p = hpcad("run", f"hydra.run.dir={run}", *SMALL, "threshold=pot", "threshold.risk=0.5", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "hpcad run: error: threshold.init_q=0.98, threshold.risk=0.5: need 0 < risk < 1 - init_q < 1" in p.stderr
    assert "Traceback" not in p.stderr and "Error in call to target" not in p.stderr
    assert not (run / "store.h5").exists() and not (run / "models").exists()  # nothing ran


@pytest.mark.parametrize("option", ["train.trim=0.3", "train.weight_decay=1"])
def test_a_training_option_is_part_of_the_models_fingerprint_and_its_default_leaves_it_unchanged(option):
    """``train.trim`` and ``train.weight_decay`` change the weights, so models trained without them
    are retrained when one is set; at their defaults (0) the fingerprint is the one hpcad wrote
    before the options existed, so a site's trained models stay valid across the upgrade."""
    from types import SimpleNamespace

    from hpcad.train import model_spec, training_fingerprint

    store = SimpleNamespace(metrics=["power", "ips"])
    plain, trimmed = (_cfg(*o) for o in ([], [option]))
    assert training_fingerprint(plain, model_spec(plain), store) == "1cb6a554f39412723138"  # recorded before the option (a change to a default in the digest retrains every site's models: update only on purpose)
    assert training_fingerprint(trimmed, model_spec(trimmed), store) != training_fingerprint(plain, model_spec(plain),
                                                                                                 store)


def test_the_benchs_sizes_are_checked_before_it_builds_anything():
    """A count of 0 had ended in a traceback from inside the benchmark (bench.nodes=0, bench.pool=0)."""
    for overrides, says in ((["bench.nodes=0"], "bench.nodes=0: must be >= 1"),
                            (["bench.mode=score", "bench.rows=0"], "bench.rows=0: must be >= 1"),
                            (["bench.naive_nodes=-1"], "bench.naive_nodes=-1: must be >= 0")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            check_options(_cfg(*overrides), "bench")
    check_options(_cfg("bench.naive_nodes=0"), "bench")  # 0: the naive loop skipped, as documented
