"""Pivot interleaved (node, time, metric, value) records onto per-node regular time grids, out of core.

LDMS CSV stores and long-format exports (ExaMon, Marconi100 ExaData) interleave many nodes in
time order, with one file per sampler or plugin. Pivoting them in memory would need the whole
cluster at once, so ingestion runs in two streaming passes:

1. every input batch becomes compact records (node code, time bin, metric code, value: 14 bytes,
   NaNs dropped) appended to one of ``data.scratch_buckets`` scratch files chosen by node, so a
   node's records all land in one bucket whatever the input order;
2. bucket by bucket, each node's records are averaged per (bin, metric) into a [T, M] matrix
   (``data.period_s`` bins, mean aggregation; labels take the maximum) and handed on, one node at
   a time.

Peak memory is one input batch plus one bucket plus one node's matrix; the scratch files (next to
the store) take 14 bytes per sample and are removed at the end, also on error.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcad.data.store import check_node_name
from hpcad.data.node import NodeData
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
# data.on_missing_metric: a metric some nodes lack is absent there | dropped everywhere | an error
MISSING_METRIC_POLICIES = ("union", "drop", "error")
RECORD = np.dtype([("node", "<i4"), ("bin", "<u4"), ("metric", "<u2"), ("value", "<f4")])


class GridStager:
    """Pass 1 (``add``) and pass 2 (``iter_nodes``) of the out-of-core pivot."""

    def __init__(self, scratch_dir: Path, period_s: int, buckets: int, label_name: str):
        if period_s < 1:
            raise InputError(f"data.period_s={period_s}: must be >= 1 second")
        if buckets < 1:
            raise InputError(f"data.scratch_buckets={buckets}: must be >= 1")
        scratch_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".ingest-grid-", dir=scratch_dir))
        self.period = int(period_s)
        self.buckets = [open(self.dir / f"bucket{i:04d}.rec", "wb") for i in range(buckets)]
        self.node_names: list[str] = []
        self.infinite = 0  # infinite input values, read as missing
        self._node_code: dict[str, int] = {}
        self.metric_names: list[str] = []
        self._metric_code: dict[str, int] = {}
        self.label_name = label_name
        self.cover = np.zeros((256, 256), dtype=bool)  # [node, metric] seen at least once
        self.records = 0

    # ---- pass 1 -------------------------------------------------------------------------------
    def node_codes(self, names: pd.Series, where: str) -> np.ndarray:
        import pandas as pd

        codes, uniq = pd.factorize(names, sort=False)
        if (codes < 0).any():
            raise InputError(f"{where}: {int((codes < 0).sum())} rows have no node name")
        lut = np.array([self._code(self._node_code, self.node_names, check_node_name(_node_str(u).strip(), where))
                        for u in uniq], dtype=np.int32)
        return lut[codes]

    def metric_codes(self, names: pd.Series, where: str) -> np.ndarray:
        import pandas as pd

        codes, uniq = pd.factorize(names, sort=False)
        if (codes < 0).any():
            raise InputError(f"{where}: {int((codes < 0).sum())} rows have no metric name")
        lut = np.array([self.metric_code(str(u)) for u in uniq], dtype=np.uint16)
        return lut[codes]

    def metric_code(self, name: str) -> int:
        code = self._code(self._metric_code, self.metric_names, name)
        if code >= 65535:
            raise InputError("more than 65,534 distinct metrics; is data.metric_column right?")
        return code

    @staticmethod
    def _code(table: dict[str, int], names: list[str], name: str) -> int:
        code = table.get(name)
        if code is None:
            code = table[name] = len(names)
            names.append(name)
        return code

    def add(self, nodes: np.ndarray, seconds: np.ndarray, metrics: np.ndarray, values: np.ndarray) -> None:
        """Append records (equal-length arrays; NaN values are missing samples and are dropped, and
        so are infinite ones, counted in ``infinite``)."""
        keep = np.isfinite(values)
        if not keep.all():
            self.infinite += int(np.isinf(values).sum())
            nodes, seconds, metrics, values = nodes[keep], seconds[keep], metrics[keep], values[keep]
        if len(values) == 0:
            return
        if (seconds < 0).any():
            raise InputError(f"timestamp {seconds.min()} is before 1970")
        rec = np.empty(len(values), dtype=RECORD)
        rec["node"], rec["metric"], rec["value"] = nodes, metrics, values
        rec["bin"] = np.floor(seconds / self.period).astype(np.uint32)
        self._mark(nodes, metrics)
        bucket = self._bucket(nodes)
        order = np.argsort(bucket, kind="stable")
        rec, bucket = rec[order], bucket[order]
        edges = np.searchsorted(bucket, np.arange(len(self.buckets) + 1))
        for b in np.flatnonzero(np.diff(edges)):
            rec[edges[b]:edges[b + 1]].tofile(self.buckets[b])
        self.records += len(rec)

    def _bucket(self, nodes: np.ndarray) -> np.ndarray:
        """The scratch bucket of each node code (all of a node's records land in one)."""
        return nodes % len(self.buckets)

    def _mark(self, nodes: np.ndarray, metrics: np.ndarray) -> None:
        n, m = len(self.node_names), len(self.metric_names)
        if n > self.cover.shape[0] or m > self.cover.shape[1]:
            grown = np.zeros((max(n, 2 * self.cover.shape[0]), max(m, 2 * self.cover.shape[1])), dtype=bool)
            grown[: self.cover.shape[0], : self.cover.shape[1]] = self.cover
            self.cover = grown
        self.cover[nodes, metrics] = True

    # ---- between the passes ---------------------------------------------------------------------
    def metric_plan(self, policy: str, source: str) -> list[int]:
        """Codes of the metrics the store keeps (sorted by name), after the missing-metric policy."""
        if not self.node_names:
            raise InputError(f"{source}: no samples found")
        codes = [c for c, name in enumerate(self.metric_names) if name != self.label_name]
        if not codes:
            raise InputError(f"{source}: no metric besides the label {self.label_name!r}")
        cover = self.cover[: len(self.node_names)]
        missing = {c: np.flatnonzero(~cover[:, c]) for c in codes if not cover[:, c].all()}
        if policy not in MISSING_METRIC_POLICIES:
            raise InputError(f"data.on_missing_metric={policy!r}: one of {', '.join(MISSING_METRIC_POLICIES)}")
        if missing and policy == "union":
            log.warning("%s: %d metric(s) missing on some nodes are kept as absent there (data.on_missing_metric="
                        "union; each node is trained on its own metrics): %s", source, len(missing),
                        [self.metric_names[c] for c in list(missing)[:20]])
            missing = {}
        if missing and policy == "error":
            c, nodes = next(iter(missing.items()))
            raise InputError(
                f"{source}: {len(missing)} metric(s) missing entirely on some nodes, e.g. "
                f"{self.metric_names[c]!r} on {len(nodes)} of {len(self.node_names)} nodes "
                f"({[self.node_names[i] for i in nodes[:5]]}); data.on_missing_metric=union keeps each node's "
                f"own metrics, drop keeps only the common ones")
        if missing:
            log.warning("data.on_missing_metric=drop: dropping %d metric(s) missing on some nodes: %s",
                        len(missing), [self.metric_names[c] for c in list(missing)[:20]])
            codes = [c for c in codes if c not in missing]
            if not codes:
                raise InputError(f"{source}: no metric is present on every node")
        return sorted(codes, key=lambda c: self.metric_names[c])

    # ---- pass 2 --------------------------------------------------------------------------------
    def finish_pass1(self) -> dict[int, tuple[int, int]]:
        """Close the scratch files; returns {bucket: (bytes, nodes)} of those that hold records."""
        for fh in self.buckets:
            fh.close()
        nodes = np.bincount(self._bucket(np.arange(len(self.node_names))), minlength=len(self.buckets))
        sizes = {b: (self.dir / f"bucket{b:04d}.rec").stat().st_size for b in range(len(self.buckets))}
        return {b: (size, int(nodes[b])) for b, size in sizes.items() if size}

    def state(self) -> dict:
        """What another process needs for pass 2 over this stager's scratch files (:meth:`attach`)."""
        return {"dir": str(self.dir), "period": self.period, "node_names": self.node_names,
                "metric_names": self.metric_names, "label_name": self.label_name}

    @classmethod
    def attach(cls, state: dict) -> GridStager:
        """A stager for pass 2 only, over the scratch files another process staged (another rank:
        the folder is on the run folder's file system); it neither writes nor removes them."""
        self = cls.__new__(cls)
        self.dir, self.period, self.label_name = Path(state["dir"]), state["period"], state["label_name"]
        self.node_names, self.metric_names = state["node_names"], state["metric_names"]
        self._metric_code = {m: i for i, m in enumerate(self.metric_names)}
        self.buckets = []
        return self

    def iter_nodes(self, keep: list[int], buckets: list[int] | None = None) -> Iterator[NodeData]:
        """One node at a time, bucket by bucket (``buckets``: only those, e.g. one rank's share)."""
        for fh in self.buckets:
            fh.close()
        label = self._metric_code.get(self.label_name)
        for b in range(len(self.buckets)) if buckets is None else buckets:
            path = self.dir / f"bucket{b:04d}.rec"
            rec = np.fromfile(path, dtype=RECORD)
            if buckets is None:
                path.unlink()  # one process: its disk back as it goes (ranks: the stager's owner removes them)
            if len(rec) == 0:
                continue
            order = np.argsort(rec["node"], kind="stable")  # gather node by node, no sorted copy
            node = rec["node"][order]
            starts = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
            del node
            for a, z in zip(starts, np.r_[starts[1:], len(order)]):
                yield self._node(rec[order[a:z]], keep, label)
            del rec, order

    def _node(self, rec: np.ndarray, keep: list[int], label: int | None) -> NodeData:
        name = self.node_names[int(rec["node"][0])]
        bins, inv = np.unique(rec["bin"], return_inverse=True)
        M, T = len(self.metric_names), len(bins)
        key = inv.astype(np.int64) * M + rec["metric"]
        sums = np.bincount(key, weights=rec["value"], minlength=T * M).reshape(T, M)
        counts = np.bincount(key, minlength=T * M).reshape(T, M)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = (sums[:, keep] / counts[:, keep]).astype(np.float32)
        labels = None
        if label is not None:
            sel = rec["metric"] == label
            lab = rec["value"][sel]
            if (lab != np.round(lab)).any() or (lab < 0).any():
                raise InputError(f"node {name}: label {self.label_name!r} must hold integers >= 0 "
                                 f"(0 normal, other = anomaly class); found {lab[lab != np.round(lab)][:3]}")
            labels = np.zeros(T, dtype=np.int8)
            np.maximum.at(labels, inv[sel], lab.astype(np.int8))
        has_data = ~np.isnan(values).all(axis=1)  # bins that held only a label carry no sample
        if not has_data.all():
            bins, values = bins[has_data], values[has_data]
            labels = labels[has_data] if labels is not None else None
        return NodeData(name, bins.astype(np.int64) * self.period, values, labels, "s")

    def close(self) -> None:
        for fh in self.buckets:
            fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _node_str(u) -> str:
    """Node ids as text: LDMS component_id 12 -> "12" (not "12.0" when pandas read floats). The callers
    strip blanks around a name (a database's fixed-width CHAR column pads it)."""
    if isinstance(u, (float, np.floating)) and float(u).is_integer():
        return str(int(u))
    return str(u)
