"""Per-node model files: ``models/<node>.pt`` holds only tensors and plain values.

They load with ``torch.load(..., weights_only=True)``; a file is written to a temporary name and
renamed, so a file under the final name is always complete (a requeued job skips those nodes).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from hpcad.atomic import atomic_path, write_json
from hpcad.errors import StoreError
from hpcad.preprocess import Scaler

if TYPE_CHECKING:  # torch loads only where models are read or written: the paths and stamps need none
    import torch

    from hpcad.model.autoencoder import AutoencoderSpec
    from hpcad.model.whiten import Whitening

FORMAT = "hpcad-node-model"
FORMAT_VERSION = 2  # 2: a list of members' parameters, the scaler's training range; 1 (one model) still loads
# (``holdout_error`` and ``whitening`` were added to version 2 later: files without them load, and are
# scored with signal.metric_scales=false and signal.whiten=false respectively; a whitening of an
# earlier hpcad.model.whiten.VERSION serves only thresholds fitted on it)


@dataclass
class NodeModel:
    node: str
    spec: AutoencoderSpec
    metrics: list[str]
    members: list[list[torch.Tensor]]  # per member, [W0, b0, W1, b1, ...]
    scaler: Scaler
    history: dict
    signal_scale: float  # mean alarm signal on the node's held-out normal rows (per-node normalisation)
    fingerprint: str = ""  # what the model was trained from (hpcad.train.training_fingerprint); "" = unknown
    # mean squared error per metric on the held-out normal rows (signal.metric_scales); None: a file
    # written before it was recorded
    holdout_error: np.ndarray | None = None
    digest: str = ""  # of the file it was loaded from, by content (model_digest); "" = not loaded
    # its residuals' whitening (signal.whiten, hpcad/model/whiten.py); None: a file written before it
    whitening: Whitening | None = None

    def save(self, path: Path) -> None:
        import torch

        sc = self.scaler
        obj = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "node": self.node,
            "spec": self.spec.to_dict(), "metrics": list(self.metrics),
            "members": [[p.detach().cpu().contiguous() for p in m] for m in self.members],
            "scaler": {"mean": torch.from_numpy(sc.mean), "scale": torch.from_numpy(sc.scale), "clip": sc.clip,
                       "soft_clip": sc.soft_clip, "lo": torch.from_numpy(sc.lo), "hi": torch.from_numpy(sc.hi),
                       "absent": torch.from_numpy(sc.absent)},
            "history": self.history, "signal_scale": float(self.signal_scale), "fingerprint": self.fingerprint,
        }
        if self.holdout_error is not None:
            obj["holdout_error"] = torch.from_numpy(np.asarray(self.holdout_error, dtype=np.float32))
        if self.whitening is not None:
            obj["whitening"] = self.whitening.to_dict()
        save_tensors(path, obj)

    @classmethod
    def load(cls, path: Path) -> "NodeModel":
        from hpcad.model.autoencoder import AutoencoderSpec
        from hpcad.model.whiten import Whitening

        raw = _read(path, "model file")
        obj = load_tensors(path, FORMAT, "model file", raw)
        try:
            sc = obj["scaler"]
            mean, scale = sc["mean"].numpy().astype(np.float32), sc["scale"].numpy().astype(np.float32)
            soft = bool(sc.get("soft_clip", False))  # version 1 files: hard clip, no training range
            lo = sc["lo"].numpy().astype(np.float32) if "lo" in sc else np.full_like(mean, -np.inf)
            hi = sc["hi"].numpy().astype(np.float32) if "hi" in sc else np.full_like(mean, np.inf)
            absent = sc["absent"].numpy().astype(bool) if "absent" in sc else None  # older files: none
            members = [list(m) for m in obj["members"]] if "members" in obj else [list(obj["params"])]
            held = obj["holdout_error"].numpy().astype(np.float32) if "holdout_error" in obj else None
            whitening = Whitening.from_dict(obj["whitening"]) if "whitening" in obj else None
            return cls(obj["node"], AutoencoderSpec(**obj["spec"]), list(obj["metrics"]), members,
                       Scaler(mean, scale, float(sc["clip"]), soft, lo, hi, absent), obj["history"],
                       float(obj["signal_scale"]), str(obj.get("fingerprint", "")), held, content_digest(raw),
                       whitening)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise StoreError(f"{path}: model file is incomplete or of another version ({exc}); "
                             f"delete it and rerun `hpcad train` to retrain the node") from exc


def save_tensors(path: Path, obj: dict) -> None:
    """Write a dict of tensors and plain values atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write_tensors(obj, fh)


