"""The score stage's contract (docs/data.md "The error file"), checked in process against an
independent computation: per-metric errors, the range-excess term, missing metrics, the signals."""
import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hpcad.config import HpcadConfig
from hpcad.data.node import NodeData
from hpcad.data.store import TelemetryStore, write_store
from hpcad.model.autoencoder import AutoencoderSpec, forward, glorot_init
from hpcad.model.files import NodeModel, model_path
from hpcad.model.whiten import fit_whitening, held_out_from
from hpcad.preprocess import Scaler, fill_gaps, split_codes
from hpcad.errorstore import ErrorStore
from hpcad.score import score_nodes
from hpcad.signals import Recipe, metric_scales, scaled_level, signal_level, smooth_signal

METRICS = ["power", "temp", "ips"]


def _site(tmp_path, held=None):
    """Two nodes; node b's later rows leave the training range, and it misses six values in a row.
    ``held``: the models' per-metric held-out errors (None: a model file written before them)."""
    rng = np.random.default_rng(0)
    nodes = []
    for name in ("a", "b"):
        v = rng.normal(size=(200, 3)).astype(np.float32)
        labels = np.zeros(200, np.int8)
        if name == "b":
            v[150:160, 0] += 8.0  # far outside what training saw
            v[170:176, 2] = np.nan  # 3 rows forward-filled (preprocess.nan_fill_limit), 3 missing
            labels[150:160] = 1
        nodes.append(NodeData(name, np.arange(200, dtype=np.int64) * 300, v, labels))
    store_path = tmp_path / "store.h5"
    write_store(store_path, METRICS, nodes, "test")
    cfg = OmegaConf.structured(HpcadConfig)
    cfg.compute.device, cfg.compute.progress, cfg.signal.excess_weight = "cpu", False, 10.0
    spec = AutoencoderSpec(hidden=[2])
    models = tmp_path / "models"
    for i, nd in enumerate(nodes):
        scaler = Scaler.fit(nd.values[:100], cfg.preprocess, names=METRICS)
        members = [glorot_init(spec, 3, i)]
        NodeModel(nd.name, spec, METRICS, members, scaler, {}, 0.5 + i, "", held,
                  whitening=_whitening(spec, members, scaler, nd.values[:100])).save(model_path(models, nd.name))
    return cfg, TelemetryStore(store_path), models, nodes


def _whitening(spec, members, scaler, train_values):
    """The whitening training would fit for ``members`` on these training rows."""
    z = scaler.transform(train_values)[0]
    return fit_whitening(spec, [members], [z], [held_out_from(len(z), 0.1)], z.shape[1])[0]


def _random_site(tmp_path, n: int, rows: int, train: int, labels=None):
    """``n`` nodes of ``rows`` random rows (``labels(i)``: node i's labels, or None), each with an
    untrained model whose scaler saw its first ``train`` rows; the config on CPU."""
    rng = np.random.default_rng(n)
    nodes = [NodeData(f"n{i:02d}", np.arange(rows, dtype=np.int64) * 300, rng.normal(size=(rows, 3)).astype(np.float32),
                      labels(i) if labels else None) for i in range(n)]
    write_store(tmp_path / "store.h5", METRICS, nodes, "test")
    cfg = OmegaConf.structured(HpcadConfig)
    cfg.compute.device = "cpu"
    spec = AutoencoderSpec(hidden=[2])
    for i, nd in enumerate(nodes):
        members, scaler = [glorot_init(spec, 3, i)], Scaler.fit(nd.values[:train], cfg.preprocess, names=METRICS)
        NodeModel(nd.name, spec, METRICS, members, scaler, {}, 1.0, "",
                  whitening=_whitening(spec, members, scaler, nd.values[:train])).save(
            model_path(tmp_path / "models", nd.name))
    return cfg, TelemetryStore(tmp_path / "store.h5"), nodes


