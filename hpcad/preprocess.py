"""Preprocessing fitted on training rows only: chronological splits, NaN policy, standardisation.

Standardisation survives constant and near-constant metrics: each metric's scale is floored at a
share of its training range and an absolute minimum (a metric constant in training is measured
relative to its level), and standardised values beyond +-clip are compressed, so a metric whose
training std is tiny (the seed lecture's exploding ips errors) cannot swamp the alarm signal.
Compression is logarithmic by default (``soft_clip``): a value further outside still scores higher,
so a never-seen value cannot hide among normal rows that sit at the clip. The scaler also keeps
each metric's training range (standardised), from which scoring adds the squared excess of a
value outside it to that metric's error (``signal.range_excess``).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hpcad.data.node import NodeData
from hpcad.errors import ConfigError, TooFewTrainingRows

if TYPE_CHECKING:
    from hpcad.config import PreprocessConfig

log = logging.getLogger(__name__)
TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}


def _to_epoch(value, option: str) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    import pandas as pd  # here: pandas costs 0.25 s of every train and score start-up

    try:
        ts = pd.Timestamp(value)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts
        return int((ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{option}: {value!r} is not a timestamp (ISO time or epoch seconds)") from exc


def _split_number(value, option: str, kind: type, unit: str) -> int | float:
    try:
        n = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}={value!r}: not a number, as split.unit={unit} needs (split.unit=time takes "
                          f"timestamps)") from None
    if not n >= 0:
        raise ConfigError(f"{option}={value}: must be >= 0")
    return n


def check_split(split_cfg) -> tuple[int | float, int | float]:
    """The split's two bounds, checked without any data (the unit, the numbers, the order of two
    times): ``ConfigError`` naming the option. Fractions, row counts or epoch seconds."""
    unit = split_cfg.unit
    if unit == "fraction":
        tr, va = (_split_number(getattr(split_cfg, k), f"split.{k}", float, unit) for k in ("train", "val"))
        if tr + va > 1:
            raise ConfigError(f"split.train={tr}, split.val={va}: fractions must be >= 0 and sum to <= 1")
        return tr, va
    if unit == "rows":
        return tuple(_split_number(getattr(split_cfg, k), f"split.{k}", int, unit) for k in ("train", "val"))
    if unit == "time":
        t_tr = _to_epoch(split_cfg.train, "split.train")
        t_va = _to_epoch(split_cfg.val, "split.val")
        if t_va < t_tr:
            raise ConfigError(f"split.val ({split_cfg.val}) must not be before split.train ({split_cfg.train})")
        return t_tr, t_va
    raise ConfigError(f"split.unit={unit!r}: expected fraction, rows or time")


def no_validation_rows(split_cfg) -> bool:
    """Whether the split gives no node a validation row (``split.val`` 0 in fractions or rows: a nightly
    night, new data scored as test), known without reading any node."""
    return split_cfg.unit in ("fraction", "rows") and check_split(split_cfg)[1] == 0


def split_codes(node: NodeData, split_cfg) -> np.ndarray:
    """Split code per row (0 train, 1 validation, 2 test), chronological within the node."""
    T = len(node.timestamp)
    unit = split_cfg.unit
    if unit == "time" and node.time_unit != "s":
        raise ConfigError(f"split.unit=time: node {node.name} has no timestamps (row order only)")
    a, b = check_split(split_cfg)
    if unit == "fraction":
        n_tr, n_va = int(round(T * a)), int(round(T * (a + b))) - int(round(T * a))
    elif unit == "rows":
        n_tr = min(a, T)
        n_va = min(b, T - n_tr)
    else:
        n_tr = int(np.searchsorted(node.timestamp, a, side="left"))
        n_va = int(np.searchsorted(node.timestamp, b, side="left")) - n_tr
    codes = np.full(T, TEST, dtype=np.int8)
    codes[:n_tr] = TRAIN
    codes[n_tr:n_tr + n_va] = VAL
    return codes


# The fewest training inputs a node's model (or baseline) is fitted on: with the default 10 %
# validation share, that keeps at least one held-out row for early stopping and the normal level.
MIN_TRAINING_ROWS = 10


def check_training_rows(n: int, where: str) -> None:
    """Refuse a node with fewer than ``MIN_TRAINING_ROWS`` training inputs, naming it."""
    if n < MIN_TRAINING_ROWS:
        short = f"{n} training rows, fewer than the minimum of {MIN_TRAINING_ROWS}"
        raise TooFewTrainingRows(f"{where}: {short} (check the node's data, split.* and labels; "
                                 f"data.on_bad_node=skip leaves such nodes untrained and trains the others)", short)


def fit_rows(n: int, validation_split: float) -> int:
    """How many of a model's ``n`` training inputs it fits; the rest (the last ``validation_split``
    share, in time order, as Keras' ``validation_split``) are its held-out validation rows, on which
    early stopping and the node's normal signal level are measured. At least 1 when ``n`` > 0."""
    return min(max(math.ceil(n * (1.0 - float(validation_split))), 1), n)


