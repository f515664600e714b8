from types import SimpleNamespace as NS

import numpy as np
import pytest

from hpcad.data.node import NodeData
from hpcad.errors import ConfigError
from hpcad.preprocess import (TEST, TRAIN, VAL, Scaler, fill_gaps, split_codes, training_rows, window_at, window_rows,
                              windows)

PRE = NS(std_floor_rel=0.01, std_floor_abs=1e-6, clip=20.0, soft_clip=False)  # the lecture-era hard clip
SOFT = NS(std_floor_rel=0.01, std_floor_abs=1e-6, clip=20.0, soft_clip=True)  # the default


def _node(T=100, labels=None):
    return NodeData("n", 1_700_000_000 + 300 * np.arange(T), np.zeros((T, 2), np.float32), labels)


def test_fraction_rows_and_time_splits_are_chronological():
    nd = _node()
    c = split_codes(nd, NS(unit="fraction", train=0.5, val=0.2))
    assert (c[:50] == TRAIN).all() and (c[50:70] == VAL).all() and (c[70:] == TEST).all()
    c = split_codes(nd, NS(unit="rows", train=30, val=15))  # the lecture's protocol, by row counts
    assert (c == TRAIN).sum() == 30 and (c == VAL).sum() == 15 and c[44] == VAL and c[45] == TEST
    t_tr = "2023-11-14T22:13:20+00:00"  # epoch 1_700_000_000
    c = split_codes(nd, NS(unit="time", train=1_700_000_000 + 300 * 40, val=1_700_000_000 + 300 * 60))
    assert (c == TRAIN).sum() == 40 and (c == VAL).sum() == 20
    assert (split_codes(nd, NS(unit="time", train=t_tr, val=t_tr)) == TEST).all()
    with pytest.raises(ConfigError, match="split.unit"):
        split_codes(nd, NS(unit="weeks", train=1, val=1))
    with pytest.raises(ConfigError, match="sum to <= 1"):
        split_codes(nd, NS(unit="fraction", train=0.8, val=0.5))


def test_training_rows_exclude_anomalies_when_labelled():
    labels = np.zeros(100, np.int8)
    labels[10:20] = 2
    nd = _node(labels=labels)
    codes = split_codes(nd, NS(unit="fraction", train=0.5, val=0.25))
    assert training_rows(nd, codes, normal_only=True).sum() == 40
    assert training_rows(nd, codes, normal_only=False).sum() == 50


def test_scaler_survives_constant_and_near_constant_metrics():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(5, 2, 500), np.full(500, 3.0), 1e6 + rng.normal(0, 1e-9, 500)].astype(np.float32)
    sc = Scaler.fit(x, PRE)
    assert np.isfinite(sc.scale).all() and (sc.scale > 0).all()
    z, _ = sc.transform(np.array([[5, 4.0, 1e6 + 1]], np.float32))  # a shift on the (near-)constant metrics
    assert np.abs(z).max() <= PRE.clip  # bounded: one metric cannot explode the signal
    assert abs(z[0, 0]) < 1
    assert sc.scale[1] == 3.0 and z[0, 1] == pytest.approx(1 / 3)  # constant: change relative to its level


def test_nan_policy_fills_short_gaps_and_imputes_long_runs():
    v = np.arange(20, dtype=np.float32)[:, None].repeat(2, 1)
    v[5:7, 0] = np.nan  # short gap: forward-filled
    v[10:18, 1] = np.nan  # long run: the first 3 filled, the rest imputed with the mean
    f = fill_gaps(v, limit=3)
    assert f[6, 0] == 4 and np.isnan(f[13:18, 1]).all() and f[12, 1] == 9
    sc = Scaler.fit(f, PRE)
    z, missing = sc.transform(f)
    assert missing[13:18, 1].all() and (z[13:18, 1] == 0).all() and not missing[:, 0].any()


def test_scaler_needs_training_rows():
    with pytest.raises(ConfigError, match="no training rows"):
        Scaler.fit(np.zeros((0, 3), np.float32), PRE, where="node n7")