@pytest.mark.parametrize("scaled, whiten", [(False, False), (True, False), (False, True)])
def test_errors_h5_holds_the_documented_errors_and_signals(tmp_path, scaled, whiten):
    held = np.array([2.0, 0.1, 0.3], np.float32)
    cfg, store, models, nodes = _site(tmp_path, held if scaled else None)
    cfg.signal.metric_scales, cfg.signal.whiten = scaled, whiten
    assert score_nodes(cfg, store, models, tmp_path / "errors.h5") == 2
    errors = ErrorStore(tmp_path / "errors.h5")
    assert errors.nodes == ["a", "b"] and errors.metrics == METRICS
    assert errors.recipe == Recipe(10.0, scaled, whiten)
    # b's 3 values left missing after the gap filling, of 200 rows x 3 metrics (telemetry gaps)
    assert errors.missing == {"a": 0.0, "b": np.float32(3 / 600)}
    with h5py.File(tmp_path / "errors.h5") as f:
        for nd in nodes:
            model = NodeModel.load(model_path(models, nd.name))
            z, miss = model.scaler.transform(fill_gaps(nd.values, cfg.preprocess.nan_fill_limit))
            params = [p[None] for p in model.members[0]]
            recon, _ = forward(params, torch.from_numpy(z)[None], 1)
            r = recon[0].numpy() - z
            if whiten:  # a missing value's residual is zeroed first: it leaks into no other metric
                r[miss] = 0.0
                r = r @ model.whitening.matrix
            expected = r ** 2 + 10.0 * model.scaler.excess(z) ** 2
            if scaled:  # each metric's error over its held-out error, at least their mean (0.8)
                np.testing.assert_allclose(metric_scales(held), [2.0, 0.8, 0.8], rtol=1e-6)
                expected /= metric_scales(held)
            expected[miss] = 0.0
            g = f[f"nodes/{nd.name}"]
            np.testing.assert_allclose(g["error"][()], expected, rtol=1e-5, atol=1e-6)
            row = g["error"][()].astype(np.float64).sum(1)
            np.testing.assert_allclose(g["signal_row"][()], row, rtol=1e-6)
            normal = model.whitening.level if whiten else model.signal_scale
            level = signal_level(scaled_level(held) if scaled else normal, 3, cfg.signal.scale_floor)
            signal = smooth_signal(row, cfg.signal.smooth, level)
            np.testing.assert_allclose(g["signal"][()], signal, rtol=1e-5)
            np.testing.assert_allclose(g["signal_norm"][()], signal / level, rtol=1e-5)
            assert g.attrs["signal_scale"] == level and g.attrs["smooth"] == 25
            np.testing.assert_array_equal(g["split"][()], split_codes(nd, cfg.split))
            np.testing.assert_array_equal(g["labels"][()], nd.labels)
    with h5py.File(tmp_path / "errors.h5") as f:
        b = f["nodes/b/error"][()]
        assert (b[173:176, 2] == 0.0).all() and (b[170:173, 2] > 0).all()  # missing: no error; filled: scored
        assert b[150:160, 0].min() > 50 * np.median(b[:150, 0])  # far outside the range: the excess term dominates


def test_a_model_trained_on_other_metrics_is_refused_by_name(tmp_path):
    import pytest

    from hpcad.errors import InputError

    cfg, store, models, _ = _site(tmp_path)
    other = NodeModel.load(model_path(models, "b"))
    other.metrics = ["power", "temp", "mem_bw"]
    other.save(model_path(models, "b"))
    with pytest.raises(InputError, match="node b: its model was trained on other metrics than node a's"):
        score_nodes(cfg, store, models, tmp_path / "errors.h5")
    assert not (tmp_path / "errors.h5").exists() and not list(tmp_path.glob(".errors.h5.*"))  # nothing half-written


