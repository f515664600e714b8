"""Turn timestamp columns of any export into int64 epoch seconds (UTC), with one documented policy.

- numbers are epoch time in ``data.epoch_unit`` (s, ms, us or ns);
- ISO strings or datetimes with a zone or offset are converted to UTC (offsets may differ row to
  row, e.g. across a daylight-saving change);
- naive strings/datetimes are wall-clock time in ``data.timezone`` (default UTC); the repeated hour
  of a daylight-saving fall-back is resolved by row order, and if that is impossible it is an error;
- a column that mixes naive and zoned values is an error (which zone the naive ones are in is a
  guess hpcad does not make);
- dates written with the day and month before the year (``06/01/2025``, ``06.01.2025``) are read
  day first or month first as ``data.dayfirst`` says, or, where it is unset, as a day above 12 in
  the column shows; a column that shows neither is an error (pandas alone would read 06/01 as June
  and 13/01 as January 13: wrong dates, or "not increasing" errors).
"""
from __future__ import annotations

from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from hpcad.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd

EPOCH_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# a time of day ending with a zone: Z, +01:00, +0100, PostgreSQL's +01 (psql prints timestamptz so),
# or UTC/GMT; not a date alone (2025-01-06 ends with -06 too)
_ZONED = r"\d:\d\d(?::\d\d(?:[.,]\d+)?)?\s*(?:Z|[+-]\d\d(?::?\d\d)?|UTC|GMT)$"
_DAY_MONTH = r"^(\d{1,2})[/.-](\d{1,2})[/.-]\d{2,4}\b"  # 06/01/2025: day and month before the year


def to_epoch_seconds(col: pd.Series, where: str, name: str, timezone: str = "UTC",
                     epoch_unit: str = "s", fractional: bool = False, dayfirst: bool | None = None) -> np.ndarray:
    """Epoch seconds of a timestamp column (float64 if ``fractional``, else floored int64)."""
    import pandas as pd

    if epoch_unit not in EPOCH_UNITS:
        raise InputError(f"data.epoch_unit={epoch_unit!r}: one of {sorted(EPOCH_UNITS)}")
    empty = col.isna().to_numpy()
    if empty.any():  # the first one's data row: the file's, also in a chunk of it (pandas numbers on)
        at = col.index[int(np.flatnonzero(empty)[0])]
        first = f" (the first: data row {at + 1})" if isinstance(at, (int, np.integer)) else ""
        raise InputError(f"{where}: column {name!r} has {int(empty.sum())} empty timestamp(s){first}: empty, NA or "
                         f"N/A; fill them in or drop those rows")
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        raw = col.to_numpy(dtype=np.float64)
        secs = raw / EPOCH_UNITS[epoch_unit]
        _check_epoch_range(raw, secs, epoch_unit, where, name)
        return secs if fractional else np.floor(secs).astype(np.int64)
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = col if getattr(col.dt, "tz", None) is not None else _localize(col, timezone, where, name)
    else:
        text = col.astype(str).str.strip()
        zoned = text.str.contains(_ZONED, regex=True)
        if zoned.any() and not zoned.all():
            _no_time(text[~zoned], where, name)  # 'yesterday' is no time without a zone, but no time at all
            i, j = int(np.flatnonzero(zoned.to_numpy())[0]), int(np.flatnonzero(~zoned.to_numpy())[0])
            raise InputError(f"{where}: column {name!r} mixes timestamps with a time zone ({text.iloc[i]!r}) "
                             f"and without one ({text.iloc[j]!r}); export one or the other")
        first = _day_first(text, dayfirst, where, name)
        try:
            if zoned.all():
                ts = pd.to_datetime(text, utc=True, format="mixed", dayfirst=first)
            else:
                ts = _localize(pd.to_datetime(text, format="mixed", dayfirst=first), timezone, where, name)
        except (ValueError, TypeError) as exc:
            _no_time(text, where, name)
            raise InputError(f"{where}: column {name!r} is neither ISO time nor epoch seconds: {exc}") from exc
    ns = ts.dt.tz_convert("UTC").dt.as_unit("ns").astype("int64").to_numpy()  # pandas may parse to s/us
    secs = ns / 1e9
    return secs if fractional else ns // 1_000_000_000


