"""Scoring with the model options (members, window) and the signal rules of hpcad/signals.py."""
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from hpcad.model.autoencoder import AutoencoderSpec, forward, glorot_init, stack
from hpcad.model.ensemble import member_seed, node_seed, train_ensemble
from hpcad.model.files import NodeModel
from hpcad.preprocess import Scaler, windows
from hpcad.score import reconstruction_errors
from hpcad.signals import Recipe, metric_scales, signal_level, smooth_signal

CFG = NS(batch_size=32, validation_split=0.1, epochs=3, lr=1e-3, patience=3, restore_best=True)
PRE = NS(std_floor_rel=0.01, std_floor_abs=1e-6, clip=20.0, soft_clip=True)


def _model(spec: AutoencoderSpec, M: int, seed: int = 0) -> NodeModel:
    members = [glorot_init(spec, M, member_seed(seed, r)) for r in range(spec.members)]
    scaler = Scaler.fit(np.random.default_rng(seed).normal(size=(50, M)).astype(np.float32), PRE)
    return NodeModel("n", spec, [f"m{j}" for j in range(M)], members, scaler, {}, 1.0)


def test_members_are_scored_by_their_mean_reconstruction():
    M = 5
    spec = AutoencoderSpec([4], members=3)
    models = [_model(spec, M, seed) for seed in (1, 2)]
    zs = [np.random.default_rng(k).normal(size=(40 + 7 * k, M)).astype(np.float32) for k in range(2)]
    got = reconstruction_errors(models, zs, torch.device("cpu"))
    for m, z, e in zip(models, zs, got):
        recon = torch.stack([forward(stack([p], "cpu"), torch.from_numpy(z)[None], 1)[0][0] for p in m.members]).mean(0)
        np.testing.assert_allclose(e, ((recon - torch.from_numpy(z)) ** 2).numpy(), rtol=1e-5, atol=1e-6)


def test_a_windowed_model_scores_each_row_from_it_and_the_rows_before_it_only():
    M, w = 4, 5
    model = _model(AutoencoderSpec([6], window=w), M)
    z = np.random.default_rng(0).normal(size=(60, M)).astype(np.float32)
    e = reconstruction_errors([model], [z], torch.device("cpu"))[0]
    assert e.shape == (60, M)
    later = z.copy()
    later[30:] += 3.0  # rows from 30 on change: rows before 30 keep their errors
    e2 = reconstruction_errors([model], [later], torch.device("cpu"))[0]
    np.testing.assert_array_equal(e[:30], e2[:30])
    assert not np.allclose(e[30:], e2[30:])
    x = torch.from_numpy(windows(z, w))[None]  # row t's error: its own part of the window's reconstruction
    recon = forward(stack(model.members, "cpu"), x, 1)[0][0, :, -M:]
    np.testing.assert_allclose(e, ((recon - torch.from_numpy(z)) ** 2).numpy(), rtol=1e-5, atol=1e-6)


def test_member_zero_is_the_one_member_model_bit_for_bit():
    """members=1 keeps the lecture's model; a node's other members never change its first one."""
    spec = AutoencoderSpec([8])
    x = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)
    s0 = node_seed(0, "node7")
    alone = train_ensemble(spec, [x], [s0], CFG, torch.device("cpu"))
    three = train_ensemble(spec, [x] * 3, [member_seed(s0, r) for r in range(3)], CFG, torch.device("cpu"))
    for a, b in zip(alone.params[0], three.params[0]):
        assert torch.equal(a, b)
    assert len({member_seed(s0, r) for r in range(8)}) == 8  # distinct seeds: different inits and data orders
    assert not torch.equal(three.params[0][0], three.params[1][0])


def test_smoothing_is_a_geometric_mean_around_the_row_and_a_spike_is_not_an_alarm():
    sig = np.ones(50)
    sig[10] = 1000.0  # one spike
    sig[30:40] = 100.0  # a sustained rise
    sm = smooth_signal(sig, 5, level=1.0)
    assert sm[10] < 100 and sm[35] > 90  # the spike is damped far more than the sustained rise
    assert sm[28] > 1.5 and sm[27] == pytest.approx(1.0)  # centred: the rise shows two rows ahead (half the window)
    causal = smooth_signal(sig, 5, level=1.0, causal=True)
    assert causal[29] == pytest.approx(1.0) and causal[34] > 90  # causal: never ahead of the data
    np.testing.assert_array_equal(smooth_signal(sig, 1, 1.0), sig)
    assert np.all(np.diff(smooth_signal(np.arange(20.0), 7, 1.0)) > 0)  # monotone input stays monotone
    # a spike in the first or last row is damped almost as much as elsewhere: its window holds the 3
    # rows there are (repeating the end row for the missing two gave it 3 of 5 rows' weight: 68, not 11)
    ends = np.ones(50)
    ends[[0, -1]] = 1000.0
    sm_ends = smooth_signal(ends, 5, level=1.0)
    expected = np.sinh((np.arcsinh(1000.0) + 2 * np.arcsinh(1.0)) / 3)
    assert sm_ends[0] == pytest.approx(expected) and sm_ends[-1] == pytest.approx(expected)
    assert sm_ends[0] < 3 * sm[10] and sm_ends[3] == pytest.approx(1.0)


