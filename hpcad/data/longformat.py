"""Long-format exports (ExaMon, Marconi100 ExaData): one row per (timestamp, node, metric, value).

Files may be split any way (one per metric plugin and month is usual); every CSV/Parquet file
below ``data.source`` is read in batches and fed to the grid stager, which pivots to per-node
matrices out of core. Rows whose metric is ``data.label_column`` are labels. Files below a Hive-style
partition folder of the node or metric column (``node=cn01/``, ``metric=power/part-0.parquet``, as
Spark's ``partitionBy`` writes them) need no such column.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcad.data.cells import STRAY_SHARE, as_numbers, text_after_all
from hpcad.data.grid import GridStager
from hpcad.data.paths import HIVE_NULL, partition_value, table_files
from hpcad.data.tables import iter_table_chunks
from hpcad.data.timestamps import to_epoch_seconds
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from hpcad.config import DataConfig

log = logging.getLogger(__name__)
BATCH_ROWS = 1_000_000


def stage_long(source: Path, cfg: DataConfig, stager: GridStager) -> None:
    """Pass 1 over every long-format file below ``source``."""
    import pandas as pd

    files = table_files(source)
    need = {"data.node_column": cfg.node_column, "data.timestamp_column": cfg.timestamp_column,
            "data.metric_column": cfg.metric_column, "data.value_column": cfg.value_column}
    for i, path in enumerate(files):
        where = str(path)
        given = {col: partition_value(path, col) for col in (cfg.node_column, cfg.metric_column)}  # node=, metric=
        given = {col: value for col, value in given.items() if value is not None}
        empty = [col for col, value in given.items() if value == ""]
        if empty:
            log.warning("%s: rows without a %s (%s=%s) left out", where, " or ".join(empty), empty[0], HIVE_NULL)
            continue
        for chunk in iter_table_chunks(path, BATCH_ROWS, text=(cfg.node_column,)):
            for col, value in given.items():
                if col not in chunk.columns:
                    chunk[col] = value
            missing = {opt: col for opt, col in need.items() if col not in chunk.columns}
            if missing:
                raise InputError(f"{where}: missing column(s) {missing}; the file has {list(chunk.columns)[:10]}")
            secs = to_epoch_seconds(chunk[cfg.timestamp_column], where, cfg.timestamp_column, cfg.timezone,
                                    cfg.epoch_unit, fractional=True, dayfirst=cfg.dayfirst)
            raw = chunk[cfg.value_column]
            vals, stray = (raw, None) if pd.api.types.is_numeric_dtype(raw) else as_numbers(raw)
            if stray is not None and stray.any():  # a few per metric: missing samples, their records left out
                row = int(np.flatnonzero(stray)[0])
                value, metric = raw.iloc[row], chunk[cfg.metric_column].iloc[row]
                node = chunk[cfg.node_column].iloc[row]
                if _text_values(raw, stray, chunk[cfg.metric_column]):
                    raise InputError(f"{where}: non-numeric value {value!r} in column {cfg.value_column!r} (metric "
                                     f"{metric!r}, node {node!r}; more than {STRAY_SHARE:.0%} of a metric's values "
                                     f"are no number)")
                log.warning("%s: %d value(s) that are no number in column %r left out as missing samples (e.g. "
                            "%r, metric %r, node %r; at most %g%% of a metric's values; more is an error)", where,
                            int(stray.sum()), cfg.value_column, value, metric, node, 100 * STRAY_SHARE)
                keep = ~stray
                chunk, vals, secs = chunk[keep], vals[keep], np.asarray(secs)[keep]
            stager.add(stager.node_codes(chunk[cfg.node_column], where),
                       secs, stager.metric_codes(chunk[cfg.metric_column], where), vals.to_numpy(np.float32))
        log.info("long format: %d/%d files read (%s), %.3g samples staged", i + 1, len(files), path.name,
                 stager.records)


def _text_values(raw: pd.Series, stray: np.ndarray, metric: pd.Series) -> bool:
    """Whether a long table's value column is text rather than numbers with a few stray values,
    judged per metric (each metric's values are a column of the wide table: more than
    :data:`hpcad.data.cells.STRAY_SHARE` of one metric's values no number), or by
    :func:`hpcad.data.cells.text_after_all` (its own name: a header line joined on)."""
    per = metric[stray].value_counts()
    return bool((per > STRAY_SHARE * metric.value_counts().reindex(per.index)).any()) or \
        text_after_all(raw, stray, frozenset({str(raw.name)}))
