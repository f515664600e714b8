"""What the nightly job hands to the site's tools after a night is published: the Prometheus
textfile (newest night only), the ``nightly.notify`` command (new incidents or a cluster-wide
event), drain commands."""
from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.atomic import write_json
from hpcad.nightly.drain import drain, drained_before, last_night
from hpcad.nightly.events import new_events
from hpcad.nightly.days import day_bounds, published_nights
from hpcad.nightly.prometheus import render, write_textfile

if TYPE_CHECKING:
    from hpcad.config import NightlyConfig

log = logging.getLogger(__name__)


def announce(n: NightlyConfig, out: Path, day: dt.date, built) -> dict:
    """Step 6, once the night is published: the Prometheus file, ``nightly.notify`` for new
    incidents or new cluster-wide events (not one continuing the night before's), drain commands run
    when ``nightly.drain``; returns the night's history fields."""
    iso = day.isoformat()
    fresh = [i for i in built.incidents if i["state"] == "new"]
    export_prometheus(n, out, day, built.levels, built.incidents, len(built.new), len(built.silent), built.events,
                      len(built.retired), built.input_warnings)
    notified = notify(n, out / iso, iso, fresh, built.events) if fresh or new_events(built.events) else ""
    if built.confirmed and n.drain and last_night(day, n.timezone):
        write_json(out / iso / "drain.json", drain(built.confirmed, n.drain_max_nodes,
                                                   before=drained_before(out, day, built.confirmed)))
    elif built.confirmed and n.drain:
        log.info("nightly %s: an older night (backfill or catch-up): its %d drain command(s) are in drain.txt, "
                 "not run (only last night's are)", iso, len(built.confirmed))
    return {"date": iso, "nodes": len(built.nodes), "alarms": len(built.records), "new_incidents": len(fresh),
            "drifted": len(built.drifted), "light_refits": len(built.refits), "notify": notified,
            "message": f"{built.src}", "seconds_by_phase": built.seconds}


def export_prometheus(n: NightlyConfig, out: Path, day: dt.date, levels: list[dict], incidents: list[dict],
                      unscored: int, silent: int = 0, events: list[dict] | None = None, retired: int = 0,
                      input_warnings: int = 0) -> None:
    """The textfile (``nightly.prometheus``, default ``<out>/hpcad.prom``) for the newest night only."""
    newest = max(published_nights(out), default="")
    if day.isoformat() < newest:
        log.info("nightly %s: not the newest night (%s); %s left as it is", day, newest, n.prometheus or "hpcad.prom")
        return
    path = Path(n.prometheus).expanduser() if n.prometheus else out / "hpcad.prom"
    write_textfile(path, render(levels, incidents, day_bounds(day, n.timezone)[0], unscored, silent=silent,
                                events=events, retired=retired, input_warnings=input_warnings))


def notify(n: NightlyConfig, night_dir: Path, iso: str, fresh: list[dict], events: list[dict] | None = None) -> str:
    """Run ``nightly.notify`` with the night's ``alarms.jsonl`` as its last argument (``HPCAD_NEW_INCIDENTS``,
    ``HPCAD_CLUSTER_EVENTS`` and ``HPCAD_NEW_CLUSTER_EVENTS``, those not continuing the night before's,
    count them; ``events.json`` beside it). Returns "ok", "failed" or "" (not configured); the outcome
    is kept in ``<night>/notify.json``."""
    events = events or []
    if not n.notify:
        return ""
    cmd = [*shlex.split(n.notify), str(night_dir / "alarms.jsonl")]
    new = len(new_events(events))
    env = dict(os.environ, HPCAD_NIGHT=iso, HPCAD_NIGHT_DIR=str(night_dir), HPCAD_NEW_INCIDENTS=str(len(fresh)),
               HPCAD_CLUSTER_EVENTS=str(len(events)), HPCAD_NEW_CLUSTER_EVENTS=str(new))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=n.notify_timeout_s)
        ok, detail = proc.returncode == 0, f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    write_json(night_dir / "notify.json", {"command": cmd, "ok": ok, "detail": detail, "new_incidents": len(fresh),
                                          "cluster_events": len(events), "new_cluster_events": new,
                                          "seconds": round(time.time() - t0, 2)})
    if ok:
        log.info("nightly %s: notified (%d new incidents, %d cluster-wide events): %s", iso, len(fresh), len(events),
                 " ".join(cmd))
    else:
        log.warning("nightly %s: nightly.notify failed (%s); the night's outputs are complete", iso, detail)
    return "ok" if ok else "failed"
