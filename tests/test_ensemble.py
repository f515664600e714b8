"""Batched training keeps each model's own semantics (what the performance work relies on)."""
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from hpcad.model.autoencoder import AutoencoderSpec, forward, glorot_init
from hpcad.model.adam import BETA1, BETA2, EPS
from hpcad.model.ensemble import _shuffle_keys, input_noise, train_ensemble

CFG = NS(batch_size=32, validation_split=0.1, epochs=6, lr=1e-3, patience=3, restore_best=True)


def _data(n_rows, M=12, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_rows, 3))
    return (base @ rng.normal(size=(3, M)) + 0.1 * rng.normal(size=(n_rows, M))).astype(np.float32)


def _reference(spec, x, seed, cfg):
    """One model trained alone by a plain loop: autograd and torch.optim.Adam, step by step."""
    params = [p.clone().requires_grad_(True) for p in glorot_init(spec, x.shape[1], seed)]
    # train.weight_decay: AdamW's decoupled decay on the weight matrices [W0, b0, W1, b1, ...], not the biases
    groups = [{"params": params[0::2], "weight_decay": getattr(cfg, "weight_decay", 0.0)},
              {"params": params[1::2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(BETA1, BETA2), eps=EPS)
    X = torch.from_numpy(x)
    n_tr = int(np.ceil(len(x) * (1 - cfg.validation_split)))
    best, best_loss, wait = None, float("inf"), 0
    for epoch in range(cfg.epochs):
        keys = _shuffle_keys(torch.tensor([seed]), epoch, len(x))[0, :n_tr]
        perm = torch.argsort(keys)
        for s in range(0, n_tr, cfg.batch_size):
            xb = X[perm[s:s + cfg.batch_size]][None]
            x_in = xb
            if getattr(cfg, "input_noise", 0.0):  # denoising: the step's noise, the clean batch as target
                z = input_noise(torch.tensor([seed]), epoch, s // cfg.batch_size, (cfg.batch_size, x.shape[1]))
                x_in = xb + cfg.input_noise * z[:, : xb.shape[1]]
            recon, _ = forward([p[None] for p in params], x_in, len(spec.hidden))
            opt.zero_grad()
            rows = ((recon - xb) ** 2).mean(-1)[0]
            if getattr(cfg, "trim", 0.0):  # trimmed loss: the batch's highest row errors left out
                drop = int(np.floor(len(rows) * cfg.trim))
                rows = rows[torch.argsort(rows.detach(), descending=True, stable=True)[drop:]]
            rows.mean().backward()
            opt.step()
        with torch.no_grad():
            xv = X[n_tr:][None]
            val = float(((forward([p[None] for p in params], xv, len(spec.hidden))[0] - xv) ** 2).mean())
        if val < best_loss:
            best, best_loss, wait = [p.detach().clone() for p in params], val, 0
        else:
            wait += 1
            if wait >= cfg.patience:
                break
    return best


# (hidden, metrics): weights of whole 64-byte lines (updated in place), and odd sizes (padded storage)
SHAPES = [([8], 12), ([5], 7)]


@pytest.mark.parametrize("hidden,M", SHAPES)
def test_batched_equals_one_at_a_time_with_different_row_counts(hidden, M):
    spec = AutoencoderSpec(hidden)
    data = [_data(n, M=M, seed=i) for i, n in enumerate([300, 157, 64])]
    seeds = [11, 22, 33]
    batched = train_ensemble(spec, data, seeds, CFG, torch.device("cpu"))
    for k in range(3):
        ref = _reference(spec, data[k], seeds[k], CFG)
        for a, b in zip(batched.params[k], ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert batched.history[k]["train_rows"] == int(np.ceil(len(data[k]) * 0.9))


@pytest.mark.parametrize("hidden,M", SHAPES)
def test_result_does_not_depend_on_chunk_companions(hidden, M):
    spec = AutoencoderSpec(hidden)
    companions = [_data(200, M=M), _data(90, M=M, seed=1), _data(150, M=M, seed=2)]
    a = train_ensemble(spec, companions, [5, 6, 7], CFG, torch.device("cpu"))
    b = train_ensemble(spec, companions[1:2], [6], CFG, torch.device("cpu"))
    for x, y in zip(a.params[1], b.params[0]):
        assert torch.equal(x, y)
    assert a.history[1] == b.history[0] and a.holdout_signal[1] == b.holdout_signal[0]


@pytest.mark.parametrize("hidden,M,decay", [(*SHAPES[0], 0.0), (*SHAPES[1], 0.0), (*SHAPES[0], 3.0)])
def test_masked_adam_of_the_cuda_path_trains_like_the_plain_loop_and_ignores_companions(hidden, M, decay,
                                                                                        monkeypatch):
    """On CUDA every model steps through one masked, element-wise Adam (models of different lengths
    would split the fused kernel into one-model slices); run here on CPU: same training as
    torch.optim.Adam (AdamW with ``train.weight_decay``), stopped models untouched, and a node's
    model still its own alone."""
    import hpcad.model.ensemble as ens

    monkeypatch.setattr(ens, "masked_adam", lambda device: True)
    spec = AutoencoderSpec(hidden)
    cfg = NS(**{**vars(CFG), "weight_decay": decay})
    data = [_data(n, M=M, seed=i) for i, n in enumerate([300, 157, 64])]
    seeds = [11, 22, 33]
    batched = train_ensemble(spec, data, seeds, cfg, torch.device("cpu"))
    for k in range(3):
        for a, b in zip(batched.params[k], _reference(spec, data[k], seeds[k], cfg)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    alone = train_ensemble(spec, data[1:2], seeds[1:2], cfg, torch.device("cpu"))
    for x, y in zip(batched.params[1], alone.params[0]):
        assert torch.equal(x, y)
    assert batched.history[1] == alone.history[0]


@pytest.mark.parametrize("option,value", [("input_noise", 0.3), ("trim", 0.25), ("weight_decay", 3.0)])
def test_a_training_option_trains_like_the_plain_loop_and_ignores_companions(option, value):
    """train.input_noise: each model's noise is its own (seed, epoch, step); train.trim: each step
    leaves out the share of its batch's rows with the highest errors, short last batches included;
    train.weight_decay: AdamW's decoupled decay of the weight matrices (not the biases), models that
    sit a step out not decayed. Each, model by model, as in a plain loop, and whatever the chunk's
    other models."""
    spec, M = AutoencoderSpec([8]), 12
    cfg = NS(**{**vars(CFG), option: value})
    data = [_data(n, M=M, seed=i) for i, n in enumerate([300, 157, 64])]
    batched = train_ensemble(spec, data, [11, 22, 33], cfg, torch.device("cpu"))
    for k, seed in enumerate([11, 22, 33]):
        for a, b in zip(batched.params[k], _reference(spec, data[k], seed, cfg)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    alone = train_ensemble(spec, data[1:2], [22], cfg, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(alone.params[0], batched.params[1]))
    assert alone.history[0] == batched.history[1]
    plain = train_ensemble(spec, data[1:2], [22], CFG, torch.device("cpu"))
    assert not torch.equal(plain.params[0][0], alone.params[0][0])  # the option does reach training


def test_denoising_noise_is_standard_normal_and_each_models_own():
    z = input_noise(torch.tensor([1, 2]), 0, 0, (512, 64))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01  # standard normal
    assert not torch.equal(z[0], z[1]) and torch.equal(z[1], input_noise(torch.tensor([2]), 0, 0, (512, 64))[0])


def test_a_trimmed_loss_keeps_a_fault_among_the_training_rows_from_being_learnt_as_normal():
    """A node whose unlabelled training rows hold a fault (a tenth of them: six metrics dropped
    together, as a wrong governor drops power) learns it as normal and ranks its return poorly; with
    ``train.trim=0.25`` the model leaves those rows out and the fault's rows stand out again. One draw
    of data and seed (offline, 20 draws: median average precision 0.60 -> 0.996, worse in 3:
    docs/results.md "An incident among the training rows")."""
    from sklearn.metrics import average_precision_score

    from hpcad.model.autoencoder import forward

    rng = np.random.default_rng(0)
    M = 24
    basis = rng.normal(size=(3, M))

    def normal(n):
        return (rng.normal(size=(n, 3)) @ basis + 0.1 * rng.normal(size=(n, M))).astype(np.float32)

    fault = np.zeros(M, np.float32)
    fault[:6] = -3.0
    train = normal(1800)
    train[rng.choice(1800, 180, replace=False)] += fault
    test = torch.from_numpy(np.vstack([normal(500), normal(100) + fault]))[None]
    is_fault = np.r_[np.zeros(500), np.ones(100)]
    ap = {}
    for trim in (0.0, 0.25):
        cfg = NS(**{**vars(CFG), "epochs": 20, "trim": trim})
        params = train_ensemble(AutoencoderSpec([8]), [train], [0], cfg, torch.device("cpu")).params[0]
        err = ((forward([p[None] for p in params], test, 1)[0] - test) ** 2).mean(-1)[0].numpy()
        ap[trim] = average_precision_score(is_fault, err)
    assert ap[0.0] < 0.6 and ap[0.25] > 0.95, ap


def test_default_model_does_not_depend_on_its_chunk_position():
    """The default model on a real node's width, second in its chunk: bit-identical to training alone
    (an output-bias gradient taken by a matmul into a packed scratch row once differed by 1 ulp)."""
    from hpcad.config import PreprocessConfig
    from hpcad.data.synthetic import generate_node
    from hpcad.preprocess import Scaler

    spec = AutoencoderSpec([64])
    node, other = (Scaler.fit(v, PreprocessConfig()).transform(v)[0][:, :159] for v in
                   (generate_node(name, rows, seed=0).values for name, rows in (("a", 1500), ("b", 1537))))
    cfg = NS(**{**vars(CFG), "epochs": 3})
    alone = train_ensemble(spec, [node], [7], cfg, torch.device("cpu"))
    second = train_ensemble(spec, [other, node], [8, 7], cfg, torch.device("cpu"))
    for x, y in zip(alone.params[0], second.params[1]):
        assert torch.equal(x, y)


def test_bf16_matmuls_train_about_as_well_as_fp32():
    """compute.precision=bf16: matmuls in bfloat16, weights, optimiser and loss in float32."""
    spec = AutoencoderSpec([8])
    data = [_data(400, seed=1), _data(300, seed=2)]
    runs = {p: train_ensemble(spec, data, [1, 2], CFG, torch.device("cpu"), precision=p)
            for p in ("fp32", "bf16")}
    for k in range(2):
        fp32, bf16 = (runs[p].history[k]["val_loss"] for p in ("fp32", "bf16"))
        assert bf16[-1] < 0.9 * bf16[0] and abs(bf16[-1] - fp32[-1]) < 0.02 * fp32[-1], (fp32, bf16)
    assert not all(torch.equal(a, b) for a, b in zip(runs["fp32"].params[0], runs["bf16"].params[0]))


def test_early_stopped_model_stops_changing_and_restores_best():
    spec = AutoencoderSpec([2])
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(100, 12)).astype(np.float32)  # unlearnable: validation stops improving early
    cfg = NS(**{**vars(CFG), "epochs": 30, "patience": 2, "lr": 1e-2})
    res = train_ensemble(spec, [noise, _data(400)], [1, 2], cfg, torch.device("cpu"))
    h_noise, h_good = res.history
    assert h_noise["stopped_early"] and h_noise["epochs_run"] < h_good["epochs_run"]
    assert h_noise["best_epoch"] == int(np.nanargmin(h_noise["val_loss"])) + 1
    # restore-best: the stored model reproduces the best validation loss, not the last one
    X = torch.from_numpy(noise)
    n_tr = h_noise["train_rows"]
    p = [t[None] for t in res.params[0]]
    val = float(((forward(p, X[n_tr:][None], 1)[0] - X[n_tr:][None]) ** 2).mean())
    assert abs(val - min(h_noise["val_loss"])) < 1e-5
    assert abs(val - h_noise["val_loss"][-1]) > 1e-5  # the last epoch was worse than the restored one
    assert h_good["loss"][-1] < h_good["loss"][0]


def test_l1_code_penalty_and_deeper_models_train():
    spec = AutoencoderSpec([16, 4], code_l1=1e-3)
    assert spec.widths(12) == [12, 16, 4, 16, 12]
    res = train_ensemble(spec, [_data(300)], [3], CFG, torch.device("cpu"))
    assert len(res.params[0]) == 8 and res.history[0]["loss"][-1] < res.history[0]["loss"][0]


def test_hand_written_gradients_match_autograd():
    from hpcad.model.autoencoder import stack
    from hpcad.model.backprop import Backprop, Workspace

    spec, l1 = AutoencoderSpec([16, 4], code_l1=1e-2), 1e-2
    params = stack([glorot_init(spec, 12, s) for s in (1, 2, 3)], "cpu")
    x = torch.from_numpy(np.stack([_data(8, seed=s) for s in range(3)]))
    w_row = torch.rand(3, 8)
    w_row[1, 5:] = 0.0  # a short last batch
    w_row[2] = 0.0  # a model that sits this step out
    grads = [torch.zeros_like(p) for p in params]
    backprop = Backprop(params, grads, 8, 2, l1, torch.float32, Workspace())
    row_loss = backprop(x, backprop.weights(w_row))
    leaves = [p.clone().requires_grad_(True) for p in params]
    recon, code = forward(leaves, x, 2)
    expected = ((recon - x) ** 2).mean(-1) + l1 * code.abs().sum(-1)
    auto = torch.autograd.grad((expected * w_row).sum(), leaves)
    torch.testing.assert_close(row_loss, expected.detach())
    for g, a in zip(grads, auto):
        torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-6)
    assert all(float(g[2].abs().max()) == 0.0 for g in grads)


def test_holdout_signal_belongs_to_the_kept_weights():
    """The per-model signal level (kept from the validation pass of the kept epoch) is what the
    returned weights give on the validation rows, with and without restore-best."""
    spec = AutoencoderSpec([2])
    noise = np.random.default_rng(0).normal(size=(100, 12)).astype(np.float32)  # its last epoch is not its best
    data = [noise, _data(120, seed=1)]
    for restore in (True, False):
        cfg = NS(**{**vars(CFG), "restore_best": restore, "epochs": 30, "patience": 2, "lr": 1e-2})
        res = train_ensemble(spec, data, [1, 2], cfg, torch.device("cpu"))
        assert res.history[0]["best_epoch"] < res.history[0]["epochs_run"]
        for k, x in enumerate(data):
            xv = torch.from_numpy(x[res.history[k]["train_rows"]:])[None]
            recon, _ = forward([p[None] for p in res.params[k]], xv, 1)
            expected = float(((recon - xv) ** 2).sum(-1).mean())
            assert abs(res.holdout_signal[k] - expected) <= 1e-5 * expected, (restore, k)
            # the per-metric errors (signal.metric_scales) of the same weights on the same rows
            np.testing.assert_allclose(res.holdout_error[k], ((recon - xv) ** 2).mean(1)[0].detach(), rtol=1e-5)


def test_workspace_reused_across_chunks_changes_nothing():
    from hpcad.model.backprop import Workspace

    spec = AutoencoderSpec([8])
    ws = Workspace()
    train_ensemble(spec, [_data(400, seed=3), _data(350, seed=4), _data(90, seed=5)], [1, 2, 3], CFG,
                   torch.device("cpu"), workspace=ws)  # leaves larger buffers full of that chunk's values
    chunk = [_data(120, seed=6), _data(70, seed=7)]
    reused = train_ensemble(spec, chunk, [4, 5], CFG, torch.device("cpu"), workspace=ws)
    fresh = train_ensemble(spec, chunk, [4, 5], CFG, torch.device("cpu"))
    for a, b in zip(reused.params, fresh.params):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert reused.holdout_signal == fresh.holdout_signal
    assert all(np.array_equal(a, b) for a, b in zip(reused.holdout_error, fresh.holdout_error))


def test_models_that_stop_early_leave_the_chunk_without_changing_anyone():
    """Once a quarter of the chunk has stopped, the stopped models are taken out and the rest is
    compacted: every model still ends exactly as it would trained alone."""
    spec = AutoencoderSpec([2])
    noise = np.random.default_rng(0).normal(size=(100, 12)).astype(np.float32)  # stops after a few epochs
    data = [_data(400, seed=1), noise, _data(200, seed=2), _data(310, seed=3)]
    seeds = [1, 2, 3, 4]
    cfg = NS(**{**vars(CFG), "epochs": 30, "patience": 2, "lr": 1e-2})
    chunk = train_ensemble(spec, data, seeds, cfg, torch.device("cpu"))
    stopped = [h["epochs_run"] for h in chunk.history]
    assert stopped[1] < max(stopped)  # the noise model left the chunk while others went on
    for k in range(4):
        alone = train_ensemble(spec, [data[k]], [seeds[k]], cfg, torch.device("cpu"))
        assert all(torch.equal(a, b) for a, b in zip(chunk.params[k], alone.params[0])), k
        assert chunk.history[k] == alone.history[0] and chunk.holdout_signal[k] == alone.holdout_signal[0]
        assert np.array_equal(chunk.holdout_error[k], alone.holdout_error[0]), k


def test_holdout_signal_without_validation_rows_is_measured_on_training_rows():
    spec = AutoencoderSpec([4])
    data = [_data(150, seed=0), _data(90, seed=1)]
    cfg = NS(**{**vars(CFG), "validation_split": 0.0, "epochs": 3})
    res = train_ensemble(spec, data, [1, 2], cfg, torch.device("cpu"))
    for k, x in enumerate(data):
        assert res.history[k]["val_rows"] == 0 and np.isnan(res.history[k]["val_loss"]).all()
        xt = torch.from_numpy(x)[None]
        recon, _ = forward([p[None] for p in res.params[k]], xt, 1)
        expected = float(((recon - xt) ** 2).sum(-1).mean())
        assert abs(res.holdout_signal[k] - expected) <= 1e-5 * expected
        np.testing.assert_allclose(res.holdout_error[k], ((recon - xt) ** 2).mean(1)[0].detach(), rtol=1e-5)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-fused-adam", "cuda-masked-adam"])
@pytest.mark.parametrize("killed_after", [5, 17, 20])  # before, between and after early stops (16, 18)
def test_a_chunk_resumed_from_its_checkpoint_ends_as_if_never_interrupted(tmp_path, killed_after, masked, monkeypatch):
    """hpcad/model/checkpoint.py: the chunk's state saved after an epoch, resumed after a kill,
    gives the same weights, histories and signal levels bit for bit, also once stopped models have
    left the chunk (two stop at epochs 16 and 18, and the chunk is compacted). Also with the masked
    Adam step that CUDA uses (run here on the CPU): its per-model step counts resume too."""
    import hpcad.model.ensemble as ens
    from hpcad.model.checkpoint import ChunkCheckpoint

    monkeypatch.setattr(ens, "masked_adam", lambda device: masked)

    spec = AutoencoderSpec([2])
    noise = [np.random.default_rng(s).normal(size=(n, 12)).astype(np.float32) for s, n in ((0, 100), (5, 60))]
    data = [_data(400, seed=1), noise[0], _data(200, seed=2), _data(310, seed=3), noise[1], _data(150, seed=4),
            _data(120, seed=5), _data(90, seed=6)]
    seeds = list(range(1, 9))
    cfg = NS(batch_size=32, validation_split=0.1, epochs=24, lr=1e-2, patience=1, restore_best=True,
             input_noise=0.05)
    whole = train_ensemble(spec, data, seeds, cfg, torch.device("cpu"))
    assert [h["epochs_run"] for h in whole.history][1:3] == [16, 18]

    def kill_at(epoch, running):  # the progress callback runs before the epoch is saved: epoch - 1 is
        if epoch == killed_after:
            raise _Killed

    ckpt = ChunkCheckpoint(tmp_path, "fp", [f"n{i}" for i in range(8)], 1, every_s=0)
    with pytest.raises(_Killed):
        train_ensemble(spec, data, seeds, cfg, torch.device("cpu"), progress=kill_at, checkpoint=ckpt)
    assert ckpt.path.exists()
    seen = []
    resumed = train_ensemble(spec, data, seeds, cfg, torch.device("cpu"), checkpoint=ckpt,
                             progress=lambda e, r: seen.append(e))
    assert seen[0] == killed_after  # it went on from the saved epoch (killed_after - 1), not from 0
    for a, b in zip(whole.params, resumed.params):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert whole.history == resumed.history and whole.holdout_signal == resumed.holdout_signal
    assert all(np.array_equal(a, b) for a, b in zip(whole.holdout_error, resumed.holdout_error))
    # another chunk (other nodes) does not take it
    other = ChunkCheckpoint(tmp_path, "fp", [f"m{i}" for i in range(8)], 1, every_s=0)
    assert other.load() is None


def test_the_staged_upload_writes_each_node_zero_padded_as_the_direct_one():
    """CUDA's upload (two staging buffers taken in turn, hpcad.device.Staging) run on the CPU: five
    nodes of different lengths, so each buffer is reused while holding a longer node's rows; the
    chunk tensor (filled with garbage first) ends as the direct copy leaves it."""
    from hpcad.model.ensemble import _upload, _upload_staged

    rng = np.random.default_rng(0)
    data = [rng.normal(size=(n, 3)).astype(np.float32) for n in (7, 2, 9, 0, 4)]
    direct, staged = (torch.full((5, 9, 3), 99.0) for _ in range(2))
    _upload(direct, data)
    _upload_staged(staged, data)
    assert torch.equal(direct, staged)
    assert torch.equal(staged[2, :9], torch.from_numpy(data[2])) and staged[1, 2:].abs().sum() == 0
