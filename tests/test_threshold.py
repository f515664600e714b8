import numpy as np
import pytest

from hpcad.errors import ConfigError
from hpcad.preprocess import TEST, VAL
from hpcad.score import NodeSignal
from hpcad.threshold.cost import CostModel, CostTerms, runs, score_rows
from hpcad.threshold.rules import CostRule, PotRule, QuantileRule


def brute_cost(signal, labels, t, c_alarm=1.0, c_missed=5.0, tol=12):
    """The lecture's definition, row by row."""
    pred = signal > t
    anom = labels != 0
    n = len(signal)
    fa = sum(pred[i] and not anom[max(0, i - tol): i + tol + 1].any() for i in range(n))
    missed = sum(anom[i] and not pred[max(0, i - tol): i + tol + 1].any() for i in range(n))
    return c_alarm * fa + c_missed * missed


def _series(seed=0, n=600):
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, np.int8)
    for start in rng.choice(n - 40, 4, replace=False):
        labels[start:start + rng.integers(3, 30)] = rng.integers(1, 3)
    signal = rng.gamma(2.0, 1.0, n) + 4.0 * (labels != 0) * rng.random(n)
    return signal, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_curve_matches_the_definition(seed):
    signal, labels = _series(seed)
    cm = CostModel(1.0, 5.0, 12)
    terms = CostTerms.of(signal, labels != 0, 12)
    ts = np.quantile(signal, np.linspace(0, 1, 25))
    np.testing.assert_array_equal(cm.curve(terms, ts), [brute_cost(signal, labels, t) for t in ts])
    for t in ts[::6]:
        assert cm.cost(signal, labels, t) == brute_cost(signal, labels, t)
        assert score_rows(signal, labels, t, cm).cost == brute_cost(signal, labels, t)


def test_optimum_is_exact_and_needs_no_hand_typed_range():
    signal, labels = _series(3)
    cm = CostModel(1.0, 5.0, 12)
    t, cost = cm.optimum(CostTerms.of(signal, labels != 0, 12))
    fine = np.linspace(signal.min() - 1, signal.max() + 1, 5000)
    assert cost == brute_cost(signal, labels, t) <= min(brute_cost(signal, labels, x) for x in fine[::10])
    big = signal * 1e6  # the lecture typed 5e5..1e6 by hand; the data's own breakpoints need no range
    t_big, cost_big = cm.optimum(CostTerms.of(big, labels != 0, 12))
    assert cost_big == cost and brute_cost(big, labels, t_big) == cost


def test_event_level_scores():
    labels = np.zeros(100, np.int8)
    labels[20:30] = 1
    labels[60:65] = 2
    signal = np.zeros(100)
    signal[25] = 5  # detects event 1
    signal[90:93] = 5  # a false alarm event (not within tolerance of any anomaly)
    s = score_rows(signal, labels, 1.0, CostModel(1, 5, 3)).as_dict()
    assert s["events"] == 2 and s["events_detected"] == 1 and s["alarm_events"] == 2
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5
    assert s["false_alarms"] == 3 and s["missed"] == 5 + 10 - 7  # rows 20-21 are > 3 rows from the alarm
    assert runs(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]
    assert runs(np.array([0, 1, 1, 0, 1, 0, 0, 1], bool), merge_gap=1) == [(1, 5), (7, 8)]
    flicker = np.zeros(100)
    flicker[[80, 82, 84]] = 5  # one incident flickering around the threshold: one alarm event
    assert score_rows(flicker, np.zeros(100, np.int8), 1.0, CostModel(1, 5, 3)).alarm_events == 1


def _signals(n_nodes=3, seed=0):
    out = []
    for k in range(n_nodes):
        sig, lab = _series(seed + k)
        split = np.where(np.arange(sig.size) < 300, VAL, TEST).astype(np.int8)
        out.append(NodeSignal(f"n{k}", sig * (k + 1), split, lab, np.arange(sig.size), scale=float(k + 1)))
    return lambda: iter(out)


def test_cost_rule_per_node_uses_validation_rows_only():
    source = _signals()
    th = CostRule(scope="node").fit(source)
    cm = CostModel()
    for s in source():
        rows = s.split == VAL
        best = min(brute_cost(s.signal[rows], s.labels[rows], t) for t in np.unique(s.signal[rows]))
        assert brute_cost(s.signal[rows], s.labels[rows], th.nodes[s.node]) == best
        assert cm.cost(s.signal[rows], s.labels[rows], th.nodes[s.node]) == best


def test_cluster_scope_threshold_minimises_the_summed_cost_on_normalised_signals():
    source = _signals()
    th = CostRule(scope="cluster", grid_points=2048).fit(source)
    assert th.normalised and th.cluster is not None
    total = lambda t: sum(brute_cost(s.normalised[s.split == VAL], s.labels[s.split == VAL], t) for s in source())
    cands = np.unique(np.concatenate([s.normalised[s.split == VAL] for s in source()]))
    exact = min(total(t) for t in cands[::7])
    assert total(th.cluster) <= exact  # the grid is fine enough to match a search over the data


def test_unsupervised_rules():
    rng = np.random.default_rng(0)
    sig = rng.exponential(1.0, 50_000)
    s = NodeSignal("n", sig, np.full(sig.size, VAL, np.int8), None, np.arange(sig.size))
    q = QuantileRule(q=0.99).fit(lambda: iter([s]))
    assert q.nodes["n"] == pytest.approx(np.log(100), rel=0.05)
    pot = PotRule(init_q=0.98, risk=1e-4).fit(lambda: iter([s]))
    assert pot.nodes["n"] == pytest.approx(np.log(1e4), rel=0.1)  # EVT extrapolates beyond the data's quantiles
    cl = QuantileRule(q=0.99, scope="cluster").fit(lambda: iter([s]))
    assert cl.cluster == pytest.approx(np.log(100), rel=0.05)
    with pytest.raises(ConfigError, match="threshold.q"):
        QuantileRule(q=1.5)
    with pytest.raises(ConfigError, match="threshold.scope"):
        QuantileRule(scope="rack")


def test_cost_rule_falls_back_without_labels():
    sig = np.random.default_rng(1).exponential(1.0, 2000)
    s = NodeSignal("n", sig, np.full(sig.size, VAL, np.int8), None, np.arange(sig.size))
    th = CostRule(scope="node").fit(lambda: iter([s]))
    assert th.nodes["n"] == pytest.approx(np.quantile(sig, 0.995))


def test_causal_smoothing_of_the_signal():
    from hpcad.score import causal_mean

    x = np.array([0.0, 3.0, 6.0, 0.0, 0.0])
    np.testing.assert_allclose(causal_mean(x, 2), [0.0, 1.5, 4.5, 3.0, 0.0])
    np.testing.assert_array_equal(causal_mean(x, 1), x)
