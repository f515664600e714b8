"""Reading CSV/Parquet tables whole or in chunks, with errors that name the file; what export
folders hold besides clean tables is left out here (a row cut short at a CSV's end, lines repeating
its header, comment lines, hidden files and folders), and said (docs/data.md)."""
from __future__ import annotations

import csv
import logging
import mmap
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
CHUNK_ROWS = 200_000
TAIL_BYTES = 1 << 16  # how much of a CSV's end ``cut_last_row`` reads (a row of 160 metrics: ~2 KiB)
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


def columns(path: Path) -> list[str]:
    """A table's column names without reading its rows (CSV header line, Parquet schema)."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:
            raise InputError(f"{path}: cannot read the Parquet schema: {exc}") from exc
    how = dialect(path)
    if how.sections:
        from hpcad.data import sections

        return sections.columns(path, how.sep)
    return [name for name in how.header if name.strip()]  # an unnamed column holds no metric


SEPARATORS = ",;\t|"  # a CSV's field separator: whichever of these its header line holds most of
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class CsvDialect:
    """How a CSV export writes its fields, and its column names: found in its header and first rows
    (``dialect``)."""

    sep: str = ","
    decimal: str = "."
    blanks: bool = False  # a blank after each separator (``a, b``): skipped (it costs pandas ~20 %)
    header: tuple[str, ...] = ()
    sections: bool = False  # the header line starts with #: reports under header lines (hpcad/data/sections.py)

    def read_csv_kw(self) -> dict:
        """pandas.read_csv's options for it (a UTF-8 byte-order mark is dropped, as for the header)."""
        return {"sep": self.sep, "decimal": self.decimal, "encoding": "utf-8-sig", "skipinitialspace": self.blanks}


def open_text(path: Path):
    """The file as UTF-8 text; a byte-order mark (spreadsheets' "UTF-8 with BOM") is not part of the
    first column's name."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", newline="", encoding="utf-8-sig")


DIALECT_ROWS = 20  # rows looked at for a decimal comma


def dialect(path: Path) -> CsvDialect:
    """The separator (``,``, ``;``, tab or ``|``: the one the header line holds most of), the
    decimal mark (a comma where fields are not comma-separated and the first ``DIALECT_ROWS`` rows
    write a number as ``21,5``: spreadsheet exports in European locales), whether the header puts a
    blank after its separators, and the header's names, in one read of the file's start. A header
    that names a column twice is refused (pandas would rename the copy ``name.1`` and ingest it as
    another metric)."""
    from collections import Counter

    try:
        with open_text(path) as f:
            head = f.readline()
            sep = max(SEPARATORS, key=head.count) if any(c in head for c in SEPARATORS) else ","
            blanks = f"{sep} " in head
            f.seek(0)
            header = next(csv.reader(f, delimiter=sep, skipinitialspace=blanks), [])
            rows = [f.readline() for _ in range(DIALECT_ROWS)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        hint = " (CSV exports are read as UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8`)"
        raise InputError(f"{path}: cannot read the header line: {exc}"
                         f"{hint if isinstance(exc, UnicodeDecodeError) else ''}") from exc
    sections = bool(header) and header[0].startswith("#")  # sysstat's sadf -d: # hostname;interval;timestamp;...
    if sections:
        header = [header[0].lstrip("#").strip(), *header[1:]]
    dup = [name for name, n in Counter(h for h in header if h.strip()).items() if n > 1]  # unnamed: without_unnamed
    if dup:
        raise InputError(f"{path}: the header names column(s) {dup[:10]} more than once; each metric needs "
                         f"one column")
    comma = sep != "," and any(looks_decimal_comma(v) for row in rows for v in row.rstrip("\r\n").split(sep))
    return CsvDialect(sep, "," if comma else ".", blanks, tuple(header), sections)


def looks_decimal_comma(value: str) -> bool:
    """``21,5``: a number written with a decimal comma."""
    return bool(_DECIMAL_COMMA.fullmatch(value.strip().strip('"')))


def without_unnamed(df: pd.DataFrame, how: CsvDialect, path: Path) -> pd.DataFrame:
    """``df`` without the columns its CSV header leaves unnamed (a separator at the end of every line
    makes one, which pandas calls ``Unnamed: k``): dropped when empty, an error when they hold values."""
    unnamed = [k for k, name in enumerate(how.header) if not name.strip() and k < len(df.columns)]
    if not unnamed:
        return df
    filled = [k for k in unnamed if df.iloc[:, k].notna().any()]
    if filled:
        raise InputError(f"{path}: column {filled[0] + 1} holds values but has no name in the header line; "
                         f"name it (or remove it)")
    return df.drop(columns=[df.columns[k] for k in unnamed])


def cut_last_row(path: Path, sep: str, fields: int) -> str | None:
    """Why a plain CSV's last line is a row cut short (or None): no line end after it and fewer than
    ``fields`` fields. A file still being written looks so (an LDMS store's current file, an export
    read while it is copied): pandas would fill the missing fields in as missing values and read
    the last one it has, perhaps cut mid-number (``1234.5`` as ``12``), as it stands. Only the file's
    last ``TAIL_BYTES`` are read; a gzip file cut short fails to decompress instead."""
    if path.name.lower().endswith(".gz"):
        return None
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - TAIL_BYTES))
        return cut_reason(f.read(), path, sep, fields)


def cut_reason(tail: bytes, path: Path, sep: str, fields: int) -> str | None:
    """``cut_last_row`` on the file's last ``TAIL_BYTES`` (``tail``)."""
    end = max(tail.rfind(b"\n"), tail.rfind(b"\r"))
    if end < 0 or end == len(tail) - 1:  # ends with a line end; or one line (the header), or a longer one
        return None
    line = tail[end + 1:].decode("utf-8", errors="replace")
    if not line.strip() or line.startswith("#"):  # no row (pandas skips it), or an LDMS header being written
        return None
    got = len(next(csv.reader([line], delimiter=sep), []))
    if got >= fields:
        return None
    return (f"{path}: the last line has {got} of {fields} fields and no line end (the file was still being "
            f"written?): that row is left out")