class _KeepsWriteError(io.RawIOBase):
    """The file torch.save writes through, remembering the OSError of a failed write."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise


def write_tensors(obj: dict, fh: BinaryIO) -> None:
    """``torch.save(obj)`` into the open file ``fh``. A write that fails (a full file system, a
    quota) raises its own OSError, errno and all: torch's writer turns it into "unexpected pos N
    vs M", which says neither (hpcad.atomic names the cause from the errno)."""
    import torch

    out = _KeepsWriteError(fh)
    try:
        torch.save(obj, out)
    except RuntimeError:
        if out.error is not None:
            raise out.error from None
        raise


def content_digest(raw: bytes) -> str:
    """A file's identity by content: what errors.h5 records per node and light maps are fitted for."""
    return hashlib.sha256(raw).hexdigest()[:16]


def model_digest(path: Path) -> str:
    """A node's model file by content (:func:`content_digest`): a light map corrects one model's
    reconstructions, and an errors.h5 was scored by one model; another training run's model of the
    node, or a retrained one, has another digest, a copy of the file the same."""
    return content_digest(Path(path).read_bytes())


def _read(path: Path, kind: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: {kind} not found") from None


def load_tensors(path: Path, fmt: str, kind: str, raw: bytes | None = None) -> dict:
    """Load a file written by :func:`save_tensors` (its bytes ``raw`` where already read) with
    ``weights_only=True`` (no pickled code) and check its ``format`` field."""
    import torch

    try:
        obj = torch.load(io.BytesIO(raw) if raw is not None else path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StoreError(f"{path}: {kind} not found") from None
    except Exception as exc:
        said = " ".join(str(exc).split())
        garbled = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s*Check the documentation|$)", said)
        detail = f"garbled or not plain tensors: {garbled.group(1)}" if garbled else said[:300]
        raise StoreError(f"{path}: cannot load {kind} ({detail}): the file is corrupt, truncated or not written by "
                         f"hpcad; delete it and rerun the stage that writes it") from exc
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise StoreError(f"{path}: not an hpcad {kind}")
    return obj


def model_nodes(models_dir: Path) -> list[str]:
    """The nodes with a model file in ``models_dir`` (light maps beside them are not models)."""
    return sorted(p.name[:-3] for p in Path(models_dir).glob("*.pt") if not LIGHT_NAME.search(p.name))


# Light maps an older hpcad wrote beside the models: <node>.light.pt, <node>.light-v<version>.pt (group 1: version)
LIGHT_NAME = re.compile(r"\.light(?:-v(\d+))?\.pt$")


def models_stamp(models_dir: Path) -> str:
    """A digest of the node model files (names, sizes, modification times; light maps left out: they
    are versioned and applied per night): cheap to recompute, different once any node is retrained."""
    h = hashlib.sha256()
    for node in model_nodes(models_dir):
        st = model_path(models_dir, node).stat()
        h.update(f"{node}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_path(models_dir: Path, node: str) -> Path:
    return Path(models_dir) / f"{node}.pt"


UNTRAINED_SUFFIX = ".untrained.json"


def untrained_path(models_dir: Path, node: str) -> Path:
    """A node that training left without a model (too few training rows, ``data.on_bad_node=skip``):
    ``models/<node>.untrained.json`` says why and for which training fingerprint."""
    return Path(models_dir) / f"{node}{UNTRAINED_SUFFIX}"


def write_untrained(models_dir: Path, node: str, reason: str, fingerprint: str) -> None:
    """Record ``node`` as left untrained, and remove its model file of earlier settings or data (scoring
    would otherwise use it)."""
    write_json(untrained_path(models_dir, node), {"node": node, "reason": reason, "fingerprint": fingerprint})
    model_path(models_dir, node).unlink(missing_ok=True)


def untrained_nodes(models_dir: Path) -> dict[str, str]:
    """The nodes training left without a model in ``models_dir`` (a record and no model file), and why."""
    out = {}
    for p in sorted(Path(models_dir).glob(f"*{UNTRAINED_SUFFIX}")):
        node = p.name[:-len(UNTRAINED_SUFFIX)]
        if model_path(models_dir, node).exists():
            continue
        try:
            out[node] = str(json.loads(p.read_text()).get("reason", ""))
        except (OSError, ValueError, AttributeError) as exc:
            raise StoreError(f"{p}: unreadable ({exc}); delete it and rerun `hpcad train`") from exc
    return out


def untrained_for(models_dir: Path, node: str, fingerprint: str) -> bool:
    """Whether ``node`` was left untrained by a training of the same data and settings (a rerun need
    not read its rows again)."""
    p = untrained_path(models_dir, node)
    try:
        return json.loads(p.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False
