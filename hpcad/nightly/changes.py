"""The site's maintenance log (``nightly.changes``): a node repaired, given a new part, re-cabled or
reconfigured behaves otherwise from a date on, and its model, trained before, alarms on its new
normal. A CSV the site keeps, one change per row::

    node,since,note,kind
    cn0012,2025-01-10,DIMMs replaced,
    cn0200,2025-02-01,moved to the test partition,retired

``node``: the name its model carries (SLURM's, after ``data.node_names``), or a SLURM host list for
many nodes changed alike (``"cn[0001-0480],gpu[01-16]"``, quoted where it holds a comma: a firmware
or cooling change across racks); ``since``: the first night
(YYYY-MM-DD, in ``nightly.timezone``) of the new behaviour; ``note``: optional, shown in the report;
``kind``: optional, ``changed`` (the default) or ``retired``: from ``since`` on the node is out of
service (decommissioned, moved, powered off for good): not expected, so neither silent nor counted
against ``nightly.min_node_fraction``, and not scored. A later ``changed`` row brings it back.

From ``since`` on the node is *settling* until a light map fitted only on nights since the change
scores it: its alarms are kept (alarms.csv, alarms.json with ``settling``) but open no incident (so
nothing is drained or notified for it), and its light map is refitted every night on the nights
since the change (whatever ``nightly.light_retrain`` says), applied from the next night. A light
map is never fitted across a change: any refit of a changed node reads only the nights since.
"""
from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.data.jobs import expand_nodelist
from hpcad.errors import ConfigError, InputError

if TYPE_CHECKING:
    from hpcad.model.light import LightMap

HEADER = ["node", "since", "note", "kind"]
KINDS = ("changed", "retired")


@dataclass(frozen=True)
class Change:
    node: str
    since: str  # YYYY-MM-DD: the first night of the new behaviour
    note: str = ""
    kind: str = "changed"  # or "retired": out of service from ``since`` on

    @property
    def retired(self) -> bool:
        return self.kind == "retired"

    def settled_by(self, lm: LightMap | None, nights: int) -> bool:
        """Whether the light map ``lm`` (the one valid tonight) was fitted on nights since the change only,
        up to the change's ``nights``-th night (``nightly.light_days``) or later."""
        if lm is None or not lm.fitted_on or min(lm.fitted_on) < self.since:
            return False
        return max(lm.fitted_on) >= self.window_end(nights)

    def window_end(self, nights: int) -> str:
        """The change's ``nights``-th night (YYYY-MM-DD): its light map is refitted on each night up to it."""
        return (dt.date.fromisoformat(self.since) + dt.timedelta(days=max(nights, 1) - 1)).isoformat()


def read_changes(path: str | Path | None) -> dict[str, list[Change]]:
    """node -> its changes, oldest first (a row naming a host list gives each of its nodes the change);
    empty without a file. A missing file, a header without ``node`` and ``since``, or a row without a
    node, with a host list that does not expand, a date that is not YYYY-MM-DD or an unknown ``kind``
    is refused, naming the file and the line."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"nightly.changes={str(path)!r}: no such file (the site's maintenance log: a CSV "
                          f"node,since[,note][,kind]; docs/operations.md)")
    out: dict[str, list[Change]] = {}
    with open(p, newline="") as fh:
        rows = csv.DictReader(fh)
        missing = [c for c in HEADER[:2] if c not in (rows.fieldnames or [])]
        if missing:
            raise InputError(f"{p}: the header must name the columns node,since[,note][,kind] (missing: "
                             f"{', '.join(missing)}; found: {', '.join(rows.fieldnames or []) or 'nothing'})")
        for r in rows:
            line = rows.line_num
            node, since = (r.get("node") or "").strip(), (r.get("since") or "").strip()
            if not node and not since:
                continue  # a blank line
            if not node:
                raise InputError(f"{p}, line {line}: no node")
            try:
                dt.date.fromisoformat(since)
                if len(since) != 10:
                    raise ValueError(since)
            except ValueError:
                raise InputError(f"{p}, line {line}: since={since!r} for node {node} is not a night as "
                                 f"YYYY-MM-DD") from None
            kind = (r.get("kind") or "").strip().lower() or "changed"
            if kind not in KINDS:
                raise InputError(f"{p}, line {line}: kind={r['kind']!r} for node {node}: one of {', '.join(KINDS)} "
                                 f"(empty: changed)")
            for name in expand_nodelist(node, f"{p}, line {line}"):
                out.setdefault(name, []).append(Change(name, since, (r.get("note") or "").strip(), kind))
    return {node: sorted(cs, key=lambda c: c.since) for node, cs in out.items()}


def hold(alarms: list[dict], settling: dict[str, Change]) -> int:
    """Mark the ``settling`` nodes' alarms (``settling``: since, note); returns how many."""
    held = 0
    for a in alarms:
        c = settling.get(a["node"])
        if c is not None:
            a["settling"] = {"since": c.since, "note": c.note}
            held += 1
    return held


def change_for(changes: dict[str, list[Change]], node: str, night: str) -> Change | None:
    """The node's latest change on or before ``night`` (YYYY-MM-DD), if any."""
    mine = [c for c in changes.get(node, ()) if c.since <= night]
    return mine[-1] if mine else None
