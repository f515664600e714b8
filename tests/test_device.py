"""Device choice: this rank's GPU, and cuBLAS set up so a node's model is its own on CUDA too."""
import pytest
import torch

from hpcad.device import CUBLAS_WORKSPACE, resolve_device


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine that reports four CUDA devices (only the choice is tested; nothing runs on them).
    Returns the devices made current, in order."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    return current


def test_cuda_gets_the_ranks_gpu_and_cublas_without_split_k(four_gpus):
    import os

    assert resolve_device("auto", local_rank=2) == torch.device("cuda:2")
    # and it becomes the current device: pinned staging buffers, events and cuBLAS handles are then
    # created on the rank's own GPU, not as an extra context on GPU 0 of every rank on the node
    assert four_gpus == [torch.device("cuda:2")]
    # without a workspace cuBLAS has no split-K kernels: bit-identical models whatever the chunk (gpu_check)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":0:0"


def test_an_exported_cublas_setting_wins(four_gpus, monkeypatch):
    import os

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_cpu_leaves_cublas_alone(monkeypatch):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_gpus_bound_to_a_cpu_only_torch_are_reported_once(monkeypatch, caplog):
    """A CPU build of torch on a GPU node (a common install slip) trains on the CPU: said, not silent;
    once per process, by each host's first rank (the others' lines go to DEBUG: a 16-rank job on 4
    nodes said it 16 times per step)."""
    import hpcad.device

    hpcad.device._warn_no_cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with caplog.at_level("DEBUG", logger="hpcad.device"):
        assert resolve_device("auto", local_rank=0) == torch.device("cpu")
        resolve_device("auto", local_rank=0)  # train and score in one process: one line
        hpcad.device._warn_no_cuda.cache_clear()
        assert resolve_device("auto", local_rank=2) == torch.device("cpu")  # another rank of the host
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "CUDA_VISIBLE_DEVICES=2" in r.getMessage()]
    assert [level for level, _ in said] == ["WARNING", "DEBUG"], said
    assert "sees no CUDA device (a CPU build, or no driver): running on the CPU" in said[0][1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU allocated: nothing to say
    hpcad.device._warn_no_cuda.cache_clear()
    caplog.clear()
    resolve_device("auto")
    assert not caplog.records


def _gpu_check():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "slurm" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_gpu_checks_equivalence_allows_a_near_tie_but_not_a_different_training():
    """slurm/gpu_check.py's CPU-CUDA equivalence: one model of 64 stopping an epoch apart and far off
    (a near tie, seen on the CPU alone) is rounding; many such models, or every model a little off,
    is a different training."""
    import numpy as np

    rng = np.random.default_rng(0)
    cpu = [{"epochs_run": int(e), "best_epoch": int(e) - 2, "val_loss": list(rng.uniform(0.05, 0.2, 3))}
           for e in rng.integers(8, 30, 64)]

    def gpu(flipped: int, scale: float = 1.0, jitter: float = 1e-7) -> list[dict]:
        out = [{**h, "val_loss": [v * scale * (1 + jitter) for v in h["val_loss"]]} for h in cpu]
        for i, h in enumerate(out[:flipped]):  # a tie goes either way: better or worse
            h.update(epochs_run=h["epochs_run"] + 1, best_epoch=h["best_epoch"] + 1,
                     val_loss=[v * (1.3 if i % 2 else 1 / 1.3) for v in h["val_loss"]])
        return out

    check = _gpu_check().equivalence
    one_tie = check(cpu, gpu(1))
    assert one_tie["ok"] and one_tie["same_stopping_epochs"] == "63/64"
    assert check(cpu, gpu(9))["ok"]
    assert not check(cpu, gpu(10))["ok"]  # 54/64 stop where they did: under 85 %
    assert not check(cpu, gpu(0, scale=1.02))["ok"]  # every model 2 % worse
    assert not check(cpu, gpu(0, jitter=1e-3))["ok"]  # the typical model 1e-3 off
