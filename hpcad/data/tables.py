"""Reading CSV/Parquet tables whole or in chunks, with errors that name the file; what export files
hold besides clean tables is left out here (a row cut short at a CSV's end or inside it, lines
repeating its header, comment lines; reports under header lines: hpcad/data/sections.py), and
said (docs/data.md). Which files a folder holds: hpcad/data/paths.py; a CSV's dialect:
hpcad/data/csvtext.py."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.data.csvtext import CsvDialect, cut_reason, dialect
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
    """``chunks`` as they come; with ``why`` (``cut_reason``), without the last chunk's last row,
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
SCAN_BYTES = 1 << 24  # how much of a CSV ``scan_lines`` looks at once


@dataclass
class LineScan:
    """What a CSV's lines hold besides rows of its header's fields, as line numbers (0 = the header)."""

    repeats: list[int]  # lines repeating the header byte for byte (files joined with cat)
    comments: list[int]  # lines starting with ``#``
    short: list[int]  # rows cut short inside the file (``scan_lines``)
    tail: bytes  # the file's last line when it has no line end (b"" when it has one), for ``cut_reason``


def scan_lines(blocks: Iterable[bytes], sep: str, fields: int, named: int) -> LineScan:
    """One pass over a CSV's bytes (``blocks``, as read: a plain file's or a gzip file's text) for
    the lines pandas would misread:

    - lines after the first that repeat it byte for byte (files joined with ``cat``: ``cat day*.csv >
      node.csv``, each with its header line; a byte-order mark or CRLF line end as the first has them)
      and lines that start with ``#`` (an exporter's comment, e.g. ``# exported by ... at ...``):
      pandas reads either as a row of text (every metric column turned non-numeric, or the comment
      taken for a timestamp);
    - rows with fewer than ``named`` fields (``named_fields``) and a line end, each between rows that
      have them: a row cut short where its writer stopped mid-row and the file went on after a line
      end. pandas fills the missing fields in as missing values and reads the last one there is,
      perhaps cut mid-number (``1234.5`` as ``12``), as it stands. Lines short one after the other
      are no cut rows but another table (a header of fewer columns joined on with ``cat``: the
      readers' errors say so); blank and comment lines are no rows, nor is a line with an odd count
      of quotes (part of a quoted value over several lines).

    The header has ``fields`` fields. A block of lines whose separators are as many as its lines
    hold is passed over after two counts (numpy); the others are looked at line by line."""
    import numpy as np

    scan, carry, line0, header = LineScan([], [], [], b""), b"", 0, None
    want, mark = named - 1, ord(sep)
    for chunk in blocks:
        data = carry + chunk
        end = data.rfind(b"\n")
        if end < 0:  # no whole line yet
            carry = data
            continue
        block, carry = data[:end + 1], data[end + 1:]
        if header is None:
            header = block[:block.find(b"\n")].removeprefix(BOM).rstrip(b"\r")
        lines = _scan_block(block, np.frombuffer(block, np.uint8), line0, header, fields, want, mark, scan)
        line0 += lines
    taken = set(scan.short)
    scan.short = [k for k in scan.short if k - 1 not in taken and k + 1 not in taken]
    if header and line0 and carry.removeprefix(BOM).rstrip(b"\r") == header:  # a header repeated last, no line end
        scan.repeats.append(line0)
    elif carry.strip():
        scan.tail = (b"\n" if line0 else b"") + carry
    scan.repeats.sort()
    return scan


def _scan_block(block: bytes, arr, line0: int, header: bytes, fields: int, want: int, mark: int,
                scan: LineScan) -> int:
    """``scan_lines`` on ``block`` (whole lines, its first the file's line ``line0``); returns its lines."""
    import numpy as np

    lines = int(np.count_nonzero(arr == 10))
    ends = None

    def line_of(at: int) -> int:  # the line holding byte ``at``
        nonlocal ends
        if ends is None:
            ends = np.flatnonzero(arr == 10)
        return line0 + int(np.searchsorted(ends, at))

    for needle in (header, BOM + header) if header else ():
        starts, at = [0] if block.startswith(needle) else [], block.find(b"\n" + needle)
        while at >= 0:
            starts.append(at + 1)
            at = block.find(b"\n" + needle, at + 1)
        for at in starts:
            after = at + len(needle)
            if block[after:after + 1] in (b"\n", b"\r") and (line := line_of(at)) > 0:
                scan.repeats.append(line)
    at = block.find(b"#")  # one byte: memchr's speed ("\n#" is searched 4x slower)
    while at >= 0:
        if (at == 0 or block[at - 1] == 10) and (line := line_of(at)) > 0:
            scan.comments.append(line)
        at = block.find(b"#", at + 1)
    if want >= 1 and int(np.count_nonzero(arr == mark)) != lines * (fields - 1):
        if ends is None:
            ends = np.flatnonzero(arr == 10)
        per_line = np.diff(np.searchsorted(np.flatnonzero(arr == mark), ends), prepend=0)
        for k in np.flatnonzero(per_line < want):
            text = block[ends[k - 1] + 1 if k else 0:ends[k]]
            if text.strip() and not text.startswith(b"#") and text.count(b'"') % 2 == 0 and line0 + k > 0:
                scan.short.append(line0 + int(k))
    return lines


def named_fields(how: CsvDialect) -> int:
    """How many fields a row needs to reach the header's last named column (a separator at the end
    of the header line only names no column)."""
    return max((k + 1 for k, name in enumerate(how.header) if name.strip()), default=0)


def scan_file(path: Path, sep: str, fields: int, named: int) -> LineScan:
    """``scan_lines`` over the CSV ``path``, plain or gzip (decompressed once more for it)."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        return scan_lines(iter(lambda: fh.read(SCAN_BYTES), b""), sep, fields, named)


def rows_cut_short(path: Path, scan: LineScan, named: int) -> list[int]:
    """``scan.short``, logged as a warning naming the file, their count and the first one's line."""
    if scan.short:
        log.warning("%s: left out %d row(s) with fewer than the %d fields the header names, the first at line %d (a "
                    "writer that stopped mid-row and went on?): the last value such a row has may be cut mid-number",
                    path, len(scan.short), named, scan.short[0] + 1)
    return scan.short


def csv_options(path: Path, how: CsvDialect) -> tuple[dict, str | None]:
    """pandas.read_csv's options for the CSV ``path`` (plain or gzip): its dialect's (``how``) and
    the lines to skip (``scan_lines``: lines repeating its header and comments, logged; rows cut
    short inside it, a warning); and whether its last row is cut short (``cut_reason``), for
    ``without_cut_row``."""
    kw = how.read_csv_kw()
    scan = scan_file(path, how.sep, len(how.header), named := named_fields(how))
    if scan.repeats:
        log.info("%s: skipped %d line(s) repeating the header line (files joined with cat?), the first at line %d",
                 path, len(scan.repeats), scan.repeats[0] + 1)
    if scan.comments:
        log.info("%s: skipped %d comment line(s) (starting with #), the first at line %d", path, len(scan.comments),
                 scan.comments[0] + 1)
    skip = sorted(set(scan.repeats + scan.comments + rows_cut_short(path, scan, named)))
    if skip:
        kw["skiprows"] = skip
    return kw, cut_reason(scan.tail, path, how.sep, len(how.header))


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
