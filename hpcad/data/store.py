"""The hpcad telemetry store: one HDF5 file, one group per monitored node (layout in docs/data.md).

    /                  attrs: hpcad_format="telemetry-store", format_version, created, source, hpcad_version
    /metrics           [M] UTF-8 metric names (the same for every node)
    /node_rows         [N] int64, /node_labelled [N] int8: each node's rows and has_labels, in node-name
                       order (a reader lists the nodes without opening each group; older stores lack them)
    /node_digest       [N] UTF-8: each node's content digest (node_digest: what training reads of it), same order
    /nodes/<node>/     attrs: rows, has_labels, source, digest
        timestamp      [T] int64 epoch seconds (attr time_unit="s"; "row" when the input had none)
        values         [T, M] float32, chunked by rows, gzip + shuffle, NaN = missing sample
                       (every per-node dataset carries HDF5 Fletcher-32 checksums: corruption is an error)
        labels         [T] int8 (only when labelled): 0 normal, other integers = anomaly class
        job            [T] int32 (only with data.jobs): row -> index into /jobs, -1 = idle
    /jobs/             (only with data.jobs) job_id, state, nodelist [J] UTF-8 (user [J] if given); start, end [J] int64

Writers stream node by node; readers load one node at a time. A store ingested by several ranks is
an *index* (attribute ``index_of``: its part files): each ``/nodes/<node>`` is an HDF5 external link
into ``store-part-<signature>-<r>of<n>.h5`` beside it (relative names: the folder can move), each
part a store of one rank's nodes in this layout (hpcad/data/ranks.py).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from hpcad import __version__
from hpcad.atomic import atomic_path, remove_unreferenced
from hpcad.data.h5 import h5_writing, open_h5, read_spans
from hpcad.data.jobs import JobTable
from hpcad.data.node import NodeData
from hpcad.data.notes import InputWarnings
from hpcad.errors import InputError, StoreError

FORMAT = "telemetry-store"
FORMAT_VERSION = 1
ROW_CHUNK = 1024
_NODE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")

STR = h5py.string_dtype("utf-8")
log = logging.getLogger(__name__)

def checked(data: np.ndarray, rows: int = ROW_CHUNK) -> dict:
    """``create_dataset`` options that make corruption a read error instead of wrong numbers: HDF5's
    Fletcher-32 checksum on every chunk (chunks of ``rows`` rows). Empty arrays cannot be chunked."""
    if data.size == 0:
        return {}
    return {"fletcher32": True, "chunks": (min(data.shape[0], rows), *data.shape[1:])}


def corrupt(path: Path, what: str, exc: Exception, rerun: str) -> StoreError:
    """The error for an HDF5 file whose data fails its checksum or cannot be read."""
    return StoreError(f"{path}: {what}: cannot read (corrupt file: {exc}); delete {path.name} and rerun "
                      f"`{rerun}` to write it again")


STORE_SUFFIXES = (".h5", ".hdf5")


def is_store_path(source) -> bool:
    """Whether ``data.source`` names an hpcad store (used in place) rather than exports."""
    return source is not None and str(source).lower().endswith(STORE_SUFFIXES)


def run_store_path(run_dir: Path, source) -> Path:
    """The store a run folder's stages read: its ``store.h5``, or ``data.source`` itself where that is
    a store used in place and the run has none."""
    path = Path(run_dir) / "store.h5"
    return Path(source) if not path.exists() and is_store_path(source) else path


def check_node_name(name: str, where: str) -> str:
    if not _NODE_RE.match(name):
        raise InputError(f"{where}: node name {name!r} may hold only letters, digits, '_', '.', '-'")
    return name


def node_digest(node: NodeData) -> str:
    """A digest of what training reads of a node: timestamps and their unit, values (every NaN alike),
    labels and which rows ran a job. Equal for a node ingested again from the same telemetry (a file
    re-exported, other nodes added or changed), so a rerun retrains only the nodes whose data changed."""
    h = hashlib.sha256(f"{node.time_unit}\n{node.values.shape}\n".encode())
    h.update(np.ascontiguousarray(node.timestamp, dtype=np.int64).tobytes())
    values = np.array(node.values, dtype=np.float32)  # a copy: NaNs of other payloads made one
    values[np.isnan(values)] = np.nan
    h.update(values.tobytes())
    for extra in (node.labels is not None and np.asarray(node.labels, dtype=np.int8),
                  node.job is not None and np.asarray(node.job) >= 0):
        h.update(b"-" if extra is False else b"+" + np.ascontiguousarray(extra).tobytes())
    return h.hexdigest()[:24]


def write_node(f: h5py.File, node: NodeData, source: str = "") -> str:
    """Write one node's group; returns its :func:`node_digest`."""
    grp = f.require_group("nodes").create_group(node.name)
    T = node.values.shape[0]

    def put(name: str, data: np.ndarray, **kw) -> h5py.Dataset:
        return grp.create_dataset(name, data=data, compression="gzip", **checked(data), **kw)

    put("timestamp", node.timestamp.astype(np.int64)).attrs["time_unit"] = node.time_unit
    # gzip level 1: 26-41 % less time than level 4 (a node-year of 160 metrics: ~1.4 vs 2.3 s, the
    # largest part of ingesting it) for 1-4 % more disk (docs/data.md)
    put("values", node.values.astype(np.float32), compression_opts=1, shuffle=True)
    if node.labels is not None:
        put("labels", node.labels.astype(np.int8))
    if node.job is not None:
        put("job", node.job.astype(np.int32))
    digest = node_digest(node)
    grp.attrs.update(rows=T, has_labels=node.labels is not None, source=source, digest=digest)
    return digest


