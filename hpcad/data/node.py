"""The one record every input reader produces and every stage consumes: a node's telemetry."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NodeData:
    """One node's telemetry: timestamps [T], values [T, M], labels [T] (0 = normal) or None."""

    name: str
    timestamp: np.ndarray
    values: np.ndarray
    labels: np.ndarray | None
    time_unit: str = "s"  # "s": epoch seconds; "row": the input had no timestamps
    job: np.ndarray | None = None  # [T] int32 row -> index into the store's /jobs table, -1 = idle
