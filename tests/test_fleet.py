"""model.scope=fleet within memory budgets: rows kept in host memory when the device cannot hold
them (the same model), and a share larger than the host budget refused before it runs out."""
import logging

import pytest
import torch

from conftest import small_site
from hpcad import fleet
from hpcad.errors import HpcadError
from hpcad.model.budget import Budget
from hpcad.model.files import NodeModel, model_path

FLEET = ("model.scope=fleet", "train.batch_size=16", "train.epochs=4", "train.patience=10")


def _models(models_dir, nodes) -> dict:
    return {n: NodeModel.load(model_path(models_dir, n)) for n in nodes}


def test_rows_the_device_cannot_hold_stay_in_host_memory_and_train_the_same_model(tmp_path, monkeypatch, caplog):
    """On a GPU whose budget is smaller than the rank's rows, minibatches are gathered in host memory
    a segment of steps at a time and uploaded; the batches, and so the model, are the ones the rows
    on the device give. Run on the CPU here with a 1-byte device budget and segments of 3 steps
    (6 nodes, 540 training rows: 34 steps of 16 rows per epoch, the last batch wrapping around to
    the epoch's first rows, the last segment one step; 60 validation rows in blocks of 7)."""
    cfg, store = small_site(tmp_path, n=6, rows=200, overrides=FLEET)
    cpu = torch.device("cpu")
    fleet.train_fleet(cfg, store, tmp_path / "on_device", list(store.nodes), cpu)
    real = Budget.resolve
    monkeypatch.setattr(Budget, "resolve", classmethod(
        lambda cls, cc, device: Budget(real(cc, device).host_bytes, 1, "a 1-byte device budget")))
    monkeypatch.setattr(fleet, "SEGMENT_BYTES", 3 * 16 * 4 * 4)  # 3 steps of 16 rows x 4 metrics
    monkeypatch.setattr(fleet, "VAL_ROWS", 7)  # validation in blocks, the last one short
    with caplog.at_level(logging.INFO, logger="hpcad.fleet"):
        fleet.train_fleet(cfg, store, tmp_path / "streamed", list(store.nodes), cpu)
    assert "in host memory, uploaded 3 steps at a time" in caplog.text
    a, b = _models(tmp_path / "on_device", store.nodes), _models(tmp_path / "streamed", store.nodes)
    for n in store.nodes:
        assert all(torch.equal(x, y) for x, y in zip(a[n].members[0], b[n].members[0])), n
        assert a[n].history["epochs_run"] == b[n].history["epochs_run"] == 4
        assert a[n].history["val_loss"] == pytest.approx(b[n].history["val_loss"], rel=1e-6)  # blocks: summed apart
        # the per-metric held-out errors (signal.metric_scales) add up to the node's level
        assert a[n].holdout_error.shape == (4,) and a[n].holdout_error.sum() == pytest.approx(a[n].signal_scale, rel=1e-5)
    assert a["n0"].members[0][0].abs().sum() > 0 and b["n0"].history["scope"] == "fleet"


def test_a_share_larger_than_the_host_budget_is_refused_as_soon_as_that_is_clear(tmp_path):
    """4 nodes of 40,000 rows x 4 metrics (their training rows and shuffle index: 0.44 MB each)
    against a 1 MB host budget: refused after the third node is read, with the share's size and
    what to change; nothing written."""
    cfg, store = small_site(tmp_path, n=4, rows=40_000, overrides=(*FLEET, "compute.memory_budget_mb=1"))
    with pytest.raises(HpcadError) as err:
        fleet.train_fleet(cfg, store, tmp_path / "models", list(store.nodes), torch.device("cpu"))
    msg = str(err.value)
    assert "model.scope=fleet: this rank's 4 nodes need about 1.8 MB of training rows in host memory (1.3 MB " \
           "after 3 of them)" in msg  # read node by node, refused before the last one
    assert "host 1 MB (compute.memory_budget_mb)" in msg and "srun -n" in msg and "model.scope=node" in msg
    assert not list((tmp_path / "models").glob("*.pt"))
