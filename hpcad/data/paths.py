"""Which files an export holds and whose they are: table files (CSV, gzip'd CSV, Parquet) in a
folder, below it or matched by a glob pattern, hidden ones left out; the node a file holds (its name,
its folder's where it is named for its day, its Hive-style partition folder's)."""
from __future__ import annotations

import re
from pathlib import Path

from hpcad.errors import InputError

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # the partition folder of rows whose value is null (Hive, Spark, pyarrow)


def stem(path: Path) -> str:
    """File name without its table suffix (``n001.csv.gz`` -> ``n001``)."""
    name = path.name
    for suf in TABLE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def partition_value(path: Path, column: str) -> str | None:
    """``column``'s value for the rows of the file ``path`` from Hive-style partition folders, as
    Spark's ``partitionBy``, pyarrow's ``write_to_dataset``, Dask and Polars write them
    (``node=cn01/part-00000-<uuid>.parquet``: the column is then not in the file): the nearest folder
    above ``path`` named ``<column>=<value>``, URL-decoded as those writers encode it; ``""`` for the
    null partition (``HIVE_NULL``); None where no folder names the column."""
    from urllib.parse import unquote

    prefix = f"{column}="
    for part in reversed(path.parent.parts):
        if part.startswith(prefix):
            value = unquote(part[len(prefix):])
            return "" if value == HIVE_NULL else value
    return None


# a name that is a date (2025-01-06, 2025_01_06, 2025.01.06, 20250106, a month 2025-01), perhaps with a
# time after it (2025-01-06T00, 2025-01-06_0000): an export's file named for its day, not for a node
_DATE = re.compile(r"((?:19|20)\d\d)([-_.]?)(\d\d)(?:\2(\d\d))?(?:$|[T_ ])")


def dated(name: str, folder: bool = False) -> bool:
    """Whether ``name`` is a date's (``_DATE``); ``folder``: also a year's, month's or day's folder of a
    tree of dates (``2025``, ``01``)."""
    if folder and re.fullmatch(r"(?:19|20)\d\d|\d{1,2}", name):
        return True
    m = _DATE.match(name)
    if not m or (not m.group(2) and m.group(4) is None):  # 202501 alone may be a number
        return False
    return 1 <= int(m.group(3)) <= 12 and (m.group(4) is None or 1 <= int(m.group(4)) <= 31)


def file_node(path: Path, node_column: str) -> str:
    """The node a node file holds: its partition folder's (``node=cn01/part-0.parquet``:
    ``partition_value``); a file named like a date in a folder that is not, the folder's
    (``cn01/2025-01.csv``: a folder per node); else the file's ``stem`` (``cn01.csv``)."""
    value = partition_value(path, node_column)
    if value is not None:
        return value
    name = stem(path)
    return path.parent.name if dated(name) and not dated(path.parent.name, folder=True) else name


def is_pattern(path: Path | str) -> bool:
    """Whether ``data.source`` is a glob pattern (``/exports/*/2025-01-06.csv``): its input is the
    table files it matches (``pattern_files``)."""
    return any(c in str(path) for c in "*?[")


def pattern_files(pattern: Path) -> list[Path]:
    """The CSV/Parquet files a glob pattern matches (``**``: folders at any depth; hidden names are
    not matched), sorted."""
    import glob

    return sorted(p for p in map(Path, glob.glob(str(pattern), recursive=True)) if is_table(p))


def source_exists(path: Path) -> bool:
    """Whether an input path is there: a file or folder, or a pattern that matches a table file."""
    return bool(pattern_files(path)) if is_pattern(path) else path.exists()


def is_table(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TABLE_SUFFIXES)


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith((".parquet", ".pq"))


def hidden(path: Path, root: Path) -> bool:
    """Whether ``path`` below ``root`` is hidden, or lies in a hidden folder below it (``._node.csv``,
    macOS's AppleDouble copies on a share; ``.snapshot/``, an editor's ``.node.csv.swp``): not an export."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def visible_files(source: Path) -> list[Path]:
    """Every file below the folder ``source`` that is not ``hidden``, sorted."""
    return sorted(p for p in source.rglob("*") if p.is_file() and not hidden(p, source))


def table_files(source: Path) -> list[Path]:
    """``source`` itself, every CSV/Parquet file below it (sorted; hidden ones left out), or those a
    pattern matches."""
    if source.is_file():
        return [source]
    if is_pattern(source):
        if not (files := pattern_files(source)):
            raise InputError(f"{source}: the pattern matches no *.csv, *.csv.gz or *.parquet file")
        return files
    files = [p for p in visible_files(source) if is_table(p)]
    if not files:
        raise InputError(f"{source}: no *.csv, *.csv.gz or *.parquet files below the directory")
    return files