def write_store(path: str | os.PathLike[str], metrics: list[str], nodes: Iterable[NodeData],
                source: str, signature: str = "",
                skipped: list | None = None, jobs: JobTable | None = None, empty_ok: bool = False,
                skipped_files: list | None = None, warnings: InputWarnings | None = None) -> int:
    """Write a store atomically from a stream of nodes; returns the number of nodes written (none is
    an error unless ``empty_ok``: a rank's part whose nodes were all skipped). ``skipped``,
    ``skipped_files`` (bad nodes, bad files of a folder of many nodes' files) and ``warnings`` (the
    readers' warnings, hpcad/data/notes.py) fill while the nodes stream and are recorded at the end."""
    written: dict[str, tuple[int, bool, str]] = {}
    with atomic_path(path) as tmp:
        with h5_writing(tmp) as f:
            _write_head(f, metrics, source, signature, jobs)
            for node in nodes:
                if node.values.shape[1] != len(metrics):
                    raise InputError(f"node {node.name}: {node.values.shape[1]} metrics, store has {len(metrics)}")
                digest = write_node(f, node, str(source))
                written[node.name] = (node.values.shape[0], node.labels is not None, digest)
            if not written and not empty_ok:
                raise InputError(f"{source}: no usable node" + (f" ({len(skipped)} skipped)" if skipped else ""))
            _write_node_table(f, written)
            f.attrs["skipped_nodes"] = json.dumps(skipped or [])  # [[node, reason], ...]
            f.attrs["skipped_files"] = json.dumps(skipped_files or [])  # [[file, reason], ...]
            _write_warnings(f, warnings.said() if warnings is not None else (0, []))
    return len(written)


def write_index(path: Path, metrics: list[str], parts: dict[Path, dict[str, tuple[int, bool, str]]], source: str,
                signature: str, skipped: list, jobs: JobTable | None = None, skipped_files: list | None = None,
                warnings: tuple[int, list[str]] = (0, [])) -> int:
    """Write ``path`` atomically as a store whose nodes live in ``parts`` (part file -> {node: (rows,
    labelled, digest)}, each part a store written by :func:`write_store` beside ``path``); returns the number
    of nodes. Its ``/node_rows``, ``/node_labelled`` and ``/node_digest`` let a reader list the nodes
    without opening every part once per node (thousands of opens per rank on Lustre)."""
    table = {node: rl for nodes in parts.values() for node, rl in nodes.items()}
    with atomic_path(path) as tmp, h5_writing(tmp) as f:
        _write_head(f, metrics, source, signature, jobs)
        f.attrs["index_of"] = [p.name for p in parts]
        for part, nodes in parts.items():
            for node in nodes:
                f["nodes"][node] = h5py.ExternalLink(part.name, f"/nodes/{node}")
        _write_node_table(f, table)
        f.attrs["skipped_nodes"] = json.dumps(skipped)
        f.attrs["skipped_files"] = json.dumps(skipped_files or [])
        _write_warnings(f, warnings)
    return len(table)


