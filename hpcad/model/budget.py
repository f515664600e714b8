"""How many models train (or nodes are scored) together in one batched chunk: host and device
memory counted apart, one cap policy (:func:`default_chunk_cap`) for both stages.

On CPU the chunk's rows live in host memory three times (as read from the store, in the chunk
tensor, in the epoch's shuffled copy). On CUDA the host holds the prepared rows of the chunk once,
and the device holds the chunk tensor, the epoch's shuffled copy, the gathered validation rows,
the int64 sort keys of the shuffle, and seven copies of the parameters (weights, gradients, Adam's
two moments, best weights, gradient scratch, the initial weights). ``compute.memory_budget_mb`` bounds
the host side and ``compute.device_memory_mb`` the device side; unset, they come from the machine
(half of the host's available memory, within the job's --mem and the cgroup's memory limit,
shared by the ranks on the node; 90 % of the device's free
memory), so a default run fills a 40, 64 or 80 GB A100 without running out on the smallest.
Scoring sizes its chunks from the same budgets with its own per-node need (no optimiser state, no
shuffled copy: :func:`score_bytes_per_node`).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpcad.errors import ConfigError, HpcadError
from hpcad.model.autoencoder import AutoencoderSpec
from hpcad.model.ensemble import VAL_BLOCK
from hpcad.preprocess import fit_rows

if TYPE_CHECKING:
    from hpcad.config import ComputeConfig

log = logging.getLogger(__name__)
DEVICE_SHARE = 0.9  # of the device's free memory, when compute.device_memory_mb is unset
HOST_SHARE = 0.5  # of the host's available memory (split among the node's ranks), when memory_budget_mb is unset


def check_compute_config(cc: "ComputeConfig") -> None:
    """Refuse compute settings that cannot work, naming the option."""
    every = getattr(cc, "checkpoint_every_s", 0.0)
    if float(every) < 0:
        raise ConfigError(f"compute.checkpoint_every_s={every}: must be >= 0 (0: after every epoch)")
    for option, what in (("memory_budget_mb", "the machine"), ("device_memory_mb", "the device"),
                         ("max_nodes_per_chunk", "the device's default")):
        value = getattr(cc, option, None)
        if value is not None and not value > 0:
            raise ConfigError(f"compute.{option}={value}: must be > 0 (or null: from {what})")


def default_chunk_cap(device: torch.device) -> int:
    """Nodes per chunk when ``compute.max_nodes_per_chunk`` is unset: 32 on CPU, as many as fit (up
    to 4,096) on a GPU, for training and scoring alike. On CPU a larger chunk buys no speed (the
    optimiser streams all K models' weights every step, and a forward pass is as fast per node in
    small batches) and costs memory: scoring 1,000 synthetic nodes in one chunk took 9.8 GB and
    70 s, in chunks of 32 0.7 GB and 43 s (docs/benchmarks.md)."""
    return 4096 if device.type == "cuda" else 32


def score_bytes_per_node(n_rows: int, n_metrics: int, spec: AutoencoderSpec) -> int:
    """Memory one node needs while its chunk is scored (host, and device on a GPU): per row its
    values, standardised and window copies, the members' reconstructions and the errors (plain and
    whitened); its whitening matrix."""
    return 4 * n_metrics * max(n_rows, 1) * (6 + spec.window * (1 + spec.members)) + 4 * n_metrics * n_metrics


def host_bytes_per_model(n_rows: int, n_metrics: int, spec: AutoencoderSpec, batch: int,
                         device: torch.device) -> int:
    """Host memory one model of a chunk needs (everything, on CPU; its prepared rows, on CUDA)."""
    width = spec.widths(n_metrics)[0]  # a window's values
    if device.type == "cuda":
        return 4 * n_rows * width + 4 * n_rows * n_metrics  # prepared rows + the store read in flight
    p = spec.n_params(n_metrics)
    return 4 * (n_rows * width * 3 + p * 6 + batch * sum(spec.widths(n_metrics)) * 4 + n_rows * 2)


def device_bytes_per_model(n_rows: int, n_metrics: int, spec: AutoencoderSpec, batch: int,
                           validation_split: float) -> int:
    """Peak device memory of one model while its chunk trains on a GPU (see the module docstring)."""
    width = spec.widths(n_metrics)[0]
    p = spec.n_params(n_metrics)
    n_va = max(n_rows - fit_rows(n_rows, validation_split), 1)
    val_rows = -(-n_va // VAL_BLOCK) * VAL_BLOCK
    rows = n_rows + (n_rows + batch) + val_rows  # chunk tensor, shuffled epoch copy, validation rows
    return (4 * rows * width + 4 * val_rows  # + the validation mask
            + 8 * n_rows * 7  # shuffle keys, their temporaries, the sort's output and the gather index
            + 4 * p * 7
            + 4 * batch * sum(spec.widths(n_metrics)) * 4  # activations and their gradients
            + 4 * VAL_BLOCK * width * 4)  # one validation block's reconstruction and errors


def local_ranks(env: dict | None = None) -> int:
    """Ranks sharing this host (torchrun, MPICH, Open MPI or SLURM variables; 1 if none says)."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(name, "").isdigit():
            return max(1, int(env[name]))
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    per_node = []  # "3(x2),1" -> [3, 3, 1], in the order of the step's nodes (SLURM_NODEID)
    for part in tasks.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return 1
        per_node += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env["SLURM_NODEID"]) if env.get("SLURM_NODEID", "").isdigit() else 0
    return max(1, per_node[node]) if node < len(per_node) else 1