def split_identity(split) -> dict:
    """The split's settings as they shape a model, without ``exclude`` (a path: what it lists for a
    node is in that node's fingerprint, so editing the list retrains only the nodes it changes for)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(split, resolve=True) if OmegaConf.is_config(split) else dict(vars(split))
    d.pop("exclude", None)
    return d


def training_rows(node: NodeData, codes: np.ndarray, normal_only: bool, exclude_idle: bool = False,
                  excluded: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the rows a model trains on: training split, normal rows if labelled, rows
    outside ``excluded`` (``split.exclude``), and rows that ran a job if the store has job context and
    ``exclude_idle`` (the lecture dropped idle time)."""
    mask = codes == TRAIN
    if normal_only and node.labels is not None:
        mask &= node.labels == 0
    if excluded is not None:
        mask &= ~excluded
    if exclude_idle and node.job is not None:
        busy = mask & (node.job >= 0)
        if busy.any():
            mask = busy
        else:
            log.warning("node %s: no training row ran a job; training on its idle rows", node.name)
    return mask


def check_preprocess(pc) -> None:
    """``preprocess.*``, checked: the clip and the standard-deviation floors (a negative clip or floor
    had been taken: every standardised value then came out clipped or divided by nonsense)."""
    if not float(pc.clip) > 0:
        raise ConfigError(f"preprocess.clip={pc.clip}: must be > 0 (standard deviations)")
    if not float(pc.std_floor_rel) >= 0:
        raise ConfigError(f"preprocess.std_floor_rel={pc.std_floor_rel}: must be >= 0 (a share of the metric's "
                          "typical size)")
    if not float(pc.std_floor_abs) > 0:
        raise ConfigError(f"preprocess.std_floor_abs={pc.std_floor_abs}: must be > 0 (a constant metric's spread)")
    gap_limit(pc.nan_fill_limit)


def gap_limit(limit: int) -> int:
    """``preprocess.nan_fill_limit``, checked."""
    if not int(limit) >= 0:
        raise ConfigError(f"preprocess.nan_fill_limit={limit}: must be >= 0 (0: no forward fill)")
    return int(limit)


TRANSFORM_ROWS = 8192  # rows gap-filled (fill_gaps) and standardised (Scaler.transform) at a time


def fill_gaps(values: np.ndarray, limit: int) -> np.ndarray:
    """Forward-fill each column's NaNs with its last value, at most ``limit`` rows after it (pandas'
    ``ffill(limit=...)``: the first ``limit`` rows of a longer gap are filled, the rest stay NaN and
    are imputed later); ``limit`` 0: nothing is filled. float32 when anything was missing."""
    limit = gap_limit(limit)
    nan = np.isnan(values)
    if limit == 0 or not nan.any():
        return values
    out = np.array(values, dtype=np.float32)
    before = np.full(values.shape[1:], -1, dtype=np.int64)  # per column, the last value's row before the block
    for s in range(0, len(values), TRANSFORM_ROWS):  # in blocks of rows: a node-year's int index arrays
        gap = nan[s:s + TRANSFORM_ROWS]  # are ~2 copies of its values otherwise
        rows = np.arange(s, s + len(gap), dtype=np.int64)[:, None]
        last = np.maximum(np.maximum.accumulate(np.where(gap, -1, rows), axis=0), before)  # the last value's row
        r, c = np.nonzero(gap & (last >= 0) & (rows - last <= limit))
        out[s + r, c] = values[last[r, c], c]
        before = last[-1]
    return out


