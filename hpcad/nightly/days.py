"""The nights the nightly job scores: which days, their input paths and their bounds in the site's zone."""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from zoneinfo import ZoneInfo

from hpcad.data.timestamps import zone
from hpcad.errors import ConfigError

NIGHT_DIR = re.compile(r"\d{4}-\d{2}-\d{2}")  # published night folders (not .<date>.tmp-<pid>)


def published_nights(out: Path, before: str | None = None, since: str = "", holding: str | None = None) -> list[str]:
    """The published nights under the nightly output ``out`` (its YYYY-MM-DD folders, not a night's
    scratch folder), oldest first: from ``since`` and before ``before``; with ``holding``, only those
    that hold that file."""
    return sorted(p.name for p in Path(out).iterdir()
                  if p.is_dir() and NIGHT_DIR.fullmatch(p.name) and since <= p.name
                  and (before is None or p.name < before) and (holding is None or (p / holding).exists()))


def parse_days(spec: str | None, timezone: str) -> list[dt.date]:
    """``None`` (yesterday in the site's zone), ``YYYY-MM-DD`` or ``FROM..TO`` (inclusive)."""
    tz = zone(timezone, "nightly.timezone")
    if spec in (None, "", "yesterday"):
        return [yesterday(tz)]
    try:
        a, _, b = str(spec).partition("..")
        first = dt.date.fromisoformat(a.strip())
        last = dt.date.fromisoformat(b.strip()) if b else first
    except ValueError as exc:
        raise ConfigError(f"nightly.date={spec!r}: YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD") from exc
    if last < first:
        raise ConfigError(f"nightly.date={spec!r}: the range ends before it starts")
    return [first + dt.timedelta(days=k) for k in range((last - first).days + 1)]


def yesterday(tz: ZoneInfo) -> dt.date:
    """The day before today in the site's zone (the night cron scores)."""
    return dt.datetime.now(tz).date() - dt.timedelta(days=1)


def missed_nights(out: Path, last: dt.date, window: int) -> tuple[list[dt.date], list[dt.date]]:
    """The nights before ``last`` that the nightly output ``out`` never published (cron did not run,
    or the night failed: exports late, a collector outage), counted from its first published night
    (a new output does not backfill): those of the ``window`` days before ``last``, oldest first,
    and the older ones."""
    done = set(published_nights(out)) if Path(out).is_dir() else set()
    if not done:
        return [], []
    first = dt.date.fromisoformat(min(done))
    gaps = [first + dt.timedelta(days=k) for k in range(1, (last - first).days)]
    gaps = [d for d in gaps if d.isoformat() not in done]
    start = last - dt.timedelta(days=max(window, 0))
    return [d for d in gaps if d >= start], [d for d in gaps if d < start]


def input_for(pattern: str, day: dt.date) -> Path:
    """``nightly.input``/``nightly.jobs`` for ``day``: ``{date}`` and strftime codes filled in."""
    text = pattern.replace("{date}", day.isoformat())
    if "%" in text:
        text = dt.datetime.combine(day, dt.time()).strftime(text)
    return Path(text).expanduser()


def day_bounds(day: dt.date, timezone: str) -> tuple[int, int]:
    """The day's first second and the next day's, as epoch seconds, in the site's time zone."""
    tz = ZoneInfo(timezone)
    start = dt.datetime.combine(day, dt.time(), tz)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tz)
    return int(start.timestamp()), int(end.timestamp())