def test_signal_level_floor_keeps_signal_norm_finite_for_perfectly_reconstructed_nodes():
    assert signal_level(1e-13, 55, 1e-4) == pytest.approx(55e-4)  # an MSL channel constant in training
    assert signal_level(49.0, 159, 1e-4) == 49.0  # a real node: its held-out level
    assert signal_level(float("nan"), 10, 1e-4) == pytest.approx(1e-3)


def _choice_inputs(anomaly_in_excess: bool, n_nodes: int = 3):
    """Nodes whose labelled validation anomalies show either as values outside the training range
    (no reconstruction error) or as reconstruction error, while normal validation rows carry the
    other kind: the range-excess weight decides which ranks first."""
    from hpcad.data.node import NodeData

    T, M = 400, 4
    out = []
    for k in range(n_nodes):
        rng = np.random.default_rng(k)
        labels = np.zeros(T, np.int8)
        labels[250:270] = labels[330:345] = 1
        err = rng.gamma(2.0, 0.05, size=(T, M))
        excess2 = np.zeros((T, M))
        normal_val = (np.arange(T) >= 200) & (labels == 0)
        if anomaly_in_excess:  # MSL-like: a never-seen value is the anomaly, normal rows err a little
            excess2[labels == 1, 0] = 0.02
            err[normal_val & (np.arange(T) % 7 == 0), 1] += 0.5
        else:  # node-like: new workloads leave the range on normal rows, anomalies reconstruct badly
            excess2[normal_val & (np.arange(T) % 5 == 0), 0] = 0.02
            err[labels == 1, 1] += 0.3
        nd = NodeData(f"n{k}", np.arange(T, dtype=np.int64) * 300, np.zeros((T, M), np.float32), labels)
        model = NS(signal_scale=float(err[:200].sum(1).mean()), holdout_error=err[:200].mean(0), node=nd.name)
        out.append((model, nd, err, excess2, np.zeros((T, M), bool), None))
    return out


def _signal_cfg(weight="auto", grid=(1.0, 10.0, 100.0, 1000.0), scales=False):
    return NS(signal=NS(excess_weight=weight, excess_grid=list(grid), excess_margin=0.005, range_excess=True,
                        metric_scales=scales, whiten=False, smooth=5, causal=False, scale_floor=1e-4),
              split=NS(unit="fraction", train=0.5, val=0.5), train_run="runs/train")


def test_auto_excess_weight_follows_what_the_labelled_validation_rows_reward():
    from hpcad.signal_choice import choose

    store = NS(has_labels=True)
    for in_excess, expected in ((True, 100.0), (False, 1.0)):
        inputs = _choice_inputs(in_excess)
        r, choice = choose(_signal_cfg(), store, lambda: iter(inputs), None)
        assert r == Recipe(expected) and choice["chosen"]["excess_weight"] == expected and choice["nodes"] == 3
        ap = {c["excess_weight"]: a for c, a in zip(choice["candidates"], choice["validation_ap"])}
        assert ap[expected] == max(ap.values()) and abs(ap[1000.0] - ap[1.0]) > 0.5
    assert ap[1000.0] < ap[1.0] - 0.5  # node-like: a large weight ranks new workloads first
    # MSL-like: 100 and 1000 both separate perfectly; within the margin the smaller weight wins
    r, choice = choose(_signal_cfg(), store, lambda: iter(_choice_inputs(True)), None)
    assert choice["validation_ap"][-1] == choice["validation_ap"][-2] == 1.0 and r.weight == 100.0
    # within the margin, the smaller weight wins: a flat validation keeps the first candidate
    flat = [(m, nd, e, np.zeros_like(x), miss, lm) for m, nd, e, x, miss, lm in _choice_inputs(True)]
    assert choose(_signal_cfg(), store, lambda: iter(flat), None)[0] == Recipe(1.0)


