"""``nodes/<node>.html``: one page per alarmed node (its alarms, signal, the metrics behind them and
its last nights), drawn by worker processes."""
from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from hpcad.atomic import write_text
from hpcad.errorstore import ErrorStore
from hpcad.explain import expected_values, lookback, scoring_light
from hpcad.model.files import NodeModel, model_path
from hpcad.preprocess import in_model_order, metric_positions
from hpcad.report.markup import alarms_table, html_table, page, rule_named
from hpcad.report.plots import AlarmWindow, heatmap, local_times, signal_plot, values_plot
from hpcad.threshold.evaluate import time_of
from hpcad.threshold.rules import Thresholds


def node_pages(run_dir: Path, errors: ErrorStore, th: Thresholds, nodes: list[str], alarms: list[dict],
                time_unit: str, title: str, store=None, models_dir: Path | None = None,
                workers: int | None = None, history: dict[str, list[list]] | None = None,
                zone: str = "UTC", fill_limit: int = 3, light: tuple[Path | None, str | None] = (None, None)
                ) -> dict[str, str]:
    """``nodes/<node>.html`` for each alarmed node in ``nodes`` (its alarms, signal and the metrics
    behind them with what its model expected them to read, and its ``history`` over earlier nights
    where given), drawn by ``workers`` processes (default: the CPUs, at most 8; plots are most of a
    report's time); pages of nodes no longer listed are removed. ``fill_limit``
    (``preprocess.nan_fill_limit``) and ``light`` (the light maps' folder and night that scoring
    read: ``score.light_maps``, ``score.light_night``) let the expected values be the ones scored.
    Returns node -> relative link."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from urllib.parse import quote

    folder = run_dir / "nodes"
    job = (run_dir, errors.path, th.to_dict(), time_unit, title, None if store is None else store.path, models_dir,
           zone, fill_limit, light)
    _OPENED.clear()  # files of an earlier report (same paths, rewritten since) are not reused
    groups = [(node, [a for a in alarms if a["node"] == node], (history or {}).get(node)) for node in nodes]
    n = max(1, min(workers or min(os.cpu_count() or 1, 8), len(groups)))
    if n == 1:
        for node, mine, hist in groups:
            _node_page(job, node, mine, hist)
    else:
        if store is not None and models_dir is not None:
            # the pages load model files (torch.load): torch imported once here, before the fork, not
            # once in every worker (1.5-2.5 s of CPU each; `hpcad report` has not imported it yet)
            import importlib

            importlib.import_module("torch")
        with ProcessPoolExecutor(n, mp_context=get_context("fork")) as pool:
            # pages in chunks of up to 4 (less pickling), but never so few chunks that workers stay idle
            chunk = min(4, max(1, len(groups) // (4 * n)))
            list(pool.map(_node_page, [job] * len(groups), *zip(*groups), chunksize=chunk))
    links = {node: f"nodes/{quote(node)}.html" for node in nodes}
    if folder.exists():
        for old in folder.glob("*.html"):
            if old.stem not in links:
                old.unlink()
    return links


HISTORY_HEADER = ["night", "level (median signal / normal)", "alarmed rows", "incident"]

_OPENED: dict = {}  # per worker process: files opened once, not once per page


def _opened(kind, path: Path):
    if (kind, path) not in _OPENED:
        _OPENED[(kind, path)] = kind(path)
    return _OPENED[(kind, path)]


def _node_page(job: tuple, node: str, mine: list[dict], history: list[list] | None = None) -> None:
    """One node's page (a worker of :func:`node_pages`: everything it needs comes by path)."""
    run_dir, errors_path, th_dict, time_unit, title, store_path, models_dir, zone, fill_limit, light = job
    errors, th = _opened(ErrorStore, errors_path), Thresholds.from_dict(th_dict)
    s = next(errors.signals([node]))
    rule, said = rule_named(th)
    parts = [f"<p><a href='../report.html'>&larr; {html.escape(title)}</a></p><h1>{html.escape(node)}</h1>",
             f"<p>{len(mine)} alarm(s); threshold {th.threshold_for(node):.4g} on the "
             f"{'normalised ' if th.normalised else ''}signal ({rule}, {said}).</p>",
             signal_plot(s, th, time_unit, zone)]
    win = AlarmWindow(errors, s, th, time_unit)
    parts.append(heatmap(errors, s, th, time_unit, win, zone=zone))
    model = model_path(models_dir, node) if models_dir is not None else None
    if store_path is not None and model is not None and model.exists():
        from hpcad.data.store import TelemetryStore

        store = _opened(TelemetryStore, store_path)
        if node in store and store.rows(node) == len(s.signal):
            nm = NodeModel.load(model)
            # the window's rows and the few before them its gap filling and model window need (a day of a
            # node-year, not the year), in the model's metric order, as scoring aligned them: tonight's
            # exports may list them otherwise
            first = max(win.a - lookback(nm, fill_limit), 0)
            (raw,) = store.values_at(node, [(first, win.b)])
            raw = in_model_order(raw, metric_positions(nm.metrics, store.metrics))
            if nm.metrics == errors.metrics and raw.shape[1] == len(nm.metrics):
                expected = _expected(errors, node, model, nm, raw, first, win, fill_limit, light)
                values = raw[win.a - first:]  # rows win.a .. win.b
                parts.append(values_plot(errors, s, th, values, nm.scaler, time_unit, win, zone=zone,
                                         expected=expected))
                if expected is not None and len(mine):
                    parts.append(peak_table(errors, s, values, expected, nm.scaler, win, time_unit, zone,
                                            row=_loudest_row(mine, s, win, time_unit)))
    parts.append("<h2>Alarms</h2>" + alarms_table(mine, lambda n: None, "node-alarms", zone))
    if history:
        parts.append("<h2>This node over the last nights</h2>" + html_table(history, HISTORY_HEADER))
    write_text(run_dir / "nodes" / f"{node}.html", page(f"{node} - {title}", parts))


