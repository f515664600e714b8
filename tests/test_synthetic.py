import numpy as np

from hpcad.data.synthetic import ANOMALY_CODES, generate_cluster, generate_node, metric_names


def test_metric_names_match_real_telemetry_shapes():
    names = metric_names("cluster")
    assert len(names) == 160 and len(set(names)) == 160
    for family in ("ips_p0_", "util_p1_", "temp_p0_", "cmbw_p1_", "pow_"):
        assert any(n.startswith(family) for n in names)
    davide = metric_names("davide")
    assert len(davide) == 159 and davide[:3] == ["ambient_temp", "cmbw_p0_0", "cmbw_p0_1"]


def test_generation_is_seeded_and_reproducible():
    a, b = generate_node("n1", 500, seed=3), generate_node("n1", 500, seed=3)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.labels, b.labels)
    c = generate_node("n1", 500, seed=4)
    assert not np.array_equal(a.values, c.values)
    assert not np.array_equal(a.values, generate_node("n2", 500, seed=3).values)  # nodes differ


def test_anomaly_physics():
    node = generate_node("n0", 6000, seed=1, anomaly_fraction=0.3)
    names = metric_names()
    col = lambda prefix: node.values[:, [i for i, n in enumerate(names) if n.startswith(prefix)]].mean(1)
    ips, util, power, mem = col("ips_"), col("util_"), col("pow_p"), col("mem_used")
    normal, ps, pf = node.labels == 0, node.labels == 1, node.labels == 2
    assert {1, 2, 3, 4} <= set(np.unique(node.labels))
    # Power-saving governor: ips and power fall per unit of utilisation, util stays high.
    assert (ips / util)[ps].mean() < 0.8 * (ips / util)[normal].mean()
    assert (power / util)[ps].mean() < 0.8 * (power / util)[normal].mean()
    assert util[ps].mean() > 0.9 * util[normal].mean()
    # Performance governor: more power per unit of utilisation.
    assert (power / util)[pf].mean() > (power / util)[normal].mean()
    # Memory leak: used memory above normal; CPU contention: context switches jump.
    assert mem[node.labels == 3].mean() > mem[normal].mean()
    ctx = node.values[:, names.index("ctx_switches")]
    assert ctx[node.labels == 4].mean() > 2 * ctx[normal].mean()


def test_clean_prefix_and_idle_gaps():
    node = generate_node("n0", 2000, seed=0, clean_fraction=0.45)
    assert not node.labels[:900].any()
    steps = np.diff(node.timestamp)
    assert steps.min() == 300 and steps.max() > 300  # idle periods are absent rows


def test_cluster_is_streamed_with_heterogeneous_nodes():
    gen = generate_cluster(4, 300, seed=0)
    first = next(gen)
    assert first.name == "node0000"
    rest = list(gen)
    assert len({n.values.shape[0] for n in [first, *rest]}) > 1
    assert set(ANOMALY_CODES.values()) == {1, 2, 3, 4}


def test_davide_profile_is_normalised_with_governor_labels_only():
    node = generate_node("x", 2000, profile="davide")
    assert node.values.shape[1] == 159
    assert node.values.min() >= 0 and node.values.max() <= 1
    assert set(np.unique(node.labels)) <= {0, 1, 2}


def test_the_temperature_lag_is_scipys_filter_bit_for_bit():
    """hpcad.data.synthetic._lag replaces scipy.signal.lfilter (0.6 s of start-up): the synthetic
    data, and every figure measured on it, stay the same to the last bit."""
    import numpy as np
    from scipy.signal import lfilter

    from hpcad.data.synthetic import _lag

    x = np.random.default_rng(3).normal(50, 10, (500, 7))
    assert np.array_equal(_lag(x), lfilter([0.4], [1, -0.6], x, axis=0, zi=0.6 * x[:1])[0])
