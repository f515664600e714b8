"""Shared helpers: small synthetic data, and the CLI run the way a user runs it (a subprocess)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcad.config import DataConfig

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
# Small, fast settings for end-to-end runs on generated data.
SMALL = ["data.synthetic.nodes=3", "data.synthetic.rows=400", "train.epochs=4", "train.progress=false",
         "baselines.methods=[kde]", "report.max_nodes_plotted=2"]


def hpcad(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``hpcad ARGS`` as a subprocess; returns the completed process (stdout+stderr text)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "hpcad", *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpcad {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def data_cfg(**kw) -> DataConfig:
    """The data config a user gets from conf/ (the dataclass defaults), with overrides."""
    return dataclasses.replace(DataConfig(), **kw)


@pytest.fixture
def msl_dir() -> Path:
    if not (SHARED / "msl" / "train").is_dir():
        pytest.skip(f"real MSL data not found at {SHARED / 'msl'} (the shared data folder beside the checkout)")
    return SHARED / "msl"
