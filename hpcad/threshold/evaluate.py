"""Apply fitted thresholds: alarm events, cost and event-level precision/recall/F1 per split."""
from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from hpcad.atomic import atomic_path
from hpcad.data.jobs import JobTable
from hpcad.preprocess import SPLIT_NAMES, VAL
from hpcad.errorstore import ErrorStore, NodeSignal
from hpcad.threshold.cost import CostModel, Scores, runs, score_rows
from hpcad.threshold.quality import macro, ranking
from hpcad.threshold.reduce import Reducer
from hpcad.threshold.rules import Thresholds

SpanReader = Callable[[str, list[tuple[int, int]]], list[np.ndarray]]  # (node, [(a, b), ...]) -> rows [a, b) each


def node_figures(s: NodeSignal, th: Thresholds, model: CostModel,
                 time_unit: str = "s") -> tuple[bool, dict, dict]:
    """One node's figures: whether it has labels, its entry in ``metrics.json`` (threshold, and per
    split its scores and threshold-free figures) and its :class:`Scores` per split, which add across
    nodes."""
    sig, t = th.signal_of(s), th.threshold_for(s.node)
    entry: dict = {"threshold": t}
    scores: dict[str, Scores] = {}
    ts = s.timestamp if time_unit == "s" else None
    parts = [(name, s.split == code) for code, name in SPLIT_NAMES.items()] + [("eval", s.split != 0)]
    for name, rows in parts:
        if not rows.any():
            continue
        lab = None if s.labels is None else s.labels[rows]
        part = entry.setdefault(name, {})
        if name != "eval":
            sc = scores[name] = score_rows(sig[rows], lab, t, model, None if ts is None else ts[rows])
            part.update(sc.as_dict())
        r = ranking(sig[rows], lab)
        if r is not None:
            part["ranking"] = r
    return s.labels is not None, entry, scores


def summarise(figures: dict[str, tuple[bool, dict, dict]]) -> dict:
    """:func:`evaluate`'s result from each node's :func:`node_figures`, added in node-name
    order (the order of ``errors.h5``: the same sums however the nodes were shared out)."""
    totals = {name: Scores() for name in SPLIT_NAMES.values()}
    ranked: dict[str, list[dict]] = {name: [] for name in (*SPLIT_NAMES.values(), "eval")}
    per_node: dict[str, dict] = {}
    labelled = False
    for node in sorted(figures):
        lab, entry, scores = figures[node]
        labelled |= lab
        per_node[node] = entry
        for name, sc in scores.items():
            totals[name] += sc
        for name, figs in ranked.items():
            if "ranking" in entry.get(name, {}):
                figs.append(entry[name]["ranking"])
    splits = {k: v.as_dict() for k, v in totals.items()}
    for name, figs in ranked.items():
        if labelled:
            splits.setdefault(name, {})["ranking"] = macro(figs)
    return {"labelled": labelled, "splits": splits, "nodes": per_node}


def evaluate(signals: Iterator[NodeSignal], th: Thresholds, model: CostModel, time_unit: str = "s",
             red: Reducer | None = None) -> dict:
    """Scores per split summed over nodes, plus per node (cost terms add across nodes), and the
    threshold-free figures (:mod:`hpcad.threshold.quality`) per node and as means over nodes:
    ``splits[<split>]["ranking"]``, and ``"eval"`` for validation and test together (the whole
    labelled period after training). With an MPI reducer each rank passes its own nodes and rank 0
    gets the result (the other ranks: {})."""
    red = red or Reducer()
    mine = {s.node: node_figures(s, th, model, time_unit) for s in signals}
    parts = red.gather(mine)
    return summarise({k: v for part in parts for k, v in part.items()}) if red.rank == 0 else {}


LEVELS = (2.0, 3.0, 5.0, 10.0, 20.0)  # multiples of the normal level the alarm budget is counted at


