"""Light retraining in the nightly job: a node's light map refitted on its last nights' normal rows."""
from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcad.data.store import TelemetryStore
from hpcad.errorstore import ErrorStore
from hpcad.model.light import LightMaps, fit_light_map
from hpcad.model.files import NodeModel, model_path
from hpcad.preprocess import fill_gaps, windows

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig
    from hpcad.threshold.rules import Thresholds

log = logging.getLogger(__name__)


def recent_nights(day: dt.date, out: Path, tmp: Path, count: int) -> list[tuple[str, TelemetryStore, ErrorStore]]:
    """Tonight (still in ``tmp``) and the published nights before it that kept their data."""
    nights = []
    for k in range(max(count, 1)):
        d = tmp if k == 0 else out / (day - dt.timedelta(days=k)).isoformat()
        if (d / "store.h5").exists() and (d / "errors.h5").exists():
            nights.append(((day - dt.timedelta(days=k)).isoformat(), TelemetryStore(d / "store.h5"),
                           ErrorStore(d / "errors.h5")))
    return nights


def light_retrain(cfg: HpcadConfig, node: str, day: dt.date, nights: list[tuple[str, TelemetryStore, ErrorStore]],
                  maps: LightMaps, staging: Path, under: Thresholds | None = None) -> dict | None:
    """Fit the node's light map (for its model in ``maps.models_dir``) on its last nights' rows, less
    the night's worst 10 % of the signal (possible incidents), when labelled the anomalous rows, and
    with ``under`` (drift's refits) the rows over the node's threshold: a map learns only what the
    detector calls normal. The version of ``maps`` valid from the next night, written to ``staging``
    until the night is published."""
    n = cfg.nightly
    model = NodeModel.load(model_path(maps.models_dir, node))
    xs, used = [], []
    for night, store, errors in nights:
        if node not in errors.nodes:
            continue
        s = next(errors.signals([node]))
        ok = s.signal <= np.quantile(s.signal, 0.9)
        if s.labels is not None:
            ok &= s.labels == 0
        if under is not None:
            ok &= under.signal_of(s) <= under.threshold_for(node)
        nd = store.read(node)
        z = model.scaler.transform(fill_gaps(nd.values, cfg.preprocess.nan_fill_limit))[0]
        xs.append(windows(z, model.spec.window)[ok])
        used.append(night)
    x = np.concatenate(xs) if xs else np.empty((0, len(model.metrics) * model.spec.window), np.float32)
    if len(x) == 0:
        log.warning("nightly %s: node %s has no normal rows to refit its light map on%s", day, node,
                    " (rows under its threshold)" if under is not None else "")
        return None
    t0 = time.perf_counter()
    lm = fit_light_map(model.members, len(model.spec.hidden), x, n.light_ridge, sorted(used),
                       valid_from=(day + dt.timedelta(days=1)).isoformat(), n_out=len(model.metrics))
    lm.version, lm.model = maps.next_version(node, lm.valid_from), maps.digest(node)
    maps.save(node, lm, into=staging)
    return {"node": node, "version": lm.version, "rows": lm.rows, "days": lm.fitted_on, "valid_from": lm.valid_from,
            "fit_ms": round(1000 * (time.perf_counter() - t0), 1)}
