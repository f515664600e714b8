"""Atomic output: write to a temporary file beside the target, then rename over it."""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


# errnos of a lock call on a file system without file locks (Lustre mounted noflock, some NFS):
# hpcad's run-folder lock and HDF5's file lock both go without them there (hpcad/runfolder.py,
# hpcad/data/store.py ``h5_file``)
NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``target`` atomically.

    On error the temporary file is removed and an existing ``target`` is left untouched, so a
    failed or killed run never leaves a half-written file under the final name. The file gets the
    permissions the process's umask gives a new file (mkstemp's own are 0600), so a shared run
    folder or a published report stays readable by the group or the web server.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        _fault_point(target)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fault_point(target: Path) -> None:
    """Fault injection (tests/test_faults.py): ``HPCAD_FAULT=<file name>[:TERM][@N]`` kills this
    process with SIGKILL (or SIGTERM) once a file of that name (a glob pattern, e.g. ``.chunk-*``)
    is fully written, right before it is published: the worst moment for a crash. ``@N``: at the
    N-th such file of the process (the earlier ones are published). Unset in normal use."""
    spec = os.environ.get("HPCAD_FAULT")
    if spec:
        spec, _, nth = spec.partition("@")
        name, _, how = spec.partition(":")
        if fnmatch.fnmatchcase(target.name, name):
            _FAULT_SEEN[name] = _FAULT_SEEN.get(name, 0) + 1
            if _FAULT_SEEN[name] >= int(nth or 1):
                os.kill(os.getpid(), signal.SIGTERM if how.upper() == "TERM" else signal.SIGKILL)


_FAULT_SEEN: dict[str, int] = {}


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
