"""hpcad's non-Python parts: the Hydra config groups (``conf/``), the SLURM scripts (``slurm/``)
and the cron job (``jobs/``).

They live at the repository root of a source checkout; a wheel ships them inside the package as
``hpcad/conf``, ``hpcad/slurm`` and ``hpcad/jobs`` (pyproject.toml). ``hpcad where`` prints them.
"""
from __future__ import annotations

from pathlib import Path

KINDS = {"conf": "config.yaml", "slurm": "train_all_nodes.sh", "jobs": "nightly_rescore.sh"}


def resource_dir(kind: str) -> Path:
    """The folder of ``kind`` (conf | slurm | jobs): the checkout's copy first, else the wheel's."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource {kind!r}: one of {', '.join(KINDS)}")
    here = Path(__file__).resolve().parent
    checkout = (here.parent / "pyproject.toml").is_file()
    for cand in ((here.parent / kind, here / kind) if checkout else (here / kind,)):
        if (cand / KINDS[kind]).is_file():
            return cand
    raise FileNotFoundError(f"hpcad: {kind}/ not found next to {here} (a broken installation? reinstall hpcad)")
