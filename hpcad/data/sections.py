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
comments, and sysstat's reboot marks (``LINUX-RESTART``) are left out, as is a last row cut short
(the file still being written). A report of several rows per sample (one per CPU: ``sadf -d -- -P
ALL``; per interface: ``-n DEV``; per disk: ``-d``) becomes one row per sample, its columns one per
device (``%user.cpu3``, ``rxkB/s.eth0``). The reports' rows are joined on the columns every report has
(host, interval, time), one row per sample.
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
SADF_KEYS = ("hostname", "interval", "timestamp")  # the columns sadf -d starts every report with: a sample


def header_names(line: str, sep: str) -> tuple[str, ...]:
    """A ``#`` line's fields as column names (``# hostname;interval`` -> ``hostname``, ``interval``)."""
    return tuple(name.strip() for name in line.rstrip("\r\n").lstrip("\ufeff").lstrip("#").split(sep))


def split(path: Path, sep: str) -> tuple[dict[tuple[str, ...], list[str]], int]:
    """The file's rows by the header above them (headers in first-seen order; a report repeated
    after a reboot joins its rows), and how many reboot marks were left out."""
    reports: dict[tuple[str, ...], list[str]] = {}
    header: tuple[str, ...] | None = None  # the one the rows belong to
    restarts, first = 0, None
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if line.startswith("#"):
                names = header_names(line, sep)
                first = first or names[0]
                if len(names) > 1 and names[0] == first:
                    header = names
                    reports.setdefault(header, [])
                continue  # another # line is a comment
            if RESTART in line:
                restarts += 1
            elif line.strip():
                if header is None:
                    raise InputError(f"{path}: line {number} holds values before any header line")
                reports[header].append(line)
    rows = reports[header] if header is not None else []
    if rows and not rows[-1].endswith(("\n", "\r")):  # the file still being written?
        why = cut_reason(("\n" + rows[-1]).encode(), path, sep, len(header))
        if why:
            log.warning("%s", why)
            rows.pop()
    return reports, restarts


def columns(path: Path, how: CsvDialect) -> list[str]:
    """The table's column names (``read``'s: a per-device report's columns per device, so the file is
    read; sadf's files are small)."""
    return list(read(path, how).columns)


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
        return pd.DataFrame(columns=list(dict.fromkeys(n for names in reports for n in names if n)))
    keys = _keys(frames)
    if not keys:
        if len(frames) == 1:
            return frames[0]
        raise InputError(f"{path}: its reports (header lines starting with #) share no column to join their rows on")
    frames = [_per_device(f, keys, path) if f.duplicated(keys).any() else f for f in frames]
    if len(frames) == 1:
        return frames[0]
    joined = pd.concat([f[keys] for f in frames]).drop_duplicates(keys)
    for f in frames:
        joined = joined.merge(f, on=keys, how="left")
    return joined.reset_index(drop=True)


def _keys(frames: list[pd.DataFrame]) -> list[str]:
    """The columns that name a sample: those every report has (several reports); sadf's own
    (``SADF_KEYS``) in a file of one report; else none."""
    if len(frames) > 1:
        return [c for c in frames[0].columns if all(c in f.columns for f in frames[1:])]
    return list(SADF_KEYS) if tuple(frames[0].columns[:len(SADF_KEYS)]) == SADF_KEYS else []


def _per_device(f: pd.DataFrame, keys: list[str], path: Path) -> pd.DataFrame:
    """A report of several rows per sample (one per CPU: ``sadf -d -- -P ALL``; per interface: ``-n DEV``;
    per disk: ``-d``) as one row per sample: the column after ``keys`` names the device, each other
    column becomes one per device, ``<column>.<device>`` (``%user.all``, ``%user.cpu3``, ``rxkB/s.eth0``;
    sadf's row of all CPUs, ``-1``, is ``all``). Rows in the order of their samples."""
    if len(f.columns) <= len(keys) + 1:
        raise InputError(f"{path}: the report of {list(f.columns[len(keys):])} has several rows per sample "
                         f"({keys}) and no column after its device column")
    device = f.columns[len(keys)]
    raw = f[device].astype(str).str.strip()
    ids = raw.where(raw != "-1", "all")
    if str(device).upper() == "CPU":
        ids = ids.where(ids == "all", "cpu" + ids)
    values = list(f.columns[len(keys) + 1:])
    try:
        wide = f.assign(_device=ids).set_index([*keys, "_device"])[values].unstack("_device")
    except ValueError as exc:  # the same device twice in one sample
        raise InputError(f"{path}: the report of {values[:3]} has a {device!r} repeated within one sample "
                         f"({exc})") from exc
    order = list(dict.fromkeys(ids))  # devices as the export lists them, not sorted as text (cpu10 after cpu9)
    wide = wide.reindex(columns=[(v, d) for v in values for d in order])
    wide.columns = [f"{v}.{d}" for v, d in wide.columns]
    return f[keys].drop_duplicates().merge(wide.reset_index(), on=keys, how="left")
