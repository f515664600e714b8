"""SLURM action on confirmed incidents (opt-in): drain the node, with the incident as the reason.

An incident is *confirmed* when it has been open for ``nightly.drain_after_nights`` nights (default
2: one night's alarm alone never takes a node out). Every night writes the exact commands for its
confirmed incidents to ``<night>/drain.txt``; only with ``nightly.drain=true`` are they run, at most
``nightly.drain_max_nodes`` per night (the highest peaks first; the rest are recorded as not
drained), nodes SLURM already drains or holds down are left alone, and every outcome goes to
``<night>/drain.json``. hpcad node names must be SLURM's ``NodeName``s. Undo with
``scontrol update NodeName=<node> State=RESUME``: a node put back is not drained again for the same
incident (a person judged it), only for a new one. Only last night (or a later one) drains: a
backfill or a catch-up of older nights writes their commands but runs none, since SLURM acts on a
node as it is now, not as it was then.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import shlex
import subprocess
from pathlib import Path

from hpcad.incidents import OPEN
from hpcad.nightly.days import published_nights, yesterday

log = logging.getLogger(__name__)


def last_night(day: dt.date, timezone: str) -> bool:
    """Whether ``day`` is last night or later in the site's zone: the only nights whose drain commands
    run (``nightly.drain``; an older night's incidents may be over)."""
    from zoneinfo import ZoneInfo

    return day >= yesterday(ZoneInfo(timezone))


def reason(incident: dict) -> str:
    """SLURM's drain reason: short, no quotes, says who and why."""
    return (f"hpcad: {incident['cause']} anomaly since {incident['first_night']} "
            f"({incident['nights']} nights, incident {incident['id']})").replace('"', "'")


def command(incident: dict) -> list[str]:
    return ["scontrol", "update", f"NodeName={incident['node']}", "State=DRAIN", f"Reason={reason(incident)}"]


def candidates(incidents: list[dict], after_nights: int) -> list[dict]:
    """One confirmed incident per node (its highest peak), highest peaks first."""
    best: dict[str, dict] = {}
    for i in incidents:
        if i["state"] in OPEN and i["nights"] >= max(int(after_nights), 1):
            if i["node"] not in best or i["peak_score"] > best[i["node"]]["peak_score"]:
                best[i["node"]] = i
    return sorted(best.values(), key=lambda i: (-i["peak_score"], i["node"]))


def lines(incidents: list[dict]) -> str:
    """The commands, one per line, as a shell would take them (``drain.txt``)."""
    return "".join(shlex.join(command(i)) + "\n" for i in incidents)


def _node_state(node: str, env: dict | None) -> str:
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, env=env,
                         timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"scontrol show node {node}: exit {out.returncode}")
    return next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("State=")), "")


def drained_before(out: Path, day: dt.date, incidents: list[dict]) -> dict[str, str]:
    """The incidents among ``incidents`` that an earlier night drained its node for: id -> that night
    (``<out>/<night>/drain.json``, the nights since the earliest of them began)."""
    ids = {i["id"] for i in incidents}
    first = min((i["first_night"] for i in incidents), default=day.isoformat())
    found: dict[str, str] = {}
    for name in published_nights(out, before=day.isoformat(), since=first, holding="drain.json"):
        try:
            records = json.loads((out / name / "drain.json").read_text())
        except (OSError, ValueError):
            continue
        for r in records:
            if r.get("outcome") == "drained" and r.get("incident") in ids:
                found.setdefault(r["incident"], name)
    return found


def drain(incidents: list[dict], max_nodes: int, env: dict | None = None,
          before: dict[str, str] | None = None) -> list[dict]:
    """Run the drain commands for ``incidents`` (from :func:`candidates`), at most ``max_nodes``.
    Never raises: each node's outcome is ``drained``, ``already`` (SLURM drains it or holds it
    down: hpcad did on an earlier night, ``before``, or someone else did), ``resumed`` (an earlier
    night drained it for this incident and someone put it back since: not drained again for it),
    ``capped`` or ``failed`` with the message. Only the commands run (``drained``, ``failed``) count
    toward ``max_nodes``: a node already out takes none of the night's drains."""
    results = []
    before = before or {}
    run = 0
    for inc in incidents:
        cmd = command(inc)
        rec = {"node": inc["node"], "incident": inc["id"], "command": shlex.join(cmd)}
        try:
            state = _node_state(inc["node"], env)
            down = any(s in state for s in ("DRAIN", "DOWN", "FAIL"))
            if down:
                by = f"drained by hpcad for this incident on {before[inc['id']]}, " if inc["id"] in before else ""
                results.append({**rec, "outcome": "already", "message": f"{by}SLURM state {state}"})
            elif inc["id"] in before:
                results.append({**rec, "outcome": "resumed", "message": f"drained for this incident on "
                                f"{before[inc['id']]} and put back since: not drained again for it"})
            elif run >= max_nodes:
                results.append({**rec, "outcome": "capped", "message": f"nightly.drain_max_nodes={max_nodes} reached"})
            else:
                run += 1
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
                results.append({**rec, "outcome": "drained" if p.returncode == 0 else "failed",
                                "message": (p.stderr or p.stdout).strip()[-300:]})
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            results.append({**rec, "outcome": "failed", "message": f"{type(exc).__name__}: {exc}"})
        outcome = results[-1]["outcome"]
        (log.info if outcome in ("drained", "already", "resumed") else log.warning)(
            "drain %s: %s %s", inc["node"], outcome, results[-1]["message"])
    return results
