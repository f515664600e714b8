"""Explanation: which metrics carry the error, per anomaly class (the lecture's error profiles), and
what a node's model expected its metrics to read (its reconstruction, in the metrics' own units)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcad.errorstore import ErrorStore
from hpcad.preprocess import fill_gaps, gap_limit, window_at

if TYPE_CHECKING:
    from hpcad.data.store import TelemetryStore
    from hpcad.model.files import NodeModel
    from hpcad.model.light import LightMap, LightMaps


ProfileSums = tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, int], bool]


def class_profiles(errors: ErrorStore, top: int = 20) -> dict:
    """Mean per-metric squared error per label class, accumulated node by node (sums and counts),
    and where every node's normal errors are known the mean "times normal" (each row's errors over
    its node's :meth:`~hpcad.errorstore.ErrorStore.explain_scale`, as alarms rank their top metrics):
    ``top_x_normal``."""
    return profiles_from_sums([profile_sums(errors)], errors.metrics, top)


def profile_sums(errors: ErrorStore, nodes: list[str] | None = None) -> ProfileSums:
    """:func:`class_profiles`' sums over ``nodes`` (default all): per class the per-metric error
    and "times normal" sums, the row counts, and whether every node's normal errors are known.
    They add across nodes, so MPI ranks each read their own nodes' per-row errors."""
    sums: dict[int, np.ndarray] = {}
    times: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    known = True
    for s in errors.signals(nodes):
        if s.labels is None:
            continue
        err = errors.errors(s.node)
        scale = errors.explain_scale(s.node)
        known &= scale is not None
        for c in np.unique(s.labels):
            rows = s.labels == c
            sums[int(c)] = sums.get(int(c), 0) + err[rows].sum(0, dtype=np.float64)
            if known:
                times[int(c)] = times.get(int(c), 0) + (err[rows] / scale).sum(0)
            counts[int(c)] = counts.get(int(c), 0) + int(rows.sum())
    return sums, times, counts, known


def profiles_from_sums(parts: list[ProfileSums], metrics: list[str], top: int = 20) -> dict:
    """The class profiles from :func:`profile_sums` of one or more shares of the nodes (added in order;
    one share's sums come out as they are: 0 + x is x)."""
    sums, times, counts, known = {}, {}, {}, all(p[3] for p in parts)
    for part_sums, part_times, part_counts, _ in parts:
        for c, v in part_sums.items():
            sums[c] = sums.get(c, 0) + v
            times[c] = times.get(c, 0) + part_times.get(c, 0)
            counts[c] = counts.get(c, 0) + part_counts[c]
    out = {}
    for c in sorted(sums):
        mean = sums[c] / counts[c]
        order = np.argsort(mean)[::-1]
        out[str(c)] = {"rows": counts[c], "mean_error": mean.tolist(),
                       "top": [[metrics[j], float(mean[j])] for j in order[:top]]}
        if known:
            x = times[c] / counts[c]
            out[str(c)]["top_x_normal"] = [[metrics[j], float(x[j])] for j in np.argsort(x)[::-1][:top]]
    return out


def metric_family(name: str) -> str:
    """``ips_p0_3`` -> ``ips``: the telemetry family a metric belongs to."""
    return name.split("_")[0]


def lookback(model: "NodeModel", fill_limit: int) -> int:
    """Rows before a row that its expected value reads: the model's window and the gap filling's reach."""
    return model.spec.window - 1 + gap_limit(fill_limit)


