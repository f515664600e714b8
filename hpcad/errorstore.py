"""The error file (``errors.h5``): the contract between scoring and everything after it.

Written by :mod:`hpcad.score` (and, without per-metric errors, by the baselines); read one node at
a time by thresholds, evaluation, explanations, drift, reports and the nightly job. Reading it
needs no torch, so the stages after scoring start fast. Layout: :mod:`hpcad.score`, docs/data.md.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hpcad.atomic import atomic_path
from hpcad.data.h5 import h5_writing, open_h5, read_spans
from hpcad.data.store import STR, checked, corrupt
from hpcad.errors import StoreError
from hpcad.signals import Recipe, explain_scale

log = logging.getLogger(__name__)

FORMAT = "error-store"


@dataclass
class NodeSignal:
    """What threshold fitting and evaluation need of one node (no per-metric errors)."""

    node: str
    signal: np.ndarray
    split: np.ndarray
    labels: np.ndarray | None
    timestamp: np.ndarray
    scale: float = 1.0

    @property
    def normalised(self) -> np.ndarray:
        return self.signal / self.scale


class ErrorStore:
    """Read ``errors.h5`` (or a baseline's signal file) one node at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open_h5(self.path, kind="error file") as f:
            if f.attrs.get("hpcad_format") not in (FORMAT, "signal-store"):
                raise StoreError(f"{self.path}: not an hpcad error file")
            self.metrics = [m.decode() if isinstance(m, bytes) else m for m in f["metrics"][()]] \
                if "metrics" in f else []
            self.nodes = sorted(f["nodes"].keys())
            if "node_rows" in f and len(f["node_rows"]) == len(self.nodes):  # an index: no part file opened
                self.rows = dict(zip(self.nodes, map(int, f["node_rows"][()])))
            else:
                self.rows = {n: int(f["nodes"][n]["signal"].shape[0]) for n in self.nodes}
            # each node's share of missing input values (scored files; none for baselines and older files)
            self.missing = dict(zip(self.nodes, map(float, f["node_missing"][()]))) \
                if "node_missing" in f and len(f["node_missing"]) == len(self.nodes) else {}
            # per node, the metrics it reported in training that have no value in the scored rows
            lost = f["node_lost"][()] if "node_lost" in f and len(f["node_lost"]) == len(self.nodes) else None
            self.lost: dict[str, list[str]] = {} if lost is None or lost.shape[1] != len(self.metrics) else {
                n: [self.metrics[i] for i in np.flatnonzero(row)] for n, row in zip(self.nodes, lost) if row.any()}
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()
                          if k in ("created", "store_signature", "models_stamp", "store", "models", "excess_weight",
                                   "metric_scales", "whiten", "signal_choice")}

    def keep(self, nodes: list[str]) -> ErrorStore:
        """This file read as if it held only ``nodes`` (those of them it has); returns itself."""
        wanted = set(nodes)
        self.nodes = [n for n in self.nodes if n in wanted]
        self.rows = {n: r for n, r in self.rows.items() if n in wanted}
        self.missing = {n: v for n, v in self.missing.items() if n in wanted}
        self.lost = {n: v for n, v in self.lost.items() if n in wanted}
        return self

    @property
    def smooth(self) -> int | None:
        """The smoothing window the signals were written with (a node's ``smooth`` attribute), or None."""
        if not self.nodes:
            return None
        with open_h5(self.path, kind="error file") as f:
            value = f["nodes"][self.nodes[0]].attrs.get("smooth")
        return None if value is None else int(value)

    @property
    def recipe(self) -> Recipe:
        """The signal's recipe it was scored with (files before it was chosen: weight 1, no scales; files
        before whitening: unwhitened)."""
        return Recipe(float(self.attrs.get("excess_weight", 1.0)), bool(self.attrs.get("metric_scales", 0)),
                      bool(self.attrs.get("whiten", 0)))

    def signals(self, nodes: list[str] | None = None) -> Iterator[NodeSignal]:
        """Per-node alarm signals (already smoothed when written: hpcad.signals)."""
        with open_h5(self.path, kind="error file") as f:
            for n in (self.nodes if nodes is None else nodes):
                try:
                    g = f["nodes"][n]
                    s = NodeSignal(n, g["signal"][()].astype(np.float64), g["split"][()],
                                   g["labels"][()] if "labels" in g else None, g["timestamp"][()],
                                   float(g.attrs.get("signal_scale", 1.0)))
                except (OSError, KeyError) as exc:
                    raise corrupt(self.path, f"node {n}", exc, self.rerun) from exc
                yield s

    def models(self) -> dict[str, str]:
        """Each node's model digest, by content, as scored (attribute ``model``; files scored before
        it was recorded: none)."""
        with open_h5(self.path, kind="error file") as f:
            found = {n: _text(f["nodes"][n].attrs.get("model", "")) for n in self.nodes}
        return {n: d for n, d in found.items() if d}

    def scored_with(self, node: str) -> tuple[str, int]:
        """The digest of the model file that scored the node ("" where not recorded) and the version
        of the light map it applied (0: none; hpcad.model.light)."""
        with open_h5(self.path, kind="error file") as f:
            try:
                a = f["nodes"][node].attrs
                return _text(a.get("model", "")), int(a.get("light_version", 0))
            except (OSError, KeyError) as exc:
                raise corrupt(self.path, f"node {node}", exc, self.rerun) from exc

    @property
    def rerun(self) -> str:
        """The stage that writes this file."""
        return "hpcad baselines" if self.path.parent.name == "baselines" else "hpcad score"

    def errors(self, node: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        with open_h5(self.path, kind="error file") as f:
            try:
                ds = f["nodes"][node]["error"]
                return (ds[()] if rows is None else ds[rows]).astype(np.float32, copy=False)
            except (OSError, KeyError) as exc:
                raise corrupt(self.path, f"node {node} errors", exc, self.rerun) from exc

    def errors_at(self, node: str, spans: list[tuple[int, int]]) -> list[np.ndarray]:
        """Rows ``[a, b)`` of the node's per-metric errors for each span ``(a, b)`` (its alarms), in one
        open of the file (:func:`hpcad.data.h5.read_spans`)."""
        with open_h5(self.path, kind="error file") as f:
            try:
                return [e.astype(np.float32, copy=False) for e in read_spans(f["nodes"][node]["error"], spans)]
            except (OSError, KeyError) as exc:
                raise corrupt(self.path, f"node {node} errors", exc, self.rerun) from exc

    def normal_error(self, node: str) -> np.ndarray | None:
        """The node's per-metric error on its model's held-out normal rows, in the units of
        :meth:`errors` (explanations rank an alarm's metrics by "times normal"); None in files
        scored before it was written, and in baselines' files."""
        with open_h5(self.path, kind="error file") as f:
            try:
                g = f["nodes"][node]
                return g["normal_error"][()].astype(np.float32) if "normal_error" in g else None
            except (OSError, KeyError) as exc:
                raise corrupt(self.path, f"node {node} normal errors", exc, self.rerun) from exc

    def explain_scale(self, node: str) -> np.ndarray | None:
        """The divisors that make the node's errors "times normal" (:func:`hpcad.signals.explain_scale`),
        or None where its normal errors are unknown: what alarms, class profiles and node pages rank by."""
        normal = self.normal_error(node)
        return explain_scale(normal) if normal is not None and len(normal) == len(self.metrics) else None


def _text(value) -> str:
    """An HDF5 string attribute as text (h5py gives bytes or str, by how it was written)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def signal_attrs(method: str, store_signature: str = "") -> dict:
    """The attributes of a baseline's signal file (or of its index over ranks); ``store_signature``:
    the input signature of the store it scored (the threshold stage leaves out a file of other data)."""
    attrs = {"hpcad_format": "signal-store", "format_version": 1, "method": method}
    return {**attrs, "store_signature": store_signature} if store_signature else attrs


def signal_files(folder: Path) -> list[Path]:
    """A run folder's baseline signal files (``baselines/<method>.h5``), not the ranks' parts they index."""
    return sorted(p for p in Path(folder).glob("*.h5") if not re.fullmatch(r".+-rank\d+", p.stem))


def remove_other_signal_files(folder: Path, keep: list[str]) -> list[str]:
    """Remove the baseline signal files (and their ranks' parts) of methods not in ``keep``: a rerun
    with another ``baselines.methods`` (or none, or beyond ``baselines.max_nodes``) must not have
    the threshold stage report an earlier run's figures as its own. Returns the methods removed."""
    gone = set()
    for p in Path(folder).glob("*.h5"):
        method = re.sub(r"-rank\d+$", "", p.stem)
        if method not in keep:
            p.unlink(missing_ok=True)  # ranks may race to it: the same files either way
            gone.add(method)
    if gone:
        log.info("baselines: removed the signal files of %s (not in baselines.methods=%s)", sorted(gone), list(keep))
    return sorted(gone)


def write_signal_file(path: Path, method: str, signals: Iterator[NodeSignal], settings: str | None = None,
                      store_signature: str = "", attrs: dict | None = None) -> None:
    """Baselines write the same per-node layout without the per-metric error tensor (``settings``: a
    digest of what they were fitted from, so that a rerun keeps an up-to-date file; ``attrs``: more
    file attributes, e.g. the range-excess weight it chose)."""
    with atomic_path(path) as tmp, h5_writing(tmp) as f:
        f.attrs.update(signal_attrs(method, store_signature), **(attrs or {}))
        if settings:
            f.attrs["settings"] = settings
        g0 = f.create_group("nodes")
        for s in signals:
            g = g0.create_group(s.node)
            for name, data in (("signal", s.signal.astype(np.float32)), ("split", s.split),
                               ("timestamp", s.timestamp), ("labels", s.labels)):
                if data is not None:
                    g.create_dataset(name, data=data, **checked(data))
            g.attrs["signal_scale"] = s.scale


def write_index(out_path: Path, parts: list[Path], attrs: dict, metrics: list[str] | None = None) -> None:
    """An error or signal file as an index over per-rank files (``errors.h5`` over ``errors-rank<r>.h5``,
    ``baselines/kde.h5`` over ``kde-rank<r>.h5``): ``/nodes/<node>`` are HDF5 external links (relative
    file names, so the run folder can move); ``attrs`` and ``metrics`` (error files) are written, and
    ``/node_rows`` (each node's rows, in node-name order) so that a reader lists the nodes without
    following a link per node (one part-file open each: 1.3 s for 4,000 nodes, on every rank)."""
    rows: dict[str, int] = {}
    missing: dict[str, float] = {}
    lost: dict[str, np.ndarray] = {}
    with atomic_path(out_path) as tmp, h5_writing(tmp) as f:
        f.attrs.update(attrs, index_of=[p.name for p in parts])
        if metrics is not None:
            f.create_dataset("metrics", data=np.array(metrics, dtype=object), dtype=STR)
        g = f.create_group("nodes")
        for part in parts:
            with open_h5(part, kind="per-rank error file") as src:
                names = sorted(src["nodes"])
                if "node_missing" in src and len(src["node_missing"]) == len(names):
                    missing.update(zip(names, map(float, src["node_missing"][()])))
                if "node_lost" in src and len(src["node_lost"]) == len(names):
                    lost.update(zip(names, src["node_lost"][()]))
                for node in names:
                    g[node] = h5py.ExternalLink(part.name, f"/nodes/{node}")
                    rows[node] = int(src["nodes"][node]["signal"].shape[0])
        f.create_dataset("node_rows", data=np.array([rows[n] for n in sorted(rows)], dtype=np.int64))
        if missing and len(missing) == len(rows):
            f.create_dataset("node_missing", data=np.array([missing[n] for n in sorted(rows)], dtype=np.float32))
        if metrics is not None and lost and len(lost) == len(rows):
            write_lost(f, [lost[n] for n in sorted(rows)], len(metrics))


def write_lost(f: h5py.File, lost: list[np.ndarray], n_metrics: int) -> None:
    """``/node_lost`` [nodes, metrics] (uint8, node-name order): 1 where a node's metric, reported in
    training, has no value in the scored rows (:attr:`ErrorStore.lost`)."""
    data = np.stack(lost).astype(np.uint8) if lost else np.zeros((0, n_metrics), dtype=np.uint8)
    f.create_dataset("node_lost", data=data, compression="gzip", compression_opts=1)
