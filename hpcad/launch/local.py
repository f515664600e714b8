"""Run a stage in the current process."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class LocalLauncher:
    def launch(self, fn: Callable[[Any, Path], Any], cfg: Any, run_dir: Path) -> Any:
        return fn(cfg, run_dir)
