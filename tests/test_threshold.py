import numpy as np
import pytest

from hpcad.errors import ConfigError
from hpcad.preprocess import TEST, VAL
from hpcad.errorstore import NodeSignal
from hpcad.threshold.cost import CostModel, CostTerms, runs, score_rows
from hpcad.threshold.rules import CostRule, LevelRule, PotRule, QuantileRule


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
    th = CostRule(scope="node", drift=0).fit(source)
    cm = CostModel()
    for s in source():
        rows = s.split == VAL
        best = min(brute_cost(s.signal[rows], s.labels[rows], t) for t in np.unique(s.signal[rows]))
        assert brute_cost(s.signal[rows], s.labels[rows], th.nodes[s.node]) == best
        assert cm.cost(s.signal[rows], s.labels[rows], th.nodes[s.node]) == best


def test_cluster_scope_threshold_minimises_the_summed_cost_on_normalised_signals():
    source = _signals()
    th = CostRule(scope="cluster", grid_points=2048, drift=0).fit(source)
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
    assert cl.cluster == pytest.approx(np.quantile(s.normalised, 0.99), rel=1e-4)  # not to the grid's step
    # a tail bunched within one grid step at the top (as on DAVIDE): one histogram pass rounded the
    # quantile up to the largest value fitted on, a threshold that never alarms
    top = np.r_[rng.uniform(0, 1, 990), 100 + rng.uniform(0, 0.01, 10)]
    t = NodeSignal("t", top, np.full(top.size, VAL, np.int8), None, np.arange(top.size), scale=1.0)
    th = QuantileRule(q=0.995, scope="cluster").fit(lambda: iter([t]))
    assert th.details["check"]["verdict"] == "ok" and th.cluster < top.max(), (th.cluster, top.max())
    ranked = np.sort(top)  # between the order statistics around the quantile, as np.quantile is
    assert ranked[994] <= th.cluster <= ranked[995]
    pot = PotRule(init_q=0.98, risk=1e-3, scope="cluster").fit(lambda: iter([t]))  # its tail starts there too
    assert ranked[979] <= pot.details["init"] <= ranked[980]
    with pytest.raises(ConfigError, match="threshold.q"):
        QuantileRule(q=1.5)
    with pytest.raises(ConfigError, match="threshold.scope"):
        QuantileRule(scope="rack")


def test_cost_rule_falls_back_without_labels_and_says_so_once(caplog):
    """An unlabelled cluster (most sites): the level rule's thresholds (5 x each node's normal level),
    said in one line for all nodes and recorded in thresholds.json's details (before: one warning per
    node, thousands); ``threshold.fallback=quantile`` keeps the 0.995 quantile of each node's rows."""
    rng = np.random.default_rng(1)
    unlabelled = [NodeSignal(f"u{k}", rng.exponential(1.0 + k, 2000), np.full(2000, VAL, np.int8), None,
                             np.arange(2000), scale=1.0 + k) for k in range(50)]
    labelled = list(_signals(2)())
    for fallback, said_rule, details in (("level", "level rule (threshold.fallback, times=5)",
                                          {"rule": "level", "times": 5.0}),
                                         ("quantile", "quantile rule (threshold.fallback, q=0.995)",
                                          {"rule": "quantile", "q": 0.995})):
        caplog.clear()
        with caplog.at_level("WARNING", logger="hpcad.threshold.rules"):
            th = CostRule(scope="node", fallback=fallback).fit(lambda: iter(unlabelled + labelled))
        for s in unlabelled:
            want = 5.0 * s.scale if fallback == "level" else np.quantile(s.signal, 0.995)
            assert th.nodes[s.node] == pytest.approx(want)
        said = [r.getMessage() for r in caplog.records if "no labels" in r.getMessage()]
        assert said == [f"autoencoder: 50 of 52 nodes have no labels: their thresholds come from the {said_rule}"], said
        assert th.details["unlabelled_nodes"] == 50 and th.details["fallback"] == details
    assert CostRule().fallback.name == "level"  # the default
    caplog.clear()
    assert "unlabelled_nodes" not in CostRule(scope="node").fit(lambda: iter(labelled)).details
    assert not [r for r in caplog.records if "no labels" in r.getMessage()]
    with pytest.raises(ConfigError, match="threshold.fallback='median': expected level or quantile"):
        CostRule(fallback="median")


