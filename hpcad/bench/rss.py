"""Peak resident memory of a process, as every benchmark reports it, and a fresh process to measure
one step in (its peak is that step's, not the bench's own)."""
from __future__ import annotations

import resource
from collections.abc import Callable

from hpcad.errors import ConfigError


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): Linux's ``VmHWM``, the high-water mark of its own
    memory map. ``getrusage``'s ``ru_maxrss`` is kept across ``execve``, so a spawned child (fork, then
    exec) reported at least its parent's size at the fork: 6.2 GB for a threshold stage that needs
    0.42 (``bench.mode=threshold``, 2026-12-04). Elsewhere: ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def in_fresh_process(target: Callable, *args: object, what: str) -> dict:
    """``target(*args, conn)`` in a spawned process; returns the dict it sends on ``conn``. A child that
    exits without one is an error naming ``what``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    res = parent.recv() if parent.poll(timeout=24 * 3600) else {}
    proc.join()
    if proc.exitcode != 0 or not res:
        raise ConfigError(f"{what} child failed (exit {proc.exitcode}); see the log above")
    return res
