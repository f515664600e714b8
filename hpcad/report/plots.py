"""The report's plots, each returned as an embedded PNG (``<img>`` with a data URI), so that a
report stays one file that opens offline. Only this module of the report imports matplotlib."""
from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Titles at a fixed place above the axes (none of these plots has tick labels on top): the automatic
# placement measured every tick label's extent for each title (about 6 % of a node page's time).
matplotlib.rcParams["axes.titley"] = 1.0
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache and backend chatter
# A font cache another matplotlib wrote (a shared $HOME: a system matplotlib without the STIX
# fonts, another venv) makes each report say "findfont: Font family ['STIXGeneral'] not found"
# about twenty times; the log axes' labels then fall back to DejaVu Sans, the report's own font.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from hpcad.errorstore import ErrorStore  # noqa: E402
from hpcad.model.files import NodeModel, model_path  # noqa: E402
from hpcad.threshold.rules import Thresholds  # noqa: E402

CLASS_NAMES = {"0": "normal", "1": "class 1 (e.g. power-saving governor)", "2": "class 2 (e.g. performance governor)",
               "3": "class 3 (e.g. memory leak)", "4": "class 4 (e.g. CPU contention)"}


TITLE_IN = 0.42  # inches above a node plot's axes: its title in two lines (long node names, many keys)


def _png(fig, margins: dict | None = None, dpi: int = 90) -> str:
    """The figure as an embedded PNG. ``margins`` (subplots_adjust arguments) instead of a tight
    bounding box: half the drawing time, for the plots drawn once per alarmed node."""
    buf = io.BytesIO()
    if margins:
        fig.subplots_adjust(**margins)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=None if margins else "tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _x(s, time_unit: str, zone: str = "UTC") -> np.ndarray:
    """The plots' x values: wall-clock times in ``zone`` when the input had timestamps, else row numbers."""
    if time_unit != "s":
        return np.arange(len(s.timestamp))
    return local_times(s.timestamp, zone)


def local_times(epoch: np.ndarray, zone: str) -> np.ndarray:
    """Epoch seconds as ``zone``'s wall-clock times (datetime64, no zone: what a plot axis shows)."""
    t = np.asarray(epoch).astype("datetime64[s]")
    if zone == "UTC" or not len(t):
        return t
    import pandas as pd

    return pd.DatetimeIndex(t, tz="UTC").tz_convert(zone).tz_localize(None).to_numpy().astype("datetime64[s]")


def _time_label(time_unit: str, zone: str) -> str:
    return f"time ({zone})" if time_unit == "s" else "row"


GAP_STEPS = 3  # rows further apart than this many sampling steps (the median) have no data between them


def gaps(timestamp: np.ndarray, time_unit: str) -> np.ndarray:
    """Row indices i where rows i-1 and i are more than GAP_STEPS sampling steps apart (a node down,
    idle rows left out, a collector outage): the plots' lines and shading stop there instead of
    drawing a straight line across time without data."""
    t = np.asarray(timestamp, dtype=np.float64)
    if time_unit != "s" or len(t) < 3:
        return np.empty(0, dtype=np.int64)
    d = np.diff(t)
    return np.flatnonzero(d > GAP_STEPS * max(float(np.median(d)), 1.0)) + 1


