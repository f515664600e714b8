"""Labels from a file of intervals (``data.labels``): the incident list a site keeps beside its telemetry.

Input: a CSV (or Parquet) file, one labelled interval per line, header names case-insensitive:

- ``node``: a node name or a SLURM host list (``n[001-004]``) for an incident on several nodes;
- ``start``, ``end``: ISO 8601 times or epoch numbers, read like the telemetry's timestamps
  (``data.timezone``, ``data.epoch_unit``, ``data.dayfirst``); both ends included; an empty ``end``
  is an incident still open (to the end of the data). Telemetry without timestamps (rows numbered):
  row numbers, from 0;
- ``class`` (or ``label``, or the name of ``data.label_column``), optional: the anomaly class, an
  integer >= 1 or a name from ``data.label_names``; without the column every interval is class 1.
  Lines of class 0 (normal) are skipped;
- any other column (ticket id, description) is ignored.

Every ingested node is then labelled: its rows inside an interval take the interval's class, every
other row is normal (0). A row is inside when its timestamp is; where rows stand for periods
(``data.resample_s``, the LDMS and long formats' ``data.period_s``: the row's time is its period's
start) a row is inside when its period overlaps the interval. Policy (docs/data.md): overlapping
intervals of different classes on one node are an error naming both lines; an interval that covers
no row is counted and logged with the first one; nodes the file names but the telemetry lacks are
logged, and a file that names none of the telemetry's nodes is an error (a naming mismatch).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcad.data.convert import label_numbers
from hpcad.data.jobs import OPEN_END, expand_nodelist
from hpcad.data.node import NodeData
from hpcad.data.tables import read_table
from hpcad.data.timestamps import to_epoch_seconds
from hpcad.errors import InputError

log = logging.getLogger(__name__)
REQUIRED = ("node", "start", "end")
CLASS_COLUMNS = ("class", "label")


@dataclass
class LabelTable:
    """Labelled intervals: per interval its file line, class and both ends, in epoch seconds and,
    where the file wrote plain integers, as row numbers; node -> its intervals."""

    path: str
    line: np.ndarray  # [I] the interval's line in the file (the header is line 1)
    cls: np.ndarray  # [I] int8, >= 1
    start_s: np.ndarray  # [I] int64 epoch seconds
    end_s: np.ndarray  # [I] int64 epoch seconds (OPEN_END: still open)
    start_row: np.ndarray | None  # [I] int64, or None when the file holds times
    end_row: np.ndarray | None
    by_node: dict[str, list[int]] = field(default_factory=dict)
    uncovered: int = 0  # intervals that covered no row of their node (counted by ``assign``)
    first_uncovered: str = ""

    def assign(self, node: NodeData, period: int = 0) -> np.ndarray:
        """Class per row of ``node`` (0 = normal): rows whose time (or, with ``period`` > 0, whose
        period ``[t, t + period)``) meets an interval take its class."""
        labels = np.zeros(len(node.timestamp), dtype=np.int8)
        rows = node.time_unit == "row"
        if rows and self.start_row is None and self.by_node.get(node.name):
            raise InputError(f"{self.path}: node {node.name} has no timestamps (its rows are numbered), but the "
                             f"labels file gives times; give its intervals as row numbers (from 0)")
        ts = node.timestamp
        for i in self.by_node.get(node.name, []):
            lo, hi = ((int(self.start_row[i]), int(self.end_row[i])) if rows
                      else (int(self.start_s[i]), int(self.end_s[i])))
            if period > 0 and not rows:
                lo -= period - 1
            a, b = np.searchsorted(ts, lo, side="left"), np.searchsorted(ts, hi, side="right")
            if b > a:
                labels[a:b] = self.cls[i]
            else:
                self.uncovered += 1
                self.first_uncovered = self.first_uncovered or (
                    f"line {self.line[i]} ({node.name}; its rows run from {_when(ts[0], rows)} to "
                    f"{_when(ts[-1], rows)})" if len(ts) else f"line {self.line[i]} ({node.name}: no rows)")
        return labels

    def check_nodes(self, nodes: Iterable[str]) -> None:
        """Before the store is written: a file naming none of ``nodes`` (the store's) is an error;
        nodes it names that are not among them are logged."""
        known = set(nodes)
        unknown = sorted(set(self.by_node) - known)
        if self.by_node and len(unknown) == len(self.by_node):
            raise InputError(f"{self.path}: none of the labels file's nodes is in the telemetry (labels file: "
                             f"{unknown[:3]}, telemetry: {sorted(known)[:3]}); do the names match? "
                             f"(data.node_names maps the telemetry's node names to SLURM's)")
        if unknown:
            log.warning("%s: %d node(s) in the labels file have no telemetry (their intervals are ignored), e.g. %s",
                        self.path, len(unknown), unknown[:5])

    def log_uncovered(self) -> None:
        """After ``assign`` labelled a stream of nodes: how many intervals covered no row, and the first."""
        if self.uncovered:
            log.warning("%s: %d interval(s) cover no row of their node (outside the export, or in a gap), "
                        "the first: %s", self.path, self.uncovered, self.first_uncovered)


def _when(t: int, rows: bool) -> str:
    if rows:
        return f"row {int(t)}"
    import datetime as dt

    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc).isoformat(timespec="seconds")


def read_labels(path: str | Path, data_cfg, summary: bool = True) -> LabelTable:
    """Read and check ``data.labels`` (see the module); errors name the file, line and column.
    ``summary``: log what the file holds (``split.exclude`` says it once for all its files)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"data.labels: {path.resolve()} does not exist")
    df = read_table(path, as_text=True)  # node names such as 007 keep their zeros
    cols = {str(c).strip().lower(): c for c in df.columns}
    node_col = cols.get("node") or cols.get(str(data_cfg.node_column).lower())
    missing = [c for c in REQUIRED if (node_col if c == "node" else cols.get(c)) is None]
    if missing:
        raise InputError(f"{path}: the labels file lacks column(s) {missing} (has {list(df.columns)}); it needs "
                         f"node, start, end and optionally class, one labelled interval per line")
    cls_col = next((cols[c] for c in (*CLASS_COLUMNS, str(data_cfg.label_column).lower()) if c in cols), None)
    lines = np.arange(len(df)) + 2  # the header is line 1
    where = str(path)
    if cls_col is None:
        cls = np.ones(len(df), dtype=np.int64)
    else:
        num = label_numbers(df[cls_col], data_cfg.label_names, where, str(cls_col))
        if num.isna().any():
            k = int(np.flatnonzero(num.isna().to_numpy())[0])
            raise InputError(f"{path}: line {lines[k]} has no class in column {cls_col!r}")
        cls = num.to_numpy().astype(np.int64)
    bad = np.flatnonzero((cls < 0) | (cls > np.iinfo(np.int8).max))
    if bad.size:
        raise InputError(f"{path}: line {lines[bad[0]]}: class {cls[bad[0]]} (classes are 1..127; 0 is normal)")
    keep = cls > 0
    if not keep.all():
        log.info("%s: %d interval(s) of class 0 (normal) skipped: rows outside every interval are normal",
                 path, int((~keep).sum()))
    df, cls, lines = df[keep].reset_index(drop=True), cls[keep], lines[keep]
    if df.empty:
        raise InputError(f"{path}: no labelled interval (every line is of class 0, or the file has no lines)")
    nodes = df[node_col].astype("string").str.strip()
    if nodes.isna().any() or (nodes == "").any():
        k = int(np.flatnonzero((nodes.isna() | (nodes == "")).to_numpy())[0])
        raise InputError(f"{path}: line {lines[k]} names no node")
    start_raw, end_raw = _numbers_or_text(df[cols["start"]]), _numbers_or_text(df[cols["end"]])
    if start_raw.isna().any():
        raise InputError(f"{path}: line {lines[int(np.flatnonzero(start_raw.isna().to_numpy())[0])]} has no start")
    open_end = end_raw.isna().to_numpy()
    tz, unit, dayfirst = str(data_cfg.timezone), str(data_cfg.epoch_unit), data_cfg.dayfirst
    start_s = to_epoch_seconds(start_raw, where, "start", tz, unit, dayfirst=dayfirst)
    end_s = np.full(len(df), OPEN_END, dtype=np.int64)
    if (~open_end).any():
        end_s[~open_end] = to_epoch_seconds(end_raw[~open_end].reset_index(drop=True), where, "end", tz, unit,
                                            dayfirst=dayfirst)
    start_row, end_row = _row_numbers(start_raw), _row_numbers(end_raw)
    if start_row is not None and end_row is not None:
        end_row = np.where(open_end, OPEN_END, end_row)
    else:
        start_row = end_row = None
    back = np.flatnonzero(end_s < start_s)
    if back.size:
        raise InputError(f"{path}: line {lines[back[0]]} ends before it starts ({end_raw.iloc[back[0]]!r} < "
                         f"{start_raw.iloc[back[0]]!r})")
    table = LabelTable(where, lines, cls.astype(np.int8), start_s, end_s, start_row, end_row)
    for i, text in enumerate(nodes):
        for node in expand_nodelist(text, f"{path}: line {lines[i]}"):
            table.by_node.setdefault(node, []).append(i)
    _check_overlaps(table)
    if summary:
        log.info("%s: %d labelled interval(s) on %d node(s); every other row is normal", path, len(df),
                 len(table.by_node))
    return table


