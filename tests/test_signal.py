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
from hpcad.signals import signal_level, smooth_signal

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


def test_signal_level_floor_keeps_signal_norm_finite_for_perfectly_reconstructed_nodes():
    assert signal_level(1e-13, 55, 1e-4) == pytest.approx(55e-4)  # an MSL channel constant in training
    assert signal_level(49.0, 159, 1e-4) == 49.0  # a real node: its held-out level
    assert signal_level(float("nan"), 10, 1e-4) == pytest.approx(1e-3)
