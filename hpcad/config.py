"""Typed configuration tree (one per job), registered in Hydra's ConfigStore.

The YAML groups under ``conf/`` mirror these dataclasses; the schema makes Hydra reject unknown keys
and wrongly typed values before any work starts (keys forced in with ``+``: ``unknown_keys``).
``model`` and ``threshold`` carry a ``_target_`` so users pick an implementation by config group,
as with Hydra's own plugins.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II


class Choice(str, Enum):
    """An option with a fixed set of values: Hydra refuses any other value when the config is
    composed ("Invalid value 'x', expected one of [...]"), before any work starts. Members are
    strings (``cfg.data.format == "long"``) and print as their value."""

    def __str__(self) -> str:
        return str(self.value)


def _choice(name: str, *values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values])


DataFormat = _choice("DataFormat", "wide", "ldms", "long")
EpochUnit = _choice("EpochUnit", "s", "ms", "us", "ns")
MissingMetric = _choice("MissingMetric", "union", "drop", "error")
BadNode = _choice("BadNode", "error", "skip")
Duplicates = _choice("Duplicates", "identical", "error", "first", "last")
BlankLabels = _choice("BlankLabels", "error", "normal")
SplitUnit = _choice("SplitUnit", "fraction", "rows", "time")
Precision = _choice("Precision", "fp32", "tf32", "bf16")
ErrorDtype = _choice("ErrorDtype", "float32", "float16")
ExportFormat = _choice("ExportFormat", "csv", "parquet", "ldms", "long")
BenchMode = _choice("BenchMode", "train", "score", "ingest", "drift", "report", "baselines", "explain", "nightly",
                    "threshold")
LightRetrain = _choice("LightRetrain", "drifted", "all", "off")


@dataclass
class SyntheticConfig:
    """The embedded default data set: a synthetic cluster (see :mod:`hpcad.data.synthetic`)."""

    profile: str = "cluster"  # cluster: ~160 metrics in real units | davide: the lecture's 159 columns in [0, 1]
    nodes: int = 8
    rows: int = 2016  # non-idle 5-minute rows per node (2016 = one week)
    seed: int = 0
    clean_fraction: float = 0.45  # leading share of rows kept free of anomalies (like the lecture's train part)
    anomaly_fraction: float = 0.12  # share of the remaining rows inside labelled anomalies
    kinds: Optional[list[str]] = None  # None: all four for cluster, the two governor modes for davide


@dataclass
class DataConfig:
    source: Optional[str] = None  # directory, CSV/Parquet file, or hpcad HDF5 store; None = synthetic
    format: DataFormat = DataFormat.wide  # wide: a row per (node, time) | ldms: LDMS CSV store | long: (time, node, metric, value)
    node_column: str = "node"
    timestamp_column: str = "timestamp"
    label_column: str = "anomaly"
    blank_labels: BlankLabels = BlankLabels.error  # empty cells in a labelled node's label column: error | normal (read as 0); all empty: the node is unlabelled
    # text labels (incident tickets, spreadsheets), in class order: the first is normal (0), the next
    # class 1, ... e.g. [normal,powersave,performance]; empty: labels must be integers
    label_names: list[str] = field(default_factory=list)
    metric_column: str = "metric"  # long format only
    value_column: str = "value"  # long format only
    period_s: int = 300  # ldms/long: grid period (mean per period)
    resample_s: Optional[int] = None  # wide: average each node's rows into periods of this many seconds (300 for 1-minute exports); null: rows as they are
    timezone: str = "UTC"  # zone of naive timestamps (ISO without offset, sacct times)
    epoch_unit: EpochUnit = EpochUnit.s  # numeric timestamps: s | ms | us | ns
    dayfirst: Optional[bool] = None  # dates like 06/01/2025: true dd/mm, false mm/dd; null: a day above 12 tells, else an error
    counters: list[str] = field(default_factory=list)  # metric names/patterns turned into per-second rates
    # labelled intervals (node,start,end[,class]: an incident list) instead of a label column; every
    # node is then labelled, normal outside its intervals (hpcad/data/labelfile.py)
    labels: Optional[str] = None
    node_names: Optional[str] = None  # CSV node,name: a telemetry node name -> the name to use (SLURM's NodeName); unlisted names kept
    jobs: Optional[str] = None  # sacct --parsable2 (JobID|NodeList|Start|End|State|User; State, User optional) or CSV: job context
    on_missing_metric: MissingMetric = MissingMetric.union  # a metric some nodes lack: union (absent there) | drop (common set) | error
    scratch_buckets: int = 64  # ldms/long: node buckets of the out-of-core pivot (memory ~ input / buckets)
    sort_timestamps: bool = False  # unsorted timestamps are an error unless this is true
    duplicates: Duplicates = Duplicates.identical  # rows repeating a node's timestamp: identical (drop exact repeats, refuse others) | first | last | error
    ignore_columns: list[str] = field(default_factory=list)  # non-metric columns to drop (else: error)
    on_bad_node: BadNode = BadNode.error  # error: stop, write nothing | skip: log and record the node (or a bad file of many nodes), ingest the rest
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class SplitConfig:
    """Chronological split per node; ``unit`` says how ``train`` and ``val`` are read.

    fraction: shares of each node's rows; rows: row counts; time: end timestamps (ISO or epoch).
    Test is whatever follows the validation part.
    """

    unit: SplitUnit = SplitUnit.fraction
    train: Any = 0.5
    val: Any = 0.25
    normal_only: bool = True  # train on label-0 rows only when labels exist
    exclude_idle: bool = True  # with job context (data.jobs): train only on rows that ran a job
    # stretches kept out of training, not labels: a file or glob pattern of incident lists (node,start,end;
    # a nightly alarms.csv is one) (hpcad/data/exclusions.py)
    exclude: Optional[str] = None


@dataclass
class PreprocessConfig:
    std_floor_rel: float = 0.01  # scale >= this share of the metric's training range
    std_floor_abs: float = 1.0e-6  # and >= this absolute value
    clip: float = 20.0  # standardised values beyond +-clip are compressed (bounds one metric's error)
    soft_clip: bool = True  # compress logarithmically beyond the clip (further out still scores higher); false: cut
    nan_fill_limit: int = 3  # forward-fill at most this many consecutive NaN rows, then use the training mean


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1.0e-3
    validation_split: float = 0.1  # Keras semantics: the last share of the training rows, not shuffled
    patience: int = 3
    restore_best: bool = True
    seed: int = 0
    input_noise: float = 0.0  # denoising: Gaussian noise of this std (standardised units) on training inputs
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) on the weight matrices, per step lr x this
    trim: float = 0.0  # leave each batch's highest-error share of rows out of its step (robust to anomalies in training)


@dataclass
class ComputeConfig:
    """Where and how the train, score and baseline stages run: none of these changes a result, except
    ``precision`` (training's matmuls; part of a model's fingerprint)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N (under several ranks: the rank's local GPU)
    precision: Precision = Precision.fp32  # fp32 | tf32 (CUDA) | bf16: training's matmuls; weights, optimiser, scoring stay fp32
    # Bound the models trained (nodes scored) together in one batched chunk (hpcad/model/budget.py). Host
    # memory (all of it on CPU); None: half the host's available memory shared by the ranks on the node.
    memory_budget_mb: Optional[int] = None
    device_memory_mb: Optional[int] = None  # GPU memory; None: 90 % of the device's free memory
    max_nodes_per_chunk: Optional[int] = None  # None: 32 on CPU (training and scoring), 4096 on CUDA
    progress: bool = True  # a bar on a terminal, a log line a minute in files (SLURM, cron: hpcad/progress.py)
    # Save a training chunk's state after an epoch once this many seconds have passed since the last
    # save (0: every epoch): a kill loses at most this plus one epoch (hpcad/model/checkpoint.py).
    checkpoint_every_s: float = 30.0


@dataclass
class SignalConfig:
    """From per-row errors to the alarm signal (the same for every detector; hpcad/signals.py)."""

    smooth: int = 25  # rows averaged into a row's signal (asinh scale), centred; 1 = the raw per-row signal
    causal: bool = False  # average the row and the ones before it only (alarms that never look ahead)
    range_excess: bool = True  # add the squared excess of a value outside its training range to its error
    excess_weight: Any = "auto"  # ...times this weight: a number, or auto = chosen on labelled validation rows (hpcad/signal_choice.py)
    # auto's candidates (the first without labels): decades from 1 (the model's error decides) to 1e6 (a value
    # outside its training range outranks it): docs/results.md, "The range-excess weight's grid, extended"
    excess_grid: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6])
    # divide each metric's error by its mean on the node's held-out normal rows (at least the metrics'
    # mean) before the sum: false, true, or auto = chosen with the weight (hpcad/signals.py;
    # off by default: docs/results.md, "Per-metric error scales as a choice of each run")
    metric_scales: Any = False
    # divide the residuals by their covariance on the rows the node's model was fitted on (Mahalanobis
    # distance, ZCA per metric; hpcad/model/whiten.py): families of metrics that move together count
    # once. true, false, or auto = whitened unless the labelled validation rows rank it worse
    # (chosen with the weight; without labels, whitened: hpcad/signal_choice.py)
    whiten: Any = "auto"
    excess_margin: float = 0.005  # auto keeps the first candidate (whitened, no scales, small weights first) within this of the best validation AP
    scale_floor: float = 1.0e-4  # a node's normal level (signal_norm's divisor) is at least this x metrics