def _line(x: np.ndarray, y: np.ndarray, breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x, y`` with a NaN point at each break: matplotlib ends the line there and starts a new one."""
    if not len(breaks):
        return x, y
    return np.insert(x, breaks, x[breaks - 1]), np.insert(np.asarray(y, dtype=np.float64), breaks, np.nan)


def _spans(ax, x: np.ndarray, mask: np.ndarray | None, color: str, alpha: float = 0.25,
           breaks: np.ndarray | None = None) -> None:
    if mask is None or not mask.any():
        return
    d = np.diff(np.r_[0, mask.astype(int), 0])
    cuts = np.zeros(len(mask) + 1, dtype=bool)
    if breaks is not None:
        cuts[breaks] = True  # a run of shaded rows across a gap is shaded on each side, not over the gap
    for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
        edges = [a, *(np.flatnonzero(cuts[a + 1:b]) + a + 1), b]
        for lo, hi in zip(edges[:-1], edges[1:]):
            ax.axvspan(x[lo], x[hi - 1], color=color, alpha=alpha, lw=0)


def signal_plot(s, th: Thresholds, time_unit: str = "s", zone: str = "UTC") -> str:
    sig, t = th.signal_of(s), th.threshold_for(s.node)
    x, breaks = _x(s, time_unit, zone), gaps(s.timestamp, time_unit)
    fig, ax = plt.subplots(figsize=(11, 2.6))
    ax.plot(*_line(x, sig, breaks), lw=0.6, color="tab:blue", label="alarm signal")
    ax.axhline(t, color="tab:red", lw=1, label="threshold")
    _spans(ax, x, None if s.labels is None else s.labels != 0, "tab:orange", breaks=breaks)
    _spans(ax, x, sig > t, "tab:red", 0.12, breaks)
    labelled = s.labels is not None and bool((s.labels != 0).any())
    said = (["orange = labelled anomaly"] if labelled else []) + ["red = alarmed"]
    starts = []
    for code, ls, style, name in ((1, ":", "dotted", "validation"), (2, "--", "dashed", "test")):
        idx = np.flatnonzero(s.split == code)
        if idx.size and idx[0] > 0:  # a split that starts inside the plot (a night's rows are all one)
            ax.axvline(x[idx[0]], color="grey", ls=ls, lw=0.8)
            starts.append(f"{style} = {name} start")
    if np.nanmin(sig) > 0:
        ax.set_yscale("log")
    said += starts + (["no line = no data"] if len(breaks) else [])
    ax.set_title(f"{s.node}: signal vs threshold ({'; '.join(said)})", fontsize=9, wrap=True)
    ax.set_xlabel(_time_label(time_unit, zone))
    ax.legend(loc="upper left", fontsize=7)
    return _png(fig, {"left": 0.06, "right": 0.99, "top": 1 - TITLE_IN / 2.6, "bottom": 0.2})


class AlarmWindow:
    """The rows around a node's strongest alarm (those within a day either side of it, 200 rows either
    side when the input had no timestamps; all rows when it has none), their per-metric errors read
    once, in times their normal error where the error file has the node's normal errors (as the
    alarms' top metrics, hpcad.signals.explain_scale), the metrics ordered by their largest, and the
    gaps in time among those rows (:func:`gaps`): what the heatmap and the values plot of a node show."""

    def __init__(self, errors: ErrorStore, s, th: Thresholds, time_unit: str):
        sig, t = th.signal_of(s), th.threshold_for(s.node)
        peak = int(np.nanargmax(sig)) if len(sig) else 0
        if not (sig > t).any():
            self.a, self.b = 0, len(sig)
        elif time_unit == "s":  # a day of time, not 288 rows: across gaps in the data those span days
            ts = np.asarray(s.timestamp)
            self.a = int(np.searchsorted(ts, ts[peak] - 86400, "left"))
            self.b = int(np.searchsorted(ts, ts[peak] + 86400, "right"))
        else:
            self.a, self.b = max(0, peak - 200), min(len(sig), peak + 200)
        self.breaks = gaps(np.asarray(s.timestamp)[self.a:self.b], time_unit)  # in the window's rows
        self.err = errors.errors(s.node, slice(self.a, self.b))
        # the strongest alarm's loudest row: the smoothed signal peaks where the window holds the most
        # error, which may be a row beside the fault's rows; the row's own error says which carries it
        lo, hi = peak, peak + 1
        while lo > self.a and sig[lo - 1] > t:
            lo -= 1
        while hi < self.b and sig[hi] > t:
            hi += 1
        self.loudest = lo + int(np.argmax(self.err[lo - self.a:hi - self.a].sum(1))) if len(self.err) else peak
        scale = errors.explain_scale(s.node)
        self.times_normal = scale is not None
        if self.times_normal:
            self.err = self.err / scale.astype(np.float32)
        self.order = np.argsort(self.err.max(0))[::-1]


def values_plot(errors: ErrorStore, s, th: Thresholds, values: np.ndarray, scaler, time_unit: str,
                 win: AlarmWindow, top: int = 4, zone: str = "UTC", expected: np.ndarray | None = None) -> str:
    """The alarm's top metrics in their own units around the strongest alarm (``values``: rows
    ``win.a:win.b``, every metric), against the node's training range (grey band), alarmed rows
    shaded, and where given what the model ``expected`` (the same rows; dashed): is the value new, or
    the combination?"""
    a, b, order = win.a, win.b, win.order[:top]
    lo, hi = scaler.training_range()
    x, breaks = _x(s, time_unit, zone)[a:b], win.breaks
    alarmed = th.signal_of(s)[a:b] > th.threshold_for(s.node)
    fig, axes = plt.subplots(len(order), 1, figsize=(11, 0.4 + 1.1 * len(order)), sharex=True, squeeze=False)
    for ax, j in zip(axes[:, 0], order):
        ax.axhspan(lo[j], hi[j], color="0.85", lw=0)
        # without antialiasing: a third of the PNG size
        ax.plot(*_line(x, values[:, j], breaks), lw=0.8, color="tab:blue", antialiased=False)
        if expected is not None:
            ax.plot(*_line(x, expected[:, j], breaks), lw=0.8, ls="--", color="tab:orange", antialiased=False)
        _spans(ax, x, alarmed, "tab:red", 0.12, breaks)
        ax.set_ylabel(errors.metrics[j], fontsize=7, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=7)
    most = "the most times their normal error" if win.times_normal else "the largest error"
    no_data = "; no line = no data" if len(breaks) else ""
    model = "; dashed orange = what the model expected" if expected is not None else ""
    axes[0, 0].set_title(f"{s.node}: the {len(order)} metrics with {most}, in their own units; grey = "
                         f"the node's training range, red = alarmed rows{model}{no_data}", fontsize=9, wrap=True)
    axes[-1, 0].set_xlabel(_time_label(time_unit, zone))
    width = max((len(errors.metrics[j]) for j in order), default=8)
    height = 0.4 + 1.1 * len(order)
    return _png(fig, {"left": min(0.4, 0.03 + 0.0065 * width), "right": 0.99, "top": 1 - TITLE_IN / height,
                      "bottom": 0.35 / height + 0.05, "hspace": 0.15}, dpi=72)


def heatmap(errors: ErrorStore, s, th: Thresholds, time_unit: str = "s", win: AlarmWindow | None = None,
             top: int = 20, zone: str = "UTC") -> str:
    """Per-metric error of the ``top`` metrics (by their largest error) over the rows around the
    node's strongest alarm (the whole series when it has none), metric names on the axis."""
    sig, t = th.signal_of(s), th.threshold_for(s.node)
    win = win or AlarmWindow(errors, s, th, time_unit)
    a, b, err, order = win.a, win.b, np.sqrt(win.err), win.order[:top]
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.17 * len(order)))
    vmax = float(np.quantile(err[:, order], 0.99)) or 1.0
    ax.imshow(err[:, order].T, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(order)), [errors.metrics[j] for j in order], fontsize=7)
    x = _x(s, time_unit, zone)[a:b]
    ticks = np.linspace(0, len(x) - 1, min(len(x), 7)).astype(int) if len(x) else []
    ax.set_xticks(ticks, [str(x[k]).replace("T", " ")[:16] for k in ticks], fontsize=7)
    lab = np.flatnonzero(s.labels[a:b] != 0) if s.labels is not None else np.empty(0, dtype=np.int64)
    if lab.size:
        ax.plot(lab, np.full(lab.size, -0.8), "|", color="tab:orange", ms=4)
    alarmed = np.flatnonzero(sig[a:b] > t)
    ax.plot(alarmed, np.full(alarmed.size, len(order) - 0.2), "|", color="tab:red", ms=4)
    breaks = win.breaks
    for k in breaks:  # one column per row: a gap in time is a line between two columns
        ax.axvline(k - 0.5, color="tab:cyan", lw=1.2)
    ax.set_xlabel(_time_label(time_unit, zone) + (" (one column per row)" if len(breaks) else ""))
    residual = "|x - x_hat| whitened" if errors.recipe.whitened else "|x - x_hat|"  # hpcad/model/whiten.py
    what = (f"{residual} over its normal size, the {{}} metrics most above normal" if win.times_normal
            else f"per-metric error {residual}, the {{}} metrics with the largest error").format(len(order))
    said = (["orange ticks = labelled anomaly"] if lab.size else []) + ["red = alarmed rows"]
    said += ["cyan line = no data between"] if len(breaks) else []
    ax.set_title(f"{s.node}: {what} ({', '.join(said)})", fontsize=9, wrap=True)
    width = max((len(errors.metrics[j]) for j in order), default=8)
    height = 0.9 + 0.17 * len(order)
    return _png(fig, {"left": min(0.4, 0.02 + 0.0065 * width), "right": 0.99, "top": 1 - TITLE_IN / height,
                      "bottom": 0.7 / height})