def test_the_default_grid_reaches_weights_that_rank_values_just_outside_the_range_first():
    """Anomalies that are values only slightly outside their training range (MSL's validation chose
    the top of the grid when it ended at 1000): the default grid goes on to 1e6, so auto finds the
    weight that ranks them above the normal rows' reconstruction errors."""
    from hpcad.config import SignalConfig
    from hpcad.signal_choice import choose

    grid = SignalConfig().excess_grid
    assert grid[0] == 1.0 and max(grid) >= 1e5  # 1 first: the weight of runs without labels
    slight = [(m, nd, e, x * 1e-3, miss, lm) for m, nd, e, x, miss, lm in _choice_inputs(True)]  # 0.02 -> 2e-5
    r, choice = choose(_signal_cfg(grid=grid), NS(has_labels=True), lambda: iter(slight), None)
    ap = dict(zip(grid, choice["validation_ap"]))
    assert r.weight == 1e5 and ap[1e5] == 1.0 and ap[1000.0] < 0.5, ap  # 1000 (the old top) ranks them badly


def test_excess_weight_without_labels_reuses_the_weight_its_thresholds_were_fitted_with():
    from hpcad.errors import ConfigError
    from hpcad.signal_choice import choose, fixed_weight

    def never():
        raise AssertionError("no labels: the errors need not be computed twice")

    unlabelled = NS(has_labels=False)
    fitted = Recipe(100.0, True)
    assert choose(_signal_cfg(scales="auto"), unlabelled, never, fitted)[0] == fitted
    r, choice = choose(_signal_cfg(scales="auto"), unlabelled, never, None)
    assert r == Recipe(1.0, False) and choice["nodes"] == 0 and "first candidate" in choice["rule"]
    assert choose(_signal_cfg(weight=10), NS(has_labels=True), never, fitted) == (Recipe(10.0), None)  # fixed: as told
    # one option fixed, the other auto: the fallback decides the auto one; a fixed one that differs
    # from the thresholds' recipe is refused before anything is scored
    assert choose(_signal_cfg(weight=100, scales="auto"), unlabelled, never, fitted)[0] == fitted
    for other, said in ((_signal_cfg(weight=10, scales="auto"), "signal.excess_weight=10 signal.metric_scales=true"),
                        (_signal_cfg(scales=False), "signal.excess_weight=100 signal.metric_scales=false")):
        with pytest.raises(ConfigError, match=f"runs/train/thresholds.json were fitted on signals scored with "
                                              f"signal.excess_weight=100 signal.metric_scales=true signal.whiten=false, "
                                              f"but this run is scored with {said} signal.whiten=false: score with "
                                              f"signal.excess_weight=auto signal.metric_scales=auto"):
            choose(other, unlabelled, never, fitted)
    whitened = _signal_cfg(weight=100, scales=True)
    whitened.signal.whiten = True  # not chosen by auto: said on its own
    with pytest.raises(ConfigError, match="fitted on unwhitened signals.*score with signal.whiten=false, or fit "
                                          "thresholds on whitened signals"):
        choose(whitened, unlabelled, never, fitted)
    # labels, but no validation row of either class on any node: the fallback too
    no_val = _signal_cfg(scales="auto")
    no_val.split.val = 0.0
    assert choose(no_val, NS(has_labels=True), lambda: iter(_choice_inputs(True)), fitted)[0] == fitted
    for bad in ("often", -1):
        with pytest.raises(ConfigError, match="signal.excess_weight"):
            fixed_weight(bad)


def _noisy_metric_inputs(n_nodes: int = 3, recorded: bool = True):
    """Nodes whose metric 0 the model always reconstructs poorly (a large, noisy error on normal
    rows) and whose labelled anomalies are a moderate error on metric 1, otherwise reconstructed
    well: summed as they are, metric 0's noise hides the anomalies; scaled per metric, it does not."""
    from hpcad.data.node import NodeData

    T, M = 400, 4
    out = []
    for k in range(n_nodes):
        rng = np.random.default_rng(10 + k)
        labels = np.zeros(T, np.int8)
        labels[250:270] = labels[330:345] = 1
        err = rng.gamma(2.0, 0.05, size=(T, M))
        err[:, 0] = rng.gamma(2.0, 2.0, size=T)
        err[labels == 1, 1] += 1.5
        nd = NodeData(f"n{k}", np.arange(T, dtype=np.int64) * 300, np.zeros((T, M), np.float32), labels)
        model = NS(signal_scale=float(err[:200].sum(1).mean()), node=nd.name,
                   holdout_error=err[:200].mean(0) if recorded else None)
        out.append((model, nd, err, np.zeros((T, M)), np.zeros((T, M), bool), None))
    return out