@dataclass
class ScoreConfig:
    """What ``errors.h5`` keeps (docs/data.md "Disk")."""

    error_dtype: ErrorDtype = ErrorDtype.float32  # float32 | float16: per-metric errors at half the disk (the signal is float32 either way)
    # Light maps (hpcad/model/light.py) to apply: a nightly output's light/ folder (the nightly job
    # passes its own to its SLURM scoring job), and the night whose maps apply (YYYY-MM-DD; None: the
    # newest). Maps an older hpcad wrote beside the models are applied either way.
    light_maps: Optional[str] = None
    light_night: Optional[str] = None


@dataclass
class ReportConfig:
    top_k: int = 8
    max_nodes_plotted: int = 12
    max_nodes_overview: int = 200  # rows of the cluster overview heatmap (most alarms first)
    max_node_pages: int = 200  # alarmed nodes that get their own page (most alarms first)
    max_missing_share: float = 0.5  # a node with more of its input values missing is a telemetry gap (report, nightly log)
    enabled: bool = True
    timezone: Optional[str] = None  # the report's clock (plots, alarm times): null = the nightly's site zone (nightly.timezone), else data.timezone


@dataclass
class BaselineConfig:
    """Comparison detectors (hpcad/baselines.py), thresholded and evaluated like the autoencoder."""

    methods: list[str] = field(default_factory=lambda: ["kde", "iforest", "pca", "knn", "range"])
    range_excess: bool = True  # pca, knn and kde add the autoencoder's range-excess term, each at its own auto weight (baselines.py)
    kde_bandwidths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 5.0, 8.0])
    iforest_trees: int = 100
    pca_variance: float = 0.95  # components kept: the fewest that explain this share of the variance
    knn_window: int = 10  # rows per window of the nearest-neighbour baseline
    max_train_rows: int = 2000  # fits use at most this many training rows (an even subsample)
    max_nodes: int = 256  # more nodes than this: baselines are skipped (with a warning)
    seed: int = II("train.seed")  # subsampling and IsolationForest; follows the training seed