LATEST_EPOCH_S = 1e10  # 2286-11-20: epoch seconds beyond it are another unit read as seconds


def _check_epoch_range(raw: np.ndarray, secs: np.ndarray, unit: str, where: str, name: str) -> None:
    """Epoch times read in the wrong unit (milliseconds as seconds: the year 56985) stop here, with
    the unit that fits, instead of as a crash where a later stage formats a date."""
    top = float(np.max(np.abs(secs))) if secs.size else 0.0
    if not top >= LATEST_EPOCH_S:
        return
    fits = [u for u, f in EPOCH_UNITS.items() if f > EPOCH_UNITS[unit] and top * EPOCH_UNITS[unit] / f < LATEST_EPOCH_S]
    hint = f"set data.epoch_unit={fits[0]}" if fits else "export epoch seconds (or ms, us, ns with data.epoch_unit)"
    at = int(np.flatnonzero(np.abs(secs) >= LATEST_EPOCH_S)[0])
    raise InputError(f"{where}: column {name!r} holds epoch time {raw[at]:.0f} (row {at}), which is after the "
                     f"year 2286 in data.epoch_unit={unit}: {hint}")


def _no_time(text: pd.Series, where: str, name: str) -> None:
    """The first of ``text`` that is no time at all, named with its data row (an error path only: a
    second parse of the column)."""
    import warnings

    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = pd.to_datetime(text, errors="coerce", utc=True, format="mixed").isna().to_numpy()
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        at = text.index[k]
        row = f" (data row {at + 1})" if isinstance(at, (int, np.integer)) else ""
        raise InputError(f"{where}: column {name!r} holds {text.iloc[k]!r}{row}, which is no time; fix the export "
                         f"or drop that row")


def zone(name: str, option: str) -> ZoneInfo:
    """The time zone ``name``, or a ``ConfigError`` naming ``option`` (``data.timezone``,
    ``report.timezone``, ``nightly.timezone``)."""
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"{option}={name!r}: not a time zone name (e.g. Europe/Rome)") from exc


def _localize(ts: pd.Series, timezone: str, where: str, name: str) -> pd.Series:
    if timezone.upper() == "UTC":
        return ts.dt.tz_localize("UTC")
    try:
        return ts.dt.tz_localize(timezone, ambiguous="infer", nonexistent="raise")
    except Exception as exc:  # pytz/zoneinfo raise several types for ambiguous/non-existent times
        raise InputError(f"{where}: column {name!r}: naive times in data.timezone={timezone!r} cannot be "
                         f"placed unambiguously ({exc}); export UTC or ISO times with an offset") from exc


def _day_first(text: pd.Series, dayfirst: bool | None, where: str, name: str) -> bool:
    """Whether dates written day and month before the year put the day first: ``dayfirst`` where
    set, else what a number above 12 in the first or second place shows (False for ISO dates)."""
    hit = text.str.match(_DAY_MONTH)  # a tenth of the time extract() takes on ISO columns, the usual ones
    if not hit.any():
        return False
    if dayfirst is not None:
        return bool(dayfirst)
    dated = text[hit]
    parts = dated.str.extract(_DAY_MONTH)
    big = [parts[k].astype(int).gt(12).to_numpy() for k in (0, 1)]
    if big[0].any() and big[1].any():
        a, b = (dated[big[k]].iloc[0] for k in (0, 1))
        raise InputError(f"{where}: column {name!r} writes dates both day first ({a!r}) and month first ({b!r})")
    if not big[0].any() and not big[1].any():
        raise InputError(f"{where}: column {name!r} writes dates with the day and month before the year "
                         f"({text.iloc[0]!r}) and no day above 12 shows which comes first: set data.dayfirst=true "
                         f"(dd/mm/yyyy) or data.dayfirst=false (mm/dd/yyyy), or export ISO 8601 times")
    return bool(big[0].any())