def test_an_error_index_lists_its_nodes_without_opening_the_rank_files(tmp_path):
    """errors.h5 (and a baseline's file) over the ranks' files: every rank of the threshold step opens
    it; listing thousands of nodes used to follow one link, so open one rank file, per node."""
    from hpcad.errorstore import NodeSignal, signal_attrs, write_index, write_signal_file

    def signal(i: int) -> NodeSignal:
        return NodeSignal(f"n{i}", np.full(10 + i, float(i), np.float32), np.zeros(10 + i, np.int8), None,
                          np.arange(10 + i), 1.0)

    parts = [tmp_path / f"kde-rank{r}.h5" for r in range(2)]
    for r, part in enumerate(parts):
        write_signal_file(part, "kde", map(signal, range(r, 5, 2)))
    write_index(tmp_path / "kde.h5", parts, signal_attrs("kde"))
    for p in parts:
        p.rename(p.with_suffix(".away"))
    index = ErrorStore(tmp_path / "kde.h5")  # the parts are gone, yet the nodes and their rows are listed
    assert index.nodes == ["n0", "n1", "n2", "n3", "n4"] and index.rows == {f"n{i}": 10 + i for i in range(5)}
    for p in parts:
        p.with_suffix(".away").rename(p)
    assert [float(s.signal[0]) for s in ErrorStore(tmp_path / "kde.h5").signals()] == [0, 1, 2, 3, 4]


def test_on_cpu_nodes_are_scored_in_chunks_of_32_whatever_the_memory_budget(tmp_path, monkeypatch):
    """An unset cap on CPU scores 32 nodes per forward pass even where the memory budget holds them
    all (a chunk of 1,000 nodes filled 9.8 GB for no speed), and a node's errors do not depend on
    the chunk it was scored in."""
    import hpcad.score as score

    cfg, store, nodes = _random_site(tmp_path, 70, 60, 30)
    cfg.compute.progress, cfg.compute.memory_budget_mb = False, 8192
    real, sizes = score.reconstruction_errors, []
    monkeypatch.setattr(score, "reconstruction_errors", lambda models, *a, **kw: sizes.append(len(models)) or
                        real(models, *a, **kw))
    score_nodes(cfg, store, tmp_path / "models", tmp_path / "default.h5")
    assert sizes == [32, 32, 6]
    cfg.compute.max_nodes_per_chunk = 70  # one chunk, as the budget would have allowed
    score_nodes(cfg, store, tmp_path / "models", tmp_path / "one.h5")
    assert sizes[3:] == [70]
    with h5py.File(tmp_path / "default.h5") as a, h5py.File(tmp_path / "one.h5") as b:
        for nd in nodes:
            np.testing.assert_array_equal(a[f"nodes/{nd.name}/error"][()], b[f"nodes/{nd.name}/error"][()])


def test_the_signal_choice_scores_only_the_nodes_whose_validation_rows_it_can_rank(tmp_path, monkeypatch):
    """signal.excess_weight=auto ranks the nodes whose validation rows hold both classes; its pass
    over the errors scores only those (with an incident list every node is labelled, most with no
    anomaly to rank), and the choice is the same as from every node."""
    import json

    import hpcad.score as score
    from hpcad.signal_choice import rankable_nodes

    cfg, store, models, nodes = _site(tmp_path)
    cfg.signal.excess_weight = "auto"
    cfg.split.unit, cfg.split.train, cfg.split.val = "rows", 100, 60  # b's anomaly (rows 150-159) is in validation
    assert store.labelled == {"a": True, "b": True} and rankable_nodes(store, ["a", "b"], cfg.split) == ["b"]
    cfg.split.val = 40  # now only in b's test rows: nothing to rank on either node
    assert rankable_nodes(store, ["a", "b"], cfg.split) == []
    cfg.split.val = 60
    real, seen = score.reconstruction_errors, []
    monkeypatch.setattr(score, "reconstruction_errors", lambda ms, *a, **kw: seen.append([m.node for m in ms]) or
                        real(ms, *a, **kw))
    score_nodes(cfg, store, models, tmp_path / "errors.h5")
    assert seen == [["b"], ["a", "b"]]  # the choice's pass, then the scoring
    with h5py.File(tmp_path / "errors.h5") as f:
        choice = json.loads(f.attrs["signal_choice"])
    assert choice["nodes"] == 1
    # the same choice when the pass covers every node, as it did before
    monkeypatch.setattr(score, "rankable_nodes", lambda store, nodes, split: list(nodes))
    score_nodes(cfg, store, models, tmp_path / "all.h5")
    assert seen[2:] == [["a", "b"], ["a", "b"]]
    with h5py.File(tmp_path / "all.h5") as f:
        assert json.loads(f.attrs["signal_choice"]) == choice