def test_the_level_rule_alarms_on_incidents_that_fill_the_validation_period():
    """Without labels the quantile rule takes the validation period as normal: where it holds
    incidents (DAVIDE: over half its rows), the threshold sits among them and they do not alarm. The
    level rule is a multiple of each node's normal level (its held-out training mean): the same
    alarms at node and cluster scope, whatever the period holds."""
    rng = np.random.default_rng(4)
    n = 1000
    val = np.full(n, VAL, np.int8)
    incident = np.arange(n) >= 400  # 60 % of the period: a fault at ~50x the normal level
    busy_norm = rng.exponential(1.0, n) + 50.0 * incident
    busy = NodeSignal("busy", 3.0 * busy_norm, val, None, np.arange(n), scale=3.0)
    calm = NodeSignal("calm", 0.5 * rng.exponential(1.0, n), val, None, np.arange(n), scale=0.5)
    source = lambda: iter([busy, calm])
    node = LevelRule().fit(source)
    cluster = LevelRule(scope="cluster").fit(source)
    assert node.nodes == {"busy": 15.0, "calm": 2.5} and cluster.cluster == 5.0
    assert node.details["times"] == cluster.details["times"] == 5.0  # thresholds.json says the multiple
    for s in source():  # node scope on the signal, cluster scope on the normalised signal: the same rows
        alarms = node.signal_of(s) > node.threshold_for(s.node)
        assert (alarms == (cluster.signal_of(s) > cluster.threshold_for(s.node))).all()
    busy_alarms = busy.signal > node.nodes["busy"]
    assert busy_alarms[incident].all() and busy_alarms[~incident].mean() < 0.02
    assert (calm.signal > node.nodes["calm"]).mean() < 0.02  # a calm node: e^-5 of its rows, not a set share
    quantile = QuantileRule().fit(source)
    assert (busy.signal[incident] > quantile.nodes["busy"]).mean() < 0.01  # among the incidents: they are missed
    assert "not_normal_fit_nodes" not in node.details["check"]  # it took no rows as normal
    assert LevelRule(times=3.0).fit(source).nodes["busy"] == 9.0
    with pytest.raises(ConfigError, match="threshold.times=0.0: must be a positive multiple"):
        LevelRule(times=0.0)