_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_available_mb(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """Memory this process may still use under its cgroups' limits (the tightest of its cgroup and
    the ones above it: v2 ``memory.max`` - ``memory.current``, v1 ``memory.limit_in_bytes`` -
    ``memory.usage_in_bytes``), in MB; None where no limit is set or nothing can be read. SLURM's
    task/cgroup (ConstrainRAMSpace) and containers kill a process at this limit, not at the host's."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base, limit_f, usage_f = Path(root), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_f, usage_f = Path(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [q for q in path.split("/") if q]
        for depth in range(len(parts), -1, -1):  # the process's cgroup, then each one above it
            d = base.joinpath(*parts[:depth])
            try:
                raw = (d / limit_f).read_text().strip()
                if raw == "max" or int(raw) >= _UNLIMITED:
                    continue
                free = max(int(raw) - int((d / usage_f).read_text()), 0) / 2**20
            except (OSError, ValueError):
                continue
            best = free if best is None else min(best, free)
    return best


def host_memory_mb() -> float:
    """MemAvailable from /proc/meminfo (8 GiB where it cannot be read), capped by the process's
    cgroup memory limit (``cgroup_available_mb``)."""
    mb = 8192.0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    mb = int(line.split()[1]) / 1024.0
                    break
    except OSError:
        pass
    limited = cgroup_available_mb()
    return mb if limited is None else min(mb, limited)


def available_host_mb(env: dict | None = None) -> float:
    """:func:`host_memory_mb`, inside a SLURM job capped by the job's memory on this node
    (``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` x ``SLURM_CPUS_ON_NODE``): a job is killed at
    its ``--mem``, not at the host's."""
    env = os.environ if env is None else env
    mb = host_memory_mb()
    try:
        if int(env.get("SLURM_MEM_PER_NODE", 0)) > 0:
            mb = min(mb, float(env["SLURM_MEM_PER_NODE"]))
        elif int(env.get("SLURM_MEM_PER_CPU", 0)) > 0:
            mb = min(mb, float(env["SLURM_MEM_PER_CPU"]) * int(env.get("SLURM_CPUS_ON_NODE", 1)))
    except ValueError:
        pass  # not numbers: SLURM did not set them
    return mb


@dataclass(frozen=True)
class Budget:
    host_bytes: int
    device_bytes: int | None  # None: the device is the CPU (host_bytes covers everything)
    source: str  # how the budgets were chosen, for the log

    @classmethod
    def resolve(cls, cc: ComputeConfig, device: torch.device) -> "Budget":
        """The budgets for training on ``device`` from ``compute.memory_budget_mb`` and
        ``compute.device_memory_mb`` (unset: from the machine; see the module docstring)."""
        check_compute_config(cc)
        host_mb, how = getattr(cc, "memory_budget_mb", None), []
        if host_mb is None:
            ranks = local_ranks()
            host_mb = HOST_SHARE * available_host_mb() / ranks
            shared = f" / {ranks} ranks" if ranks > 1 else ""
            how.append(f"host {host_mb:.0f} MB (half the available memory{shared})")
        else:
            how.append(f"host {host_mb} MB (compute.memory_budget_mb)")
        dev_mb = getattr(cc, "device_memory_mb", None)
        if device.type != "cuda":
            dev_bytes = None
        elif dev_mb is None:
            free, _total = torch.cuda.mem_get_info(device)
            # memory this process's allocator holds already (an earlier chunk's buffers) is reusable
            held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            dev_bytes = int(DEVICE_SHARE * (free + held))
            how.append(f"device {dev_bytes / 2**20:.0f} MB ({DEVICE_SHARE:.0%} of free memory on {device})")
        else:
            dev_bytes = int(dev_mb * 2**20)
            how.append(f"device {dev_mb} MB (compute.device_memory_mb)")
        return cls(int(host_mb * 2**20), dev_bytes, ", ".join(how))

    def chunk_size(self, n_rows: int, n_metrics: int, spec: AutoencoderSpec, batch: int, cap: int,
                   validation_split: float) -> int:
        """Models per chunk (a node counts ``spec.members`` times): the most that fit both budgets,
        at most ``cap``, at least one."""
        on = torch.device("cpu" if self.device_bytes is None else "cuda")  # the device the budget was resolved for
        k = min(cap, self.host_bytes // max(host_bytes_per_model(n_rows, n_metrics, spec, batch, on), 1))
        if self.device_bytes is not None:
            k = min(k, self.device_bytes // device_bytes_per_model(n_rows, n_metrics, spec, batch, validation_split))
        return int(max(1, k))

    def score_chunk_size(self, n_rows: int, n_metrics: int, spec: AutoencoderSpec, cap: int) -> int:
        """Nodes scored in one batched forward pass: the most whose rows fit both budgets, at most
        ``cap``, at least one."""
        per_node = score_bytes_per_node(n_rows, n_metrics, spec)
        return int(max(1, min(cap, self.host_bytes // per_node, (self.device_bytes or self.host_bytes) // per_node)))


def retry_cap_after_oom(device: torch.device, nodes: list[str], members: int, stage: str) -> int:
    """After a chunk of ``nodes`` ran out of device memory (the estimate was short, or something else
    took the GPU): the chunk cap, in models, for retrying it in halves (and for every later chunk).
    A single node that does not fit is an error that says what to do."""
    if len(nodes) == 1:
        raise HpcadError(f"out of memory on {device} {stage} node {nodes[0]} alone ({members} member(s)): free "
                         f"the GPU, or use compute.device=cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cap = max(1, len(nodes) // 2) * members
    log.warning("out of memory on %s %s a chunk of %d nodes: retrying in chunks of up to %d nodes (set "
                "compute.device_memory_mb lower to start there)", device, stage, len(nodes), cap // members)
    return cap