def without_cut_row(chunks: Iterable[pd.DataFrame], why: str | None) -> Iterator[pd.DataFrame]:
    """``chunks`` as they come; with ``why`` (``cut_last_row``), without the last chunk's last row,
    logged. Holds one chunk back only then."""
    if why is None:
        yield from chunks
        return
    held = None
    for chunk in chunks:
        if held is not None:
            yield held
        held = chunk
    log.warning(why)
    if held is not None:
        yield held.iloc[:-1]


BOM = b"\xef\xbb\xbf"


def skipped_lines(mm: mmap.mmap) -> tuple[list[int], list[int]]:
    """The line numbers (0 = the header) of the lines after the first that repeat it byte for byte
    (files joined with ``cat``: ``cat day*.csv > node.csv``, each with its header line), and of those
    that start with ``#`` (an exporter's comment, e.g. ``# exported by ... at ...`` at the end), in
    the plain CSV mapped in ``mm`` (one search of the file, in place). pandas reads either as a row
    of text: every metric column turned non-numeric ("if 'cmbw_p0_0' names the nodes..."), or the
    comment was taken for a timestamp. The readers skip them."""
    end = mm.find(b"\n")
    if end < 0:
        return [], []
    header = mm[:end].removeprefix(BOM).rstrip(b"\r")
    if not header:
        return [], []
    repeats = []  # the newlines before them
    for needle in (b"\n" + header, b"\n" + BOM + header):
        at = mm.find(needle, end)
        while at >= 0:
            after = at + len(needle)
            if after == len(mm) or mm[after:after + 1] in (b"\n", b"\r"):
                repeats.append(at)
            at = mm.find(needle, after)
    comments, at = [], mm.find(b"#", end)  # one byte: memchr's speed ("\n#" is searched 4x slower)
    while at >= 0:
        if mm[at - 1:at] == b"\n":
            comments.append(at - 1)
        at = mm.find(b"#", at + 1)
    return _line_numbers(mm, sorted(repeats)), _line_numbers(mm, comments)


def _line_numbers(mm: mmap.mmap, newlines: list[int]) -> list[int]:
    """The 0-based line numbers of the lines that start after the newlines at ``newlines`` (sorted)."""
    out, line, pos = [], 0, 0
    for at in newlines:
        line += mm[pos:at + 1].count(b"\n")
        pos = at + 1
        out.append(line)
    return out


