"""A Hydra callback that ranks the points of a multirun sweep (``sweep_summary.csv`` in the sweep folder).

Points are ranked by the validation cost in their ``metrics.json`` (labelled runs of ``run`` or
``threshold``), else by the mean best validation loss of their node models (``train`` sweeps).
When the sweep varies ``train.seed``, ``sweep_settings.csv`` and ``sweep_settings.md`` add one row
per setting (a point's overrides without the seed) and detector, the autoencoder beside the
baselines: each figure as mean +- standard deviation over the seeds (docs/results.md's protocol).
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hpcad.atomic import atomic_path
from hpcad.model.files import FORMAT, load_tensors, model_nodes, model_path

log = logging.getLogger(__name__)
FAILED_POINTS: list[str] = []  # points of the last sweep in this process that produced no result (hpcad.cli exits 2)


def point_score(folder: Path) -> tuple[str, float] | None:
    metrics = folder / "metrics.json"
    if metrics.exists():
        return "val_cost", float(json.loads(metrics.read_text())["splits"]["val"]["cost"])
    losses = []
    for node in model_nodes(folder / "models"):
        h = load_tensors(model_path(folder / "models", node), FORMAT, "model file")["history"]
        vals = [v for v in h["val_loss"] if v == v]
        if vals:
            losses.append(min(vals))
    return ("mean_best_val_loss", float(np.mean(losses))) if losses else None


def summarise(sweep_dir: Path) -> list[dict]:
    rows = []
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        score = point_score(folder)
        overrides = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
        rows.append({"point": folder.name, "overrides": " ".join(map(str, overrides)),
                     "override_list": list(map(str, overrides)), "metric": score[0] if score else "",
                     "value": score[1] if score else float("nan"), "status": "ok" if score else "failed"})
    rows.sort(key=lambda r: (np.isnan(r["value"]), r["value"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    with atomic_path(sweep_dir / "sweep_summary.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["rank", "point", "status", "metric", "value", "overrides"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


SEED = "train.seed="
# (column, split, key in the split's figures; "ranking." for the threshold-free ones)
FIGURES = [("ap_val", "val", "ranking.ap"), ("ap_eval", "eval", "ranking.ap"), ("roc_eval", "eval", "ranking.roc_auc"),
           ("best_f1_eval", "eval", "ranking.best_f1"), ("cost_val", "val", "cost"), ("cost_test", "test", "cost"),
           ("event_f1_test", "test", "f1")]


def _figure(split: dict, key: str) -> float:
    for part in key.split("."):
        split = split.get(part, {}) if isinstance(split, dict) else {}
    return float(split) if isinstance(split, (int, float)) else float("nan")


def _detector_figures(metrics: dict) -> dict[str, dict[str, float]]:
    """Per detector (the autoencoder first, then the baselines), the FIGURES of one point."""
    out = {}
    for name, splits in [(metrics.get("detector", "autoencoder"), metrics["splits"]),
                         *((b, v["splits"]) for b, v in sorted(metrics.get("baselines", {}).items()))]:
        out[name] = {col: _figure(splits.get(split, {}), key) for col, split, key in FIGURES}
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if x == x], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def by_setting(sweep_dir: Path, rows: list[dict]) -> list[dict]:
    """``sweep_settings.csv``/``.md``: the points grouped by their overrides without ``train.seed``,
    one row per setting and detector with the number of seeds and each figure's mean and standard
    deviation over the seeds (ddof 0, as docs/results.md); settings ordered by the autoencoder's mean
    validation cost (``train`` sweeps: mean best validation loss). Only when a setting ran on 2+ seeds."""
    groups: dict[str, list[dict]] = {}
    # the overrides as typed (Hydra records an interpolation in an override as $\{train.seed\})
    typed = {r["point"]: [o.replace("$\\{", "${").replace("\\}", "}") for o in r["override_list"]] for r in rows}
    common = set.intersection(*(set(typed[r["point"]]) for r in rows)) if rows else set()
    for r in rows:  # a setting is named by what the sweep varies; what every point shares goes under the table
        setting = " ".join(o for o in typed[r["point"]] if not o.startswith(SEED) and o not in common)
        groups.setdefault(setting or "(one setting)", []).append(r)
    if not any(sum(any(o.startswith(SEED) for o in typed[r["point"]]) for r in g) > 1 for g in groups.values()):
        return []
    out = []
    for setting, points in groups.items():
        ok = [r for r in points if r["status"] == "ok"]
        seeds = " ".join(sorted((o.split("=", 1)[1] for r in ok for o in typed[r["point"]] if o.startswith(SEED)),
                                key=lambda v: (len(v), v)))
        metrics = [json.loads((sweep_dir / r["point"] / "metrics.json").read_text())
                   for r in ok if (sweep_dir / r["point"] / "metrics.json").exists()]
        if not metrics:  # train sweeps: the models' validation loss
            m, sd = _mean_std([r["value"] for r in ok])
            out.append({"setting": setting, "detector": "autoencoder", "seeds": len(ok), "seed_values": seeds,
                        "failed": len(points) - len(ok), "mean_best_val_loss": m, "mean_best_val_loss_std": sd})
            continue
        per = [_detector_figures(m) for m in metrics]
        for det in per[0]:
            row = {"setting": setting, "detector": det, "seeds": len(per), "seed_values": seeds,
                   "failed": len(points) - len(ok)}
            for col, _, _ in FIGURES:
                row[col], row[col + "_std"] = _mean_std([p[det][col] for p in per if det in p])
            out.append(row)
    key = "cost_val" if any("cost_val" in r for r in out) else "mean_best_val_loss"
    first: dict[str, float] = {}  # per setting, its main detector's figure (the first row of the setting)
    for r in out:
        first.setdefault(r["setting"], r[key] if r.get(key, float("nan")) == r.get(key) else float("inf"))
    out.sort(key=lambda r: first[r["setting"]])  # stable: the main detector first within a setting
    fields = list(out[0])
    for r in out:
        fields += [k for k in r if k not in fields]
    with atomic_path(sweep_dir / "sweep_settings.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(out)
    settings_plot(out, key, sweep_dir / "sweep_settings.png")
    with atomic_path(sweep_dir / "sweep_settings.md") as tmp:
        tmp.write_text(settings_table(out, key, sorted(o for o in common if not o.startswith(SEED))))
    return out


def settings_plot(rows: list[dict], key: str, path: Path) -> None:
    """``sweep_settings.png``: the figures a setting is chosen on (validation average precision and
    cost; ``train`` sweeps: the models' best validation loss), mean +- std over the seeds, one bar
    per setting and detector, settings in the table's order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ([("ap_val", "validation average precision (higher is better)"),
             ("cost_val", "validation cost (lower is better)")] if key == "cost_val"
            else [("mean_best_val_loss", "mean best validation loss of the node models")])
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    fig, axes = plt.subplots(1, len(cols), figsize=(6 * len(cols), 1.2 + 0.25 * len(settings) * len(detectors)),
                             squeeze=False)
    h = 0.8 / len(detectors)
    for ax, (col, label) in zip(axes[0], cols):
        for j, det in enumerate(detectors):
            mine = [(i, r) for i, s in enumerate(settings) for r in rows
                    if r["setting"] == s and r["detector"] == det and r.get(col, float("nan")) == r.get(col)]
            ax.barh([i + (j - (len(detectors) - 1) / 2) * h for i, _ in mine], [r[col] for _, r in mine], height=h,
                    xerr=[r.get(col + "_std", 0.0) for _, r in mine], capsize=2, label=det)
        ax.set_yticks(range(len(settings)), [s if len(s) <= 40 else s[:37] + "..." for s in settings], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("mean +- std over the seeds per setting (bars: detectors); choose on these validation figures",
                 fontsize=9)
    fig.tight_layout()
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(detectors), fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def settings_table(rows: list[dict], key: str, common: list[str]) -> str:
    """The settings as a markdown table, figures as ``mean +- std`` (the layout of docs/results.md)."""
    cols = [c for c, _, _ in FIGURES] if key == "cost_val" else ["mean_best_val_loss"]

    def cell(r: dict, c: str) -> str:
        m, sd = r.get(c, float("nan")), r.get(c + "_std", float("nan"))
        if m != m:
            return ""
        digits = 0 if c.startswith("cost") else 4 if c == "mean_best_val_loss" else 3
        return f"{m:.{digits}f} +- {sd:.{digits}f}"

    head = ["setting", "detector", "seeds", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join([f"`{r['setting']}`", r["detector"], str(r["seeds"]), *(cell(r, c) for c in cols)])
              + " |" for r in rows]
    note = ("Mean +- standard deviation over the seeds. Settings ordered by the autoencoder's mean validation "
            "cost; choose on validation figures (ap_val, cost_val): the test and eval columns are for "
            "reporting, a choice made on them is marked as such (docs/results.md).") if key == "cost_val" else \
        "Mean +- standard deviation over the seeds of the node models' mean best validation loss."
    shared = f" Every point: `{' '.join(common)}`." if common else ""
    return "\n".join(lines) + "\n\n" + note + shared + "\n\n![the validation figures per setting](sweep_settings.png)\n"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = summarise(sweep_dir)
            failed = [r for r in rows if r["status"] == "failed"]
            FAILED_POINTS[:] = [f"{r['point']} ({r['overrides']})" for r in failed]
            if failed:  # a SLURM point that failed still "completes" for Hydra: say so, and exit 2 (hpcad.cli)
                log.error("sweep: %d of %d points produced no result: %s; their logs are in %s/<point>/ and, for "
                          "SLURM jobs, %s/.submitit/", len(failed), len(rows), "; ".join(FAILED_POINTS), sweep_dir,
                          sweep_dir)
            if rows and rows[0]["status"] == "ok":
                log.info("sweep summary: best %s (%s=%s) -> %s", rows[0]["overrides"], rows[0]["metric"],
                         rows[0]["value"], sweep_dir / "sweep_summary.csv")
            if by_setting(sweep_dir, rows):
                log.info("sweep over seeds: mean +- std per setting and detector -> %s",
                         sweep_dir / "sweep_settings.md")
