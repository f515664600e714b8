"""LDMS CSV store output (``store_csv``, as at Sandia/Prodigy sites) into the grid stager.

One file per sampler (and per rollover period), rows of every node interleaved::

    #Time,Time_usec,ProducerName,component_id,job_id,app_id,Active::meminfo,MemFree::meminfo,...
    1736121600.002,2113,n001,1,0,0,1.2e6,3.4e7,...

The header is the first line (``#``-prefixed) or a ``<file>.HEADER`` file beside it (``altheader``).
A sampler restart writes the header again mid-file: identical repeats are skipped and counted; a
repeat that differs (the metric set changed) is an error naming the file and line. ``Time`` plus
``Time_usec`` give the sample time; LDMS bookkeeping columns (ProducerName, job_id, app_id, DT,
...) are not metrics. Samplers' rows for the same node and period are merged on the grid.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcad.data.cells import as_numbers, stray_as_missing
from hpcad.data.grid import GridStager
from hpcad.data.csvtext import cut_reason
from hpcad.data.paths import visible_files
from hpcad.data.linescan import rows_cut_short, scan_file
from hpcad.data.tables import CHUNK_ROWS, without_cut_row
from hpcad.data.timestamps import to_epoch_seconds
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from hpcad.config import DataConfig

log = logging.getLogger(__name__)
BOOKKEEPING = {"Time", "Time_usec", "DT", "DT_usec", "ProducerName", "component_id", "job_id", "app_id",
               "uid", "gid", "instance", "producer"}
SIDE_FILES = (".HEADER", ".KIND")


def ldms_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = [p for p in visible_files(source) if not p.name.endswith(SIDE_FILES)]
    if not files:
        raise InputError(f"{source}: no LDMS CSV files below the directory")
    return files


def _header_line(path: Path) -> tuple[str, bool]:
    side = path.with_name(path.name + ".HEADER")
    src = side if side.exists() else path
    with open(src, errors="replace") as fh:
        line = fh.readline().rstrip("\r\n")
    if not line.startswith("#"):
        raise InputError(f"{src}: first line {line[:60]!r} is not an LDMS header ('#Time,Time_usec,...')")
    return line, src is side


def stage_ldms(source: Path, cfg: DataConfig, stager: GridStager) -> None:
    """Pass 1 over every LDMS file below ``source``."""
    for path in ldms_files(source):
        header, _ = _header_line(path)
        cols = [c.strip() for c in header[1:].split(",")]
        tcol, ncol = cfg.timestamp_column.lstrip("#"), cfg.node_column
        for need, opt in ((tcol, "data.timestamp_column"), (ncol, "data.node_column")):
            if need not in cols:
                raise InputError(f"{path}: no column {need!r} ({opt}); the header has {cols[:8]}...")
        skip = (BOOKKEEPING | set(cfg.ignore_columns) | {tcol, ncol})
        metrics = [c for c in cols if c not in skip]
        if not metrics:
            raise InputError(f"{path}: no metric columns (all of {cols} are LDMS bookkeeping or ignored)")
        codes = np.array([stager.metric_code(m) for m in metrics], dtype=np.uint16)
        try:
            import pandas as pd

            # one pass: header lines after the first (sampler restarts; another one is an error), rows cut short
            scan = scan_file(path, ",", len(cols), len(cols), header.encode())
            other = sorted(set(scan.comments) - set(scan.repeats))
            if other:
                raise InputError(f"{path}: line {other[0] + 1}: header differs from the file's first header "
                                 f"(a sampler restarted with another metric set?); split the file there")
            if scan.repeats:
                log.info("%s: skipped %d repeated header line(s) (sampler restarts)", path, len(scan.repeats))
            reader = pd.read_csv(path, comment="#", header=None, names=cols, chunksize=CHUNK_ROWS,
                                 skip_blank_lines=True, skiprows=rows_cut_short(path, scan, len(cols)) or None)
            for chunk in without_cut_row(reader, cut_reason(scan.tail, path, ",", len(cols))):
                _stage_chunk(chunk, path, cfg, tcol, ncol, metrics, codes, stager)
        except InputError:
            raise
        except Exception as exc:  # pandas parser errors: ragged rows, bad quoting
            raise InputError(f"{path}: cannot read LDMS CSV: {exc}") from exc


def _stage_chunk(chunk: pd.DataFrame, path: Path, cfg: DataConfig, tcol: str, ncol: str, metrics: list[str],
                 codes: np.ndarray, stager: GridStager) -> None:
    import pandas as pd

    where = str(path)
    if tcol == "Time" and "Time_usec" in chunk.columns and pd.api.types.is_numeric_dtype(chunk["Time"]):
        secs = np.floor(chunk["Time"].to_numpy(np.float64)) + chunk["Time_usec"].to_numpy(np.float64) / 1e6
    else:
        secs = to_epoch_seconds(chunk[tcol], where, tcol, cfg.timezone, cfg.epoch_unit, fractional=True,
                                dayfirst=cfg.dayfirst)
    block = chunk[metrics]
    bad = [c for c in metrics if not pd.api.types.is_numeric_dtype(block[c])]
    if bad:  # a few stray cells are missing samples (hpcad.data.cells)
        block, bad = stray_as_missing(block, bad, where)
    if bad:
        c = bad[0]
        example = block[c][as_numbers(block[c])[1]].iloc[0]
        raise InputError(f"{where}: non-numeric values in metric columns {bad[:10]} (e.g. {c}={example!r}); "
                         f"fix the export or list them in data.ignore_columns")
    nodes = stager.node_codes(chunk[ncol], where)
    vals = block.to_numpy(dtype=np.float32)
    n, k = vals.shape
    stager.add(np.repeat(nodes, k), np.repeat(secs, k), np.tile(codes, n), vals.ravel())
