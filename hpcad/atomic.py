"""Atomic output: write to a temporary file beside the target, then rename over it."""
from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import re
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hpcad.errors import OutputError

log = logging.getLogger(__name__)


# errnos of a lock call on a file system without file locks (Lustre mounted noflock, some NFS):
# hpcad's run-folder lock and HDF5's file lock both go without them there (hpcad/runfolder.py,
# hpcad/data/h5.py ``h5_file``)
NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
# errnos of a write that found no room: a full file system, a user's or project's quota (Lustre's
# $SCRATCH and $WORK have both)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


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
    except (OSError, RuntimeError) as exc:
        tmp_path.unlink(missing_ok=True)  # first: nothing half-written stays, whatever happens next
        full = out_of_room(exc, target)
        if full is None:
            raise
        logging.raiseExceptions = False  # log files on the same full file system: no traceback per log line
        raise full from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_unreferenced(folder: Path, pattern: str, keep: list[str], what: str, index: str) -> list[Path]:
    """Remove the files of ``folder`` matching ``pattern`` whose names are not in ``keep``: per-rank
    files (``what``) that the index just written (``index``: ``errors.h5``, ``store.h5``, a baseline's
    file) does not link to, left by an earlier run on other ranks or one that failed; unreferenced,
    and as large as the data. Says so in one line; returns those removed."""
    stale = [f for f in Path(folder).glob(pattern) if f.name not in keep]
    for f in stale:
        f.unlink(missing_ok=True)
    if stale:
        log.info("removed %d %s file(s) of an earlier run that %s no longer uses (e.g. %s)", len(stale), what, index,
                 stale[0].name)
    return stale


def errno_of(exc: BaseException) -> int | None:
    """The system errno behind a failed write: the one HDF5 names in its message ("errno = 28"; h5py
    raises RuntimeError or OSError around it), else an OSError's own."""
    said = re.search(r"errno = (\d+)", str(exc))
    if said:
        return int(said.group(1))
    return exc.errno if isinstance(exc, OSError) else None


def out_of_room(exc: BaseException, target: Path) -> OutputError | None:
    """The clear error for a write of ``target`` (a file, or the run folder) that failed for want of
    space, or None when ``exc`` is something else: by its errno, which Python says, HDF5 inside its
    message, and torch.save through hpcad.model.files.write_tensors."""
    code = errno_of(exc)
    if code not in NO_ROOM:
        return None
    folder = target if target.is_dir() else target.parent
    try:
        inodes = os.statvfs(folder).f_favail
    except OSError:
        inodes = None
    if code == errno.EDQUOT:
        why = f"disk quota exceeded (`quota -s`; on Lustre `lfs quota -h -u $USER {folder}`)"
    elif inodes == 0:
        why = "no free inodes left on its file system (too many files)"
    else:
        why = "no space left on its file system"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    what = f"{target}: could not be written" if target != folder else f"writing in {folder}"
    return OutputError(f"{what}: {why}. Partial files were removed and earlier outputs kept; free space (or move "
                       f"the outputs to another file system: hydra.run.dir, nightly.out), then rerun: finished "
                       f"work is not redone ({type(exc).__name__}: {first[:200]})")


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