def _write_warnings(f: h5py.File, said: tuple[int, list[str]]) -> None:
    """The readers' warnings (``InputWarnings.said()``): how many, and the first ones."""
    f.attrs["input_warnings_total"] = said[0]
    f.attrs["input_warnings"] = json.dumps(said[1])


def _write_node_table(f: h5py.File, nodes: dict[str, tuple[int, bool, str]]) -> None:
    """``/node_rows``, ``/node_labelled`` and ``/node_digest`` in node-name order (what
    :class:`TelemetryStore` lists)."""
    names = sorted(nodes)
    f.create_dataset("node_rows", data=np.array([nodes[n][0] for n in names], dtype=np.int64))
    f.create_dataset("node_labelled", data=np.array([nodes[n][1] for n in names], dtype=np.int8))
    f.create_dataset("node_digest", data=np.array([nodes[n][2] for n in names], dtype=object), dtype=STR)


def part_path(store_path: Path, signature: str, rank: int, size: int) -> Path:
    """Rank ``rank``'s part of the store ``store_path`` for input ``signature`` (a new input never
    overwrites the parts an earlier store still links to)."""
    return store_path.with_name(f"{store_path.stem}-part-{signature[:12]}-{rank}of{size}.h5")


def drop_parts(store_path: Path, keep: list[str]) -> None:
    """Remove the part files beside ``store_path`` that it does not link to (those of an earlier
    ingest, or of one that failed): unreferenced, and as large as the telemetry itself."""
    remove_unreferenced(store_path.parent, f"{store_path.stem}-part-*.h5", keep, "part", store_path.name)


def missing_parts(path: Path, f: h5py.File) -> list[str]:
    """The part files an index store links to that are not beside it."""
    return [str(n) for n in f.attrs.get("index_of", []) if not (path.parent / str(n)).exists()]


def _write_head(f: h5py.File, metrics: list[str], source: str, signature: str, jobs: JobTable | None) -> None:
    f.attrs.update(hpcad_format=FORMAT, format_version=FORMAT_VERSION, source=str(source),
                   created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   hpcad_version=__version__, source_signature=signature)
    f.create_dataset("metrics", data=np.array(metrics, dtype=object), dtype=STR)
    f.create_group("nodes")
    if jobs is not None:
        _write_jobs(f, jobs)


def _write_jobs(f: h5py.File, jobs: JobTable) -> None:
    g = f.create_group("jobs")
    for name in ("job_id", "state", "nodelist") + (("user",) if jobs.user else ()):
        g.create_dataset(name, data=np.array(getattr(jobs, name), dtype=object), dtype=STR, compression="gzip")
    g.create_dataset("start", data=jobs.start, compression="gzip")
    g.create_dataset("end", data=jobs.end, compression="gzip")


