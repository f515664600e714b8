"""Scheduling the nightly job: which days, one run at a time (a lock), each night built in a scratch
folder and published by rename, the history of runs, and pruning old nights' bulky files."""
from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.atomic import atomic_path
from hpcad.data.paths import source_exists
from hpcad.errors import ConfigError, HpcadError, InputError, OutputError
from hpcad.model.light import LIGHT_FOLDER, STAGED, publish_staged
from hpcad.nightly.days import input_for, missed_nights, parse_days, published_nights
from hpcad.nightly.night import build_night
from hpcad.nightly.outlets import announce
from hpcad.runfolder import exclusive_lock

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig, NightlyConfig

log = logging.getLogger(__name__)
HISTORY_FIELDS = ["run_at", "date", "status", "nodes", "alarms", "new_incidents", "drifted", "light_refits", "notify",
                  "seconds", "message"]


def run_nightly(cfg: HpcadConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Score the days of ``nightly.date`` one after the other under the output folder's lock. In a
    backfill, a night whose input is missing or bad (``InputError``: a collector outage, a partial
    export) is recorded as failed and the later nights are still scored; the run then ends with an
    error naming the failed nights. Any other error (the options, a full disk) stops it there."""
    n = cfg.nightly
    for opt in ("input", "out"):
        if not getattr(n, opt):
            raise ConfigError(f"nightly.{opt} is required (see jobs/nightly.env.example)")
    if not cfg.train_run:
        raise ConfigError("train_run is required: the run folder whose models and thresholds score the nights")
    train_run = Path(cfg.train_run).expanduser().resolve()
    for need in ("models", "thresholds.json"):
        if not (train_run / need).exists():
            raise ConfigError(f"train_run={train_run}: no {need} (train and threshold that run first)")
    if n.keep_data_days < max(n.light_days, 1):
        raise ConfigError(f"nightly.keep_data_days={n.keep_data_days} < nightly.light_days={n.light_days}: light "
                          f"retraining reads the telemetry of its last nights")
    days = parse_days(n.date, n.timezone)
    out = Path(n.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    with exclusive_lock(out / ".nightly.lock", "hpcad nightly", others="another nightly run"):
        for stale in out.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a crashed run's leftovers (we hold the lock)
        if n.date in (None, "", "yesterday"):
            days = _catch_up(out, days[0], n) + days
        for i, day in enumerate(days):
            t0 = time.time()
            try:
                res = _one_night(cfg, day, out, train_run, overrides or [])
            except HpcadError as exc:
                try:
                    history(out, day, "failed", {"message": str(exc)}, t0)
                except OutputError as full:  # e.g. the same full file system: the night's own error comes first
                    log.warning("nightly %s: not recorded in history.csv: %s", day, full)
                    raise exc from None
                if not isinstance(exc, InputError) or len(days) == 1:
                    raise
                log.error("%s; going on with the %d later night(s)", exc, len(days) - i - 1)
                failed.append(str(exc))
                continue
            history(out, day, "ok", res, t0)
            took = ", ".join(f"{phase} {s:.0f} s" for phase, s in res["seconds_by_phase"].items())
            log.info("nightly %s: %d nodes, %d alarms, %d drifted, %d light refits -> %s (%.0f s: %s)", day,
                     res["nodes"], res["alarms"], res["drifted"], res["light_refits"], out / day.isoformat(),
                     time.time() - t0, took)
            results.append(res)
    if failed:
        raise InputError(f"{len(failed)} of {len(days)} nights failed (the other {len(results)} were scored; "
                         f"history.csv): {'; '.join(failed[:5])}" + ("; ..." if len(failed) > 5 else ""))
    return {"days": results, "out": str(out)}


def _catch_up(out: Path, last: dt.date, n: NightlyConfig) -> list[dt.date]:
    """The nights before ``last`` (cron's yesterday) to score first: those of the last
    ``nightly.catch_up_days`` that this output has not published and whose exports are there now,
    oldest first (the lock is held: no other run publishes). Missed nights without exports are
    named (their data is lost, or not there yet), older ones with exports with the backfill command
    that scores them."""
    window = n.catch_up_days
    if window < 0:
        raise ConfigError(f"nightly.catch_up_days={window}: a number of days, 0 or more (0: yesterday only)")
    missed, older = missed_nights(out, last, window)
    missed_in, lost = [], []
    for d in missed:
        (missed_in if source_exists(input_for(n.input, d)) else lost).append(d)
    if missed_in:
        log.info("nightly: catching up %d night(s) before %s not published (cron did not run, or the night failed): "
                 "%s", len(missed_in), last, ", ".join(d.isoformat() for d in missed_in))
    if lost:
        log.warning("nightly: %d night(s) of the last %d days not published and without exports at nightly.input: %s",
                    len(lost), window, ", ".join(d.isoformat() for d in lost))
    older = [d for d in older if source_exists(input_for(n.input, d))]
    if older:
        log.warning("nightly: %d older night(s) from %s to %s not published, beyond nightly.catch_up_days=%d, have "
                    "exports: score them with nightly_rescore.sh --from %s --to %s", len(older), older[0], older[-1],
                    window, older[0], older[-1])
    return missed_in


def _one_night(cfg: HpcadConfig, day: dt.date, out: Path, train_run: Path, overrides: list[str]) -> dict:
    """Build the night in a scratch folder, publish it whole, prune old nights, then hand it to the
    site's tools."""
    n = cfg.nightly
    src = input_for(n.input, day)
    if not source_exists(src):
        raise InputError(f"nightly {day.isoformat()}: no exports at {src} (nightly.input={n.input!r}); nothing changed")
    tmp = scratch(out, day)
    try:
        built = build_night(cfg, day, src, out, tmp, train_run, overrides)
        publish_staged(tmp / STAGED, out / LIGHT_FOLDER)  # tonight's light maps, then the night itself
        publish(tmp, out / day.isoformat())
        prune(out, day, n.keep_data_days)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return announce(n, out, day, built)


def scratch(out: Path, day: dt.date) -> Path:
    """A fresh hidden folder in which the night is built (removed by the next run if left behind)."""
    tmp = out / f".{day.isoformat()}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` (two renames; the lock keeps other nightly runs out)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(out: Path, day: dt.date, keep_days: int) -> None:
    """Drop the bulky telemetry and error files of nights older than ``keep_days`` before ``day``;
    what people read (alarms, report, drift, history) stays."""
    cutoff = (day - dt.timedelta(days=keep_days)).isoformat()
    for name in published_nights(out, before=cutoff):
        for f in (*(out / name).glob("store.h5"), *(out / name).glob("errors*.h5")):
            f.unlink()


def history(out: Path, day: dt.date, status: str, res: dict, t0: float) -> None:
    """Add a line for this run of ``day`` to ``<out>/history.csv`` (rewritten atomically)."""
    path = out / "history.csv"
    rows = list(csv.DictReader(open(path))) if path.exists() else []
    rows.append({"run_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "date": day.isoformat(),
                 "status": status, "nodes": res.get("nodes", ""), "alarms": res.get("alarms", ""),
                 "new_incidents": res.get("new_incidents", ""), "drifted": res.get("drifted", ""),
                 "light_refits": res.get("light_refits", ""), "notify": res.get("notify", ""),
                 "seconds": round(time.time() - t0, 1), "message": res.get("message", "")})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows(rows)
