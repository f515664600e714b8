"""Opening HDF5 files where clusters keep them: file systems without locks, and file systems that fill up.

Every hpcad HDF5 open goes through :func:`h5_file` (reads, via :func:`open_h5` with a message that
names the file) or :func:`h5_writing` (writes).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np

from hpcad.atomic import NO_LOCKS, NO_ROOM, errno_of
from hpcad.errors import StoreError

log = logging.getLogger(__name__)

# HDF5 locks every file it opens (flock). Where the file system has no locks (``NO_LOCKS``), every
# open fails with "unable to lock file, errno = 38"; hpcad then opens without HDF5's lock, as
# HDF5_USE_FILE_LOCKING=FALSE would (its run folders have one writer per file).
_hdf5_locks = True


def _lock_errno(exc: OSError) -> int | None:
    """The errno of HDF5's "unable to lock file, errno = N" failure, None for any other failure."""
    m = re.search(r"unable to lock file, errno = (\d+)", str(exc))
    return int(m.group(1)) if m else None


def h5_file(path: str | os.PathLike[str], mode: str = "r") -> h5py.File:
    """``h5py.File(path, mode)``, also on file systems without file locks (see ``NO_LOCKS``): the
    first open that fails for want of locks switches this process to opening without them, with
    one warning. Any other failure (a file another process holds for writing included) is raised."""
    global _hdf5_locks
    if _hdf5_locks:
        try:
            return h5py.File(path, mode)
        except OSError as exc:
            if _lock_errno(exc) not in NO_LOCKS:
                raise
            _hdf5_locks = False
            log.warning("%s: the file system has no file locks (%s): HDF5 files are opened without them from now "
                        "on (as with HDF5_USE_FILE_LOCKING=FALSE)", path, str(exc).splitlines()[0])
    return h5py.File(path, mode, locking=False)


def open_h5(path: str | os.PathLike[str], mode: str = "r", kind: str = "HDF5 file") -> h5py.File:
    """Open an HDF5 file, turning h5py's low-level failures into a message that names the file."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise StoreError(f"{path}: {kind} not found")
    try:
        return h5_file(path, mode)
    except OSError as exc:
        if _lock_errno(exc) is not None:  # errno 11: another process has it open for writing
            raise StoreError(f"{path}: cannot open {kind}: another process holds it open for writing (HDF5's file "
                             f"lock: {exc}); wait for it to end or close it, then rerun") from exc
        raise StoreError(f"{path}: cannot open {kind} (truncated or not HDF5?): {exc}") from exc


def read_spans(ds: h5py.Dataset, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """Rows ``[a, b)`` of ``ds`` for each span ``(a, b)`` (a node's alarms: a few rows each of a
    node-year), from one open of its file (the caller's). A new open per span (per alarm) cost a
    metadata operation each on Lustre and started with an empty chunk cache: each span decompressed
    its whole chunk again (1,024 rows x 160 metrics); one open keeps the chunks in h5py's cache for the
    spans that follow in them."""
    return [ds[a:b] for a, b in spans]


# HDF5 cannot recover from a write that found no room (a full file system, a quota): any later close
# or flush of that file crashes the process with a segmentation fault (h5py#914, an HDF5 bug, still in
# HDF5 2.0), and so does HDF5's clean-up at exit. Such a file is therefore never closed: the writer
# raises, the CLI reports the error and ends the process without HDF5's clean-up (``out_of_room_seen``).
_NO_ROOM: list[int] = []  # the errno of each HDF5 write that found no room in this process


def out_of_room_seen() -> bool:
    """True once HDF5 failed a write for want of space in this process (the process must then end
    with ``os._exit``: a normal exit crashes in HDF5's clean-up)."""
    return bool(_NO_ROOM)


def _watch_deferred_writes() -> None:
    """HDF5 writes cached chunks when a dataset is released; h5py (Cython) reports a failure there by
    printing its traceback (``sys.excepthook``) and "Exception ignored in ...ObjectID.__dealloc__"
    (``sys.unraisablehook``), a pair per dataset, and raises nothing. Those that found no room are
    noted instead, so that the writer raises when its block ends, once."""
    if getattr(sys.unraisablehook, "hpcad", False) and getattr(sys.excepthook, "hpcad", False):
        return  # installed (and not replaced since, as pytest does around each test)
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def in_dealloc(exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None or errno_of(exc) not in NO_ROOM:
            return False
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and tb.tb_frame.f_code.co_name.endswith("dealloc")  # "h5py._objects.ObjectID._dealloc"

    def on_unraisable(u: "sys.UnraisableHookArgs") -> None:
        if in_dealloc(u.exc_value, u.exc_traceback) or (u.exc_value is not None and errno_of(u.exc_value) in NO_ROOM
                                                         and "h5py" in str(u.object)):  # "...ObjectID.__dealloc__"
            _NO_ROOM.append(errno_of(u.exc_value))
            return
        unraisable(u)

    def on_print(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if in_dealloc(exc, tb):
            _NO_ROOM.append(errno_of(exc))
            return
        excepthook(kind, exc, tb)

    on_unraisable.hpcad = on_print.hpcad = True  # type: ignore[attr-defined]
    sys.unraisablehook, sys.excepthook = on_unraisable, on_print


@contextmanager
def h5_writing(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """``h5_file(path, "w")`` for a writer's ``with`` block, closed at its end. When HDF5 finds no
    room for a write, in the block or when the file is closed, this raises an ``OSError`` with
    ``ENOSPC``/``EDQUOT`` (``hpcad.atomic.atomic_path`` turns it into an error naming the output)
    and leaves the file unclosed (see ``out_of_room_seen``)."""
    _watch_deferred_writes()
    seen = len(_NO_ROOM)
    f = h5_file(path, "w")
    try:
        yield f
    except BaseException as exc:
        code = errno_of(exc)
        if code in NO_ROOM:
            _NO_ROOM.append(code)
        if len(_NO_ROOM) == seen:  # no write found no room: closing is safe
            f.close()
        raise
    if len(_NO_ROOM) > seen:
        code = _NO_ROOM[seen]
        raise OSError(code, f"HDF5 could not write {Path(path).name}: {os.strerror(code)}")
    try:
        f.close()
    except (OSError, RuntimeError) as exc:
        code = errno_of(exc)
        if code in NO_ROOM:
            _NO_ROOM.append(code)
        raise
