"""Outputs are written whole or not at all, with the permissions the user's umask asks for."""
import os

import pytest

from hpcad.atomic import atomic_path, write_json


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "thresholds.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]


def test_a_model_file_that_finds_no_room_says_why_under_a_quota_too(tmp_path):
    """torch.save to a path turns a failed write into "unexpected pos N vs M" (no errno), so a model
    file or a checkpoint that met a full quota used to end in that traceback. hpcad writes it into an
    open file, keeping the write's own error: /dev/full gives a real ENOSPC from the kernel; a quota's EDQUOT
    (no quota-enabled file system here) takes the same path and is named as a quota."""
    import errno

    import torch

    from hpcad.errors import OutputError
    from hpcad.model.files import write_tensors

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here (a device whose every write fails with ENOSPC)")
    obj = {"format": "x", "w": torch.zeros(50_000)}
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save(obj, "/dev/full")  # torch's own writer: no errno to tell a full disk from anything else
    with open("/dev/full", "wb", buffering=0) as fh, pytest.raises(OSError) as caught:
        write_tensors(obj, fh)
    assert caught.value.errno == errno.ENOSPC
    target = tmp_path / "models" / "node0001.pt"
    with pytest.raises(OutputError, match=r"node0001\.pt: could not be written: disk quota exceeded \(`quota -s`"):
        with atomic_path(target):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert not list(target.parent.iterdir())  # no temporary file left
