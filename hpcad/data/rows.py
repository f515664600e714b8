"""Files of many nodes' rows (a node column: one export of the whole cluster, or a folder of daily
ones), read in chunks and staged by node in a scratch HDF5 row log (pass 1), then read back one node
at a time (pass 2): memory holds one input chunk or one node, never a whole file. Under several
ranks each rank stages its block of the files and converts its share of the nodes
(hpcad/data/ranks.py)."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from hpcad.data.cells import stray_as_missing
from hpcad.data.convert import FrameConverter, counted, guarded, label_numbers, odd_values, role_hint
from hpcad.data.h5 import h5_file, h5_writing
from hpcad.data.node import NodeData
from hpcad.data.store import check_node_name
from hpcad.data.paths import file_node
from hpcad.data.tables import columns, iter_table_chunks
from hpcad.data.timestamps import to_epoch_seconds
from hpcad.errors import InputError

log = logging.getLogger(__name__)


def has_node_column(files: list[Path], data_cfg) -> bool:
    """Whether a folder's files hold rows of many nodes (``data.node_column`` in the first readable
    header: daily or monthly exports of the whole cluster) rather than one node each. A file whose
    header cannot be read decides nothing: it is skipped or named when its rows are read."""
    for path in files:
        try:
            return data_cfg.node_column in columns(path)
        except InputError:
            continue
    return False


def row_columns(files: list[Path], cfg, skip_bad: bool = False) -> list[str] | None:
    """The columns a folder of many nodes' files is staged with: the union of the files' headers
    (less the node column and ``data.ignore_columns``), in first-seen order; None for one file (its
    first chunk's columns). ``skip_bad``: a file whose header cannot be read, or lacks the node
    column, is left out here (it is skipped and recorded when its rows are staged): its columns are
    no metrics."""
    if len(files) < 2:
        return None
    skip = {cfg.node_column, *cfg.ignore_columns}
    names: dict[str, None] = {}
    for path in files:
        try:
            header = columns(path)
        except InputError:
            if not skip_bad:
                raise
            continue
        if skip_bad and cfg.node_column not in header:
            continue
        names.update((c, None) for c in header if c not in skip)
    return list(names)


def stage_rows(files: list[Path], cfg, names: list[str] | None, scratch: Path,
               first: Path | None = None, skipped_files: list | None = None) -> tuple[list[str], dict[str, int]]:
    """Pass 1 over files of many nodes' rows into the HDF5 file ``scratch``: each chunk's rows, grouped
    by node (file order kept within a node), appended to one row log (``/rows``: the values as the
    store keeps them, float32; ``/timestamps``: epoch seconds, int64), and each node's segment of it
    recorded (``/segments``: node, first row, rows; ``/node_names``). One write per
    chunk whatever the number of nodes: a dataset per node cost a read-modify-write of its last
    chunk per append (10 ms at 4,000 nodes, and the chunks' space: 21 GB of scratch for 770 MB of
    rows). Returns the columns (``names``, or the first chunk's) and the rows staged per node. Memory
    holds one input chunk and the segment table. ``first``: the folder's first file, named when
    another lacks the node column. ``skipped_files`` (``data.on_bad_node=skip``, a folder's files): a
    file that cannot be read or fails a check (truncated, not a table, a non-numeric column...) is
    rolled back, logged and recorded there as ``[file, reason]``; the other files are staged."""
    import pandas as pd

    ids: dict[str, int] = {}
    segments: list[np.ndarray] = []
    with h5_writing(scratch) as f:
        log_ = None

        def stage_file(path: Path) -> None:
            nonlocal log_, names
            read = dropped = 0  # this file's rows so far; of them, rows without a node value
            first_dropped = 0
            for chunk in iter_table_chunks(path, text=(cfg.node_column,)):
                read += len(chunk)
                from_name = cfg.node_column not in chunk.columns
                if from_name:
                    if names is not None:  # a folder's file
                        raise InputError(f"{path}: no {cfg.node_column!r} column, unlike {(first or files[0]).name}: a "
                                         f"folder holds one file per node, or files of many nodes that all "
                                         f"have the node column (data.node_column; docs/data.md)")
                    node = pd.Series(check_node_name(file_node(path, cfg.node_column), str(path)), index=chunk.index,
                                     name=cfg.node_column)  # one node's file (e.g. the lecture's CSV)
                    chunk = pd.concat([chunk, node], axis=1)  # not chunk[...] = ...: pandas warns on wide frames
                ignored = [c for c in cfg.ignore_columns if c in chunk.columns]
                if ignored:  # (each step copies the chunk: only where needed)
                    chunk = chunk.drop(columns=ignored)
                missing = chunk[cfg.node_column].isna().to_numpy()
                if missing.any():  # a row without a node belongs to none: dropped, and said (below)
                    first_dropped = first_dropped or read - len(chunk) + int(np.argmax(missing)) + 1
                    dropped += int(missing.sum())
                    chunk = chunk[~missing]
                if cfg.timestamp_column in chunk.columns:
                    chunk[cfg.timestamp_column] = to_epoch_seconds(chunk[cfg.timestamp_column], str(path),
                                                                     cfg.timestamp_column, cfg.timezone,
                                                                     cfg.epoch_unit, dayfirst=cfg.dayfirst)
                if names is None:
                    names = [c for c in chunk.columns if c != cfg.node_column]
                if cfg.label_column in chunk.columns and not pd.api.types.is_numeric_dtype(chunk[cfg.label_column]):
                    chunk[cfg.label_column] = label_numbers(chunk[cfg.label_column], cfg.label_names, str(path),
                                                            cfg.label_column, read - len(chunk))
                bad = [c for c in names if c in chunk.columns and not pd.api.types.is_numeric_dtype(chunk[c])]
                if bad and len(chunk):  # a few stray cells are missing samples (hpcad.data.cells)
                    chunk, bad = stray_as_missing(chunk, bad, str(path))
                if bad and len(chunk):  # (a file of a header alone has no values to judge: no rows, said below)
                    raise InputError(f"{path}: non-numeric columns {bad[:10]} (e.g. {odd_values(chunk, bad)}); "
                                     f"{role_hint(chunk, bad, cfg, from_name)}fix the export or "
                                     f"list them in data.ignore_columns")
                values = [c for c in names if c != cfg.timestamp_column]
                if log_ is None:
                    log_ = f.create_dataset("rows", shape=(0, len(values)), maxshape=(None, len(values)),
                                            dtype=np.float32, chunks=(max(1, 131072 // len(values)), len(values)))
                    if cfg.timestamp_column in names:
                        f.create_dataset("timestamps", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(65536,))
                raw = chunk[cfg.node_column]
                # blanks around a name (a database's fixed-width CHAR column pads it) are not part of it
                code = {u: ids.setdefault(check_node_name(str(u).strip(), str(path)), len(ids)) for u in pd.unique(raw)}
                node_of = raw.map(code).to_numpy(dtype=np.int64)
                order = np.argsort(node_of, kind="stable")
                start = log_.shape[0]
                log_.resize(start + len(order), axis=0)
                log_[start:] = chunk.reindex(columns=values).to_numpy(dtype=np.float32)[order]
                if "timestamps" in f:
                    if cfg.timestamp_column not in chunk.columns:  # a folder's file without it
                        raise InputError(f"{path}: no {cfg.timestamp_column!r} column, unlike other files "
                                         f"of {path.parent}")
                    f["timestamps"].resize(start + len(order), axis=0)
                    f["timestamps"][start:] = chunk[cfg.timestamp_column].to_numpy()[order]
                seg_nodes, at, count = np.unique(node_of[order], return_index=True, return_counts=True)
                segments.append(np.stack([seg_nodes, start + at, count], axis=1))
            if dropped:  # e.g. the last line of an export cut short: the rest of that day is missing too
                log.warning("%s: %d of %d row(s) have no %r value and were dropped (the first: data row %d; a "
                            "truncated export ends so)", path, dropped, read, cfg.node_column, first_dropped)

        for path in files:
            mark = (0 if log_ is None else log_.shape[0], len(segments), len(ids))
            try:
                stage_file(path)
            except InputError as exc:
                if skipped_files is None or len(files) < 2:
                    raise
                if log_ is not None:  # this file's rows out again: the scratch holds the other files' only
                    log_.resize(mark[0], axis=0)
                    if "timestamps" in f:
                        f["timestamps"].resize(mark[0], axis=0)
                del segments[mark[1]:]
                for node in list(ids)[mark[2]:]:  # nodes first seen in it
                    del ids[node]
                log.error("skipping a file (data.on_bad_node=skip): %s", exc)  # the message names it
                reason = str(exc)
                skipped_files.append([str(path), reason.removeprefix(f"{path}: ")])
        if names is None:
            raise InputError(f"{files[0]}: the file holds no rows")
        table = np.concatenate(segments) if segments else np.zeros((0, 3), np.int64)
        f.create_dataset("segments", data=table)
        f.create_dataset("node_names", data=np.array(list(ids), dtype=object), dtype=h5py.string_dtype())
    rows = np.bincount(table[:, 0], weights=table[:, 2], minlength=len(ids)) if len(table) else np.zeros(0)
    return names, {node: int(rows[i]) for node, i in ids.items()}


def read_staged(scratches: list[Path], names: list[str], conv: FrameConverter, where: Path, nodes: list[str],
                skipped: list | None = None, progress: bool = True) -> Iterator[NodeData]:
    """Pass 2: ``nodes`` converted one at a time, each from its segments of the scratch files' row logs
    (in the files' order: every rank's pass 1 over its block of the input files, in file order). The
    timestamps, epoch seconds since pass 1, reach the converter as UTC times: read as numbers they
    would be taken in ``data.epoch_unit`` a second time."""
    import pandas as pd

    ts_col = conv.cfg.timestamp_column
    values = [c for c in names if c != ts_col]
    with contextlib.ExitStack() as stack:
        logs = []  # per scratch file: its row log, its timestamps and {node: its segments' (first row, rows)}
        for path in scratches:
            f = stack.enter_context(h5_file(path, "r"))
            table = f["segments"][()]
            node_names = [n.decode() if isinstance(n, bytes) else n for n in f["node_names"][()]]
            order = np.argsort(table[:, 0], kind="stable")  # a node's segments in the order they were written
            cuts = np.flatnonzero(np.diff(table[order, 0])) + 1
            logs.append((f.get("rows"), f.get("timestamps"),
                         {node_names[int(g[0, 0])]: g[:, 1:] for g in np.split(table[order], cuts) if len(g)}))

        def read(node: str) -> pd.DataFrame:
            spans = [(rows, ts, int(a), int(a) + int(n)) for rows, ts, segs in logs for a, n in segs.get(node, ())]
            frame = pd.DataFrame(np.concatenate([rows[a:b] for rows, _, a, b in spans]), columns=values)
            if ts_col in names:
                stamps = np.concatenate([ts[a:b] for _, ts, a, b in spans])
                frame.insert(names.index(ts_col), ts_col, pd.to_datetime(stamps, unit="s", utc=True))
            return frame

        yield from counted((guarded(lambda: conv(read(node), node, str(where)), node, skipped) for node in nodes),
                           len(nodes), progress)


def iter_node_rows(files: list[Path], conv: FrameConverter, scratch_dir: Path, skipped: list | None = None,
                   progress: bool = True, skipped_files: list | None = None) -> Iterator[NodeData]:
    """Files of many nodes' rows (one file, or a folder of them), staged in a scratch HDF5 file by node
    (:func:`stage_rows`), then converted node by node. Memory holds one input chunk or one node, never
    a whole file. A single file without the node column is one node named after the file; a folder's
    files all need the column, and a metric a file lacks is missing in its rows (the files' header
    union is the metric list). ``skipped``/``skipped_files`` (``data.on_bad_node=skip``): bad nodes
    and bad files of a folder, recorded."""
    where = files[0] if len(files) == 1 else files[0].parent
    fd, scratch = tempfile.mkstemp(suffix=".h5", dir=scratch_dir, prefix=".ingest-")
    os.close(fd)
    try:
        names, rows = stage_rows(files, conv.cfg, row_columns(files, conv.cfg, skipped_files is not None),
                                 Path(scratch), skipped_files=skipped_files)
        yield from read_staged([Path(scratch)], names, conv, where, sorted(rows), skipped, progress)
    finally:
        Path(scratch).unlink(missing_ok=True)