def test_auto_metric_scales_are_chosen_where_a_noisy_metric_hides_the_anomalies():
    from hpcad.signal_choice import choose

    labelled = NS(has_labels=True)
    cfg = _signal_cfg(grid=(1.0,), scales="auto")
    r, choice = choose(cfg, labelled, lambda: iter(_noisy_metric_inputs()), None)
    plain, scaled = choice["validation_ap"]
    assert [c["metric_scales"] for c in choice["candidates"]] == [False, True]
    assert r == Recipe(1.0, True) and scaled > plain + 0.2
    assert choice["chosen"] == {"excess_weight": 1.0, "metric_scales": True, "whiten": False}
    # where the anomalies stand out in the plain sum already (node-like inputs), scales are not taken
    assert choose(cfg, labelled, lambda: iter(_choice_inputs(False)), None)[0] == Recipe(1.0, False)
    # models trained before the held-out errors were recorded: no scales to compare, said in the log
    r, choice = choose(cfg, labelled, lambda: iter(_noisy_metric_inputs(recorded=False)), None)
    assert r == Recipe(1.0, False) and choice["candidates"] == [{"excess_weight": 1.0, "metric_scales": False, "whiten": False}]


def test_metric_scales_divide_each_metrics_error_by_its_held_out_error_at_least_the_mean():
    from hpcad.errors import ConfigError, StoreError
    from hpcad.signal_choice import choose

    held = np.array([4.0, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(metric_scales(held), [4.0, 1.075, 1.075, 1.075])  # none magnified
    model = NS(node="n0", signal_scale=4.3, holdout_error=held)
    err = np.array([[8.0, 0.1, 0.1, 0.1], [4.0, 2.15, 0.0, 0.0]], np.float32)
    excess2 = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]], np.float32)
    miss = np.array([[False, False, False, True], [False, False, False, False]])
    out = Recipe(10.0, True).errors(model, err.copy(), excess2, miss)
    np.testing.assert_allclose(out, [[2.0, 0.1 / 1.075, 0.1 / 1.075, 0.0], [1.0, 2.0, 5.0 / 1.075, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(Recipe(1.0, False).errors(model, err.copy(), excess2, miss),
                               np.where(miss, 0, err + excess2))
    assert Recipe(1.0, True).level(model, 4, 1e-4) == pytest.approx(1.0 + 3 * 0.1 / 1.075)
    assert Recipe(1.0, False).level(model, 4, 1e-4) == 4.3
    old = NS(node="n0", signal_scale=4.3, holdout_error=None)
    with pytest.raises(StoreError, match="signal.metric_scales=false"):
        Recipe(1.0, True).errors(old, err.copy(), excess2, miss, "models/: node n0")
    with pytest.raises(ConfigError, match="signal.metric_scales=true"):
        choose(_signal_cfg(scales=True), NS(has_labels=True), lambda: iter(_noisy_metric_inputs(recorded=False)), None)


def test_auto_whitening_is_the_default_and_the_labelled_validation_rows_may_veto_it():
    """``signal.whiten=auto``: whitened first, kept on ties; where the plain errors rank the
    validation anomalies better (by more than the margin) the labels choose them; without labelled
    rows the thresholds' run decides, else the whitened signal."""
    from hpcad.signal_choice import choose

    inputs, reverse = [], []
    for model, nd, err, excess2, miss, lm in _choice_inputs(False):
        plain = err.copy()
        plain[:, 1] = err[:, 0]  # the anomalies' error hidden from the plain sum...
        white = err  # ...but not from the whitened one
        model.whitening = NS(level=float(white[:200].sum(1).mean()), holdout_error=white[:200].mean(0))
        inputs.append((model, nd, {False: plain, True: white}, excess2 * 0, miss, lm))
        reverse.append((model, nd, {False: white, True: plain}, excess2 * 0, miss, lm))
    cfg = _signal_cfg(grid=(1.0,))
    cfg.signal.whiten = "auto"
    some = NS(has_labels=True, nodes=["n0", "n1", "n2", "n3"], labelled={"n0": True, "n1": True, "n2": True})
    r, choice = choose(cfg, some, lambda: iter(inputs), None)  # a node without labels changes nothing
    white_ap, plain_ap = choice["validation_ap"]
    assert r == Recipe(1.0, False, True) and white_ap > plain_ap + 0.2
    assert [c["whiten"] for c in choice["candidates"]] == [True, False]  # whitened first: kept on ties
    r, choice = choose(cfg, some, lambda: iter(reverse), None)
    assert r == Recipe(1.0) and choice["validation_ap"][1] > choice["validation_ap"][0] + 0.2  # the labels' veto
    unlabelled = NS(has_labels=False)
    assert choose(cfg, unlabelled, lambda: iter(()), Recipe(1.0))[0] == Recipe(1.0)  # the thresholds' recipe
    assert choose(cfg, unlabelled, lambda: iter(()), None)[0] == Recipe(1.0, False, True)
    from hpcad.errors import ConfigError

    cfg.signal.whiten = "maybe"
    with pytest.raises(ConfigError, match="signal.whiten='maybe': true, false or 'auto'"):
        choose(cfg, some, lambda: iter(inputs), None)
