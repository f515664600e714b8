"""``report.html``: one static page that opens offline (PNG plots embedded as data URIs)."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache and backend chatter
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hpcad.atomic import write_text  # noqa: E402
from hpcad.model.files import NodeModel, model_path  # noqa: E402
from hpcad.errorstore import ErrorStore  # noqa: E402
from hpcad.threshold.rules import Thresholds  # noqa: E402

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig

CLASS_NAMES = {"0": "normal", "1": "class 1 (e.g. power-saving governor)", "2": "class 2 (e.g. performance governor)",
               "3": "class 3 (e.g. memory leak)", "4": "class 4 (e.g. CPU contention)"}


def _png(fig, margins: dict | None = None, dpi: int = 90) -> str:
    """The figure as an embedded PNG. ``margins`` (subplots_adjust arguments) instead of a tight
    bounding box: half the drawing time, for the plots drawn once per alarmed node."""
    buf = io.BytesIO()
    if margins:
        fig.subplots_adjust(**margins)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=None if margins else "tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _x(s, time_unit: str) -> np.ndarray:
    """The plots' x values: UTC times when the input had timestamps, else row numbers."""
    return s.timestamp.astype("datetime64[s]") if time_unit == "s" else np.arange(len(s.timestamp))


def _spans(ax, x: np.ndarray, mask: np.ndarray | None, color: str, alpha: float = 0.25) -> None:
    if mask is None or not mask.any():
        return
    d = np.diff(np.r_[0, mask.astype(int), 0])
    for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
        ax.axvspan(x[a], x[b - 1], color=color, alpha=alpha, lw=0)


def _signal_plot(s, th: Thresholds, time_unit: str = "s") -> str:
    sig, t = th.signal_of(s), th.threshold_for(s.node)
    x = _x(s, time_unit)
    fig, ax = plt.subplots(figsize=(11, 2.6))
    ax.plot(x, sig, lw=0.6, color="tab:blue", label="alarm signal")
    ax.axhline(t, color="tab:red", lw=1, label="threshold")
    _spans(ax, x, None if s.labels is None else s.labels != 0, "tab:orange")
    _spans(ax, x, sig > t, "tab:red", 0.12)
    for code, ls in ((1, ":"), (2, "--")):
        idx = np.flatnonzero(s.split == code)
        if idx.size:
            ax.axvline(x[idx[0]], color="grey", ls=ls, lw=0.8)
    if np.nanmin(sig) > 0:
        ax.set_yscale("log")
    ax.set_title(f"{s.node}: signal vs threshold (orange = labelled anomaly, red = alarmed; dotted/dashed = "
                 f"validation/test start)", fontsize=9)
    ax.set_xlabel("time (UTC)" if time_unit == "s" else "row")
    ax.legend(loc="upper left", fontsize=7)
    return _png(fig, {"left": 0.06, "right": 0.99, "top": 0.88, "bottom": 0.2})


class AlarmWindow:
    """The rows around a node's strongest alarm (a day either side at 5-minute rows; all rows when it
    has none), their per-metric errors read once, and the metrics ordered by their largest error:
    what the heatmap and the values plot of a node show."""

    def __init__(self, errors: ErrorStore, s, th: Thresholds, time_unit: str):
        sig, t = th.signal_of(s), th.threshold_for(s.node)
        peak = int(np.nanargmax(sig)) if len(sig) else 0
        half = 288 if time_unit == "s" else 200
        self.a, self.b = (max(0, peak - half), min(len(sig), peak + half)) if (sig > t).any() else (0, len(sig))
        self.err = errors.errors(s.node, slice(self.a, self.b))
        self.order = np.argsort(self.err.max(0))[::-1]


