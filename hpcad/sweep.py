"""A Hydra callback that ranks the points of a multirun sweep (``sweep_summary.csv`` in the sweep folder).

Points are ranked by the validation cost in their ``metrics.json`` (labelled runs of ``run`` or
``threshold``), else by the mean best validation loss of their node models (``train`` sweeps).
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
                     "metric": score[0] if score else "", "value": score[1] if score else float("nan"),
                     "status": "ok" if score else "failed"})
    rows.sort(key=lambda r: (np.isnan(r["value"]), r["value"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    with atomic_path(sweep_dir / "sweep_summary.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["rank", "point", "status", "metric", "value", "overrides"])
        w.writeheader()
        w.writerows(rows)
    return rows


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
