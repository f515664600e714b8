"""One node's table, checked and turned into :class:`NodeData` in the store's metric order, whatever
file it came from (a node file, a node's rows staged from files of many nodes); a bad node is
skipped and recorded with ``data.on_bad_node=skip``; ingest's progress counts the nodes."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from hpcad.data.cells import as_numbers, stray_as_missing
from hpcad.data.counters import is_counter
from hpcad.data.grid import MISSING_METRIC_POLICIES
from hpcad.data.node import NodeData
from hpcad.data.csvtext import DIALECT_ROWS, looks_decimal_comma
from hpcad.data.timestamps import EPOCH_UNITS, LATEST_EPOCH_S, to_epoch_seconds
from hpcad.errors import ConfigError, InputError
from hpcad.progress import Progress

if TYPE_CHECKING:
    import pandas as pd  # imported where frames are converted: a stage whose store is up to date needs none

log = logging.getLogger(__name__)


class FrameConverter:
    """Validate one node's table and turn it into :class:`NodeData` in the store's metric order.

    ``metrics`` is the store's metric list: given (from the files' headers, :func:`plan_metrics`), or
    fixed by the first node. ``data.on_missing_metric`` says what a node without some of them gets:
    ``union`` (default) all-NaN columns, the metric is *absent* on that node (its model leaves it
    out); ``drop`` cannot happen (the list is the common set); ``error`` refuses the node."""

    def __init__(self, data_cfg, metrics: list[str] | None = None) -> None:
        self.cfg = data_cfg
        self.metrics = metrics
        self.labelled: bool | None = None
        self.spacing_said = False  # a row spacing far from 5 minutes is said once per ingest
        self.policy = str(data_cfg.on_missing_metric)
        if self.policy not in MISSING_METRIC_POLICIES:
            raise InputError(f"data.on_missing_metric={self.policy!r}: one of {', '.join(MISSING_METRIC_POLICIES)}")

    def __call__(self, df: pd.DataFrame, node: str, where: str) -> NodeData:
        import pandas as pd

        cfg = self.cfg
        where = f"{where} (node {node})"
        if len(df) == 0:
            raise InputError(f"{where}: no rows (empty node)")
        node_from_name = cfg.node_column not in df.columns
        df = df.drop(columns=[c for c in (cfg.node_column, *cfg.ignore_columns) if c in df.columns])
        has_ts = cfg.timestamp_column in df.columns
        has_lab = cfg.label_column in df.columns
        # the roles read once and the types from dtypes: a config look-up and a Series per column cost
        # more than the parse (a node of 160 metrics: 20 -> 9 ms)
        roles = {cfg.timestamp_column, cfg.label_column}
        typed = [(c, d) for c, d in zip(df.columns, df.dtypes) if c not in roles]
        metric_cols = [c for c, _ in typed]
        bad = [c for c, d in typed if not pd.api.types.is_numeric_dtype(d)]
        if bad:  # a few stray cells ('err', '#N/A') are missing samples; a column of text is an error
            df, bad = stray_as_missing(df, bad, where)
        if bad:
            examples = odd_values(df, bad)
            comma = any(looks_decimal_comma(v) for v in examples.values())
            raise InputError(f"{where}: non-numeric metric columns {bad[:10]} (e.g. {examples}); "
                             + (f"numbers with a decimal comma are read as such where the fields are separated "
                                f"by ';', tab or '|' and one shows in the first {DIALECT_ROWS} rows (docs/data.md)"
                                if comma else role_hint(df, bad, cfg, node_from_name)
                                + "fix the export or list them in data.ignore_columns"))
        if not metric_cols:
            raise InputError(f"{where}: no metric columns besides {cfg.timestamp_column!r}/{cfg.label_column!r}")
        clock = None if has_ts else clock_column(df, [c for c in metric_cols if not is_counter(str(c), cfg.counters)])
        if clock is not None:  # rows would be numbered and the clock trained on as a metric
            raise InputError(f"{where}: no {cfg.timestamp_column!r} column, and {clock!r} counts up like a clock "
                             f"(strictly increasing, evenly spaced): set data.timestamp_column={clock} (with "
                             f"data.epoch_unit if it is not in seconds); if it is a metric, list it in "
                             f"data.ignore_columns or data.counters")
        if self.labelled is None:
            self.labelled = has_lab
        if self.metrics is None:
            self.metrics = [str(c) for c in metric_cols]
        elif set(map(str, metric_cols)) != set(self.metrics) and self.policy == "error":
            missing = sorted(set(self.metrics) - set(map(str, metric_cols)))
            extra = sorted(set(map(str, metric_cols)) - set(self.metrics))
            raise InputError(f"{where}: metric set differs from the first node's: missing {missing[:10]}, "
                             f"extra {extra[:10]} (data.on_missing_metric=error; union keeps each node's "
                             f"own metrics, drop the common ones)")
        df.columns = [str(c) for c in df.columns]
        values = df.reindex(columns=self.metrics).to_numpy(dtype=np.float32)
        infinite = np.isinf(values)
        if infinite.any():  # e.g. a derived metric divided by zero: a missing sample, said once per node
            cols = [self.metrics[i] for i in np.flatnonzero(infinite.any(axis=0))[:10]]
            log.warning("%s: %d infinite values in metric columns %s read as missing (NaN)", where,
                        int(infinite.sum()), cols)
            values = np.where(infinite, np.float32(np.nan), values)  # a copy: to_numpy may lend a read-only view
        all_nan = np.isnan(values).all(axis=0)
        if all_nan.any():
            cols = [self.metrics[i] for i in np.flatnonzero(all_nan)[:10]]
            if self.policy != "union":
                raise InputError(f"{where}: metric columns {cols} hold no value at all (data.on_missing_metric="
                                 f"{self.policy}; union ingests them as absent on this node)")
            log.info("%s: %d metric(s) absent on this node (no value): %s", where, int(all_nan.sum()), cols)
        if has_ts:
            ts = to_epoch_seconds(df[cfg.timestamp_column], where, cfg.timestamp_column, cfg.timezone, cfg.epoch_unit,
                                  dayfirst=cfg.dayfirst)
            unit = "s"
        else:
            ts, unit = np.arange(len(df), dtype=np.int64), "row"
        labels = self._labels(df[cfg.label_column], where) if has_lab else None
        order_ok = np.all(np.diff(ts) > 0)
        if not order_ok and has_ts:
            ts, values, labels = drop_duplicates(ts, values, labels, str(cfg.duplicates), where, cfg.timestamp_column,
                                                 cfg.timezone)
            order_ok = np.all(np.diff(ts) > 0)
        if not order_ok:
            if not cfg.sort_timestamps:
                row = int(np.flatnonzero(np.diff(ts) <= 0)[0]) + 1
                raise InputError(f"{where}: timestamps not increasing at row {row} of column "
                                 f"{cfg.timestamp_column!r}; sort the export or set data.sort_timestamps=true")
            order = np.argsort(ts, kind="stable")
            ts, values = ts[order], values[order]
            labels = labels[order] if labels is not None else None
        if cfg.resample_s is not None:
            if not has_ts:
                raise InputError(f"{where}: data.resample_s={cfg.resample_s} needs timestamps (no "
                                 f"{cfg.timestamp_column!r} column)")
            ts, values, labels = resample(ts, values, labels, int(cfg.resample_s))
        elif has_ts and not self.spacing_said:
            self.spacing_said = spacing_check(ts, where)
        return NodeData(node, ts, values, labels, unit)

    def _labels(self, col: pd.Series, where: str) -> np.ndarray | None:
        """A node's labels (0 normal, another integer: the anomaly class). Empty cells: a node whose
        cells are all empty is unlabelled (a whole-cluster export labels some nodes only); some empty
        cells are an error unless ``data.blank_labels=normal`` reads them as normal."""
        name, blank = self.cfg.label_column, col.isna().to_numpy()
        if blank.all():
            log.info("%s: label column %r is empty on every row: the node is unlabelled", where, name)
            return None
        lab = label_numbers(col, self.cfg.label_names, where, name)
        if blank.any():
            first, count = int(np.flatnonzero(blank)[0]), int(blank.sum())
            if str(self.cfg.blank_labels) != "normal":
                raise InputError(f"{where}: label column {name!r} is empty on {count} of {len(col)} rows (first: row "
                                 f"{first}); a labelled node needs a label on every row (0 = normal, another integer = "
                                 f"the anomaly class): fill them in, or set data.blank_labels=normal to read empty "
                                 f"labels as normal")
            log.info("%s: %d empty labels read as normal (data.blank_labels=normal)", where, count)
        return lab.fillna(0).to_numpy().astype(np.int8)


DEFAULT_PERIOD_S = 300  # what the defaults assume: 5-minute rows (signal.smooth=25: 2 h; tolerance +-1 h)


def resample(ts: np.ndarray, values: np.ndarray, labels: np.ndarray | None,
             period: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One row per ``period`` seconds in which the node reported (sorted ``ts``): each metric's mean
    over its values there (NaN where none), labels their maximum; the row's time is the period's start."""
    if period < 1:
        raise ConfigError(f"data.resample_s={period}: must be >= 1 (seconds)")
    bins = ts // period
    uniq, start = np.unique(bins, return_index=True)
    seen = ~np.isnan(values)
    sums = np.add.reduceat(np.where(seen, values, 0.0).astype(np.float64), start, axis=0)
    counts = np.add.reduceat(seen.astype(np.int64), start, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
    lab = np.maximum.reduceat(labels, start) if labels is not None else None
    return uniq.astype(np.int64) * period, mean, lab


def spacing_check(ts: np.ndarray, where: str) -> bool:
    """Say (once) when a node's rows are far from 5 minutes apart: smoothing and the cost tolerance
    count rows. Returns whether it was said."""
    if len(ts) < 3:
        return False
    step = float(np.median(np.diff(ts)))
    if DEFAULT_PERIOD_S / 2 <= step <= DEFAULT_PERIOD_S * 2:
        return False
    log.warning("%s: rows are %gs apart (median); the defaults assume 5-minute rows (signal.smooth=25 rows, the "
                "cost tolerance +-12 rows): data.resample_s=%d averages them into 5-minute rows", where, step,
                DEFAULT_PERIOD_S)
    return True


CLOCK_NAMES = {"time", "ts", "date", "datetime", "epoch", "@timestamp", "_time", "time_s", "timestamp_s", "unix_time"}
EARLIEST_EPOCH_S = 1e8  # 1973-03-03: a clock's values lie between this and LATEST_EPOCH_S in some epoch unit


def odd_values(df: pd.DataFrame, bad: list) -> dict[str, str]:
    """Up to three of the non-numeric columns ``bad``, each with its first value that is no number
    (what an error quotes)."""
    out = {}
    for c in bad[:3]:
        odd = df[c][as_numbers(df[c])[1]]
        if len(odd):
            out[str(c)] = str(odd.iloc[0])
    return out


def clock_column(df: pd.DataFrame, columns: list) -> str | None:
    """A numeric column that is a clock rather than a metric (a node without the timestamp column
    under its configured name): strictly increasing, evenly spaced (nine in ten steps equal), and
    named like one or valued like epoch times."""
    for c in columns:
        v = df[c].to_numpy(dtype=np.float64)
        if len(v) < 3 or not np.isfinite(v).all():
            continue
        step = np.diff(v)
        if not (step > 0).all() or np.mean(step == np.median(step)) < 0.9:
            continue
        named = str(c).strip().lower() in CLOCK_NAMES
        if named or any(EARLIEST_EPOCH_S * f <= v[0] and v[-1] < LATEST_EPOCH_S * f for f in EPOCH_UNITS.values()):
            return str(c)
    return None


def role_hint(df: pd.DataFrame, bad: list[str], cfg, node_from_name: bool) -> str:
    """What non-numeric columns may be where the configured timestamp or node column is absent
    (exports name them ``time``, ``hostname``...); ``node_from_name``: the file has no node column,
    so its name was taken as the node's."""
    import pandas as pd

    names = {str(c) for c in df.columns}
    if sum(df[c].astype(str).isin(names).any() for c in bad[:10]) >= min(2, len(bad)):
        return ("a line inside the file holds column names, not values (another export's header line, joined on "
                "with cat? Lines that repeat a CSV's first line are skipped; with other columns they are not): give "
                "each export its own file, or ")
    said = []
    for c in bad[:10]:
        sample = df[c].dropna().astype(str).head(20)
        if sample.empty:
            continue
        if cfg.timestamp_column not in df.columns:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stamps = pd.to_datetime(sample, errors="coerce", format="mixed")
            if stamps.notna().all():
                said.append(f"{c!r} holds times: set data.timestamp_column={c}")
                continue
        if node_from_name:
            said.append(f"if {c!r} names the nodes, set data.node_column={c}")
    return "; ".join(said) + ("; else " if said else "")


def label_numbers(col: pd.Series, label_names, where: str, name: str, first_row: int = 0) -> pd.Series:
    """A label column as numbers (NaN where empty): text by its place in ``data.label_names`` (the
    first name is normal, 0); anything else that is not an integer is an error naming the option."""
    import pandas as pd

    names = {str(x).strip(): k for k, x in enumerate(label_names or [])}
    if len(names) < len(label_names or []):
        raise ConfigError(f"data.label_names={list(label_names)}: a name given twice (each is one class)")
    if names and not pd.api.types.is_numeric_dtype(col):  # numbers stay numbers
        col = col.map(lambda v: names.get(v.strip(), v) if isinstance(v, str) else v)
    lab = pd.to_numeric(col, errors="coerce")
    bad = (col.notna() & (lab.isna() | (lab != lab.round()))).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        texts = sorted({str(v).strip() for v in col[bad]}, key=lambda t: (t.lower() not in NORMAL_WORDS, t))
        value = col.iloc[row]
        if pd.api.types.is_number(value):  # 2.5: a fraction, not a class name to suggest
            hint, value = "or text named in data.label_names", float(value)
        else:
            hint = (f"and data.label_names={list(names)} does not name {texts[:10]}" if names else
                    f"or text named in data.label_names, the normal one first, e.g. "
                    f"'data.label_names=[{','.join(texts[:10])}]'")
        raise InputError(f"{where}: label column {name!r} must hold integers (0 normal, other = anomaly class) "
                         f"{hint}; row {first_row + row} holds {value!r}")
    return lab


DUPLICATE_POLICIES = ("identical", "error", "first", "last")
# repeated timestamps, every one with other values, from which a node's rows look like two series (two
# nodes' rows under one name), not an overlap of exports (a few rows re-read after they changed); and at
# least a third of its rows (a daylight-saving fall-back repeats 12 rows of 5 minutes)
ANOTHER_SERIES_ROWS = 12
NORMAL_WORDS = {"normal", "ok", "no", "none", "false", "healthy", "nominal"}  # put first in the hint


def drop_duplicates(ts: np.ndarray, values: np.ndarray, labels: np.ndarray | None, policy: str, where: str,
                    column: str, timezone: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One row per timestamp, by ``data.duplicates``: ``identical`` (default) drops rows that repeat an
    earlier row of the same timestamp value for value (overlapping exports, a collector that sent a
    sample twice) and refuses rows that disagree; ``first``/``last`` keep the first/last row of each
    timestamp in input order (a folder's files in name order); ``error`` refuses any repeat. What is
    dropped is logged once per node; the rows kept stay in input order."""
    if policy not in DUPLICATE_POLICIES:
        raise InputError(f"data.duplicates={policy!r}: one of {', '.join(DUPLICATE_POLICIES)}")
    order = np.argsort(ts, kind="stable")  # equal timestamps stay in input order
    s = ts[order]
    repeat = np.r_[False, s[1:] == s[:-1]]  # sorted position repeats the one before
    if not repeat.any():
        return ts, values, labels
    count = int(repeat.sum())
    starts = np.flatnonzero(~repeat)  # each timestamp's first sorted position
    group = np.cumsum(~repeat) - 1
    first = order[starts[group]]  # per sorted position: the input row of its timestamp's first row

    def stamp(pos: int) -> str:
        t = int(s[pos])
        return f"{np.datetime64(t, 's')} UTC ({t})"

    if policy == "identical":
        a, b = values[order], values[first]
        same = ((a == b) | (np.isnan(a) & np.isnan(b))).all(axis=1)
        if labels is not None:
            same &= labels[order] == labels[first]
        clash = np.flatnonzero(repeat & ~same)
        if clash.size:
            pos = int(clash[0])
            said = (f"{where}: duplicated timestamp {stamp(pos)} in column {column!r} with other values (the node's "
                    f"rows {int(first[pos])} and {int(order[pos])} in input order, from 0; ")
            if clash.size == count and count >= max(ANOTHER_SERIES_ROWS, len(ts) // 3):  # another series, not an overlap
                raise InputError(f"{said}every one of its {count} repeated rows differs from the first), as when two "
                                 f"nodes' rows are read as one node's: check the files or the node column that make "
                                 f"up this node (docs/data.md: what data.source accepts); data.duplicates=last (or "
                                 f"first) would keep one row of each timestamp, whichever series it came from")
            times = s[clash]
            dst = (f"; all within one hour: a daylight-saving fall-back's repeated hour? Local times without an offset "
                   f"are read in data.timezone (now {timezone or 'UTC'}): set it to the zone they were written in"
                   if clash.size == count >= 2 and times.max() - times.min() < 3600 else "")
            raise InputError(f"{said}{clash.size} of its {count} repeated rows differ from the first){dst}: set "
                             f"data.duplicates=last (or first) to keep one row of each timestamp")
    if policy == "error":
        pos = int(np.flatnonzero(repeat)[0])
        raise InputError(f"{where}: duplicated timestamp {stamp(pos)} in column {column!r} ({count} duplicates; "
                         f"data.duplicates=error)")
    if policy == "last":
        ends = np.r_[starts[1:], len(s)] - 1
        keep = order[ends]
    else:  # identical, first
        keep = order[starts]
    keep = np.sort(keep)
    what = {"identical": "identical repeats of earlier rows", "first": "repeats (the first row of each kept)",
            "last": "repeats (the last row of each kept)"}[policy]
    log.warning("%s: %d row(s) with a repeated timestamp dropped, %s (first at %s; data.duplicates=%s)", where, count,
                what, stamp(int(np.flatnonzero(repeat)[0])), policy)
    return ts[keep], values[keep], None if labels is None else labels[keep]


def guarded(make, node: str, skipped: list | None) -> NodeData | None:
    """Build one node's data; with ``data.on_bad_node=skip`` a bad node is logged and recorded."""
    try:
        return make()
    except InputError as exc:
        if skipped is None:
            raise
        log.error("skipping node %s: %s", node, exc)
        skipped.append([node, str(exc)])
        return None


def counted(stream: Iterable[NodeData | None], nodes: int, progress: bool) -> Iterator[NodeData]:
    """The nodes of ``stream`` (None: one skipped for bad input) with ingest's progress, node by node:
    a bar on a terminal, a line a minute in a log (thousands of node-years take an hour and more,
    while the job's other ranks, or GPUs, wait)."""
    bar = Progress(nodes, "ingest", "node", progress, log)
    try:
        for nd in stream:
            bar.update()
            if nd is not None:
                yield nd
    finally:
        bar.close()