@dataclass
class GenerateConfig:
    """``hpcad generate``: write the synthetic data set as files a user could have exported."""

    out: Optional[str] = None  # directory (cluster: one file per node) or file (davide: one CSV); None = run folder
    format: ExportFormat = ExportFormat.csv  # csv | parquet (wide, one file per node) | ldms | long (read back with data=ldms|long)


@dataclass
class BenchConfig:
    """``hpcad bench``: synthetic throughput benchmark (see docs/benchmarks.md)."""

    mode: BenchMode = BenchMode.train  # train | score | ingest (bench.input of nodes x days x metrics) | drift (light retraining study) | report | baselines (baselines.methods, one core each) | explain (train_run: alarms' causes vs the synthetic faults) | nightly (one night of bench.nodes, bench.days of training) | threshold (fit and apply on labelled errors of bench.nodes x bench.rows)
    nodes: int = 64
    rows: int = 6667
    rows_spread: float = 0.0  # train mode: node lengths spread evenly over [(1 - spread) x rows, rows]
    metrics: int = 159
    epochs: int = 2
    device: str = "auto"
    naive_nodes: Optional[int] = None  # nodes timed with the naive loop: None = all, 0 = skip
    pool: int = 16  # distinct synthetic nodes, reused cyclically
    labelled: bool = False  # score mode: the store keeps the synthetic nodes' labels, so auto's signal choice pass runs too
    seed: int = 0
    days: int = 30  # ingest mode: days of 5-minute samples per node
    ranks: int = 1  # ingest mode: local processes that share the ingest (launched as torchrun would)
    input: str = "long"  # ingest mode: long (an ExaMon-like long export) | days (daily wide exports of every node) | nodes (a CSV file per node)
    alarms: int = 200  # report mode: alarmed nodes (bench.nodes=5000 bench.rows=288: a night of a large machine); nightly mode: nodes with anomalies in the night


