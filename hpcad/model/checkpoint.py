"""Checkpoints inside a training chunk: a kill loses at most ``compute.checkpoint_every_s`` seconds
plus one epoch of a chunk's training, not the whole chunk.

A chunk's batched state (every model's weights, Adam moments and step count, best weights,
early-stopping counters, histories, and the results of models already finished) is written to
``models/.chunk-<digest>.ckpt`` after an epoch once ``checkpoint_every_s`` seconds have passed
since the chunk started or was last saved (0: after every epoch). The digest covers the models'
training fingerprint and the chunk's nodes and members, so a checkpoint is only resumed by the same
chunk of the same data and settings; shuffles and input noise are functions of (seed, epoch, row),
so a resumed chunk ends bit-identical to an uninterrupted one (tests/test_faults.py). The file is
removed once the chunk's model files are written.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from hpcad.errors import StoreError
from hpcad.model.files import load_tensors, save_tensors

log = logging.getLogger(__name__)
FORMAT = "hpcad-chunk-checkpoint"
SUFFIX = ".ckpt"  # not .pt: model_nodes() lists *.pt as nodes


class ChunkCheckpoint:
    """Where one chunk's training state is saved and found again (see the module docstring)."""

    def __init__(self, models_dir: Path, fingerprint: str, nodes: list[str], members: int,
                 every_s: float, what: str = "a chunk") -> None:
        key = hashlib.sha256(f"{fingerprint}\n{members}\n{chr(10).join(nodes)}".encode()).hexdigest()[:20]
        self.path = Path(models_dir) / f".chunk-{key}{SUFFIX}"
        self.key, self.every_s, self.nodes, self.what = key, float(every_s), nodes, what
        self._last = time.monotonic()

    def due(self) -> bool:
        """Whether an epoch that just ended should be saved."""
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        save_tensors(self.path, {"format": FORMAT, "key": self.key, "state": state})
        self._last = time.monotonic()

    def load(self) -> dict | None:
        """The saved state of this chunk, or None (none saved, or unreadable: logged, trained afresh)."""
        if not self.path.exists():
            return None
        try:
            obj = load_tensors(self.path, FORMAT, "chunk checkpoint")
        except StoreError as exc:
            log.warning("%s; training the chunk from its first epoch", exc)
            return None
        if obj.get("key") != self.key or not isinstance(obj.get("state"), dict):
            log.warning("%s: checkpoint of another chunk; training the chunk from its first epoch", self.path)
            return None
        state = obj["state"]
        log.info("resuming %s of %d nodes (%s ...) at epoch %d from %s", self.what, len(self.nodes), self.nodes[0],
                 int(state["epoch"]), self.path.name)
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def remove_checkpoints(models_dir: Path) -> int:
    """Delete every chunk checkpoint in ``models_dir`` (once all chunks have ended, any left is of a
    chunking that will not come again, e.g. after the memory budget changed); returns how many."""
    stale = list(Path(models_dir).glob(f".chunk-*{SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d chunk checkpoint(s) of an earlier chunking from %s", len(stale), models_dir)
    return len(stale)
