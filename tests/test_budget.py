"""Chunk sizing: host and device memory counted apart, budgets from the machine when unset."""
from types import SimpleNamespace as NS

import pytest
import torch

from hpcad.errors import ConfigError
from hpcad.model.autoencoder import AutoencoderSpec
from hpcad.model.budget import Budget, device_bytes_per_model, host_bytes_per_model, local_ranks

SPEC = AutoencoderSpec([64])
CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU


def test_a_40gb_a100_gets_a_chunk_that_fits_it():
    """The documented 60 GB host setting once gave 4,096 nodes x 6,667 x 159 on any GPU, about 37 GiB
    of device memory: out of memory on a 40 GB A100. The device budget now bounds the chunk."""
    tc = NS(memory_budget_mb=60000, device_memory_mb=int(0.9 * 40 * 1024))
    b = Budget.resolve(tc, CUDA)
    k = b.chunk_size(6667, 159, SPEC, 32, 4096, 0.1)
    per = device_bytes_per_model(6667, 159, SPEC, 32, 0.1)
    assert k < 4096 and k * per <= b.device_bytes < (k + 1) * per
    assert 8 * 2**20 < per < 12 * 2**20  # rows x 2.1 copies x 159 x 4 B + keys + parameters
    big = Budget.resolve(NS(memory_budget_mb=60000, device_memory_mb=int(0.9 * 80 * 1024)), CUDA)
    assert big.chunk_size(6667, 159, SPEC, 32, 4096, 0.1) == 4096  # an 80 GB card: the cap


def test_host_budget_counts_only_the_prepared_rows_on_gpu_but_everything_on_cpu():
    assert host_bytes_per_model(6667, 159, SPEC, 32, CUDA) < host_bytes_per_model(6667, 159, SPEC, 32, CPU) / 1.4
    tc = NS(memory_budget_mb=1024, device_memory_mb=None)
    b = Budget.resolve(tc, CPU)
    assert b.device_bytes is None and "compute.memory_budget_mb" in b.source
    assert b.chunk_size(6667, 159, SPEC, 32, 4096, 0.1) == 1024 * 2**20 // host_bytes_per_model(
        6667, 159, SPEC, 32, CPU)
    assert b.chunk_size(6667, 159, SPEC, 32, 32, 0.1) == 32  # the CPU cap
    assert b.chunk_size(10**8, 159, SPEC, 32, 32, 0.1) == 1  # never zero


def test_unset_host_budget_is_shared_by_the_ranks_on_the_node(monkeypatch):
    monkeypatch.setattr("hpcad.model.budget.available_host_mb", lambda: 64000.0)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    b = Budget.resolve(NS(memory_budget_mb=None, device_memory_mb=None), CPU)
    assert b.host_bytes == int(0.5 * 64000 / 4 * 2**20) and "4 ranks" in b.source


@pytest.mark.parametrize("env,n", [({}, 1), ({"LOCAL_WORLD_SIZE": "4"}, 4), ({"MPI_LOCALNRANKS": "2"}, 2),
                                   ({"SLURM_TASKS_PER_NODE": "4(x2)"}, 4), ({"SLURM_STEP_TASKS_PER_NODE": "3,2"}, 3)])
def test_local_ranks_from_launcher_variables(env, n):
    assert local_ranks(env) == n


@pytest.mark.parametrize("option", ["memory_budget_mb", "device_memory_mb"])
def test_non_positive_budget_names_the_option(option):
    tc = NS(memory_budget_mb=1024, device_memory_mb=1024)
    setattr(tc, option, 0)
    with pytest.raises(ConfigError, match=f"compute.{option}=0"):
        Budget.resolve(tc, CUDA)


def test_unset_host_budget_stays_within_the_slurm_jobs_memory():
    """A job is killed at its --mem, not at the host's memory: the budget follows the smaller."""
    from hpcad.model.budget import available_host_mb

    host = available_host_mb({})
    assert available_host_mb({"SLURM_MEM_PER_NODE": "3000"}) == min(host, 3000.0)
    assert available_host_mb({"SLURM_MEM_PER_CPU": "500", "SLURM_CPUS_ON_NODE": "4"}) == min(host, 2000.0)
    assert available_host_mb({"SLURM_MEM_PER_NODE": "0"}) == host  # --mem=0: the whole node
    assert available_host_mb({"SLURM_MEM_PER_NODE": "lots"}) == host


def test_one_chunk_policy_for_training_and_scoring():
    """Unset caps: only CPU training takes small (cache-sized) chunks; scoring takes as many nodes
    as its budget holds, on CPU too, and never fewer than one."""
    from hpcad.model.budget import default_chunk_cap, score_bytes_per_node

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (default_chunk_cap(cpu), default_chunk_cap(gpu)) == (32, 4096)
    assert default_chunk_cap(cpu, "score") == default_chunk_cap(gpu, "score") == 4096
    spec = AutoencoderSpec([64], members=3, window=2)
    per_node = score_bytes_per_node(6667, 159, spec)
    host = Budget(host_bytes=10 * per_node + 1, device_bytes=None, source="test")
    assert host.score_chunk_size(6667, 159, spec, cap=4096) == 10
    assert host.score_chunk_size(6667, 159, spec, cap=4) == 4
    both = Budget(host_bytes=10 * per_node, device_bytes=3 * per_node, source="test")
    assert both.score_chunk_size(6667, 159, spec, cap=4096) == 3  # the device holds fewer
    assert Budget(host_bytes=1, device_bytes=None, source="test").score_chunk_size(6667, 159, spec, 4096) == 1
    assert score_bytes_per_node(6667, 159, spec) > score_bytes_per_node(6667, 159, AutoencoderSpec([64]))
