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
    """A CPU build of torch on a GPU node (a common install slip) trains on the CPU: said, not silent."""
    import hpcad.device

    hpcad.device._warn_no_cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with caplog.at_level("WARNING", logger="hpcad.device"):
        assert resolve_device("auto", local_rank=2) == torch.device("cpu")
        resolve_device("auto", local_rank=2)  # train and score in one process: one line
    assert [r.getMessage() for r in caplog.records if "CUDA_VISIBLE_DEVICES=2" in r.getMessage()].__len__() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU allocated: nothing to say
    hpcad.device._warn_no_cuda.cache_clear()
    caplog.clear()
    resolve_device("auto")
    assert not caplog.records