def overview_grid(sigs: list, th: Thresholds, time_unit: str = "s") -> tuple[np.ndarray, int, int] | None:
    """[nodes, bins] peak signal / threshold, the first bin's start and the bin width: an hour (a day
    beyond two weeks; hours start on the hour), or 1/200 of the span in rows when the input had no
    timestamps."""
    stamps = [s.timestamp for s in sigs if len(s.timestamp)]
    if not stamps:
        return None
    t0, t1 = min(int(t[0]) for t in stamps), max(int(t[-1]) for t in stamps)
    span = max(t1 - t0, 1)
    if time_unit == "row":
        step = max(1, -(-span // 200))
    else:
        step = 3600 if span <= 14 * 86400 else 86400
        if step == 3600:  # bins on whole hours: a night's 09:15 is in the 09:00 bin, labelled 09:00
            t0 -= t0 % step
            span = t1 - t0
    grid = np.full((len(sigs), span // step + 1), np.nan)
    for i, s in enumerate(sigs):
        ratio = th.signal_of(s) / max(th.threshold_for(s.node), 1e-12)
        np.fmax.at(grid[i], (s.timestamp - t0) // step, ratio)
    return grid, t0, step


def overview(errors: ErrorStore, th: Thresholds, nodes: list[str], time_unit: str = "s", zone: str = "UTC") -> str:
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
    ticks = np.arange(0, bins, -(-bins // 8))  # at most 8, evenly spaced in whole bins: labels never collide
    import datetime as dt

    if time_unit == "row":
        ax.set_xticks(ticks, [str(t0 + int(k) * step) for k in ticks], fontsize=7)
        ax.set_xlabel("row")
        per = f"peak per {step} rows"
    else:
        from zoneinfo import ZoneInfo

        fmt = "%m-%d %H:%M" if step == 3600 else "%Y-%m-%d"
        ax.set_xticks(ticks, [dt.datetime.fromtimestamp(t0 + int(k) * step, ZoneInfo(zone)).strftime(fmt)
                              for k in ticks], fontsize=7)
        per = ("hourly" if step == 3600 else "daily") + f" peak, {zone}"
    height = fig.get_figheight()
    # a tall overview (hundreds of nodes): the colour scale keeps a readable size at the top, and the
    # dates are at the top as well as the bottom, where the first rows are
    fig.colorbar(im, ax=ax, label="peak signal / threshold", shrink=min(1.0, 4.0 / height), anchor=(0.0, 1.0))
    top = height > 8
    if top:
        ax.tick_params(axis="x", labeltop=True)
    ax.set_title(f"alarms per node over time ({per}; red >= 1 = alarm; white = no data)", fontsize=9,
                 pad=16 if top else 6)
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


def profile_plot(cls: str, prof: dict) -> str:
    """A label class's top metrics: by times their normal error where known (as alarms rank them),
    else by mean squared error."""
    times = "top_x_normal" in prof
    top = prof["top_x_normal"] if times else prof["top"]
    names = [n for n, _ in top][::-1]
    vals = [v for _, v in top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(names) + 1))
    ax.barh(names, vals, color="tab:purple")
    ax.set_xlabel("mean error, in times the metric's normal error" if times
                  else "mean squared error (standardised units)")
    ax.set_title(f"{CLASS_NAMES.get(cls, 'class ' + cls)}: top metrics ({prof['rows']} rows)", fontsize=9)
    ax.tick_params(labelsize=7)
    return _png(fig)


def curves(models_dir: Path, nodes: list[str]) -> str:
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 2.5
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    ax.set_title("training curves (solid = training, dashed = validation)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    return _png(fig)