def _values_plot(errors: ErrorStore, s, th: Thresholds, values: np.ndarray, scaler, time_unit: str,
                 win: AlarmWindow, top: int = 4) -> str:
    """The alarm's top metrics in their own units around the strongest alarm, against the node's
    training range (grey band), alarmed rows shaded: is the value new, or the combination?"""
    a, b, order = win.a, win.b, win.order[:top]
    lo, hi = scaler.training_range()
    x = _x(s, time_unit)[a:b]
    alarmed = th.signal_of(s)[a:b] > th.threshold_for(s.node)
    fig, axes = plt.subplots(len(order), 1, figsize=(11, 0.4 + 1.1 * len(order)), sharex=True, squeeze=False)
    for ax, j in zip(axes[:, 0], order):
        ax.axhspan(lo[j], hi[j], color="0.85", lw=0)
        ax.plot(x, values[a:b, j], lw=0.8, color="tab:blue", antialiased=False)  # a third of the PNG size
        _spans(ax, x, alarmed, "tab:red", 0.12)
        ax.set_ylabel(errors.metrics[j], fontsize=7, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=7)
    axes[0, 0].set_title(f"{s.node}: the {len(order)} metrics with the largest error, in their own units; grey = "
                         f"the node's training range, red = alarmed rows", fontsize=9)
    axes[-1, 0].set_xlabel("time (UTC)" if time_unit == "s" else "row")
    width = max((len(errors.metrics[j]) for j in order), default=8)
    return _png(fig, {"left": min(0.4, 0.03 + 0.0065 * width), "right": 0.99, "top": 0.9,
                      "bottom": 0.35 / (0.4 + 1.1 * len(order)) + 0.05, "hspace": 0.15}, dpi=72)


def _heatmap(errors: ErrorStore, s, th: Thresholds, time_unit: str = "s", win: AlarmWindow | None = None,
             top: int = 20) -> str:
    """Per-metric error of the ``top`` metrics (by their largest error) over the rows around the
    node's strongest alarm (the whole series when it has none), metric names on the axis."""
    sig, t = th.signal_of(s), th.threshold_for(s.node)
    win = win or AlarmWindow(errors, s, th, time_unit)
    a, b, err, order = win.a, win.b, np.sqrt(win.err), win.order[:top]
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.17 * len(order)))
    vmax = float(np.quantile(err[:, order], 0.99)) or 1.0
    ax.imshow(err[:, order].T, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(order)), [errors.metrics[j] for j in order], fontsize=7)
    x = _x(s, time_unit)[a:b]
    ticks = np.linspace(0, len(x) - 1, min(len(x), 7)).astype(int) if len(x) else []
    ax.set_xticks(ticks, [str(x[k]).replace("T", " ")[:16] for k in ticks], fontsize=7)
    if s.labels is not None:
        lab = np.flatnonzero(s.labels[a:b] != 0)
        ax.plot(lab, np.full(lab.size, -0.8), "|", color="tab:orange", ms=4)
    alarmed = np.flatnonzero(sig[a:b] > t)
    ax.plot(alarmed, np.full(alarmed.size, len(order) - 0.2), "|", color="tab:red", ms=4)
    ax.set_xlabel("time (UTC)" if time_unit == "s" else "row")
    ax.set_title(f"{s.node}: per-metric error |x - x_hat|, the {len(order)} metrics with the largest error "
                 f"(orange ticks = labelled anomaly, red = alarmed rows)", fontsize=9)
    width = max((len(errors.metrics[j]) for j in order), default=8)
    return _png(fig, {"left": min(0.4, 0.02 + 0.0065 * width), "right": 0.99, "top": 0.92, "bottom": 0.7 / (0.9 + 0.17 * len(order))})


SORTABLE = """<script>
function hpcadTable(id){const t=document.getElementById(id),f=document.getElementById(id+'-filter');
const rows=()=>[...t.tBodies[0].rows];
t.tHead.querySelectorAll('th').forEach((th,i)=>th.onclick=()=>{const asc=th.dataset.dir!=='asc';
t.tHead.querySelectorAll('th').forEach(h=>delete h.dataset.dir);th.dataset.dir=asc?'asc':'desc';
const key=r=>{const v=r.cells[i].dataset.v??r.cells[i].textContent;const n=parseFloat(v);return isNaN(n)||!/^[-+0-9.eE]+$/.test(v)?v:n};
rows().sort((a,b)=>{const x=key(a),y=key(b);const c=(typeof x===typeof y)?(x<y?-1:x>y?1:0):(typeof x==='number'?-1:1);return asc?c:-c})
.forEach(r=>t.tBodies[0].appendChild(r));});
f.oninput=()=>{const q=f.value.toLowerCase();let n=0;rows().forEach(r=>{const s=r.textContent.toLowerCase().includes(q);
r.style.display=s?'':'none';n+=s});document.getElementById(id+'-count').textContent=n;};}
</script>"""