def _numbers_or_text(col):
    """A time column as numbers where every filled cell is one (epoch times, row numbers), else as it is."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(col):
        return col
    num = pd.to_numeric(col, errors="coerce")
    return num if not (col.notna() & num.isna()).any() else col


def _row_numbers(col) -> np.ndarray | None:
    """The column as integers (empty cells 0) when every filled cell is a whole number, else None."""
    import pandas as pd

    num = pd.to_numeric(col, errors="coerce")
    filled = col.notna()
    if (num[filled].isna().any() or (num[filled] != num[filled].round()).any()):
        return None
    return num.fillna(0).to_numpy().astype(np.int64)


def _check_overlaps(table: LabelTable) -> None:
    """Two intervals of one node that overlap with different classes: an error naming both lines."""
    for node, idx in table.by_node.items():
        order = sorted(idx, key=lambda i: table.start_s[i])
        for k, i in enumerate(order):
            for j in order[k + 1:]:
                if table.start_s[j] > table.end_s[i]:
                    break
                if table.cls[i] != table.cls[j]:
                    raise InputError(f"{table.path}: lines {table.line[i]} and {table.line[j]} overlap on node {node} "
                                     f"with different classes ({table.cls[i]} and {table.cls[j]}); a row has one "
                                     f"class: split or merge them")