def test_the_signal_choice_pass_says_how_far_it_got_in_a_log_file(tmp_path, monkeypatch, caplog):
    """The choice's pass over thousands of labelled nodes takes as long as scoring them: in a SLURM
    log it says how far it got (at most every LOG_EVERY_S seconds), over the nodes it ranks only."""
    import io
    import sys

    from hpcad import progress

    def labels(i: int) -> np.ndarray:  # an anomaly in the validation rows (40-59) of three nodes
        y = np.zeros(80, np.int8)
        y[50:55] = i < 3
        return y

    cfg, store, _ = _random_site(tmp_path, 6, 80, 40, labels)
    cfg.compute.progress = True
    cfg.split.unit, cfg.split.train, cfg.split.val = "rows", 40, 20
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    with caplog.at_level("INFO", logger="hpcad.score"):
        score_nodes(cfg, store, tmp_path / "models", tmp_path / "errors.h5")
    said = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert [m for m in said if m.startswith("signal choice: ")] == ["signal choice: 1/3 nodes", "signal choice: 2/3 nodes"]
    assert [m for m in said if m.startswith("score: ")] == [f"score: {k}/6 nodes" for k in range(1, 6)]


def test_auto_whitening_is_the_default_signal_and_labels_may_only_veto_it(tmp_path, monkeypatch):
    """``signal.whiten=auto``: whitened first (its level is measured out of sample, so the level
    fallback of nodes without labels holds: hpcad.model.whiten); a run with an unlabelled node still
    ranks both on its labelled nodes, and a run without labels scores whitened without a choice."""
    import json

    import hpcad.score as score

    def labels(i: int) -> np.ndarray | None:  # an anomaly in the validation rows of nodes 0-2; node 3 unlabelled
        if i == 3:
            return None
        y = np.zeros(80, np.int8)
        y[50:55] = i < 3
        return y

    cfg, store, _ = _random_site(tmp_path, 4, 80, 40, labels)
    cfg.split.unit, cfg.split.train, cfg.split.val = "rows", 40, 20
    assert cfg.signal.whiten == "auto" and store.labelled["n03"] is False
    real, asked = score.reconstruction_errors, []
    monkeypatch.setattr(score, "reconstruction_errors", lambda ms, zs, dev, maps, masks, whiten: asked.append(whiten)
                        or real(ms, zs, dev, maps, masks, whiten))
    score_nodes(cfg, store, tmp_path / "models", tmp_path / "errors.h5")
    assert None in asked  # the choice's pass: both kinds of errors
    with h5py.File(tmp_path / "errors.h5") as f:
        choice = json.loads(f.attrs["signal_choice"])
    weights = len(cfg.signal.excess_grid)  # each weight whitened first, then each unwhitened
    assert [c["whiten"] for c in choice["candidates"]] == [True] * weights + [False] * weights and choice["nodes"] == 3
    unlabelled = _random_site(tmp_path / "none", 3, 80, 40)  # no labels at all: nothing to choose on
    unlabelled[0].split.unit, unlabelled[0].split.train, unlabelled[0].split.val = "rows", 40, 20
    asked.clear()
    score_nodes(unlabelled[0], unlabelled[1], tmp_path / "none" / "models", tmp_path / "none.h5")
    assert asked == [True]  # one pass, whitened only
    errors = ErrorStore(tmp_path / "none.h5")
    assert errors.recipe == Recipe(1.0, False, True)
    with h5py.File(tmp_path / "none.h5") as f:
        assert json.loads(f.attrs["signal_choice"])["rule"] == "no labelled validation rows: the first candidate"


