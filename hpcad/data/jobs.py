"""SLURM job context: which job ran on each node at each row, from ``sacct`` output.

Input (``data.jobs``): ``sacct --allocations --parsable2 --format=JobID,NodeList,Start,End,State,User``
(``|``-separated, header line) or a CSV with the same columns (State and User optional: the alarms
then name the jobs' users too). Policy (docs/data.md):

- job steps (``123.batch``, ``123.0``) are skipped, allocations are used; jobs that never started
  (Start ``Unknown``/``None``) or hold no nodes (``None assigned``) are skipped;
- End ``Unknown`` (still running) is open-ended;
- NodeList uses SLURM's hostlist syntax (``n[001-004,010]``, ``gpu[1-2]-ib[0-1]``), expanded with
  python-hostlist; a malformed list is an error naming the line;
- sacct prints wall-clock times without a zone: they are read in ``data.timezone``;
- nodes the job file names but the store lacks are counted and logged (a job file usually covers the
  whole cluster); a job file that names none of the store's nodes is an error (a naming mismatch);
- overlapping jobs on one node (shared nodes) are counted and logged; a row takes the job that
  started last, and an alarm lists every job that overlapped it.

A row with timestamp t belongs to a job if start <= t < end; rows in no job are idle.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hostlist
import numpy as np

from hpcad.data.node import NodeData
from hpcad.data.timestamps import to_epoch_seconds
from hpcad.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
OPEN_END = np.iinfo(np.int64).max
COLUMNS = ("JobID", "NodeList", "Start", "End")


def expand_nodelist(text: str, where: str = "") -> list[str]:
    """SLURM hostlist -> node names (``n[1-3],m7`` -> n1 n2 n3 m7), zero padding kept."""
    try:
        return hostlist.expand_hostlist(text.strip())
    except hostlist.BadHostlist as exc:
        raise InputError(f"{where}: cannot expand node list {text!r}: {exc}") from exc


@dataclass
class JobTable:
    """Allocations: id, [start, end) in epoch seconds, state, compressed node list; node -> jobs."""

    job_id: list[str]
    start: np.ndarray
    end: np.ndarray
    state: list[str]
    nodelist: list[str]
    by_node: dict[str, list[int]] = field(default_factory=dict)
    user: list[str] = field(default_factory=list)  # per job ("" unknown); empty: the job file had no User

    def index_nodes(self, where: str) -> "JobTable":
        """Fill ``by_node`` by expanding every job's node list."""
        for j, text in enumerate(self.nodelist):
            for node in expand_nodelist(text, f"{where}: job {self.job_id[j]}"):
                self.by_node.setdefault(node, []).append(j)
        return self

    def assign(self, node: NodeData) -> np.ndarray:
        """Job index per row of ``node`` (-1 = idle); with overlapping jobs the latest start wins."""
        job = np.full(len(node.timestamp), -1, dtype=np.int32)
        if node.time_unit != "s":
            return job
        for j in sorted(self.by_node.get(node.name, []), key=lambda j: self.start[j]):
            a, b = np.searchsorted(node.timestamp, [self.start[j], self.end[j]], side="left")
            job[a:b] = j
        return job

    def _overlapping(self, node: str, t0: int, t1: int) -> list[int]:
        return [j for j in self.by_node.get(node, []) if self.start[j] <= t1 and self.end[j] > t0]

    def during(self, node: str, t0: int, t1: int) -> list[str]:
        """Ids of the jobs on ``node`` that overlap [t0, t1]."""
        return [self.job_id[j] for j in self._overlapping(node, t0, t1)]

    def users_during(self, node: str, t0: int, t1: int) -> list[str]:
        """The users of those jobs, each once, in job order (none when the job file had no User)."""
        if not self.user:
            return []
        return list(dict.fromkeys(self.user[j] for j in self._overlapping(node, t0, t1) if self.user[j]))

    def check_nodes(self, store_nodes: list[str], where: str) -> None:
        known = set(store_nodes)
        unknown = sorted(set(self.by_node) - known)
        if unknown and len(unknown) == len(self.by_node):
            raise InputError(f"{where}: none of the job file's nodes is in the telemetry (job file: "
                             f"{unknown[:3]}..., telemetry: {sorted(known)[:3]}...); do the names match? "
                             f"(data.node_names maps the telemetry's node names to SLURM's)")
        if unknown:
            log.warning("%s: %d node(s) in the job file have no telemetry (ignored), e.g. %s",
                        where, len(unknown), unknown[:5])


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise InputError(f"data.jobs: {path} does not exist")
    with open(path, errors="replace") as fh:
        first = fh.readline()
    sep = "|" if "|" in first else ","
    import pandas as pd  # here: pandas costs 0.2 s of every hpcad start-up

    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(f"{path}: cannot read job file: {exc}") from exc
    cols = {c.lower(): c for c in df.columns}
    missing = [c for c in COLUMNS if c.lower() not in cols]
    if missing:
        raise InputError(f"{path}: job file lacks column(s) {missing} (has {list(df.columns)}); use "
                         f"sacct --allocations --parsable2 --format=JobID,NodeList,Start,End,State")
    df = df.rename(columns={cols[c.lower()]: c for c in (*COLUMNS, "State", "User") if c.lower() in cols})
    if "State" not in df.columns:
        df["State"] = ""
    return df


def read_jobs(path: str | Path, timezone: str = "UTC") -> JobTable:
    path = Path(path).expanduser()
    df = _read_frame(path)
    df = df[~df["JobID"].str.contains(".", regex=False)]  # steps
    started = ~df["Start"].str.strip().isin(["Unknown", "None", ""])
    placed = ~df["NodeList"].str.strip().isin(["None assigned", "", "(null)"])
    skipped = int((~(started & placed)).sum())
    df = df[started & placed].reset_index(drop=True)
    if skipped:
        log.info("%s: %d job(s) never started or hold no node (skipped)", path, skipped)
    if df.empty:
        raise InputError(f"{path}: no job allocation with a start time and nodes")
    where = str(path)
    start = to_epoch_seconds(df["Start"].str.strip(), where, "Start", timezone)
    running = df["End"].str.strip().isin(["Unknown", "None", ""])
    end = np.full(len(df), OPEN_END, dtype=np.int64)
    if (~running).any():
        end[~running.to_numpy()] = to_epoch_seconds(df["End"][~running].str.strip(), where, "End", timezone)
    bad = np.flatnonzero(end < start)
    if bad.size:
        raise InputError(f"{path}: job {df['JobID'][bad[0]]} ends before it starts")
    users = df["User"].str.strip().tolist() if "User" in df.columns else []
    table = JobTable(df["JobID"].str.strip().tolist(), start, end, df["State"].str.strip().tolist(),
                     df["NodeList"].str.strip().tolist(), user=users).index_nodes(str(path))
    _log_overlaps(table, where)
    return table


def _log_overlaps(table: JobTable, where: str) -> None:
    count, example = 0, None
    for node, jobs in table.by_node.items():
        jobs.sort(key=lambda j: table.start[j])
        latest_end, latest = -1, None
        for j in jobs:
            if table.start[j] < latest_end:
                count += 1
                example = example or (table.job_id[latest], table.job_id[j], node)
            if table.end[j] > latest_end:
                latest_end, latest = table.end[j], j
    if count:
        a, b, node = example
        log.warning("%s: %d overlapping job pair(s) on a node (e.g. %s and %s on %s): rows take the job that "
                    "started last; alarms list every overlapping job", where, count, a, b, node)
