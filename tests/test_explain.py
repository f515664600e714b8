"""Explanations: an alarm's top metrics are those that carry the most times their normal error."""
import csv

import numpy as np
import pytest

from hpcad.errorstore import ErrorStore, NodeSignal
from hpcad.incidents import cause_of
from hpcad.model.files import NodeModel, model_path
from hpcad.report.markup import alarms_table, multiple, top_names
from hpcad.score import score_nodes
from hpcad.signals import EXPLAIN_FLOOR, explain_scale
from hpcad.threshold.evaluate import alarm_events, top_metrics_of, write_alarms_csv
from hpcad.threshold.rules import Thresholds

from test_score import _site

METRICS = ["fan_noisy", "ips_p0_1", "ips_p0_2", "temp_const"]
NORMAL = np.array([0.8, 0.1, 0.1, 0.0], np.float32)  # fan: always reconstructed poorly; temp: constant in training


def _alarm(scale_of):
    """One node, one alarm over rows 10-19: the fan's error noisy (4, five times normal), the
    two ips metrics 1.7 and 1.6 (16-17 times normal: the fault), the constant temperature 0.05."""
    T = 40
    err = np.tile(NORMAL, (T, 1))
    err[10:20] = [4.0, 1.7, 1.6, 0.05]
    sig = err.sum(1).astype(np.float64)
    s = NodeSignal("n1", sig, np.full(T, 2, np.int8), None, np.arange(T, dtype=np.int64) * 300)
    th = Thresholds("cost", "node", None, {"n1": 3.0}, {})
    (rec,) = alarm_events(s, th, lambda node, spans: [err[a:b] for a, b in spans], METRICS, 3,
                          scale_of=scale_of)
    return rec


def test_an_alarm_names_the_metrics_most_times_their_normal_error(tmp_path):
    """By raw error the always-noisy fan tops every alarm and its family becomes the cause; by times
    normal the faulted ips metrics come first. A metric constant in training (normal error 0) is
    measured against the floor (a quarter of the node's mean normal error), not blown up to infinity."""
    raw = _alarm(None)
    assert [m["metric"] for m in raw["top_metrics"]] == ["fan_noisy", "ips_p0_1", "ips_p0_2"]
    assert cause_of(raw) == "fan"
    rec = _alarm(lambda node: explain_scale(NORMAL))
    floor = EXPLAIN_FLOOR * NORMAL.mean()
    np.testing.assert_allclose(explain_scale(NORMAL), [0.8, 0.1, 0.1, floor])
    assert [m["metric"] for m in rec["top_metrics"]] == ["ips_p0_1", "ips_p0_2", "fan_noisy"]
    assert [round(m["x_normal"], 3) for m in rec["top_metrics"]] == [17.0, 16.0, 5.0]
    assert rec["top_metrics"][0]["error"] == np.float32(1.7)
    assert cause_of(rec) == "ips"
    # alarms.csv keeps name:error and adds top_x_normal in the same order; read back, the report
    # shows the names with their "times normal" and finds the same cause
    write_alarms_csv(tmp_path / "alarms.csv", [rec])
    row = next(csv.DictReader(open(tmp_path / "alarms.csv")))
    assert row["top_metrics"] == "ips_p0_1:1.7 ips_p0_2:1.6 fan_noisy:4" and row["top_x_normal"] == "17 16 5"
    back = top_metrics_of(row)
    assert [(m["metric"], m["x_normal"]) for m in back] == [("ips_p0_1", 17.0), ("ips_p0_2", 16.0), ("fan_noisy", 5.0)]
    assert cause_of({"top_metrics": back}) == "ips"
    assert "data-v='ips_p0_1 (17x), ips_p0_2 (16x), fan_noisy (5x)'" in alarms_table([row], lambda n: None)
    assert top_names([{"metric": "ctx_switches", "x_normal": 4412.0}, {"metric": "load1", "x_normal": 0.834}]) \
        == "ctx_switches (4,412x), load1 (0.83x)"
    assert top_names([{"metric": "m00", "x_normal": 5.92e9}, {"metric": "m27", "x_normal": 999_999.0},
                      {"metric": "m37", "x_normal": 1.0e6}]) == "m00 (5.9e9x), m27 (999,999x), m37 (1.0e6x)"
    # the report's alarmed-nodes table writes a peak over its threshold the same way (MSL's P-10 read
    # 416,226,029 there)
    assert [multiple(x) for x in (416_226_029.0, 6.17, 3.0, 1234.4)] == ["4.2e8x", "6.2x", "3x", "1,234x"]
    # an alarms.csv written before the column: names and errors as they were
    old = {k: v for k, v in row.items() if k != "top_x_normal"}
    assert [m.get("x_normal") for m in top_metrics_of(old)] == [None, None, None]


