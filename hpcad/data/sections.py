"""CSV files of several reports, each under its own header line, as sysstat's ``sadf -d`` writes the
``sar`` data every Linux node keeps (``sadf -d /var/log/sa/sa04 -- -u -r -q``)::

    # hostname;interval;timestamp;CPU;%user;%nice;%system;%iowait;%steal;%idle
    cn01;600;2025-01-04 00:10:01 UTC;-1;1.02;0.00;0.36;0.02;0.00;98.60
    ...
    # hostname;interval;timestamp;kbmemfree;kbavail;kbmemused;%memused;...
    cn01;600;2025-01-04 00:10:01 UTC;22528336;23881008;129980;0.53;...
    cn01;-1;2025-01-04 07:12:44 UTC;LINUX-RESTART	(64 CPU)

A file whose first line starts with ``#`` is read here: that line and each ``#`` line that begins
with the same name are headers (their ``#`` is not part of the first name), other ``#`` lines are
comments, and
sysstat's reboot marks (``LINUX-RESTART``) are left out, as is a last row cut short (the file still
being written). The reports' rows are joined on the columns
every report has (host, interval, time), one row per sample; a report of several rows per sample
(per CPU or device: ``sadf -d -- -P ALL``, ``-n DEV``) is an error naming it, as joining would repeat
the other reports' values.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.data.csvtext import CsvDialect, cut_reason, open_text
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


log = logging.getLogger(__name__)
RESTART = "LINUX-RESTART"  # sysstat's mark of a reboot: host;-1;time;LINUX-RESTART\t(N CPU)


def header_names(line: str, sep: str) -> tuple[str, ...]:
    """A ``#`` line's fields as column names (``# hostname;interval`` -> ``hostname``, ``interval``)."""
    return tuple(name.strip() for name in line.rstrip("\r\n").lstrip("\ufeff").lstrip("#").split(sep))


def split(path: Path, sep: str) -> tuple[dict[tuple[str, ...], list[str]], int]:
    """The file's rows by the header above them (headers in first-seen order; a report repeated
    after a reboot joins its rows), and how many reboot marks were left out."""
    reports: dict[tuple[str, ...], list[str]] = {}
    rows: list[str] | None = None
    restarts, first = 0, None
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if line.startswith("#"):
                names = header_names(line, sep)
                first = first or names[0]
                if len(names) > 1 and names[0] == first:
                    rows = reports.setdefault(names, [])
                continue  # another # line is a comment
            if RESTART in line:
                restarts += 1
            elif line.strip():
                if rows is None:
                    raise InputError(f"{path}: line {number} holds values before any header line")
                rows.append(line)
    if rows and not rows[-1].endswith(("\n", "\r")):  # the file still being written?
        header = next(names for names, lines in reports.items() if lines is rows)
        why = cut_reason(("\n" + rows[-1]).encode(), path, sep, len(header))
        if why:
            log.warning("%s", why)
            rows.pop()
    return reports, restarts


def columns(path: Path, sep: str) -> list[str]:
    """Every report's column names, in first-seen order, each once."""
    return list(dict.fromkeys(name for names in headers(path, sep) for name in names if name))


def headers(path: Path, sep: str) -> list[tuple[str, ...]]:
    """The file's header lines' names (see the module), each once, in first-seen order."""
    found: dict[tuple[str, ...], None] = {}
    with open_text(path) as f:
        for line in f:
            if line.startswith("#"):
                names = header_names(line, sep)
                if not found or (len(names) > 1 and names[0] == next(iter(found))[0]):
                    found[names] = None
    return list(found)


def read(path: Path, how: CsvDialect, text: tuple[str, ...] = (), as_text: bool = False) -> pd.DataFrame:
    """The file as one table (see the module); ``text`` columns (or every one, ``as_text``) as text."""
    import pandas as pd

    reports, restarts = split(path, how.sep)
    frames = []
    for names, lines in reports.items():
        if not lines:
            continue
        dtype = str if as_text else {c: str for c in text if c in names}
        try:
            frames.append(pd.read_csv(io.StringIO("".join(lines)), sep=how.sep, names=list(names), header=None,
                                      decimal=how.decimal, skipinitialspace=how.blanks, dtype=dtype or None))
        except Exception as exc:  # pandas raises many types; name the file and the report
            raise InputError(f"{path}: cannot read the rows under the header {';'.join(names)[:120]!r}: {exc}") from exc
    if restarts:
        log.info("%s: left out %d reboot mark(s) (%s)", path, restarts, RESTART)
    if not frames:
        return pd.DataFrame(columns=columns(path, how.sep))
    if len(frames) == 1:
        return frames[0]
    keys = [c for c in frames[0].columns if all(c in f.columns for f in frames[1:])]
    if not keys:
        raise InputError(f"{path}: its reports (header lines starting with #) share no column to join their rows on")
    for f in frames:
        repeated = f.duplicated(keys)
        if repeated.any():
            first = f.columns[len(keys)] if len(f.columns) > len(keys) else f.columns[-1]
            raise InputError(f"{path}: the report of {list(f.columns[len(keys):len(keys) + 3])} has "
                             f"{int(repeated.sum())} row(s) repeating another's {keys} (one row per CPU or device, "
                             f"e.g. column {first!r}: sadf -P ALL, -n DEV, -d): export it to a file of its own "
                             f"or leave it out, as its rows cannot be joined with the other reports' samples")
    joined = pd.concat([f[keys] for f in frames]).drop_duplicates(keys)
    for f in frames:
        joined = joined.merge(f, on=keys, how="left")
    return joined.reset_index(drop=True)