@dataclass
class LocalLauncherConfig:
    _target_: str = "hpcad.launch.local.LocalLauncher"


@dataclass
class SubmititLauncherConfig:
    """Submit the stage as a SLURM job with submitit and wait for it (logs in <run>/submitit)."""

    _target_: str = "hpcad.launch.submitit.SubmititLauncher"
    partition: Optional[str] = None  # None: the site's default partition
    account: Optional[str] = None
    nodes: int = 1
    tasks_per_node: int = 1  # each task is one rank and trains its share of the monitored nodes
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpu_bind: str = "per_task:1"  # srun --gpu-bind when each task has a GPU (none: every task sees all)
    timeout_min: int = 60
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    cluster: Optional[str] = None  # None: SLURM when sbatch is available, else local processes
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch options


@dataclass
class NightlyConfig:
    """``hpcad nightly``: re-score a day with a trained run (jobs/nightly_rescore.sh; docs/operations.md)."""

    date: Optional[str] = None  # YYYY-MM-DD or FROM..TO (backfill, in order); None = yesterday in `timezone`
    catch_up_days: int = 7  # without `date`: also the unpublished nights of the days before yesterday (cron down, exports late)
    input: Optional[str] = None  # export location of one day: strftime codes and {date} (YYYY-MM-DD) expand
    jobs: Optional[str] = None  # the day's sacct --parsable2 dump (same expansion): job context; optional
    out: Optional[str] = None  # root of the nightly outputs: <out>/<date>/, history.csv, .nightly.lock
    timezone: str = "UTC"  # the site's time zone: what "yesterday" and a day's midnight mean
    min_node_fraction: float = 0.9  # input is partial if fewer of the trained nodes report
    max_end_gap_s: int = 3600  # ...or if the newest sample is older than the day's end minus this
    drift_ratio: float = 2.0  # drift: a night's median signal_norm >= this x the node's baseline...
    drift_days: int = 3  # ...on this many consecutive nights (hpcad/nightly/drift.py)
    drift_reference_nights: int = 3  # the baseline: median level of the node's first nights
    # drifted | all | off: fit LARA-style light maps after the night, on rows under the threshold; none for
    # a node alarmed on most of the night's rows, or whose threshold was fitted on rows that were not normal
    # (thresholds.json's not_normal_fit_nodes): a fault is not learned as normal (nightly.changes accepts one)
    light_retrain: LightRetrain = LightRetrain.drifted
    light_days: int = 3  # days of recent normal rows the light maps are fitted on
    light_ridge: float = 10.0  # ridge strength (per sample) pulling the maps towards "no change"
    changes: Optional[str] = None  # the site's maintenance log, CSV node,since[,note]: a node changed (repair, new part) settles on a light map fitted on the nights since (hpcad/nightly/changes.py)
    keep_data_days: int = 14  # nights keep store.h5/errors.h5 this long (light retraining reads them);
    #                           alarms, reports, levels and drift stay for good
    slurm: bool = False  # score through sbatch --wait slurm/score_all_nodes.sh instead of in process
    incident_gap_days: int = 2  # an incident stays one incident across this many days without a night folder
    prometheus: Optional[str] = None  # node_exporter textfile (newest night); None: <out>/hpcad.prom
    notify: Optional[str] = None  # command run with the night's alarms.jsonl when it has new incidents
    notify_timeout_s: int = 60
    drain: bool = False  # run drain.txt's `scontrol update ... State=DRAIN` lines (false: only write them)
    drain_after_nights: int = 2  # an incident open this many nights is confirmed (drain.txt)
    drain_max_nodes: int = 5  # at most this many drain commands run per night (highest peaks first; nodes already out do not count)
    event_share: float = 0.25  # a cluster-wide event: this share of the scored nodes alarmed in one hour... (0: off)
    event_min_nodes: int = 5  # ...and at least this many; their alarms open no node incident (hpcad/nightly/events.py)
    groups: Optional[str] = None  # CSV node,group (rack, chassis, PDU): events are also looked for within each group
    # The scoring job's size (nightly.slurm): a night of 5-minute rows scores in minutes on CPUs
    job_tasks: int = 1  # ranks, each scoring a share of the nodes
    job_gpus_per_node: int = 0
    job_cpus_per_task: int = 8
    job_mem_mb: int = 4096  # per task (--mem = tasks x this); scoring's chunks then fit in half of it
    job_time: str = "01:00:00"
    sbatch_args: list[str] = field(default_factory=list)  # e.g. ["-p", "prod", "-A", "ops"]; after (and over) the job_* options