def alarms_by_level(signals: Iterator[NodeSignal], model: CostModel, time_unit: str = "s",
                    levels: tuple[float, ...] = LEVELS, red: Reducer | None = None) -> dict | None:
    """The alarm budget without labels: what each multiple ``k`` of the nodes' normal level (the level
    rule, ``signal_norm > k``) raises on the validation rows: alarm events (runs merged within the cost
    model's tolerance), nodes with one, and events per node-day. A site without labels chooses
    ``threshold.times`` by it. None where no node has validation rows. With an MPI reducer each rank
    passes its own nodes and the counts are added over the ranks."""
    events, alarmed = np.zeros(len(levels), np.int64), np.zeros(len(levels), np.int64)
    nodes, days = 0, 0.0
    for s in signals:
        rows = s.split == VAL
        if not rows.any():
            continue
        nodes += 1
        norm, ts = s.normalised[rows], (s.timestamp[rows] if time_unit == "s" else None)
        for i, k in enumerate(levels):
            sc = score_rows(norm, None, k, model, ts)
            events[i] += sc.alarm_events
            alarmed[i] += sc.alarm_events > 0
        days += sc.node_days  # the rows' time span: the same at every level
    if red is not None:
        total = red.sum(np.r_[events, alarmed, nodes, days].astype(np.float64))
        events, alarmed = total[:len(levels)].astype(np.int64), total[len(levels):2 * len(levels)].astype(np.int64)
        nodes, days = int(total[-2]), float(total[-1])
    if not nodes:
        return None
    return {"nodes": nodes, "node_days": round(days, 2),
            "levels": [{"times": k, "alarm_events": int(e), "nodes_alarmed": int(a),
                        "per_node_day": round(float(e) / days, 4) if days else None}
                       for k, e, a in zip(levels, events, alarmed)]}


def apply_thresholds(errors: ErrorStore, th: Thresholds, model: CostModel, top_k: int, time_unit: str,
                     jobs: JobTable | None, alarms_csv: Path,
                     signals: Callable[[], Iterator[NodeSignal]] | None = None,
                     red: Reducer | None = None,
                     quote: Callable[[str, list[dict]], None] | None = None) -> tuple[list[dict], dict]:
    """What ``hpcad threshold`` and the nightly job do with fitted thresholds, in one pass over the
    nodes: the alarm records (written to ``alarms_csv``; consecutive alarms closer than the cost
    model's tolerance are one) and :func:`evaluate`'s figures. ``signals`` defaults to reading them
    from ``errors``. ``quote`` adds to a node's records what its top metrics read and what its model
    expected (:class:`hpcad.explain.ExpectedQuotes`), on the rank that holds the node. With an MPI
    reducer each rank passes its own nodes' ``signals``; rank 0 gets every node's records (in
    node-name order, as one process writes them) and figures and writes ``alarms_csv``; the other
    ranks get ([], {})."""
    signals = signals or errors.signals
    red = red or Reducer()
    mine = {}
    for s in signals():
        records = alarm_events(s, th, errors.errors_at, errors.metrics, top_k, time_unit, merge_gap=model.tolerance,
                               jobs=jobs, scale_of=errors.explain_scale)
        if quote is not None and records:
            quote(s.node, records)
        mine[s.node] = (records, node_figures(s, th, model, time_unit))
    parts = {k: v for part in red.gather(mine) for k, v in part.items()}
    if red.rank != 0:
        return [], {}
    records = [r for node in sorted(parts) for r in parts[node][0]]
    write_alarms_csv(alarms_csv, records)
    return records, summarise({node: fig for node, (_, fig) in parts.items()})


def alarm_record(r: dict, split: bool = False) -> dict:
    """An alarm as ``alarms.json`` holds it (:func:`alarm_events`' record without the row index; the
    split it peaked in with ``split``: a run's, not a night's)."""
    keys = ("node", "start", "end", "rows") + (("split",) if split else ()) + (
        "peak_score", "peak_time", "loudest_time", "threshold")
    out = {k: r[k] for k in keys if k in r}
    out.update(top_metrics=r.get("top_metrics", []), jobs=r.get("jobs", []), users=r.get("users", []))
    if "label_classes" in r:
        out["label_classes"] = r["label_classes"]
    return out


def _iso(ts: int, unit: str) -> str:
    if unit == "row":
        return str(int(ts))
    return dt.datetime.fromtimestamp(int(ts), dt.timezone.utc).isoformat(timespec="seconds")


def time_of(text: str, unit: str) -> int:
    """A time written in ``alarms.csv`` (start, end, peak_time, loudest_time) as the store's timestamp:
    the inverse of how alarms write it (ISO UTC for times in seconds, the row number otherwise)."""
    return int(dt.datetime.fromisoformat(text).timestamp()) if unit == "s" else int(text)


