"""Stretches of rows kept out of training without labelling them (``split.exclude``).

A site without labels may still know when a node was not normal during the training period: the
nightly job's alarms (each night's ``alarms.csv``), a maintenance window, a ticket. Listed here,
those rows are left out of what models and baselines are fitted on (the standardisation, the
training rows, the held-out rows that set a node's normal level), and nothing else changes: they are
not labels, so thresholds are fitted as without labels (an alarm list used as labels would fit the
thresholds to hpcad's own earlier alarms).

``split.exclude``: one file or a glob pattern of files (``/srv/hpcad/nightly/2025-0[12]-*/alarms.csv``)
in the incident-list format of ``data.labels`` (hpcad/data/labelfile.py: ``node`` or a SLURM host
list, ``start``, ``end``, any other column ignored; a nightly ``alarms.csv`` is one). Files without a
line (a quiet night's alarms) are skipped. Read at training time, not at ingest: changing the list
retrains only the nodes whose listed stretches changed (their model fingerprint holds them).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcad.data.labelfile import LabelTable, read_labels
from hpcad.data.node import NodeData
from hpcad.data.csvtext import open_text
from hpcad.data.paths import is_parquet, is_pattern, pattern_files
from hpcad.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exclusions:
    """The listed stretches, per file; ``period``: seconds a row stands for (as for ``data.labels``)."""

    tables: tuple[LabelTable, ...]
    period: int

    def rows(self, node: NodeData) -> np.ndarray | None:
        """Rows of ``node`` inside a listed stretch (a boolean mask), or None where none is listed."""
        hit = None
        for t in self.tables:
            if t.by_node.get(node.name):
                inside = t.assign(node, self.period) > 0
                hit = inside if hit is None else hit | inside
        return hit

    def key(self, node: str) -> str:
        """The stretches listed for ``node`` as text ("" for none): part of its model's fingerprint."""
        parts = []
        for t in self.tables:
            for i in t.by_node.get(node, []):
                rows = f"/{t.start_row[i]}-{t.end_row[i]}" if t.start_row is not None else ""
                parts.append(f"{t.start_s[i]}-{t.end_s[i]}{rows}")
        return ",".join(sorted(parts))

    def digest(self) -> str:
        """Every listed stretch of every node, digested (the baselines' settings key)."""
        nodes = sorted({n for t in self.tables for n in t.by_node})
        return hashlib.sha256("\n".join(f"{n}:{self.key(n)}" for n in nodes).encode()).hexdigest()[:16]


# the reading options a list is parsed with (its times, node names), part of what a cached read keys on
READING = ("node_column", "label_column", "timezone", "epoch_unit", "dayfirst", "format", "period_s", "resample_s")
_READ: dict[tuple, Exclusions] = {}  # the last list read in this process


def exclusion_files(spec: str) -> list[Path]:
    """The files ``split.exclude`` names: one file, or the table files a glob pattern matches."""
    path = Path(spec).expanduser()
    if is_pattern(path):
        files = pattern_files(path)
        if not files:
            raise InputError(f"split.exclude: the pattern {spec} matches no CSV or Parquet file")
        return files
    if path.is_dir():
        raise InputError(f"split.exclude: {path} is a folder: give a file or a glob pattern of files ({path}/*.csv, "
                         f"{path}/*/alarms.csv)")
    if not path.is_file():
        raise InputError(f"split.exclude: {path.resolve()} does not exist (a file or a glob pattern of files)")
    return [path]


def read_exclusions(spec: str | None, data_cfg) -> Exclusions | None:
    """``split.exclude`` read, or None when unset. Read once per process and set of files (kept on
    their paths, sizes and modification times): every node's training asks for it."""
    if not spec:
        return None
    files = exclusion_files(str(spec))
    key = (tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files),
           tuple(str(getattr(data_cfg, k)) for k in READING), tuple(data_cfg.label_names or ()))
    if key not in _READ:
        _READ.clear()
        _READ[key] = _read(files, data_cfg)
    return _READ[key]


def _without_lines(path: Path) -> bool:
    """A table without a data line (a quiet night's ``alarms.csv``: the header only), told without
    parsing it."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    with open_text(path) as fh:
        return sum(1 for line in itertools.islice(fh, 2) if line.strip()) < 2


def _read(files: list[Path], data_cfg) -> Exclusions:
    from hpcad.data.ingest import labels_period

    tables = [read_labels(path, data_cfg, summary=False) for path in files if not _without_lines(path)]
    ex = Exclusions(tuple(tables), labels_period(data_cfg))
    log.info("split.exclude: %d stretch(es) on %d node(s), from %d file(s), kept out of training",
             sum(len(t.start_s) for t in tables), len({n for t in tables for n in t.by_node}), len(files))
    return ex