@dataclass
class HpcadConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    threshold: Any = None
    signal: SignalConfig = field(default_factory=SignalConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    launcher: Any = None
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    train_run: Optional[str] = None  # score with the models (and thresholds) of this earlier run folder


@dataclass
class AutoencoderConfig:
    _target_: str = "hpcad.model.autoencoder.AutoencoderSpec"
    hidden: list[int] = field(default_factory=lambda: [64])  # encoder widths; the last one is the code
    code_l1: float = 0.0  # L1 sparsity penalty on the code (the lecture's alternative to a bottleneck)
    scope: str = "node"  # node: one model per monitored node | fleet: one model over all nodes (DDP)
    members: int = 1  # autoencoders per node (seed ensemble, one batched kernel); reconstruction = their mean
    window: int = 1  # rows per input: the row and the window - 1 rows before it, flattened


@dataclass
class CostRuleConfig:
    _target_: str = "hpcad.threshold.rules.CostRule"
    scope: str = "node"  # node: one threshold per node | cluster: one on per-node normalised signals | auto: chosen on validation
    c_alarm: float = 1.0
    c_missed: float = 5.0
    tolerance: int = 12
    grid_points: int = 4096  # cluster scope: thresholds tried (log grid over the data's range)
    fallback: str = "level"  # rule for nodes without labelled validation rows: level | quantile (q=0.995)
    times: float = 5.0  # the level fallback's threshold: this multiple of each node's normal level
    drift: float = 0.3  # expected cost under level jitter of this share of the normal-anomaly distance; 0: exact optimum


@dataclass
class LevelRuleConfig:
    _target_: str = "hpcad.threshold.rules.LevelRule"
    scope: str = "node"  # node or cluster: the same alarms (one multiple of every node's own level)
    times: float = 5.0  # threshold: this multiple of the node's normal level (signal_norm > times)
    grid_points: int = 4096
    c_alarm: float = 1.0  # used only to report the cost when labels exist
    c_missed: float = 5.0
    tolerance: int = 12


@dataclass
class QuantileRuleConfig:
    _target_: str = "hpcad.threshold.rules.QuantileRule"
    scope: str = "node"
    q: float = 0.995
    grid_points: int = 4096
    c_alarm: float = 1.0  # used only to report the cost when labels exist
    c_missed: float = 5.0
    tolerance: int = 12


@dataclass
class PotRuleConfig:
    _target_: str = "hpcad.threshold.rules.PotRule"
    scope: str = "node"
    init_q: float = 0.98  # initial threshold: this quantile of the validation signal
    risk: float = 1.0e-4  # target probability of exceeding the final threshold
    grid_points: int = 4096
    c_alarm: float = 1.0
    c_missed: float = 5.0
    tolerance: int = 12


def register_configs() -> None:
    """Register the schemas; YAML files in ``conf/`` extend them through their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="hpcad_schema", node=HpcadConfig)
    cs.store(group="model", name="autoencoder_schema", node=AutoencoderConfig)
    cs.store(group="threshold", name="cost_schema", node=CostRuleConfig)
    cs.store(group="threshold", name="level_schema", node=LevelRuleConfig)
    cs.store(group="threshold", name="quantile_schema", node=QuantileRuleConfig)
    cs.store(group="threshold", name="pot_schema", node=PotRuleConfig)
    cs.store(group="launcher", name="local_schema", node=LocalLauncherConfig)
    cs.store(group="launcher", name="submitit_schema", node=SubmititLauncherConfig)


# The nightly job's counts and times, and their least values (checked before a night starts)
NIGHTLY_LEAST = {"catch_up_days": 0, "max_end_gap_s": 0, "drift_days": 1, "drift_reference_nights": 1,
                 "light_days": 1, "keep_data_days": 0, "incident_gap_days": 0, "notify_timeout_s": 1,
                 "drain_after_nights": 1, "drain_max_nodes": 0, "event_min_nodes": 1}
JOB_LEAST = {"job_tasks": 1, "job_gpus_per_node": 0, "job_cpus_per_task": 1, "job_mem_mb": 1}  # its scoring job


def check_at_least(group: str, node: Any, least: dict[str, float]) -> None:
    """Each option ``group.<name>`` of ``least`` at least its value there, else a ``ConfigError``
    naming it."""
    from hpcad.errors import ConfigError

    for name, low in least.items():
        if not node[name] >= low:
            raise ConfigError(f"{group}.{name}={node[name]}: must be >= {low}")


def build(node: Any, option: str) -> Any:
    """Instantiate the ``_target_`` a config group names (``model``, ``threshold``). A value the
    target refuses is a ``ConfigError`` in the target's own words (it names the option), not Hydra's
    wrapped "Error in call to target" (which ended the process with exit 1 and a hint to read a trace)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from hpcad.errors import ConfigError

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        raise ConfigError(str(cause) if cause is not None else f"{option}: {exc}") from exc


def unknown_keys(cfg) -> list[str]:
    """Dotted names in ``cfg`` that no schema declares. Hydra refuses a misspelt key, but a key
    added with ``+`` (which Hydra itself suggests after a misspelling) passes and would be ignored."""
    from omegaconf import DictConfig, OmegaConf

    by_target = {c._target_: c for c in (AutoencoderConfig, CostRuleConfig, QuantileRuleConfig, PotRuleConfig,
                                        LocalLauncherConfig, SubmititLauncherConfig)}
    found: list[str] = []

    def walk(node: DictConfig, schema: DictConfig, prefix: str) -> None:
        for key in node.keys():
            if key not in schema:
                found.append(prefix + str(key))
                continue
            child, spec = node._get_node(key), schema._get_node(key)
            if isinstance(child, DictConfig) and isinstance(spec, DictConfig) and \
                    dataclasses.is_dataclass(OmegaConf.get_type(spec)):
                walk(child, spec, f"{prefix}{key}.")

    walk(cfg, OmegaConf.structured(HpcadConfig), "")
    for group in ("model", "threshold", "launcher"):
        node = cfg.get(group)
        if isinstance(node, DictConfig) and node.get("_target_") in by_target:
            walk(node, OmegaConf.structured(by_target[node["_target_"]]), f"{group}.")
    return found


# Options that moved to another group: an old command line gets one line saying where, not Hydra's
# "Key 'device' not in 'TrainConfig'" (with its hint to append the key with "+").
# Every compute option was a train option before the group existed.
MOVED = {f"train.{f.name}": f"compute.{f.name}" for f in fields(ComputeConfig)}


def moved_options(overrides: list[str]) -> list[str]:
    """``"old -> new"`` for each override that names a moved option (with or without ``+``/``~``)."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in MOVED:
            out.append(f"{key} -> {MOVED[key]}")
    return out