def alarm_events(s: NodeSignal, th: Thresholds, errors_of: SpanReader | None, metrics: list[str], top_k: int,
                 time_unit: str = "s", merge_gap: int = 0, jobs: JobTable | None = None,
                 scale_of: Callable[[str], np.ndarray | None] | None = None) -> list[dict]:
    """One record per alarm (alarmed rows with gaps of at most ``merge_gap`` rows): start, end,
    peak, the loudest row (the alarmed row with the most error of its own: ``loudest_row``, its
    index among the node's rows, and ``loudest_time``), the top-k metrics over the alarmed rows, and
    with job context the jobs that ran on the node during the alarm. ``errors_of(node, spans)``: the
    node's per-metric errors over each alarm's rows, read at once (:meth:`ErrorStore.errors_at`).
    The top metrics are those whose mean error is the most times their normal error (``scale_of``:
    the node's divisors, :meth:`hpcad.errorstore.ErrorStore.explain_scale`); by mean error where it
    is unknown (baselines, files scored before it was recorded)."""
    sig = th.signal_of(s)
    t = th.threshold_for(s.node)
    scale = scale_of(s.node) if scale_of is not None and errors_of is not None else None
    out = []
    spans = runs(sig > t, merge_gap)
    blocks = errors_of(s.node, spans) if errors_of is not None and spans else [None] * len(spans)
    for (a, b), block in zip(spans, blocks):
        alarmed = sig[a:b] > t
        err = block[alarmed] if block is not None else None
        peak = a + int(np.argmax(sig[a:b]))
        rec = {"node": s.node, "start": _iso(s.timestamp[a], time_unit), "end": _iso(s.timestamp[b - 1], time_unit),
               "rows": int(alarmed.sum()), "split": SPLIT_NAMES[int(s.split[peak])], "peak_score": float(sig[peak]),
               "peak_time": _iso(s.timestamp[peak], time_unit), "threshold": t}
        if s.labels is not None:
            rec["label_classes"] = sorted({int(c) for c in np.unique(s.labels[a:b]) if c != 0})
        if err is not None:
            loudest = a + int(np.flatnonzero(alarmed)[int(np.argmax(err.sum(1)))])  # most error of its own
            rec["loudest_row"], rec["loudest_time"] = loudest, _iso(s.timestamp[loudest], time_unit)
            mean_err = err.mean(0)
            if scale is None:
                top = np.argsort(mean_err)[::-1][:top_k]
                rec["top_metrics"] = [{"metric": metrics[j], "error": float(mean_err[j])} for j in top]
            else:
                times = mean_err / scale
                top = np.argsort(times)[::-1][:top_k]
                rec["top_metrics"] = [{"metric": metrics[j], "error": float(mean_err[j]), "x_normal": float(times[j])}
                                      for j in top]
        if jobs is not None and time_unit == "s":
            rec["jobs"] = list(jobs.during(s.node, int(s.timestamp[a]), int(s.timestamp[b - 1])))
            rec["users"] = jobs.users_during(s.node, int(s.timestamp[a]), int(s.timestamp[b - 1]))
        out.append(rec)
    return out


# one ``name:error`` entry of a top-metrics cell: the name up to the colon before a number that ends
# the entry, so names may hold spaces and colons ("CPU1 Temp", "mem:used"), as IPMI sensor names do
_TOP_ENTRY = re.compile(r"\s*(.+?):([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))(?=\s|$)")


def parse_top_metrics(cell: str, x_normal: str = "") -> list[dict]:
    """An ``alarms.csv`` ``top_metrics`` cell (``name:error`` entries separated by a space) back into
    records, names with spaces included; ``x_normal``, the row's ``top_x_normal`` cell (one number per
    entry), adds each entry's "times normal"."""
    out = [{"metric": m.group(1), "error": float(m.group(2))} for m in _TOP_ENTRY.finditer(cell or "")]
    times = (x_normal or "").split()
    if len(times) == len(out):
        for rec, x in zip(out, times):
            rec["x_normal"] = float(x)
    return out


def top_metrics_of(alarm: dict) -> list[dict]:
    """The top metrics of an ``alarms.csv`` row (a ``csv.DictReader`` record)."""
    return parse_top_metrics(alarm.get("top_metrics") or "", alarm.get("top_x_normal") or "")


def write_alarms_csv(path: Path, records: list[dict]) -> None:
    """The records of :func:`alarm_events`, lists written space-separated (top metrics as
    ``name:error``, their "times normal" in ``top_x_normal``, in the same order; columns added
    later go last)."""
    cols = ["node", "start", "end", "rows", "split", "peak_score", "peak_time", "threshold",
            "label_classes", "top_metrics", "jobs", "users", "top_x_normal", "loudest_time"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "label_classes": " ".join(map(str, r.get("label_classes", []))),
                        "top_metrics": " ".join(f"{m['metric']}:{m['error']:.3g}" for m in r.get("top_metrics", [])),
                        "jobs": " ".join(r.get("jobs", [])), "users": " ".join(r.get("users", [])),
                        "top_x_normal": " ".join(f"{m['x_normal']:.3g}" for m in r.get("top_metrics", [])
                                                 if "x_normal" in m)})
