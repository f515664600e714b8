"""Reading CSV/Parquet tables whole or in chunks, with errors that name the file; what export files
hold besides clean tables is left out here (a row cut short at a CSV's end or inside it, lines
repeating its header, comment lines; reports under header lines: hpcad/data/sections.py), and
said (docs/data.md). Which files a folder holds: hpcad/data/paths.py; a CSV's dialect:
hpcad/data/csvtext.py."""
from __future__ import annotations

import logging
import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.data.csvtext import TAIL_BYTES, CsvDialect, cut_reason, dialect
from hpcad.data.paths import is_parquet
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
CHUNK_ROWS = 200_000


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

        return sections.columns(path, how)
    return [name for name in how.header if name.strip()]  # an unnamed column holds no metric


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


SCAN_BYTES = 1 << 24  # how much of a CSV ``short_rows`` counts at once


def named_fields(how: CsvDialect) -> int:
    """How many fields a row needs to reach the header's last named column (a separator at the end
    of the header line only names no column)."""
    return max((k + 1 for k, name in enumerate(how.header) if name.strip()), default=0)


def short_rows(mm: mmap.mmap, sep: str, fields: int, named: int) -> list[int]:
    """The line numbers (0 = the header, of ``fields`` fields) of the rows inside the plain CSV mapped
    in ``mm`` that have fewer than ``named`` fields (``named_fields``) and a line end, each between
    rows that have them: a row cut short where its writer stopped mid-row and the file went on after
    a line end. pandas fills the missing fields in as missing values and reads the last one there is,
    perhaps cut mid-number (``1234.5`` as ``12``), as it stands. Lines short one after the other are
    no cut rows but another table (a header of fewer columns joined on with ``cat``: the readers'
    errors say so). Blank and comment lines are no rows, nor is a line with an odd count of quotes
    (part of a quoted value over several lines); the last line without a line end is ``cut_reason``'s.
    Counted a block at a time; only a block with fewer or more separators than its lines hold is
    looked at line by line."""
    import numpy as np

    if named < 2:
        return []
    data, block, out, line0, start = np.frombuffer(mm, np.uint8), None, [], 0, 0
    want, mark = named - 1, ord(sep)
    try:
        while start < len(data):
            size = SCAN_BYTES
            while (end := mm.rfind(b"\n", start, start + size)) < 0 and start + size < len(data):
                size *= 2  # a block of whole lines (a line longer than a block: a larger block)
            if end < 0:  # the last line has no line end
                break
            block = data[start:end + 1]
            lines = int(np.count_nonzero(block == 10))
            if int(np.count_nonzero(block == mark)) != lines * (fields - 1):
                ends = np.flatnonzero(block == 10)
                per_line = np.diff(np.searchsorted(np.flatnonzero(block == mark), ends), prepend=0)
                for k in np.flatnonzero(per_line < want):
                    text = bytes(block[ends[k - 1] + 1 if k else 0:ends[k]])
                    if text.strip() and not text.startswith(b"#") and text.count(b'"') % 2 == 0:
                        out.append(line0 + int(k))
            line0, start = line0 + lines, end + 1
    finally:
        del data, block  # the map cannot close while numpy holds it
    taken = set(out)
    return [k for k in out if k - 1 not in taken and k + 1 not in taken]


def rows_cut_short(path: Path, sep: str, fields: int, named: int) -> list[int]:
    """``short_rows`` of the plain CSV ``path`` (a gzip file: none looked for), logged as a warning
    naming the file, their count and the first one's line."""
    if path.name.lower().endswith(".gz") or path.stat().st_size == 0:
        return []
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        short = short_rows(mm, sep, fields, named)
    if short:
        log.warning("%s: left out %d row(s) with fewer than the %d fields the header names, the first at line %d (a "
                    "writer that stopped mid-row and went on?): the last value such a row has may be cut mid-number",
                    path, len(short), named, short[0] + 1)
    return short


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
    repeat its header or are comments (``skipped_lines``; logged) and the rows inside it cut short
    (``rows_cut_short``; a warning), to skip; and whether its last row is cut short (``cut_last_row``),
    for ``without_cut_row``. The file is mapped in place (a gzip file: none of these)."""
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
    short = rows_cut_short(path, how.sep, len(how.header), named_fields(how))
    if repeats or comments or short:
        kw["skiprows"] = sorted(set(repeats + comments + short))
    return kw, cut


def unreadable(path: Path, exc: Exception) -> InputError:
    """The error for a table pandas or pyarrow could not read, naming the file; a CSV row with more
    fields than the header gets its likely cause."""
    hint = ""
    if "C error: Expected" in str(exc):  # pandas: "Expected 161 fields in line 102, saw 238"
        hint = (" (a row with more fields than the header: two rows run together where a writer stopped mid-row "
                "and went on without a line end, or a separator inside a value)")
    return InputError(f"{path}: cannot read table: {str(exc).strip()}{hint}")


def read_table(path: Path, as_text: bool = False) -> pd.DataFrame:
    """``path`` whole; ``as_text``: a CSV's cells as text (no type guessing: ``007`` stays ``007``)."""
    import pandas as pd

    if is_parquet(path):
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types; name the file either way
            raise unreadable(path, exc) from exc
    how = dialect(path)
    if how.sections:
        from hpcad.data import sections

        return sections.read(path, how, as_text=as_text)
    try:
        kw, cut = csv_options(path, how)
        df = pd.read_csv(path, **kw, **({"dtype": str} if as_text else {}))
    except Exception as exc:  # pandas raises many types; name the file either way
        raise unreadable(path, exc) from exc
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
        raise unreadable(path, exc) from exc
