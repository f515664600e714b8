"""The warnings the readers log while ingesting (a row cut short left out, repeated rows dropped,
rows without a node...), kept with the store so that the report shows what the input lost or was
repaired of, not only the ingest's log."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

KEPT = 50  # the first warnings kept (every one is in the log); the store records how many there were


class InputWarnings(logging.Handler):
    """Collects the WARNING records of ``hpcad.data`` while attached (``input_warnings``). Not the
    ERROR ones: those are the nodes and files skipped (data.on_bad_node=skip), which the store
    records and the report lists on their own."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.total = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno != logging.WARNING:
            return
        self.total += 1
        if len(self.first) < KEPT:
            self.first.append(record.getMessage())

    def said(self) -> tuple[int, list[str]]:
        """How many were logged, and the first ``KEPT``."""
        return self.total, list(self.first)


@contextmanager
def input_warnings() -> Iterator[InputWarnings]:
    """The readers' warnings logged inside the block (every module below ``hpcad.data``)."""
    handler, logger = InputWarnings(), logging.getLogger("hpcad.data")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def merged(parts: list[tuple[int, list[str]]]) -> tuple[int, list[str]]:
    """Several ranks' ``said()`` as one: the totals added, the first ``KEPT`` in rank order."""
    return sum(t for t, _ in parts), [m for _, first in parts for m in first][:KEPT]
