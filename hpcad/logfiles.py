"""Where a command's log file goes: ``<run>/<stage>.log`` for one process (Hydra's own file handler);
under several ranks each rank's ``<run>/logs/<stage>-rank<r>.log``, so that a job of hundreds of
ranks leaves one folder of logs beside its outputs instead of a file per rank and step among them."""
from __future__ import annotations

import logging
from pathlib import Path

RANK_LOGS = "logs"  # the run folder's sub-folder of per-rank logs


class FolderFileHandler(logging.FileHandler):
    """A ``logging.FileHandler`` that creates its file's folder first (Hydra's job log under ranks,
    ``hydra.job_logging.handlers.file.class``)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = False,
                 errors: str | None = None):
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, mode, encoding, delay, errors)


def rank_log_overrides(stage: str, rank: int, size: int, given: list[str]) -> list[str]:
    """Hydra overrides for a rank's log: its job name (``<stage>-rank<r>``), its file under
    ``<run>/logs/`` and each line prefixed with the rank. What the command line (``given``) sets
    itself is left to it: another ``hydra/job_logging`` config, the file handler, the line format
    (``hydra.job_logging.root.level=DEBUG`` alone changes neither)."""
    own = "hydra/job_logging=" in " ".join(given) or any(o.startswith("hydra.job_logging=") for o in given)

    def mine(key: str) -> bool:
        return not own and not any(o.lstrip("+~").startswith(f"hydra.job_logging.{key}") for o in given)

    out = [f"hydra.job.name={stage}-rank{rank}"]
    if mine("handlers.file"):
        out += [f"hydra.job_logging.handlers.file.class={__name__}.FolderFileHandler",
                f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/{RANK_LOGS}/"
                "${hydra.job.name}.log"]
    if mine("formatters.simple"):
        out.append("hydra.job_logging.formatters.simple.format="
                   f"'[%(asctime)s][rank {rank}/{size}][%(name)s][%(levelname)s] - %(message)s'")
    return out