def test_scored_errors_record_each_metrics_normal_error(tmp_path):
    """``errors.h5`` keeps each node's held-out error per metric beside its errors (the threshold
    and report stages never load the models); a model file without it gives none, and alarms are
    then ranked by error as before."""
    held = np.array([2.0, 0.1, 0.3], np.float32)
    cfg, store, models, _ = _site(tmp_path, held)
    cfg.signal.whiten = True
    score_nodes(cfg, store, models, tmp_path / "whitened.h5")
    whitened = NodeModel.load(model_path(models, "b")).whitening.holdout_error
    np.testing.assert_array_equal(ErrorStore(tmp_path / "whitened.h5").normal_error("b"), whitened)
    cfg.signal.whiten = False  # below: the plain squared errors, and the held-out errors training recorded
    score_nodes(cfg, store, models, tmp_path / "errors.h5")
    errors = ErrorStore(tmp_path / "errors.h5")
    np.testing.assert_array_equal(errors.normal_error("b"), held)
    # the node page's heatmap and values plot order the metrics as the alarms do
    from hpcad.report.plots import AlarmWindow

    s = next(errors.signals(["b"]))
    win = AlarmWindow(errors, s, Thresholds("cost", "node", None, {"a": 1.0, "b": 1.0}, {}), "s")
    times = errors.errors("b", slice(win.a, win.b)) / explain_scale(held)
    assert win.times_normal and np.array_equal(win.order, np.argsort(times.max(0))[::-1])
    cfg.signal.metric_scales = True  # in the units of the scaled errors
    score_nodes(cfg, store, models, tmp_path / "scaled.h5")
    np.testing.assert_allclose(ErrorStore(tmp_path / "scaled.h5").normal_error("b"), held / [2.0, 0.8, 0.8], rtol=1e-6)
    old = tmp_path / "old"
    old.mkdir()
    cfg, store, models, _ = _site(old)
    cfg.signal.whiten = False
    score_nodes(cfg, store, models, old / "errors.h5")
    errors = ErrorStore(old / "errors.h5")
    assert errors.normal_error("b") is None
    win = AlarmWindow(errors, next(errors.signals(["b"])), Thresholds("cost", "node", None, {"b": 1.0}, {}), "s")
    assert not win.times_normal and np.array_equal(win.order, np.argsort(win.err.max(0))[::-1])


@pytest.mark.parametrize("window,light", [(1, False), (3, True)])
def test_expected_values_are_what_scoring_measured_each_row_against(window, light):
    """The node page's "expected" is the reconstruction scoring compared each row with: observed
    minus expected, standardised, squared, is the row's error in errors.h5 (unwhitened, no range
    excess), with the gaps filled as scoring fills them, each row in its window, and the light map
    that scored the node applied."""
    import torch

    from hpcad.config import HpcadConfig
    from hpcad.explain import expected_values
    from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
    from hpcad.model.light import LightMap
    from hpcad.preprocess import Scaler, fill_gaps
    from hpcad.score import reconstruction_errors
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(HpcadConfig)
    rng = np.random.default_rng(window)
    values = (rng.normal(size=(120, 4)) * [1.0, 50.0, 3.0, 0.1] + [0.0, 900.0, 40.0, 2.0]).astype(np.float32)
    values[60:66, 1] = np.nan  # three rows forward-filled, three missing
    values[90:95] *= 30  # far beyond the soft clip
    spec = AutoencoderSpec(hidden=[3], window=window)
    scaler = Scaler.fit(values[:50], cfg.preprocess)
    model = NodeModel("n1", spec, [f"m{j}" for j in range(4)], [glorot_init(spec, 4, 7)], scaler, {}, 1.0)
    lm = LightMap(torch.from_numpy(rng.normal(scale=0.1, size=(4 + 3 + 1, 4)).astype(np.float32))) if light else None
    z = scaler.transform(fill_gaps(values, cfg.preprocess.nan_fill_limit))[0]
    scored = reconstruction_errors([model], [z], torch.device("cpu"), [lm])[0]
    # from row 62 on, inside the gap: its filling and window reach back before the rows asked for
    for rows in (np.arange(55, 100), np.arange(62, 100)):
        expected = expected_values(model, values, rows, cfg.preprocess.nan_fill_limit, lm)
        assert expected.shape == (len(rows), 4) and np.isfinite(expected).all()
        residual = z[rows] - scaler.transform(expected)[0]
        np.testing.assert_allclose(np.square(residual), scored[rows], rtol=1e-4, atol=1e-5)
