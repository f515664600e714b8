"""Whitened reconstruction errors (signal.whiten, hpcad/model/whiten.py): the Mahalanobis distance
of a row's residual, per metric by ZCA, from the residuals' shrunk covariance on the rows the model
was fitted on; its normal level measured on the held-out rows."""
import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
from hpcad.model.files import NodeModel
from hpcad.model.whiten import Whitening, fit_whitening, held_out_from, ledoit_wolf
from hpcad.preprocess import Scaler
from hpcad.score import reconstruction_errors
from hpcad.signals import Recipe

CPU = torch.device("cpu")
PRE = type("Pre", (), dict(std_floor_rel=0.01, std_floor_abs=1e-6, clip=20.0, soft_clip=True))()


def _zero_model(M: int, hidden: int = 3) -> list[list[torch.Tensor]]:
    """One member whose reconstruction is 0: its residuals are the inputs, negated."""
    return [[torch.zeros_like(p) for p in glorot_init(AutoencoderSpec([hidden]), M, 0)]]


def _family_rows(n: int, seed: int = 0) -> np.ndarray:
    """Metrics a and b move together (b = a + small noise); c on its own."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    return np.c_[a, a + 0.1 * rng.normal(size=n), rng.normal(size=n)].astype(np.float32)


def test_the_shrinkage_is_scikit_learns_ledoit_wolf_for_residuals_about_zero():
    rng = np.random.default_rng(1)
    for n, M in ((500, 6), (40, 30)):  # many rows; fewer rows than metrics (heavy shrinkage)
        r = (rng.standard_t(3, size=(n, M)) @ rng.normal(size=(M, M))).astype(np.float64)
        ours, s = ledoit_wolf(torch.from_numpy(r.T @ r / n), float((np.square(r).sum(1) ** 2).mean()), n)
        ref = LedoitWolf(assume_centered=True).fit(r)
        assert s == pytest.approx(ref.shrinkage_, rel=1e-9)
        np.testing.assert_allclose(ours.numpy(), ref.covariance_, rtol=1e-9, atol=1e-12)


def test_a_rows_summed_whitened_error_is_its_mahalanobis_distance_times_the_mean_variance():
    z = _family_rows(800)
    hold = held_out_from(len(z), 0.1)
    w = fit_whitening(AutoencoderSpec([3]), [_zero_model(3)], [z], [hold], 3)[0]
    ref = LedoitWolf(assume_centered=True).fit(z[:hold].astype(np.float64))  # the fitted rows' residuals = -z
    mu = np.trace(ref.covariance_) / 3
    rows = np.random.default_rng(5).normal(size=(20, 3))
    maha = np.einsum("ti,ij,tj->t", rows, ref.precision_, rows)
    np.testing.assert_allclose(((rows @ w.matrix) ** 2).sum(1), mu * maha, rtol=1e-4)
    np.testing.assert_allclose(w.matrix, w.matrix.T, atol=1e-6)  # ZCA: symmetric
    held = z[hold:]
    np.testing.assert_allclose(w.holdout_error, ((held @ w.matrix) ** 2).mean(0), rtol=1e-4)
    assert w.level == pytest.approx(float(w.holdout_error.sum()), rel=1e-6)
    everything = fit_whitening(AutoencoderSpec([3]), [_zero_model(3)], [z], [0], 3)[0]  # no held-out rows
    ref = LedoitWolf(assume_centered=True).fit(z.astype(np.float64))  # all rows stand in for both
    np.testing.assert_allclose(((rows @ everything.matrix) ** 2).sum(1),
                               np.trace(ref.covariance_) / 3 * np.einsum("ti,ij,tj->t", rows, ref.precision_, rows),
                               rtol=1e-4)
    assert everything.level == pytest.approx(float(((z @ everything.matrix) ** 2).sum(1).mean()), rel=1e-4)


def test_later_normal_rows_like_the_held_out_ones_score_about_the_level():
    """The level is measured out of sample, as the unwhitened one is. The held-out rows (the last
    of the training period) show residuals in directions the fitted rows never did, and so do the
    later normal rows. A covariance that took the held-out rows in (the estimator before 2026-12-05)
    learns those directions from a few rows and scores those very rows low: later rows like them sat
    far above that level, and a site without labels alarmed on them all (the real DAVIDE node: 100 %
    of its normal test rows above 5 x). Measured on rows the covariance did not see, the level is
    where such rows score."""
    rng = np.random.default_rng(8)
    M, n_fit, n_hold = 40, 900, 30
    mix = rng.normal(size=(30, M))

    def period(n: int, drift: float) -> np.ndarray:  # drift: residuals in 30 directions new since the fit
        return (0.1 * rng.normal(size=(n, M)) + drift * rng.normal(size=(n, 30)) @ mix).astype(np.float32)

    z = np.r_[period(n_fit, 0.0), period(n_hold, 1.0)]
    w = fit_whitening(AutoencoderSpec([3]), [_zero_model(M)], [z], [n_fit], M)[0]
    later = period(3000, 1.0)
    ratio = float(((later @ w.matrix) ** 2).sum(1).mean()) / w.level
    assert 0.85 < ratio < 1.15, ratio  # 1.01
    # the estimator before: covariance of all training rows (as without held-out rows), level on the held-out ones
    before = fit_whitening(AutoencoderSpec([3]), [_zero_model(M)], [z], [0], M)[0].matrix
    in_sample = float(((z[n_fit:] @ before) ** 2).sum(1).mean())
    assert float(((later @ before) ** 2).sum(1).mean()) / in_sample > 1.5  # 1.75: later rows above its level


def test_a_deviation_its_family_shares_scores_below_the_same_deviation_that_breaks_the_family():
    """What whitening is for: a and b always move together in training. A row where both are 2 off
    is a usual kind of row; one where a is 2 off and b is not is not. The plain squared error scores
    them alike; the whitened error tells them apart, and names a or b, not c."""
    M = 3
    scaler = Scaler.fit(_family_rows(800), PRE)
    z = scaler.transform(_family_rows(800))[0]
    members = _zero_model(M)
    white = fit_whitening(AutoencoderSpec([3]), [members], [z], [held_out_from(len(z), 0.1)], M)[0]
    model = NodeModel("n", AutoencoderSpec([3]), ["a", "b", "c"], members, scaler, {}, 1.0, whitening=white)
    rows = np.array([[2.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=np.float32)
    miss = np.zeros_like(rows, dtype=bool)
    plain = reconstruction_errors([model], [rows], CPU)[0].sum(1)
    whitened = reconstruction_errors([model], [rows], CPU, masks=[miss], whiten=True)[0]
    assert plain[0] == pytest.approx(2 * plain[1])  # the shared deviation counts twice unwhitened
    assert whitened[0].sum() * 5 < whitened[1].sum()  # whitened, the broken relation is far the larger
    assert set(np.argsort(whitened[1])[-2:]) == {0, 1}  # and it is about a and b
    assert whitened[2].argmax() == 2


def test_a_missing_value_leaks_into_no_other_metrics_whitened_error():
    rng = np.random.default_rng(2)
    M = 6
    z = (rng.normal(size=(400, M)) @ rng.normal(size=(M, M))).astype(np.float32)
    spec = AutoencoderSpec([4])
    members = [glorot_init(spec, M, 3)]
    white = fit_whitening(spec, [members], [z], [held_out_from(len(z), 0.1)], M)[0]
    model = NodeModel("n", spec, [f"m{j}" for j in range(M)], members, Scaler.fit(z, PRE), {}, 1.0, whitening=white)
    rows = rng.normal(size=(10, M)).astype(np.float32)
    miss = np.zeros_like(rows, dtype=bool)
    miss[:, 2] = True
    a = rows.copy()
    b = rows.copy()
    b[:, 2] = 50.0  # whatever stands in for the missing value
    ea = reconstruction_errors([model], [a], CPU, masks=[miss], whiten=True)[0]
    eb = reconstruction_errors([model], [b], CPU, masks=[miss], whiten=True)[0]
    recon_changes = not np.allclose(reconstruction_errors([model], [a], CPU)[0][:, 0],
                                    reconstruction_errors([model], [b], CPU)[0][:, 0])
    assert recon_changes  # the value reaches the other metrics' reconstructions...
    # ...but not through the whitening: with the missing residual zeroed, the other metrics' whitened
    # errors are those of their own residuals
    r = _residuals(model, b)
    r[:, 2] = 0.0
    np.testing.assert_allclose(eb, (r @ white.matrix) ** 2, rtol=1e-4, atol=1e-6)
    assert not np.allclose(ea, eb)


def _residuals(model: NodeModel, rows: np.ndarray) -> np.ndarray:
    from hpcad.model.autoencoder import forward, stack

    x = torch.from_numpy(rows)[None]
    with torch.no_grad():
        return (forward(stack(model.members, "cpu"), x, 1)[0][0] - x[0]).numpy()


def test_a_nodes_whitening_does_not_depend_on_the_nodes_it_is_fitted_with():
    rng = np.random.default_rng(4)
    spec = AutoencoderSpec([4])
    zs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (300, 5000, 61)]  # 5000 rows: two row blocks
    members = [glorot_init(spec, 5, k) for k in range(3)]
    hold = [held_out_from(len(z), 0.1) for z in zs]
    together = fit_whitening(spec, [[m] for m in members], zs, hold, 5)
    for k in range(3):
        alone = fit_whitening(spec, [[members[k]]], [zs[k]], [hold[k]], 5)[0]
        assert np.array_equal(alone.matrix, together[k].matrix), k
        assert np.array_equal(alone.holdout_error, together[k].holdout_error), k


def test_a_nodes_whitening_does_not_depend_on_the_threads_it_is_fitted_with():
    """Ranks sharing a machine's CPUs get fewer threads each (hpcad.dist.share_cpu_threads): one process
    and 12 ranks on 2 cores fitted whitenings, hence thresholds, apart in the seventh digit (a product
    over 1,024 rows is split over the threads by the BLAS, the eigendecomposition too)."""
    rng = np.random.default_rng(6)
    spec = AutoencoderSpec([16])
    zs = [rng.normal(size=(n, 160)).astype(np.float32) for n in (3000, 1500)]  # a node's metrics
    members = [[glorot_init(spec, 160, k)] for k in range(2)]
    hold = [held_out_from(len(z), 0.1) for z in zs]
    before = torch.get_num_threads()
    try:
        fits = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            fits.append(fit_whitening(spec, members, zs, hold, 160))
            assert torch.get_num_threads() == threads  # given back as it was
    finally:
        torch.set_num_threads(before)
    for one, three in zip(*fits):
        assert np.array_equal(one.matrix, three.matrix)
        assert one.level == three.level and one.shrinkage == three.shrinkage
        assert np.array_equal(one.holdout_error, three.holdout_error)


def test_whitening_is_kept_in_the_model_file_and_a_file_without_it_is_a_clear_error(tmp_path):
    M = 3
    z = _family_rows(200)
    white = fit_whitening(AutoencoderSpec([3]), [_zero_model(M)], [z], [held_out_from(len(z), 0.1)], M)[0]
    model = NodeModel("n7", AutoencoderSpec([3]), ["a", "b", "c"], _zero_model(M), Scaler.fit(z, PRE), {}, 1.0,
                      whitening=white)
    model.save(tmp_path / "n7.pt")
    back = NodeModel.load(tmp_path / "n7.pt")
    assert np.array_equal(back.whitening.matrix, white.matrix) and back.whitening.level == white.level
    assert Recipe(1.0, whitened=True).level(back, M, 1e-4) == pytest.approx(white.level)
    obj = torch.load(tmp_path / "n7.pt", weights_only=True)
    assert obj["whitening"].pop("version") == 2
    torch.save(obj, tmp_path / "n7-before.pt")  # as hpcad wrote it before 2026-12-05: covariance of all rows
    before = NodeModel.load(tmp_path / "n7-before.pt").whitening  # kept for the thresholds fitted on it
    assert before.version == 1 and not before.current and back.whitening.current
    from hpcad.train import reusable

    assert reusable(tmp_path / "n7.pt", "", whiten=True) and not reusable(tmp_path / "n7-before.pt", "", whiten=True)
    assert reusable(tmp_path / "n7-before.pt", "", whiten=False)  # signal.whiten=false: no need of it
    model.whitening = None  # as an older hpcad wrote it
    with pytest.raises(Exception, match="n7: its model file has no residual whitening.*signal.whiten=false"):
        Recipe(1.0, whitened=True).level(model, M, 1e-4)
    assert Recipe(1.0).level(model, M, 1e-4) == 1.0  # unwhitened: as before


def test_without_training_rows_to_fit_the_identity_keeps_the_errors_as_they_are():
    w = Whitening.identity(4, level=8.0)
    r = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal((r @ w.matrix) ** 2, r ** 2)
    assert w.holdout_error.sum() == pytest.approx(8.0)


def test_a_windowed_ensembles_whitening_is_of_the_residuals_scoring_sees():
    """Members and windows: the whitening is fitted on the members' mean reconstruction of each
    window's newest row, as scoring measures it: its held-out figures are the scored rows' own."""
    from hpcad.preprocess import windows

    rng = np.random.default_rng(6)
    M, w, R = 5, 3, 2
    spec = AutoencoderSpec([4], members=R, window=w)
    z = (rng.normal(size=(300, M)) @ rng.normal(size=(M, M))).astype(np.float32)
    members = [glorot_init(AutoencoderSpec([4], window=w), M, 10 + r) for r in range(R)]
    hold = held_out_from(len(z), 0.1)
    white = fit_whitening(spec, [members], [windows(z, w)], [hold], M)[0]
    model = NodeModel("n", spec, [f"m{j}" for j in range(M)], members, Scaler.fit(z, PRE), {}, 1.0, whitening=white)
    scored = reconstruction_errors([model], [z], CPU, masks=[np.zeros_like(z, dtype=bool)], whiten=True)[0]
    np.testing.assert_allclose(scored[hold:].mean(0), white.holdout_error, rtol=1e-4)
    assert white.level == pytest.approx(float(scored[hold:].sum(1).mean()), rel=1e-4)