def test_soft_clip_keeps_ordering_beyond_the_clip_and_the_scaler_knows_its_training_range():
    """A value never seen in training must score above the normal rows that sit at the clip: a
    near-constant metric (MSL P-14: std 8e-5 around 1.0) whose later values move by 0.005 and by
    1.7 reaches the clip either way; the soft clip still orders them."""
    rng = np.random.default_rng(0)
    train = np.c_[1.0 + rng.normal(0, 8e-5, 500), rng.normal(0, 1, 500)].astype(np.float32)
    hard, soft = Scaler.fit(train, PRE), Scaler.fit(train, SOFT)
    later = np.array([[0.995, 0.0], [-0.7, 0.0]], np.float32)
    zh, zs = hard.transform(later)[0], soft.transform(later)[0]
    assert zh[0, 0] == zh[1, 0] == -20.0  # hard: both saturate, indistinguishable
    assert zs[1, 0] < zs[0, 0] < -20.0 and zs[1, 0] > -40  # soft: ordered, and still bounded (logarithmic)
    assert (soft.lo <= soft.transform(train)[0].min(0)).all() and (soft.hi >= soft.transform(train)[0].max(0)).all()
    ex = soft.excess(np.array([[0.0, soft.hi[1] + 2.0], [soft.lo[0] - 1.0, 0.0]], np.float32))
    np.testing.assert_allclose(ex, [[0.0, 2.0], [1.0, 0.0]], atol=1e-5)  # 0 inside the training range


def test_windows_hold_the_row_and_the_ones_before_it():
    z = np.arange(12, dtype=np.float32).reshape(6, 2)
    w = windows(z, 3)
    assert w.shape == (6, 6)
    np.testing.assert_array_equal(w[4], [4, 5, 6, 7, 8, 9])  # rows 2, 3, 4: oldest first, the row itself last
    np.testing.assert_array_equal(w[0], [0, 1, 0, 1, 0, 1])  # before the first row: the first row repeated
    assert windows(z, 1) is z
    mask = np.array([1, 1, 1, 0, 1, 1], bool)
    np.testing.assert_array_equal(window_rows(mask, 2), [1, 1, 1, 0, 0, 1])  # whole window inside the mask
    rows = np.array([5, 0, 1, 3])  # some windows only (the baselines' fit and scoring blocks), the first padded
    for k in (1, 3):
        np.testing.assert_array_equal(window_at(z, rows, k), windows(z, k)[rows])


def test_one_holdout_rule_keras_validation_split():
    """hpcad.preprocess.fit_rows: the first ceil(n x (1 - share)) inputs are fitted, the rest held out
    (at least one fitted); training, baselines, fleet and the benchmarks all split this way."""
    from hpcad.preprocess import fit_rows

    assert [fit_rows(n, 0.1) for n in (1, 2, 9, 10, 11, 400)] == [1, 2, 9, 9, 10, 360]
    assert fit_rows(7, 0.0) == 7 and fit_rows(3, 0.5) == 2 and fit_rows(2, 0.99) == 1


def test_forward_fill_follows_pandas_and_zero_means_no_filling():
    """fill_gaps is pandas' ffill(limit) in numpy (pandas costs 0.25 s of every train and score
    start-up): the first `limit` rows of a gap take the last value, the rest stay missing; before
    any value nothing is filled. nan_fill_limit=0, which pandas refuses, fills nothing."""
    import numpy as np
    import pandas as pd
    import pytest

    from hpcad.errors import ConfigError
    from hpcad.preprocess import fill_gaps

    nan = np.nan
    v = np.array([[nan, 1], [2, nan], [nan, nan], [nan, nan], [nan, 5], [6, nan]], dtype=np.float32)
    expected = np.array([[nan, 1], [2, 1], [2, 1], [2, nan], [nan, 5], [6, 5]], dtype=np.float32)
    assert np.array_equal(fill_gaps(v, 2), expected, equal_nan=True)
    rng = np.random.default_rng(0)
    for limit in (1, 3, 7):
        w = rng.normal(size=(200, 5)).astype(np.float32)
        w[rng.random(w.shape) < 0.4] = nan
        assert np.array_equal(fill_gaps(w, limit), pd.DataFrame(w).ffill(limit=limit).to_numpy(np.float32),
                              equal_nan=True)
    # filled in blocks of rows (hpcad.preprocess.TRANSFORM_ROWS): gaps across a block's edge too
    from hpcad.preprocess import TRANSFORM_ROWS

    long = rng.normal(size=(2 * TRANSFORM_ROWS + 50, 3)).astype(np.float32)
    long[TRANSFORM_ROWS - 2: TRANSFORM_ROWS + 4, 0] = nan  # a gap of 6 rows over the first edge
    long[: 2 * TRANSFORM_ROWS + 10, 1] = nan  # a column without a value until after the second edge
    long[rng.random(long.shape) < 0.2] = nan
    for limit in (3, 10):
        assert np.array_equal(fill_gaps(long, limit), pd.DataFrame(long).ffill(limit=limit).to_numpy(np.float32),
                              equal_nan=True)
    assert fill_gaps(v, 0) is v
    with pytest.raises(ConfigError, match="preprocess.nan_fill_limit=-1"):
        fill_gaps(v, -1)