def alarms_table(alarms: list[dict], link, table_id: str = "alarms") -> str:
    """All alarms as a table sorted by clicking a header and filtered by a text box (no libraries:
    the page stays one offline file); the node cell links to ``link(node)`` when that gives a URL."""
    cols = ["node", "start", "end", "rows", "split", "peak_score", "label_classes", "top_metrics", "jobs", "users"]
    head = "".join(f"<th title='click to sort'>{html.escape(c)}</th>" for c in cols)
    body = []
    for a in alarms:
        cells = []
        for c in cols:
            v = a.get(c, "")
            text = _fmt(_number(v)) if c in ("rows", "peak_score") else str(v or "")
            if c == "node" and link(v):
                cells.append(f"<td><a href='{html.escape(link(v))}'>{html.escape(text)}</a></td>")
            elif c == "top_metrics":  # names only (the errors are in alarms.csv / alarms.json)
                cells.append(f"<td>{html.escape(' '.join(t.rsplit(':', 1)[0] for t in text.split()))}</td>")
            else:
                cells.append(f"<td data-v='{html.escape(str(v or ''))}'>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<p>filter: <input id='{table_id}-filter' placeholder='node, time, metric, job...'> "
            f"<span id='{table_id}-count'>{len(alarms)}</span> of {len(alarms)} alarms shown; click a header to "
            f"sort.</p><table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<script>hpcadTable('{table_id}')</script>")


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def overview_grid(sigs: list, th: Thresholds, time_unit: str = "s") -> tuple[np.ndarray, int, int] | None:
    """[nodes, bins] peak signal / threshold, the first bin's start and the bin width: an hour (a day
    beyond two weeks), or 1/200 of the span in rows when the input had no timestamps."""
    stamps = [s.timestamp for s in sigs if len(s.timestamp)]
    if not stamps:
        return None
    t0, t1 = min(int(t[0]) for t in stamps), max(int(t[-1]) for t in stamps)
    span = max(t1 - t0, 1)
    if time_unit == "row":
        step = max(1, -(-span // 200))
    else:
        step = 3600 if span <= 14 * 86400 else 86400
    grid = np.full((len(sigs), span // step + 1), np.nan)
    for i, s in enumerate(sigs):
        ratio = th.signal_of(s) / max(th.threshold_for(s.node), 1e-12)
        np.fmax.at(grid[i], (s.timestamp - t0) // step, ratio)
    return grid, t0, step


def _overview(errors: ErrorStore, th: Thresholds, nodes: list[str], time_unit: str = "s") -> str:
    """Cluster overview: nodes x time, colour = peak signal / threshold per hour or day (>= 1: alarm);
    per block of rows when the input had no timestamps."""
    sigs = list(errors.signals(nodes))
    binned = overview_grid(sigs, th, time_unit)
    if binned is None:
        return ""
    grid, t0, step = binned
    bins = grid.shape[1]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.16 * len(sigs)))
    from matplotlib.colors import LogNorm

    im = ax.imshow(np.clip(grid, 1e-2, 1e2), aspect="auto", cmap="RdYlBu_r", norm=LogNorm(1e-2, 1e2),
                   interpolation="nearest")
    ax.set_yticks(range(len(sigs)), [s.node for s in sigs], fontsize=6 if len(sigs) > 30 else 8)
    ticks = np.linspace(0, bins - 1, min(bins, 8)).astype(int)
    import datetime as dt

    if time_unit == "row":
        ax.set_xticks(ticks, [str(t0 + int(k) * step) for k in ticks], fontsize=7)
        ax.set_xlabel("row")
        per = f"peak per {step} rows"
    else:
        fmt = "%m-%d %H:%M" if step == 3600 else "%Y-%m-%d"
        ax.set_xticks(ticks, [dt.datetime.fromtimestamp(t0 + int(k) * step, dt.timezone.utc).strftime(fmt)
                              for k in ticks], fontsize=7)
        per = ("hourly" if step == 3600 else "daily") + " peak, UTC"
    fig.colorbar(im, ax=ax, label="peak signal / threshold")
    ax.set_title(f"alarms per node over time ({per}; red >= 1 = alarm; white = no data)", fontsize=9)
    return _png(fig)


def trend_plot(rows: list[list]) -> str:
    """Alarms and new incidents per night (rows: night, nodes, alarms, new incidents; any order)."""
    rows = sorted(rows, key=lambda r: r[0])
    nights = [str(r[0])[5:] for r in rows]  # MM-DD
    alarms = [float(r[2] or 0) for r in rows]
    new = [float(r[3] or 0) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.bar(nights, alarms, color="tab:red", alpha=0.6, label="alarms")
    ax.plot(nights, new, color="black", marker="o", lw=1, label="new incidents")
    ax.set_ylabel("per night")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("the last nights", fontsize=9)
    return _png(fig, {"left": 0.09, "right": 0.99, "top": 0.86, "bottom": 0.18})


def _profile_plot(cls: str, prof: dict) -> str:
    names = [n for n, _ in prof["top"]][::-1]
    vals = [v for _, v in prof["top"]][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(names) + 1))
    ax.barh(names, vals, color="tab:purple")
    ax.set_xlabel("mean squared error (standardised units)")
    ax.set_title(f"{CLASS_NAMES.get(cls, 'class ' + cls)}: top metrics ({prof['rows']} rows)", fontsize=9)
    ax.tick_params(labelsize=7)
    return _png(fig)


def _curves(models_dir: Path, nodes: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    for n in nodes:
        p = model_path(models_dir, n)
        if not p.exists():
            continue
        h = NodeModel.load(p).history
        if not h.get("loss"):  # no training history (e.g. models made by `hpcad bench`)
            continue
        line, = ax.plot(range(1, len(h["loss"]) + 1), h["loss"], lw=1, label=f"{n} train")
        ax.plot(range(1, len(h["val_loss"]) + 1), h["val_loss"], lw=1, ls="--", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    ax.set_title("training curves (solid = training, dashed = validation)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    return _png(fig)


def html_table(rows: list[list], header: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _fmt(v) -> str:
    """A table cell: floats to 3 significant digits, but 1,000 and more in full (a cost of 1,380 rows,
    not 1.38e+03)."""
    if isinstance(v, float):
        return f"{v:,.0f}" if math.isfinite(v) and abs(v) >= 1000 else f"{v:.3g}"
    return "" if v is None else str(v)


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px}"
         "td,th{border:1px solid #ccc;padding:2px 6px}th{cursor:pointer;background:#f4f4f4}"
         "th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}"
         "img{display:block;margin:6px 0}.warning{background:#fff3cd;border:1px solid #e0b000;padding:6px}")


def _page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style>{SORTABLE}</head><body>{''.join(parts)}</body></html>\n")


def _node_pages(run_dir: Path, errors: ErrorStore, th: Thresholds, nodes: list[str], alarms: list[dict],
                time_unit: str, title: str, store=None, models_dir: Path | None = None,
                workers: int | None = None, history: dict[str, list[list]] | None = None) -> dict[str, str]:
    """``nodes/<node>.html`` for each alarmed node in ``nodes`` (its alarms, signal and the metrics
    behind them, and its ``history`` over earlier nights where given), drawn by ``workers``
    processes (default: the CPUs, at most 8; plots are most of a report's time); pages of nodes no
    longer listed are removed. Returns node -> relative link."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from urllib.parse import quote

    folder = run_dir / "nodes"
    job = (run_dir, errors.path, th.to_dict(), time_unit, title, None if store is None else store.path, models_dir)
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
    """One node's page (a worker of :func:`_node_pages`: everything it needs comes by path)."""
    run_dir, errors_path, th_dict, time_unit, title, store_path, models_dir = job
    errors, th = _opened(ErrorStore, errors_path), Thresholds.from_dict(th_dict)
    s = next(errors.signals([node]))
    parts = [f"<p><a href='../report.html'>&larr; {html.escape(title)}</a></p><h1>{html.escape(node)}</h1>",
             f"<p>{len(mine)} alarm(s); threshold {th.threshold_for(node):.4g} on the "
             f"{'normalised ' if th.normalised else ''}signal ({th.rule}, {th.scope} scope).</p>",
             _signal_plot(s, th, time_unit)]
    win = AlarmWindow(errors, s, th, time_unit)
    parts.append(_heatmap(errors, s, th, time_unit, win))
    model = model_path(models_dir, node) if models_dir is not None else None
    if store_path is not None and model is not None and model.exists():
        from hpcad.data.store import TelemetryStore

        store = _opened(TelemetryStore, store_path)
        if node in store.nodes:
            nm, values = NodeModel.load(model), store.read(node).values
            if nm.metrics == errors.metrics and values.shape == (len(s.signal), len(nm.metrics)):
                parts.append(_values_plot(errors, s, th, values, nm.scaler, time_unit, win))
    parts.append("<h2>Alarms</h2>" + alarms_table(mine, lambda n: None, "node-alarms"))
    if history:
        parts.append("<h2>This node over the last nights</h2>" + html_table(history, HISTORY_HEADER))
    write_text(run_dir / "nodes" / f"{node}.html", _page(f"{node} - {title}", parts))


def write_report(cfg: HpcadConfig, run_dir: Path, errors: ErrorStore, models_dir: Path, title: str = "hpcad report",
                 extra: list[str] | None = None, folder: Path | None = None,
                 node_history: dict[str, list[list]] | None = None) -> Path:
    """The run's (or a night's) report; ``extra`` HTML sections go after the overview; ``folder`` is
    the folder named on the page when ``run_dir`` is a temporary one that will be renamed;
    ``node_history`` (node -> rows of :data:`HISTORY_HEADER`, newest first) goes on the node pages."""
    th = Thresholds.load(run_dir / "thresholds.json")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else None
    alarms = list(csv.DictReader(open(run_dir / "alarms.csv"))) if (run_dir / "alarms.csv").exists() else []
    per_node_alarms: dict[str, int] = {}
    for a in alarms:
        per_node_alarms[a["node"]] = per_node_alarms.get(a["node"], 0) + 1
    ranked = sorted(errors.nodes, key=lambda n: (-per_node_alarms.get(n, 0), n))  # most alarms first
    shown = ranked[: cfg.report.max_nodes_plotted]
    parts = [f"<h1>{html.escape(title)}</h1><p>run folder: <code>{html.escape(str(folder or run_dir))}</code>; "
             f"{len(errors.nodes)} nodes, {len(errors.metrics)} metrics; threshold rule <b>{th.rule}</b> "
             f"({th.scope} scope); {len(alarms)} alarm events on {len(per_node_alarms)} nodes.</p>"]
    unlabelled = th.details.get("unlabelled_nodes")
    if unlabelled:  # the rule named above did not set these nodes' thresholds (written with details.fallback)
        parts.append(f"<p>{unlabelled} of {len(th.nodes)} nodes have no labels: their thresholds are the quantile "
                     f"rule's (q={th.details['fallback']['q']:g} of the signal), not the {th.rule} rule's "
                     f"(threshold.fallback).</p>")
    store_path = run_dir / "store.h5"
    if not store_path.exists() and str(cfg.data.source or "").lower().endswith((".h5", ".hdf5")):
        store_path = Path(cfg.data.source)  # a store used in place
    time_unit = "s"
    store = None
    if store_path.exists():
        from hpcad.data.store import TelemetryStore

        store = TelemetryStore(store_path)
        skipped = store.skipped
        time_unit = store.time_unit(store.nodes[0]) if store.nodes else "s"
        if skipped:
            parts.append(f"<h2>Skipped nodes ({len(skipped)})</h2><p>Bad input; these nodes were not scored.</p>"
                         + html_table(skipped, ["node", "reason"]))
        if store.skipped_files:
            parts.append(f"<h2>Skipped input files ({len(store.skipped_files)})</h2><p>Bad input (data.on_bad_node="
                         f"skip); every node's rows in these files are missing.</p>"
                         + html_table(store.skipped_files, ["file", "reason"]))
    overview = ranked[: cfg.report.max_nodes_overview]
    if overview:
        parts.append("<h2>Cluster overview</h2>" + _overview(errors, th, sorted(overview), time_unit))
        if len(overview) < len(errors.nodes):
            parts.append(f"<p>{len(overview)} of {len(errors.nodes)} nodes shown (most alarms first; "
                         f"report.max_nodes_overview).</p>")
    parts += extra or []
    if metrics:
        rows = []
        for name, res in [("autoencoder", metrics)] + [(k, v) for k, v in metrics.get("baselines", {}).items()]:
            for split in ("train", "val", "test"):
                s = res["splits"][split]
                if s.get("rows") == 0:  # e.g. a nightly run scores test rows only
                    continue
                rows.append([name, split, s["cost"], s["false_alarms"], s["missed"], s["precision"], s["recall"], s["f1"]])
        ranks = []
        for name, res in [("autoencoder", metrics)] + [(k, v) for k, v in metrics.get("baselines", {}).items()]:
            for split in ("val", "test", "eval"):
                r = res["splits"].get(split, {}).get("ranking")
                if r and r.get("nodes"):
                    ranks.append([name, "val + test" if split == "eval" else split, r["nodes"], r["ap"],
                                  r["roc_auc"], r["best_f1"]])
        parts.append("<h2>Detection quality</h2><p>Threshold-free (mean over nodes with both classes; no point "
                     "adjustment):</p>" + html_table(ranks, ["detector", "rows", "nodes", "average precision",
                                                         "ROC-AUC", "best F1"]))
        parts.append("<p>At the fitted thresholds:</p>" + html_table(rows, [
            "detector", "split", "cost", "false alarms", "missed", "event precision", "event recall", "event F1"]))
        cm = metrics["cost_model"]
        parts.append(f"<p>cost = {cm['c_alarm']} x false alarms + {cm['c_missed']} x missed anomalies, "
                     f"tolerance +-{cm['tolerance']} rows.</p>")
    check = th.details.get("check") or {}
    if check.get("verdict") in ("never_alarm", "always_alarm") or check.get("always_alarm_nodes"):
        what = {"never_alarm": "raises no alarm on any row it was fitted on: it will probably never alarm",
                "always_alarm": f"alarms on {100 * check.get('alarm_share', 0):.0f}% of the rows it was fitted on",
                }.get(check.get("verdict"), f"alarms on most rows of {check.get('always_alarm_node_count')} node(s): "
                                            + ", ".join(check.get("always_alarm_nodes", [])[:10]))
        parts.insert(1, f"<p class='warning'><b>Threshold warning:</b> the {th.rule} threshold "
                        f"({th.scope} scope) {html.escape(what)}.</p>")
    not_normal = check.get("not_normal_fit_nodes") or {}
    if not_normal:  # an unsupervised fit on a period that holds incidents (hpcad.threshold.rules.check_thresholds)
        named = ", ".join(f"{n} {v:g}x" for n, v in list(not_normal.items())[:10])
        parts.insert(1, f"<p class='warning'><b>Threshold warning:</b> on {check.get('not_normal_fit_node_count')} "
                        f"node(s) the rows the {th.rule} threshold took as normal (none labelled as anomalies) sit "
                        f"far above the node's normal level (median signal, times its held-out training level: "
                        f"{html.escape(named)}). That period likely holds incidents or a changed workload, and the "
                        f"threshold sits among them: label them (data.label_column, threshold=cost) or apply "
                        f"thresholds fitted on a quiet period (train_run=).</p>")
    paged = [n for n in ranked if per_node_alarms.get(n)][: int(cfg.report.max_node_pages)]
    pages = _node_pages(run_dir, errors, th, paged, alarms, time_unit, title, store, models_dir,
                        history=node_history)

    def link(node: str) -> str | None:
        return pages.get(node)

    parts.append("<h2>Alarm signal</h2>" + (f"<p>{len(pages)} alarmed node(s) have their own page (follow a node "
                                             f"in the alarms table).</p>" if pages else ""))
    sigs = {s.node: s for s in errors.signals(shown)}
    for n in shown:
        parts.append((f"<p><a href='{html.escape(pages[n])}'>{html.escape(n)}</a></p>" if n in pages else "")
                     + _signal_plot(sigs[n], th, time_unit))
    if shown:
        parts.append("<h2>Per-metric error</h2>" + _heatmap(errors, sigs[shown[0]], th, time_unit))
    if metrics and metrics.get("class_profiles"):
        parts.append("<h2>Mean error profile per class</h2>")
        parts += [_profile_plot(c, p) for c, p in metrics["class_profiles"].items()]
    parts.append("<h2>Training</h2>" + _curves(models_dir, shown[:8]))
    if alarms:
        parts.append(f"<h2>Alarms ({len(alarms)})</h2>" + alarms_table(alarms, link))
    page = _page(title, parts)
    out = run_dir / "report.html"
    write_text(out, page)
    return out
