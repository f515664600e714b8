"""Progress of the long loops (training, scoring and the signal choice's pass, baselines, thresholds' alarms
and figures, bench): a tqdm bar where a person
watches (stderr is a terminal), a log line at most every ``LOG_EVERY_S`` seconds where nobody
does (SLURM and cron logs: a bar there is one endless line of carriage-return updates per rank).
``compute.progress=false`` turns both off."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_EVERY_S = 60.0  # at most one progress line per minute in a log file (the bar shows every step)


class Progress:
    """``update(n)`` after each unit of work, ``close()`` at the end (the bars of a stage that failed
    are closed by the CLI before it says the error: hpcad/cli.py)."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool, log: logging.Logger | None = None):
        # disable=None: tqdm draws only when its stream (stderr) is a terminal
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True)
        self.lines = enabled and self.bar.disable and log is not None  # no bar drawn: log lines instead
        self.total, self.desc, self.unit, self.log = total, desc, unit, log
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        now = time.perf_counter()
        if self.lines and now - self.last >= LOG_EVERY_S and self.done < self.total:
            self.last = now
            self.log.info("%s: %d/%d %ss (%s)", self.desc, self.done, self.total, self.unit,
                          elapsed_and_left(now - self.t0, self.done, self.total))

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw)

    def close(self) -> None:
        self.bar.close()


def tracked(items: Iterable[T], total: int, desc: str, unit: str, enabled: bool,
            log: logging.Logger | None = None) -> Iterator[T]:
    """``items`` with a :class:`Progress` of ``total`` that counts each item as the consumer finishes
    with it (a generator of nodes' rows, read one at a time)."""
    bar = Progress(total, desc, unit, enabled, log)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def elapsed_and_left(elapsed_s: float, done: int, total: int) -> str:
    """``95 s, about 290 s left`` (at the rate so far); ``95 s`` before anything is done or after all."""
    def secs(s: float) -> str:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"

    if 0 < done < total:
        return f"{secs(elapsed_s)}, about {secs(elapsed_s * (total - done) / done)} left"
    return secs(elapsed_s)


def iterate(iterable, desc: str, unit: str, enabled: bool = True):
    """``iterable`` with a bar on a terminal (for loops whose own log lines, if any, say the rest)."""
    return tqdm(iterable, desc=desc, unit=unit, disable=None if enabled else True)