def csv_options(path: Path, how: CsvDialect) -> tuple[dict, str | None]:
    """pandas.read_csv's options for the CSV ``path``: its dialect's (``how``) and the lines that
    repeat its header or are comments, to skip (``skipped_lines``; logged); and whether its last row
    is cut short (``cut_last_row``), for ``without_cut_row``. One open of the file, mapped in place
    (a gzip file: neither)."""
    kw, repeats, comments, cut = how.read_csv_kw(), [], [], None
    if not path.name.lower().endswith(".gz") and path.stat().st_size > 0:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            repeats, comments = skipped_lines(mm)
            cut = cut_reason(mm[-TAIL_BYTES:], path, how.sep, len(how.header))
    if repeats:
        log.info("%s: skipped %d line(s) repeating the header line (files joined with cat?), the first at line %d",
                 path, len(repeats), repeats[0] + 1)
    if comments:
        log.info("%s: skipped %d comment line(s) (starting with #), the first at line %d", path, len(comments),
                 comments[0] + 1)
    if repeats or comments:
        kw["skiprows"] = sorted(set(repeats + comments))
    return kw, cut


def read_table(path: Path, as_text: bool = False) -> pd.DataFrame:
    """``path`` whole; ``as_text``: a CSV's cells as text (no type guessing: ``007`` stays ``007``)."""
    import pandas as pd

    if is_parquet(path):
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types; name the file either way
            raise InputError(f"{path}: cannot read table: {exc}") from exc
    how = dialect(path)
    if how.sections:
        from hpcad.data import sections

        return sections.read(path, how, as_text=as_text)
    try:
        kw, cut = csv_options(path, how)
        df = pd.read_csv(path, **kw, **({"dtype": str} if as_text else {}))
    except Exception as exc:  # pandas raises many types; name the file either way
        raise InputError(f"{path}: cannot read table: {exc}") from exc
    return without_unnamed(next(without_cut_row([df], cut)), how, path)


def read_node_map(path: Path, column: str, option: str, about: str = "") -> dict[str, str]:
    """A table of the columns ``node`` and ``column`` as node -> value (``data.node_names``,
    ``nightly.groups``); a missing column, an empty cell and a node given two values are errors
    naming the file, ``option`` (with ``about``, what the columns hold) and the line."""
    df = read_table(path, as_text=True)  # names such as 007 keep their zeros
    cols = {str(c).strip().lower(): c for c in df.columns}
    if "node" not in cols or column not in cols:
        raise InputError(f"{path}: {option} needs the columns node and {column}{about}; it has {list(df.columns)}")
    out: dict[str, str] = {}
    for line, (node, value) in enumerate(zip(df[cols["node"]], df[cols[column]]), start=2):
        node, value = str(node).strip(), str(value).strip()
        if not node or not value or node == "nan" or value == "nan":
            raise InputError(f"{path}: line {line}: an empty node or {column}")
        if out.get(node, value) != value:
            raise InputError(f"{path}: line {line}: node {node!r} has the {column} {out[node]!r} on an earlier line "
                             f"and {value!r} here")
        out[node] = value
    return out


def iter_table_chunks(path: Path, rows: int = CHUNK_ROWS, text: tuple[str, ...] = ()) -> Iterator[pd.DataFrame]:
    """``path`` in chunks of ``rows`` rows; a CSV's ``text`` columns read as text (node names such as
    ``007`` keep their zeros; pandas' type guessing made them the number 7)."""
    import pandas as pd

    try:
        if is_parquet(path):
            import pyarrow.parquet as pq

            f = pq.ParquetFile(path)
            for group in range(f.metadata.num_row_groups):  # one iterator per row group: pyarrow's
                for batch in f.iter_batches(batch_size=rows, row_groups=[group]):  # across groups grows
                    yield batch.to_pandas()
        elif (how := dialect(path)).sections:  # read whole: its reports are joined by sample
            from hpcad.data import sections

            yield sections.read(path, how, text)
        else:
            kw = {"dtype": {c: str for c in text}} if text else {}
            options, cut = csv_options(path, how)
            for chunk in without_cut_row(pd.read_csv(path, chunksize=rows, **options, **kw), cut):
                yield without_unnamed(chunk, how, path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read table: {exc}") from exc


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
