"""What a CSV's lines hold besides rows of its header's fields, found in one pass over its bytes
(plain or gzip'd): lines repeating the header (files joined with ``cat``), comment lines, rows cut
short inside it, and its last line when that has no line end. hpcad/data/tables.py skips them
(docs/data.md, "Bad input")."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcad.data.csvtext import CsvDialect

log = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
SCAN_BYTES = 1 << 24  # how much of a CSV ``scan_lines`` looks at once


@dataclass
class LineScan:
    """What a CSV's lines hold besides rows of its header's fields, as line numbers (0 = the header)."""

    repeats: list[int]  # lines repeating the header byte for byte (files joined with cat)
    comments: list[int]  # lines starting with ``#``
    short: list[int]  # rows cut short inside the file (``scan_lines``)
    tail: bytes  # the file's last line when it has no line end (b"" when it has one), for ``cut_reason``
    nul: int = 0  # NUL bytes (a crash while the file was written: blocks left zeroed)
    first_nul: int = -1  # the line holding the first of them
    # rows a stretch of NUL bytes cut into (a NUL after their first byte)
    damaged: list[int] = field(default_factory=list)


def scan_lines(blocks: Iterable[bytes], sep: str, fields: int, named: int, header: bytes | None = None) -> LineScan:
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

    NUL bytes are counted (``nul``, ``first_nul``): they are what a file system leaves in blocks a
    crash did not finish writing (ext4 after a power loss). A row with NUL bytes after its first
    byte (``damaged``) is a row's beginning joined to a later row's end: pandas keeps the NUL bytes in
    the value they fall in, which is then no number, and the whole column was refused ("non-numeric
    metric columns": the file lost for a few rows); such rows are left out. NUL bytes at a line's
    start only (whole rows zeroed, the stretch ending where a row starts) leave that row as it was
    written (its timestamp is read past them), or the end of one, which is short.

    The header (``header``, else the first line: an LDMS store's may be in a side file) has ``fields``
    fields. A block of lines whose separators are as many as its lines
    hold is passed over after two counts (numpy); the others are looked at line by line."""
    import numpy as np

    scan, carry, line0 = LineScan([], [], [], b""), b"", 0
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
    elif line0 and carry.startswith(b"#"):  # a comment last, no line end (``# exported by ...``)
        scan.comments.append(line0)
    elif carry.strip():
        scan.tail = (b"\n" if line0 else b"") + carry
    if b"\0" in carry:  # a zeroed end without a line end
        scan.first_nul = line0 if scan.nul == 0 else scan.first_nul
        scan.nul += carry.count(b"\0")
    scan.repeats.sort()
    return scan


def _scan_block(block: bytes, arr, line0: int, header: bytes, fields: int, want: int, mark: int,
                scan: LineScan) -> int:
    """``scan_lines`` on ``block`` (whole lines, its first the file's line ``line0``); returns its lines."""
    import numpy as np

    lines = int(np.count_nonzero(arr == 10))
    ends = None

    def line_ends() -> np.ndarray:  # where the block's lines end, found once if needed
        nonlocal ends
        if ends is None:
            ends = np.flatnonzero(arr == 10)
        return ends

    def line_of(at: int) -> int:  # the line holding byte ``at``
        return line0 + int(np.searchsorted(line_ends(), at))

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
    if block.find(b"\0") >= 0:  # memchr first: a file without NUL bytes pays no array compare
        zeros = arr == 0
        nul = int(np.count_nonzero(zeros))
        if scan.nul == 0:
            scan.first_nul = line_of(int(np.argmax(zeros)))
        scan.nul += nul
        ends = line_ends()
        for k in np.unique(np.searchsorted(ends, np.flatnonzero(zeros))).tolist():
            text = block[ends[k - 1] + 1 if k else 0:ends[k]]
            if b"\0" in text.lstrip(b"\0") and line0 + k > 0:
                scan.damaged.append(line0 + k)
    if want >= 1 and int(np.count_nonzero(arr == mark)) != lines * (fields - 1):
        ends = line_ends()
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


def scan_file(path: Path, sep: str, fields: int, named: int, header: bytes | None = None) -> LineScan:
    """``scan_lines`` over the CSV ``path``, plain or gzip (decompressed once more for it)."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        return scan_lines(iter(lambda: fh.read(SCAN_BYTES), b""), sep, fields, named, header)


def rows_cut_short(path: Path, scan: LineScan, named: int) -> list[int]:
    """The rows to leave out as cut (``scan.short`` and ``scan.damaged``), each kind logged as a
    warning naming the file, the count and the first one's line."""
    if scan.nul:
        log.warning("%s: %d NUL byte(s), the first on line %d (a crash while the file was written leaves blocks "
                    "zeroed): left out %d row(s) they cut into; rows they replaced whole are missing", path, scan.nul,
                    scan.first_nul + 1, len(scan.damaged))
    if scan.short:
        log.warning("%s: left out %d row(s) with fewer than the %d fields the header names, the first at line %d (a "
                    "writer that stopped mid-row and went on?): the last value such a row has may be cut mid-number",
                    path, len(scan.short), named, scan.short[0] + 1)
    return sorted(set(scan.short) | set(scan.damaged))