def test_auto_scores_unwhitened_where_a_model_has_no_whitening_and_a_fixed_choice_stops(tmp_path, caplog):
    """A node's model trained by an older hpcad has no whitening (or one of an earlier version, which
    loads as none): ``auto`` then scores every node unwhitened and says why, leaving no half-written
    file; ``signal.whiten=true``, or the thresholds' whitened recipe being followed, is an error
    naming the node."""
    import json

    from hpcad.errors import StoreError

    cfg, store, models, _ = _site(tmp_path)
    b = NodeModel.load(model_path(models, "b"))
    b.whitening = None
    b.save(model_path(models, "b"))
    with caplog.at_level("WARNING", logger="hpcad.signal_choice"):
        score_nodes(cfg, store, models, tmp_path / "errors.h5")
    errors = ErrorStore(tmp_path / "errors.h5")
    assert errors.recipe.whitened is False and sorted(errors.nodes) == ["a", "b"]
    with h5py.File(tmp_path / "errors.h5") as f:
        choice = json.loads(f.attrs["signal_choice"])
    assert "node b: its model file has no residual whitening" in choice["unwhitened"]
    assert choice["chosen"]["whiten"] is False
    assert any("scoring every node unwhitened" in r.getMessage() for r in caplog.records)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("errors")] == ["errors.h5"]
    cfg.signal.whiten = True
    with pytest.raises(StoreError, match="node b: its model file has no residual whitening"):
        score_nodes(cfg, store, models, tmp_path / "fixed.h5")
    cfg.signal.whiten = "auto"
    unlabelled = _random_site(tmp_path / "u", 2, 80, 40)[1]
    m1 = NodeModel.load(model_path(tmp_path / "u" / "models", "n01"))
    m1.whitening = None
    m1.save(model_path(tmp_path / "u" / "models", "n01"))
    with pytest.raises(StoreError, match="n01: its model file has no residual whitening"):  # the thresholds' recipe
        score_nodes(cfg, unlabelled, tmp_path / "u" / "models", tmp_path / "followed.h5",
                    recipe_fallback=Recipe(10.0, False, True))
    assert not (tmp_path / "fixed.h5").exists() and not (tmp_path / "followed.h5").exists()


def test_a_whitening_of_the_first_kind_serves_only_the_thresholds_fitted_on_it(tmp_path):
    """Models whitened the first way (2026-12-05 morning: covariance of all training rows, level in
    sample; files without a ``version``): the nightly job applying thresholds fitted on that signal
    keeps scoring it, as before the upgrade; a choice made afresh (no thresholds to follow) scores
    such models unwhitened, and says why, since their level would put later normal rows far above
    it (the level fallback of nodes without labels)."""
    import json

    cfg, store, _ = _random_site(tmp_path, 2, 80, 40)
    cfg.split.unit, cfg.split.train, cfg.split.val = "rows", 40, 20
    models = tmp_path / "models"
    for n in ("n00", "n01"):
        obj = torch.load(model_path(models, n), weights_only=True)
        obj["whitening"].pop("version")
        torch.save(obj, model_path(models, n))
    followed = Recipe(1.0, False, True)
    score_nodes(cfg, store, models, tmp_path / "night.h5", recipe_fallback=followed)
    night = ErrorStore(tmp_path / "night.h5")
    assert night.recipe == followed
    old = NodeModel.load(model_path(models, "n00")).whitening
    with h5py.File(tmp_path / "night.h5") as f:  # the signal its thresholds were fitted on
        assert float(f["nodes/n00"].attrs["signal_scale"]) == pytest.approx(signal_level(old.level, 3, 1e-4))
    score_nodes(cfg, store, models, tmp_path / "fresh.h5")
    assert ErrorStore(tmp_path / "fresh.h5").recipe == Recipe(1.0)
    with h5py.File(tmp_path / "fresh.h5") as f:
        assert "no residual whitening" in json.loads(f.attrs["signal_choice"])["unwhitened"]
