"""A CSV export's text: opened as UTF-8 (a byte-order mark dropped), its dialect (separator, decimal
mark, blanks, header names) from its first lines, and whether its last row is cut short (a file still
being written)."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from hpcad.errors import InputError

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


def cut_reason(tail: bytes, path: Path, sep: str, fields: int) -> str | None:
    """Why a CSV's last line (in ``tail``, its last bytes: ``LineScan.tail``) is a row cut short, or
    None: no line end after it and fewer than ``fields`` fields. A file still being written looks so
    (an LDMS store's current file, an export read while it is copied, or compressed): pandas would
    fill the missing fields in as missing values and read the last one it has, perhaps cut
    mid-number (``1234.5`` as ``12``), as it stands."""
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