def expected_values(model: "NodeModel", values: np.ndarray, rows: np.ndarray, fill_limit: int,
                    light: "LightMap | None" = None) -> np.ndarray:
    """What the node's model expected at ``rows`` of the node's raw values [T, M] (every row, as
    scoring reads them: gaps filled up to ``fill_limit`` rows, standardised, each row in its window):
    its members' mean reconstruction, adapted by ``light`` (the light map that scored the node), in
    the metrics' own units [len(rows), M] (float64). The residual the alarm signal sums is the
    standardised difference of these and the observed values.

    In NumPy, not torch: the report's node pages run in processes forked from one that has trained
    or scored with torch, where torch's matmuls wait forever on the parent's OpenMP threads.

    Only the rows those need are prepared (a day's page of a node-year standardises a day, not the
    year): the filling looks back at most ``fill_limit`` rows, a window ``spec.window - 1``."""
    rows = np.asarray(rows)
    if not len(rows):
        return np.empty((0, values.shape[1]))
    first = max(int(rows.min()) - lookback(model, fill_limit), 0)
    z = model.scaler.transform(fill_gaps(values[first:int(rows.max()) + 1], fill_limit))[0]
    x = window_at(z, rows - first, model.spec.window).astype(np.float64)
    M, n_encoder = z.shape[1], len(model.spec.hidden)
    recon, code = 0.0, 0.0
    for member in model.members:
        h = x
        weights = [p.detach().numpy().astype(np.float64) for p in member]
        n_layers = len(weights) // 2
        for layer in range(n_layers):
            h = h @ weights[2 * layer] + weights[2 * layer + 1]
            if layer < n_layers - 1:
                h = np.maximum(h, 0.0)
            if layer == n_encoder - 1:
                code = code + h
        recon = recon + h[:, h.shape[1] - M:]
    recon, code = recon / len(model.members), code / len(model.members)
    if light is not None:  # hpcad.model.light.LightMap.apply
        d = light.delta.detach().numpy().astype(np.float64)
        recon = recon + recon @ d[:M] + code @ d[M:-1] + d[-1]
    return model.scaler.to_raw(recon)


def scoring_light(errors: ErrorStore, node: str, model: "NodeModel", maps: "LightMaps",
                  night: str | None) -> tuple[bool, "LightMap | None"]:
    """Whether ``model`` and the light map ``maps`` hold for ``night`` are what scored ``node`` into
    ``errors`` (the model file's digest and the map's version, as recorded), and that map: expected
    values are quoted only from what scored the node, never from a model retrained since."""
    digest, version = errors.scored_with(node)
    if digest and model.digest != digest:
        return False, None
    lm = maps.for_night(node, night) if version else None
    return (lm.version if lm is not None else 0) == version, lm


@dataclass
class ExpectedQuotes:
    """Adds to a node's alarm records (:func:`hpcad.threshold.evaluate.alarm_events`), per top metric,
    what it read at the alarm's loudest row (``observed``), what the node's model expected
    (``expected``) and the node's ``training_range``, in the metric's own units: what a ticket
    quotes. Called per node on the rank that applies its thresholds; only each alarm's loudest row
    and the rows before it that its filling and window need are read. A node whose model or light
    map is no longer what scored it (retrained since) is left as it is."""

    errors: ErrorStore
    store: "TelemetryStore"
    models_dir: Path
    maps: "LightMaps"
    night: str | None
    fill_limit: int

    def __call__(self, node: str, records: list[dict]) -> None:
        from hpcad.model.files import NodeModel, model_path
        from hpcad.preprocess import in_model_order, metric_positions

        mine = [r for r in records if "loudest_row" in r and r.get("top_metrics")]
        path = model_path(self.models_dir, node)
        if not mine or node not in self.store or not path.exists():
            return
        model = NodeModel.load(path)
        ok, lm = scoring_light(self.errors, node, model, self.maps, self.night)
        if not ok or model.metrics != self.errors.metrics:
            return
        lo, hi = model.scaler.training_range()
        where = {m: j for j, m in enumerate(model.metrics)}
        order = metric_positions(model.metrics, self.store.metrics)
        back = lookback(model, self.fill_limit)
        rows = [int(r["loudest_row"]) for r in mine]
        spans = [(max(row - back, 0), row + 1) for row in rows]
        for r, row, (first, _), raw in zip(mine, rows, spans, self.store.values_at(node, spans)):
            values = in_model_order(raw, order)
            expected = expected_values(model, values, np.array([row - first]), self.fill_limit, lm)[0]
            quoted = []
            for t in r["top_metrics"]:
                j = where[t["metric"]]
                quoted.append({**t, "observed": _number(values[-1, j]), "expected": _number(expected[j]),
                               "training_range": [_number(lo[j]), _number(hi[j])]})
            r["top_metrics"] = quoted


def _number(v) -> float | None:
    """A JSON number to 6 significant digits, as float32 values hold them (None for a missing value)."""
    v = float(v)
    return float(f"{v:.6g}") if np.isfinite(v) else None
