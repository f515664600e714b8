"""A folder of node files (wide format): which files it holds, and which of them are whose.

One file per node, named after it (``cn0042.csv``), in the folder itself; or, where the folder holds
no table file, in its subfolders at any depth: one folder per day or month, the layout the nightly
job reads (``/exports/2025/01/02/cn0042.csv``, ``nightly.input='/exports/{date}'``), so that a
training run reads the same export tree (``data.source=/exports/2025/01``). Files below a Hive-style
partition folder named after the node column (``node=cn0042/part-00000-<uuid>.parquet``, Spark's
``partitionBy("node")``) are that node's, whatever their names; files named for their day in a folder
per node (``/exports/cn0042/2025-01-06.csv``) are their folder's node's. A node's files are read in path
order (folders named by date sort in time) and their rows joined, one node at a time. Hidden files
and folders (``.snapshot``, editors' temporaries) are left out.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.data.paths import HIVE_NULL, dated, file_node, is_pattern, is_table, partition_value, pattern_files, stem
from hpcad.data.tables import read_table
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from hpcad.data.convert import FrameConverter

log = logging.getLogger(__name__)
# a part file of a partitioned export, never a node's name: Spark's part-00000-<uuid>, Dask's part.0,
# pyarrow's <uuid hex>-0
PART_FILE = re.compile(r"^(part[-.]\d+|[0-9a-f]{32}-\d+)", re.IGNORECASE)


def folder_files(source: Path) -> list[Path]:
    """The table files of a folder, sorted: those in it, or, where it holds none, those below it
    (hidden ones left out); [] when there are none. A glob pattern: the files it matches."""
    if is_pattern(source):
        return pattern_files(source)
    files = sorted(p for p in source.iterdir() if is_table(p) and not p.name.startswith("."))
    if files:
        return files
    below, seen = [], set()
    for folder, dirs, names in os.walk(source, followlinks=True):  # a folder of links to the days wanted works
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: read once, not forever
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        below += [Path(folder) / n for n in names if not n.startswith(".") and is_table(Path(folder) / n)]
    return sorted(below)


def node_files(source: Path, node_column: str) -> list[Path]:
    """A folder's node files (see the module), sorted by path; an error where there are none, or where
    one folder holds two files of one node (``cn01.csv`` and ``cn01.parquet``; a partition folder's
    part files are one node's by design). Files of the null partition
    (``node=__HIVE_DEFAULT_PARTITION__``: rows without a node) are left out with a warning, as rows
    without a node are in a file of many nodes."""
    files = folder_files(source)
    if not files:
        raise InputError(f"{source}: " + ("the pattern matches no *.csv or *.parquet file" if is_pattern(source) else
                                          "no *.csv or *.parquet files in the directory or its subfolders"))
    nameless = [p for p in files if partition_value(p, node_column) == ""]
    if nameless:
        log.warning("%s: %d file(s) of rows without a node (%s=%s) left out", folder_of(nameless), len(nameless),
                    node_column, HIVE_NULL)
        gone = set(nameless)
        files = [p for p in files if p not in gone]
        if not files:
            raise InputError(f"{source}: every file is one of rows without a node ({node_column}={HIVE_NULL})")
    named = Counter((p.parent, stem(p)) for p in files if partition_value(p, node_column) is None)
    base = folder_of(files) if is_pattern(source) else source
    dup = sorted(str((d / s).relative_to(base)) for (d, s), n in named.items() if n > 1)
    if dup:
        raise InputError(f"{source}: several files for nodes {dup[:10]} in one folder (e.g. both CSV and Parquet)")
    return files


def node_groups(files: list[Path], node_column: str) -> dict[str, list[Path]]:
    """``files`` by node (``file_node``: the file stem, or the partition folder's value), each node's in
    the given order; nodes in order of first file."""
    groups: dict[str, list[Path]] = {}
    by_folder = None
    for p in files:
        node = file_node(p, node_column)
        if PART_FILE.match(node):
            raise InputError(f"{p}: named as a part file of a partitioned export (Spark, pyarrow, Dask), not after "
                             f"a node, and no folder above it is named {node_column}=<node>: {_part_hint(p)}")
        if dated(node):
            raise InputError(f"{p}: named like a date, not after a node, and so is its folder: put each node's files "
                             f"in a folder named after the node (cn01/{p.name}, or {node_column}=cn01/), or name each "
                             f"file after its node (cn01.csv in a folder per day)")
        if by_folder is None and node != stem(p):
            by_folder = f"{p.parent.name}/{p.name}: node {node}"
        groups.setdefault(node, []).append(p)
    if by_folder:
        log.info("node files named for their day, or part files below %s= folders: each is its folder's node (%s)",
                 node_column, by_folder)
    return groups


def _part_hint(path: Path) -> str:
    """What to do about a part file whose node no folder names (``node_groups``)."""
    keys = [part.split("=", 1)[0] for part in path.parent.parts if "=" in part]
    if keys:
        return (f"the folders above it are partitions by {', '.join(dict.fromkeys(keys))}: set data.node_column to "
                f"the one that holds the node")
    return ("put each node's files in a folder named after the node column (node=cn01/, as Spark's partitionBy "
            "writes it; data.node_column), or name each file after its node (cn01.parquet)")


def folder_of(files: list[Path]) -> Path:
    """The folder ``files`` lie in (their common one, for files of subfolders)."""
    return Path(os.path.commonpath([p.parent for p in files]))


def where(paths: list[Path]) -> str:
    """How errors name a node's files: the file, or the first and last of several."""
    if len(paths) == 1:
        return str(paths[0])
    common = Path(os.path.commonpath(paths))
    return f"{common}/{{{paths[0].relative_to(common)} .. {paths[-1].relative_to(common)}}} ({len(paths)} files)"


def node_frame(paths: list[Path], conv: FrameConverter, node: str,
               skipped_files: list | None = None) -> pd.DataFrame:
    """One node's rows from its files, joined in order (a metric a file lacks is missing in its rows).
    A file with a non-numeric metric column is named on its own (the converter's error for it).
    ``skipped_files`` (``data.on_bad_node=skip``): a node's file that cannot be read or has such a
    column is logged, recorded there as ``[file, reason]`` and left out, its other files kept (a day's
    export cut short loses that day, not the node's year); a node with one file is skipped whole by
    the caller, as in a flat folder."""
    import pandas as pd

    if len(paths) == 1:
        return read_table(paths[0])
    cfg = conv.cfg
    roles = {cfg.timestamp_column, cfg.label_column, cfg.node_column, *cfg.ignore_columns}
    frames = []
    for p in paths:
        try:
            f = read_table(p)
            if any(c not in roles and not pd.api.types.is_numeric_dtype(f[c]) for c in f.columns):
                conv.__class__(cfg, conv.metrics)(f, node, str(p))  # raises, naming the file (a copy: no state kept)
        except InputError as exc:
            if skipped_files is None:
                raise
            log.error("skipping a file (data.on_bad_node=skip): %s", exc)  # the message names it
            skipped_files.append([str(p), str(exc).removeprefix(f"{p}: ")])
            continue
        frames.append(f)
    if not frames:
        raise InputError(f"{where(paths)}: every file of the node was skipped for bad input")
    return pd.concat(frames, ignore_index=True, sort=False)