def _mislabelled_validation(seed: int = 0):
    """A node whose validation split holds labelled anomalies at ~100x its normal level, a weaker
    anomaly (~40x) only in the test split, and a long band of unlabelled anomaly rows labelled normal
    at 30-150x: the seed lecture's DAVIDE validation split in miniature."""
    rng = np.random.default_rng(seed)
    n = 1200
    sig = rng.gamma(20.0, 0.05, n)  # normal level ~1
    lab = np.zeros(n, np.int8)
    split = np.where(np.arange(n) < 600, VAL, TEST).astype(np.int8)
    lab[100:160] = 1
    sig[100:160] = rng.uniform(90, 110, 60)
    sig[300:500] = np.exp(rng.uniform(np.log(30), np.log(150), 200))  # labelled normal: missing labels
    lab[800:860] = 1
    sig[800:860] = rng.uniform(35, 50, 60)  # a weaker anomaly than any the validation split showed
    sig[700:800] *= 2.0  # the normal level drifts up on later days
    return NodeSignal("n", sig, split, lab, np.arange(n), scale=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_robust_cost_is_not_dragged_under_the_anomalies_by_mislabelled_rows(seed):
    s = _mislabelled_validation(seed)
    exact = CostRule(drift=0).fit(lambda: iter([s])).nodes["n"]
    robust = CostRule().fit(lambda: iter([s])).nodes["n"]
    assert exact > 80  # the plain optimum sits right under the labelled anomalies (validation cost is lower)...
    test = s.split == TEST
    cm = CostModel()
    assert cm.cost(s.signal[test], s.labels[test], exact) >= 5 * 50  # ...and misses the weak test anomaly
    assert 3 < robust < 50  # the robust one stays well above the normal rows and far under the anomalies
    assert cm.cost(s.signal[test], s.labels[test], robust) < 20
    for scope_th in (CostRule(scope="cluster").fit(lambda: iter([s])).cluster,):
        assert 3 < scope_th < 50  # cluster scope (histograms summed, then smoothed) agrees


def _barely_seen_anomaly(seed: int = 0):
    """A node whose validation split holds a strong anomaly (120 rows at 4-6x the quiet level's 0.15,
    whose peaks set a wide jitter) and one the signal barely shows (60 rows at 0.2-0.3), beside a busy
    normal period at 2.3-2.6; its test split has one anomaly at 1-1.6. Seen on a 100-node synthetic
    cluster (node0067: a drift threshold under every row, on every seed)."""
    rng = np.random.default_rng(seed)
    n = 800
    sig = rng.gamma(20.0, 0.0075, n)  # the quiet level, ~0.15
    lab = np.zeros(n, np.int8)
    split = np.where(np.arange(n) < 400, VAL, TEST).astype(np.int8)
    sig[0:100] = rng.uniform(2.3, 2.6, 100)
    lab[120:180] = 1
    sig[120:180] = rng.uniform(0.2, 0.3, 60)
    lab[250:370] = 1
    sig[250:370] = rng.uniform(4.0, 6.0, 120)
    lab[600:640] = 1
    sig[600:640] = rng.uniform(1.0, 1.6, 40)
    return NodeSignal("barely", sig, split, lab, np.arange(n), scale=1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_drift_threshold_that_would_alarm_on_every_row_is_the_exact_optimum_instead(seed, caplog):
    """The expected cost under a wide jitter was lowest far under every row (a threshold of -5 on a
    positive signal): the node alarmed on every row, every night. It takes the exact optimum, which
    alarms on most of its validation rows still (the busy period) but on few of its test rows."""
    s, other = _barely_seen_anomaly(seed), _mislabelled_validation(seed)
    with caplog.at_level("WARNING"):
        th = CostRule().fit(lambda: iter([s, other]), detector="baseline kde")
    exact = CostRule(drift=0).fit(lambda: iter([s])).nodes["barely"]
    assert th.nodes["barely"] == exact > 0.2
    val, test = s.split == VAL, s.split == TEST
    assert 0.3 < (s.signal[val] > exact).mean() < 0.9 and (s.signal[test] > exact).mean() < 0.15
    cm = CostModel()
    assert cm.cost(s.signal[test], s.labels[test], exact) < 60  # every row alarmed: over 300 false alarms
    assert 3 < th.nodes["n"] < 50  # the other node keeps its smoothed threshold (the test above)
    assert th.details["exact_optimum_nodes"] == ["barely"] and th.details["exact_optimum_node_count"] == 1
    assert "always_alarm_nodes" not in th.details["check"]
    assert "baseline kde: on 1 of 2 nodes the drift-smoothed cost threshold would alarm on 90% or more of the " \
           "validation rows (barely): those take the exact validation optimum" in caplog.text
    assert "exact_optimum_nodes" not in CostRule().fit(lambda: iter([other])).details


def _incidents(n_nodes: int, louder_later: bool, seed: int = 0) -> list[NodeSignal]:
    """Nodes at a normal level of 1 (normalised) with one labelled incident in each half of their
    validation rows and a weak one (3x) in their test rows. With ``louder_later=False`` every node is
    alike, in turn: a weak first incident and a strong (50x) second, both weak, the other way round,
    or both strong. With ``louder_later=True`` the odd nodes' validation and test periods run five times
    louder (normal rows at 5, incidents at 20) than the even nodes' (1 and 3): nodes not alike."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_nodes):
        n = 900
        sig = rng.gamma(20.0, 0.05, n)
        lab = np.zeros(n, np.int8)
        split = np.where(np.arange(n) < 600, VAL, TEST).astype(np.int8)
        first, second, later = ((3.0, 50.0), (3.0, 3.0), (50.0, 3.0), (50.0, 50.0))[k % 4] + (3.0,)
        if louder_later:
            first = second = later = 20.0 if k % 2 else 3.0
            sig *= 5.0 if k % 2 else 1.0
        for (a, level) in ((100, first), (400, second), (700, later)):
            lab[a:a + 30] = 1
            sig[a:a + 30] = rng.uniform(level, 1.2 * level, 30)
        out.append(NodeSignal(f"n{k}", sig, split, lab, np.arange(n), scale=1.0))
    return out


def test_scope_auto_pools_the_labels_of_alike_nodes_and_keeps_unalike_ones_apart(caplog):
    """Per-node thresholds rest on a node's one or two incidents: a node whose first incident was
    strong sits above its weak second one. One threshold over alike nodes' normalised signals learns
    from the weak incidents of the others; over unalike nodes it alarms on the loud ones' normal rows."""
    alike = _incidents(12, louder_later=False)
    with caplog.at_level("INFO"):
        th = CostRule(scope="auto").fit(lambda: iter(alike))
    choice = th.details["scope_choice"]
    assert th.scope == "cluster" and choice["chosen"] == "cluster" and choice["labelled_nodes"] == 12
    assert choice["second_half_cost"]["cluster"] < choice["second_half_cost"]["node"]
    assert "autoencoder: threshold scope cluster (threshold.scope=auto: fitted on the first half of 12 labelled " \
           "nodes' validation rows, cost on the second half: node " in caplog.text
    cm = CostModel()
    test_cost = lambda th, nodes: sum(cm.cost(th.signal_of(s)[s.split == TEST], s.labels[s.split == TEST],  # noqa: E731
                                              th.threshold_for(s.node)) for s in nodes)
    # the nodes that saw only strong incidents miss their weak test one with thresholds of their own
    assert test_cost(th, alike) < test_cost(CostRule(scope="node").fit(lambda: iter(alike)), alike)
    assert th.cluster == CostRule(scope="cluster").fit(lambda: iter(alike)).cluster  # then fitted on all the rows
    unalike = _incidents(8, louder_later=True)
    th = CostRule(scope="auto").fit(lambda: iter(unalike))
    assert th.scope == "node" and th.details["scope_choice"]["chosen"] == "node"
    assert th.nodes == CostRule(scope="node").fit(lambda: iter(unalike)).nodes
    one = CostRule(scope="auto").fit(lambda: iter(alike[:1]))  # nothing to pool: node scope, not compared
    assert one.scope == "node" and one.details["scope_choice"] == {"chosen": "node", "labelled_nodes": 1,
                                                                  "how": "fewer than two labelled nodes"}
    with pytest.raises(ConfigError, match="auto: with threshold=cost only"):
        LevelRule(scope="auto")


def test_smoothed_curve_is_the_expected_cost_under_level_jitter():
    from scipy.stats import norm

    from hpcad.threshold.cost import drift_smoothed_curve, level_counts

    rng = np.random.default_rng(0)
    far, peaks = rng.normal(0, 1, 200), rng.normal(4, 1, 30)
    grid = np.linspace(-6, 10, 801)
    h = grid[1] - grid[0]
    binned = lambda v: grid[0] + h * np.clip(np.rint((v - grid[0]) / h), 0, grid.size - 1)  # noqa: E731
    got = drift_smoothed_curve(level_counts(far, grid), level_counts(peaks, grid), grid, 0.7, CostModel(1, 5, 0))
    want = [norm.sf((t - binned(far)) / 0.7).sum() + 5 * norm.cdf((t - binned(peaks)) / 0.7).sum() for t in grid]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_thresholds_that_never_or_always_alarm_are_reported(caplog):
    rng = np.random.default_rng(0)
    calm = NodeSignal("calm", rng.exponential(1.0, 500), np.full(500, VAL, np.int8), None, np.arange(500))
    q = QuantileRule(q=0.99).fit(lambda: iter([calm]))
    assert q.details["check"]["verdict"] == "ok" and 0 < q.details["check"]["alarm_share"] < 0.05
    # one node whose normalised signal is astronomically large drags a cluster quantile above the rest
    huge = NodeSignal("huge", rng.exponential(1.0, 500) * 1e13, np.full(500, VAL, np.int8), None,
                      np.arange(500), scale=1.0)
    others = [NodeSignal(f"n{k}", rng.exponential(1.0, 500), np.full(500, VAL, np.int8), None, np.arange(500))
              for k in range(2)]
    cl = QuantileRule(q=0.5, scope="cluster").fit(lambda: iter([huge, *others]))
    assert cl.details["check"]["verdict"] == "ok"
    never = QuantileRule(q=0.999, scope="cluster")
    th = never.fit(lambda: iter(others))
    th.cluster = 1e9
    from hpcad.threshold.rules import check_thresholds

    with caplog.at_level("WARNING"):
        assert check_thresholds(th, lambda: iter(others), detector="baseline kde")["verdict"] == "never_alarm"
    assert "never alarm" in caplog.text and "baseline kde threshold (quantile, cluster scope)" in caplog.text
    th.cluster = -1.0
    assert check_thresholds(th, lambda: iter(others))["verdict"] == "always_alarm"


def test_a_period_fitted_without_labels_that_is_not_normal_is_named(caplog):
    """Unsupervised fits take the validation rows as normal. On a node whose validation period sits
    far above its held-out training level (DAVIDE without labels: 51x; over half its rows are
    incidents) the threshold lands among the incidents: the check names such nodes, once, with
    their level; a node whose labels decided (the cost rule) or a calm node is not named."""
    rng = np.random.default_rng(3)
    val = lambda n: np.full(n, VAL, np.int8)
    calm = NodeSignal("calm", rng.exponential(1.0, 1000), val(1000), None, np.arange(1000), scale=1.0)
    busy = NodeSignal("busy", 2.0 * rng.exponential(50.0, 1000), val(1000), None, np.arange(1000), scale=2.0)
    labelled_busy = NodeSignal("lab", busy.signal.copy(), val(1000), (rng.random(1000) < 0.2).astype(np.int8),
                               np.arange(1000), scale=2.0)
    with caplog.at_level("WARNING", logger="hpcad.threshold.rules"):
        q = QuantileRule().fit(lambda: iter([calm, busy]))
    check = q.details["check"]
    assert check["not_normal_fit_node_count"] == 1 and list(check["not_normal_fit_nodes"]) == ["busy"]
    assert check["not_normal_fit_nodes"]["busy"] == pytest.approx(np.median(busy.normalised), abs=0.06)
    said = [r.getMessage() for r in caplog.records if "took as normal" in r.getMessage()]
    assert len(said) == 1 and "1 node(s)" in said[0] and f"busy {check['not_normal_fit_nodes']['busy']:g}x" in said[0]
    assert "train_run=" in said[0]
    quantile = CostRule(fallback="quantile").fit(lambda: iter([calm, busy, labelled_busy])).details["check"]
    assert list(quantile["not_normal_fit_nodes"]) == ["busy"]  # labels decided for "lab"
    # the level fallback (the default) takes no rows as normal: its threshold is not among them
    assert "not_normal_fit_nodes" not in CostRule().fit(lambda: iter([calm, busy, labelled_busy])).details["check"]
    # cluster scope: unlabelled nodes take no part in a fit that has labelled nodes; without any, they do
    mixed = CostRule(scope="cluster", fallback="quantile").fit(lambda: iter([busy, labelled_busy]))
    assert "not_normal_fit_nodes" not in mixed.details["check"]
    unlabelled = CostRule(scope="cluster", fallback="quantile").fit(lambda: iter([calm, busy]))
    assert list(unlabelled.details["check"]["not_normal_fit_nodes"]) == ["busy"]
    assert unlabelled.rule == "quantile" and unlabelled.details["fallback"] == {"rule": "quantile", "q": 0.995}
    level = CostRule(scope="cluster").fit(lambda: iter([calm, busy]))
    assert level.rule == "level" and level.cluster == 5.0 and "not_normal_fit_nodes" not in level.details["check"]
    assert "not_normal_fit_nodes" not in QuantileRule().fit(lambda: iter([calm])).details["check"]


@pytest.mark.parametrize("seed", range(6))
def test_threshold_free_figures_equal_scikit_learns(seed):
    """hpcad computes AP, ROC-AUC and best F1 itself (scikit-learn costs a second to import in every
    score and threshold process); they are scikit-learn's figures, ties and NaN rows included."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    from hpcad.threshold.quality import average_precision, ranking

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 2000))
    x = rng.normal(size=n)
    x = np.round(x, 1) if seed % 2 else x  # many ties
    x[rng.integers(0, n, 3)] = np.nan  # ranked lowest
    y = rng.random(n) < [0.02, 0.1, 0.3][seed % 3]
    y[0], y[1] = True, False
    r = ranking(x, y.astype(np.int8))
    xs = np.nan_to_num(x, nan=0.0)
    p, rc, _ = precision_recall_curve(y, xs)
    assert r["ap"] == average_precision(x, y) == average_precision_score(y, xs)
    assert r["best_f1"] == np.max(2 * p * rc / np.maximum(p + rc, 1e-12))
    assert r["roc_auc"] == pytest.approx(roc_auc_score(y, xs), abs=1e-12)


def test_threshold_free_figures_and_detection_delay():
    from hpcad.threshold.quality import macro, ranking

    lab = np.zeros(100, np.int8)
    lab[40:50] = 1
    perfect = np.where(lab != 0, 10.0, 1.0)
    r = ranking(perfect, lab)
    assert r["ap"] == 1.0 and r["roc_auc"] == 1.0 and r["best_f1"] == 1.0 and r["prevalence"] == 0.1
    inverted = ranking(-perfect, lab)
    assert inverted["roc_auc"] == 0.0 and inverted["ap"] < 0.2
    assert ranking(perfect, np.zeros(100, np.int8)) is None and ranking(perfect, None) is None
    m = macro([r, inverted])
    assert m["nodes"] == 2 and m["roc_auc"] == 0.5 and m["roc_auc_std"] == 0.5
    late = np.where(np.arange(100) >= 44, perfect, 1.0)  # the alarm starts 4 rows into the event
    ts = 1_000_000 + 300 * np.arange(100)
    sc = score_rows(late, lab, 5.0, CostModel(1, 5, 2), ts).as_dict()
    assert sc["events_detected"] == 1 and sc["mean_delay_rows"] == 4 and sc["mean_delay_s"] == 1200
    assert sc["node_days"] == pytest.approx(100 * 300 / 86400)
    assert sc["false_alarm_events"] == 0 and sc["false_alarms_per_node_day"] == 0
    rows_only = score_rows(late, lab, 5.0, CostModel(1, 5, 2)).as_dict()
    assert rows_only["node_days"] == pytest.approx(100 / 288) and rows_only["mean_delay_s"] is None


def test_alarm_times_read_back_as_the_rows_timestamps():
    """What alarms.csv writes (ISO UTC for timestamps in seconds, the row number for row-indexed
    data) reads back as the row's own timestamp (the node pages find an alarm's loudest row so)."""
    from hpcad.threshold.evaluate import _iso, time_of

    for ts, unit in ((1_700_000_123, "s"), (0, "s"), (152, "row")):
        assert time_of(_iso(ts, unit), unit) == ts