def windows(z: np.ndarray, w: int) -> np.ndarray:
    """Rows [T, M] -> windows [T, w*M]: row t holds rows t-w+1 .. t, oldest first (rows before the
    first are the first row repeated). ``w=1`` returns ``z`` itself."""
    return z if w <= 1 else window_at(z, np.arange(len(z)), w)


def window_at(z: np.ndarray, rows: np.ndarray, w: int) -> np.ndarray:
    """``windows(z, w)[rows]`` without building every row's window (a node-year of 160 metrics in
    10-row windows is 1.3 GB as float64): the windows of the rows ``rows`` (indices) only."""
    if w <= 1:
        return z[rows]
    M = z.shape[1]
    out = np.empty((len(rows), w * M), dtype=z.dtype)
    for k in range(w):  # block k: the row w-1-k before, the first row where there is none
        out[:, k * M:(k + 1) * M] = z[np.maximum(rows - (w - 1 - k), 0)]
    return out


def window_rows(mask: np.ndarray, w: int) -> np.ndarray:
    """Rows whose whole window (the row and the w-1 before it) lies inside ``mask``."""
    if w <= 1:
        return mask
    ok = mask.copy()
    for lag in range(1, w):
        ok[lag:] &= mask[:-lag]
        ok[:lag] &= mask[0]
    return ok


def metric_positions(model_metrics: list[str], store_metrics: list[str]) -> np.ndarray | None:
    """Where each of a model's metrics sits among a store's (-1: not there), or None when the lists
    are equal: a site's exports may list them in another order, or lack or add some."""
    if list(model_metrics) == list(store_metrics):
        return None
    pos = {m: i for i, m in enumerate(store_metrics)}
    return np.array([pos.get(m, -1) for m in model_metrics])