def _expected(errors: ErrorStore, node: str, model: Path, nm: NodeModel, raw, first: int, win: AlarmWindow,
              fill_limit: int, light: tuple[Path | None, str | None]):
    """What the node's model expected over the window's rows (:func:`hpcad.explain.expected_values` of
    ``raw``, the node's rows from ``first``), or None where the page cannot be sure it is what scoring
    saw: the model file is not the one that scored the node (retrained since), or the light map found
    is not the one it was scored with."""
    from hpcad.model.light import LightMaps

    ok, lm = scoring_light(errors, node, nm, LightMaps(light[0], model.parent), light[1])
    return expected_values(nm, raw, np.arange(win.a, win.b) - first, fill_limit, lm) if ok else None


def _loudest_row(mine: list[dict], s, win: AlarmWindow, time_unit: str) -> int:
    """The row the node's strongest alarm (highest peak) names as its loudest in ``alarms.csv``
    (``loudest_time``: the row the nightly job's ``alarms.json`` quotes), where it lies in the
    window; else the window's own choice (``win.loudest``; files written before the column)."""
    when = max(mine, key=lambda a: float(a.get("peak_score") or 0)).get("loudest_time")
    if when:
        ts = time_of(when, time_unit)
        r = int(np.searchsorted(s.timestamp, ts))
        if win.a <= r < win.b and int(s.timestamp[r]) == ts:
            return r
    return win.loudest


def peak_table(errors: ErrorStore, s, values, expected, scaler, win: AlarmWindow, time_unit: str, zone: str,
               top: int = 8, row: int | None = None) -> str:
    """The strongest alarm's loudest row (``row``, default ``win.loudest``): its top metrics'
    observed and expected values (``values`` and ``expected``: the window's rows), training range and
    times-normal error (what a ticket quotes)."""
    r = win.loudest if row is None else row
    p = r - win.a
    lo, hi = scaler.training_range()
    order = np.argsort(win.err[p])[::-1][:top]
    when = (str(local_times(np.asarray(s.timestamp[r:r + 1]), zone)[0]).replace("T", " ") + f" {zone}"
            if time_unit == "s" else f"row {r}")
    unit = "times normal" if win.times_normal else "error"
    rows = [[errors.metrics[j], float(values[p, j]), float(expected[p, j]), f"{lo[j]:.4g} .. {hi[j]:.4g}",
             float(win.err[p, j])] for j in order]
    return (f"<h2>The strongest alarm's loudest row ({html.escape(when)})</h2><p>The row of the strongest alarm "
            f"with the largest error of its own, and its metrics with the largest "
            f"{'error times their normal error' if win.times_normal else 'error'}: what they read, what the node's "
            f"model expected them to read from the whole row, and the node's training range.</p>"
            + html_table(rows, ["metric", "observed", "expected", "training range", unit]))