class TelemetryStore:
    """Read access to a store; loads one node at a time."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        with open_h5(self.path, kind="hpcad telemetry store") as f:
            if f.attrs.get("hpcad_format") != FORMAT:
                raise StoreError(f"{self.path}: not an hpcad telemetry store (attribute hpcad_format="
                                 f"{f.attrs.get('hpcad_format')!r}, expected {FORMAT!r})")
            if "metrics" not in f or "nodes" not in f:
                raise StoreError(f"{self.path}: store lacks /metrics or /nodes (truncated write?)")
            gone = missing_parts(self.path, f)
            if gone:
                raise StoreError(f"{self.path}: its part file(s) {gone[:3]} are missing ({len(gone)} of "
                                 f"{len(f.attrs['index_of'])}; an ingest over several ranks writes the nodes there and "
                                 f"this file links to them): rerun `hpcad ingest` (or the job) to write the store again")
            self.metrics: list[str] = [m.decode() if isinstance(m, bytes) else m for m in f["metrics"][()]]
            self.nodes: list[str] = sorted(f["nodes"].keys())
            if "node_rows" in f and len(f["node_rows"]) == len(self.nodes):  # no node group (part file) opened
                self._rows = dict(zip(self.nodes, map(int, f["node_rows"][()])))
                self.labelled = dict(zip(self.nodes, map(bool, f["node_labelled"][()])))
            else:  # stores written before 2026-12-02
                self._rows = {n: int(f["nodes"][n].attrs["rows"]) for n in self.nodes}
                self.labelled = {n: bool(f["nodes"][n].attrs["has_labels"]) for n in self.nodes}
            # stores written before 2026-12-03 have no digests: training then keys on the whole store
            digests = f["node_digest"].asstr()[()] if "node_digest" in f else []
            self._digests = dict(zip(self.nodes, digests)) if len(digests) == len(self.nodes) else {}
            self.has_labels = any(self.labelled.values())
            self.source = str(f.attrs.get("source", ""))
            self.signature = str(f.attrs.get("source_signature", ""))
            self.skipped: list[list[str]] = json.loads(f.attrs.get("skipped_nodes", "[]"))
            self.skipped_files: list[list[str]] = json.loads(f.attrs.get("skipped_files", "[]"))
            # what the readers warned of while ingesting (hpcad/data/notes.py): how many, the first ones
            self.warnings: tuple[int, list[str]] = (int(f.attrs.get("input_warnings_total", 0)),
                                                    json.loads(f.attrs.get("input_warnings", "[]")))
            self.has_jobs = "jobs" in f
        self._jobs: JobTable | None = None

    def __contains__(self, node: object) -> bool:
        """Whether the store holds ``node`` (a look-up, not a scan of ``nodes``)."""
        return node in self._rows

    def rows(self, node: str) -> int:
        return self._rows[node]

    def digest(self, node: str) -> str:
        """The node's content digest (:func:`node_digest`), or "" for a store written without them."""
        return self._digests.get(node, "")

    def read(self, node: str) -> NodeData:
        if node not in self._rows:
            raise StoreError(f"{self.path}: node {node!r} is not in the store")
        try:
            with open_h5(self.path) as f:
                g = f["nodes"][node]
                labels = g["labels"][()] if "labels" in g else None
                unit = g["timestamp"].attrs.get("time_unit", "s")
                job = g["job"][()] if "job" in g else None
                return NodeData(node, g["timestamp"][()], g["values"][()], labels, str(unit), job)
        except (OSError, KeyError) as exc:
            raise corrupt(self.path, f"node {node}", exc, "hpcad ingest") from exc

    def labels_of(self, nodes: list[str]) -> Iterator[NodeData]:
        """Each of ``nodes``' timestamps and labels, without its values (``values`` [T, 0]), in one
        open of the store: what the split and the labels decide, at a fraction of the reading."""
        with open_h5(self.path) as f:
            for node in nodes:
                try:
                    g = f["nodes"][node]
                    labels = g["labels"][()] if "labels" in g else None
                    ts = g["timestamp"]
                    yield NodeData(node, ts[()], np.empty((len(ts), 0), np.float32), labels,
                                   str(ts.attrs.get("time_unit", "s")))
                except (OSError, KeyError) as exc:
                    raise corrupt(self.path, f"node {node}", exc, "hpcad ingest") from exc

    def jobs(self) -> JobTable | None:
        """The job table written from ``data.jobs`` (node lists expanded on first use), or None."""
        if self._jobs is None and self.has_jobs:
            with open_h5(self.path) as f:
                g = f["jobs"]
                text = {k: [v.decode() if isinstance(v, bytes) else v for v in g[k][()]]
                        for k in ("job_id", "state", "nodelist", "user") if k in g}
                self._jobs = JobTable(text["job_id"], g["start"][()], g["end"][()], text["state"],
                                      text["nodelist"], user=text.get("user", [])).index_nodes(str(self.path))
        return self._jobs

    def values_at(self, node: str, spans: list[tuple[int, int]]) -> list[np.ndarray]:
        """Rows ``[a, b)`` of one node's values for each span ``(a, b)``, in one open of the store
        (:func:`hpcad.data.h5.read_spans`)."""
        if node not in self._rows:
            raise StoreError(f"{self.path}: node {node!r} is not in the store")
        try:
            with open_h5(self.path) as f:
                return read_spans(f["nodes"][node]["values"], spans)
        except (OSError, KeyError) as exc:
            raise corrupt(self.path, f"node {node}", exc, "hpcad ingest") from exc

    def timestamps(self, node: str) -> np.ndarray:
        """One node's timestamps without its values."""
        with open_h5(self.path) as f:
            return f["nodes"][node]["timestamp"][()]

    def time_unit(self, node: str) -> str:
        """"s" (epoch seconds) or "row" (the input had no timestamps), without reading the data."""
        with open_h5(self.path) as f:
            return str(f["nodes"][node]["timestamp"].attrs.get("time_unit", "s"))