def in_model_order(values: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """A store's rows [T, M_store] in the model's metric order (``cols``: :func:`metric_positions`;
    NaN where the store has no such column)."""
    if cols is None:
        return values
    out = np.full((values.shape[0], cols.size), np.nan, dtype=np.float32)
    have = cols >= 0
    out[:, have] = values[:, cols[have]]
    return out


def compress(z: np.ndarray, clip: float, soft: bool) -> np.ndarray:
    """Values beyond +-clip: logarithmic growth (``soft``) or cut at the clip."""
    if not soft:
        return np.clip(z, -clip, clip)
    a = np.abs(z)
    return np.where(a > clip, np.sign(z) * (clip + np.log1p(np.maximum(a - clip, 0.0))), z)


@dataclass
class Scaler:
    """Per-metric standardisation fitted on training rows: z = compress((x - mean) / scale), and the
    training range [lo, hi] of z per metric (for the range-excess term of scoring). A metric without
    any training value (the node does not report it: heterogeneous nodes, docs/data.md) is *absent*:
    always read as missing, so it never feeds the model or its error."""

    mean: np.ndarray
    scale: np.ndarray
    clip: float
    soft_clip: bool = True
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    absent: np.ndarray | None = None  # bool [M]

    def __post_init__(self) -> None:
        if self.lo is None:
            self.lo = np.full_like(self.mean, -np.inf)
        if self.hi is None:
            self.hi = np.full_like(self.mean, np.inf)
        if self.absent is None:
            self.absent = np.zeros(self.mean.shape, dtype=bool)

    @classmethod
    def fit(cls, values: np.ndarray, cfg: PreprocessConfig, where: str = "",
            names: list[str] | None = None, quiet: bool = False) -> "Scaler":
        """Fit on training rows [T, M]. ``names`` name the metrics in the warning about metrics without
        any training value; ``quiet``: no warning (a fit of rows another stage has already fitted and
        said it for, e.g. the baselines)."""
        if values.shape[0] == 0:
            raise ConfigError(f"{where}: no training rows to fit the standardisation on "
                              f"(check split.* and the labels)")
        with np.errstate(all="ignore"), warnings.catch_warnings():  # an all-NaN column: said below, once
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0)
            rng = np.nanmax(values, axis=0) - np.nanmin(values, axis=0)
        empty = ~np.isfinite(mean)
        if empty.any() and not quiet:
            cols = [names[i] if names else str(i) for i in np.flatnonzero(empty)[:10]]
            log.warning("%s: %d metric(s) without any training value are left out of the model and its error "
                        "(absent on this node): %s", where, int(empty.sum()), ", ".join(cols))
        mean = np.where(empty, 0.0, mean)
        rng = np.nan_to_num(rng)
        floor = np.maximum(cfg.std_floor_rel * rng, cfg.std_floor_abs)
        scale = np.maximum(np.nan_to_num(std), floor)
        # A metric constant in training has no scale of its own: measure change relative to its level
        # (or in its own units when the level is below 1), not against the tiny absolute floor.
        scale = np.where(rng > 0, scale, np.maximum(np.abs(mean), 1.0))
        soft = bool(getattr(cfg, "soft_clip", True))
        out = cls(mean.astype(np.float32), scale.astype(np.float32), float(cfg.clip), soft, absent=empty)
        with np.errstate(all="ignore"):
            z = out.transform(values)[0]
            observed = ~np.isnan(values)
            out.lo = np.where(observed.any(0), np.where(observed, z, np.inf).min(0), 0.0).astype(np.float32)
            out.hi = np.where(observed.any(0), np.where(observed, z, -np.inf).max(0), 0.0).astype(np.float32)
        return out

    def transform(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardised values and a mask of entries that were missing (imputed with the mean). In
        blocks of rows (element-wise, so the same values): the soft clip's temporaries of a
        node-year are ~6 copies of its values, a few hundred MB per rank at once."""
        z = np.empty(values.shape, dtype=np.float32)
        missing = np.empty(values.shape, dtype=bool)
        for s in range(0, values.shape[0], TRANSFORM_ROWS):
            with np.errstate(invalid="ignore"):
                zb = (values[s:s + TRANSFORM_ROWS] - self.mean) / self.scale
            mb = np.isnan(zb) | self.absent
            z[s:s + TRANSFORM_ROWS] = np.where(mb, 0.0, compress(zb, self.clip, self.soft_clip))
            missing[s:s + TRANSFORM_ROWS] = mb
        return z, missing

    def to_raw(self, z: np.ndarray) -> np.ndarray:
        """Standardised values back in the metrics' own units (inverting the soft clip; a hard clip's
        cut values stay at the clip)."""
        a = np.abs(z)
        if self.soft_clip:
            a = np.where(a > self.clip, self.clip + np.expm1(np.maximum(a - self.clip, 0.0)), a)
        return self.mean + self.scale * np.sign(z) * a

    def training_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Each metric's training range [low, high] in its own units."""
        return self.to_raw(self.lo), self.to_raw(self.hi)

    def excess(self, z: np.ndarray) -> np.ndarray:
        """How far standardised values [T, M] lie outside the training range (0 inside)."""
        return np.maximum(0.0, np.maximum(z - self.hi, self.lo - z)).astype(np.float32)

    def excess_sum(self, z: np.ndarray) -> np.ndarray:
        """Per row of ``z`` [T, M], the sum of its squared :meth:`excess` [T] (float64), in blocks of
        rows (a node-year's [T, M] temporaries otherwise)."""
        out = np.empty(len(z), dtype=np.float64)
        for s in range(0, len(z), TRANSFORM_ROWS):
            out[s:s + TRANSFORM_ROWS] = np.square(self.excess(z[s:s + TRANSFORM_ROWS])).sum(1, dtype=np.float64)
        return out
