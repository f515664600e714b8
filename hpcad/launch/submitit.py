"""Run a stage as a SLURM job through submitit, and return its result when the job is done.

``hpcad train launcher=submitit launcher.partition=... launcher.tasks_per_node=4`` submits the
same stage function the local launcher calls; with several tasks every task is one rank
(:mod:`hpcad.dist` reads them from the step's SLURM variables). submitit's logs and pickles go to
``<run folder>/submitit``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def _remote(fn: Callable[[Any, Path], Any], cfg: Any, run_dir: Path) -> Any:
    from hpcad.dist import finish

    _configure_logging()
    try:
        return fn(cfg, run_dir)
    finally:  # the stage's process group (hpcad.dist) ends with the job's task
        finish()


class SubmititLauncher:
    def __init__(self, partition: str | None = None, account: str | None = None, nodes: int = 1,
                 tasks_per_node: int = 1, cpus_per_task: int = 1, gpus_per_node: int = 0,
                 gpu_bind: str = "per_task:1", timeout_min: int = 60, setup: list[str] | None = None,
                 cluster: str | None = None, additional: dict | None = None, **_: object):
        self.params = dict(nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
                           timeout_min=timeout_min)
        if gpus_per_node:
            self.params["gpus_per_node"] = gpus_per_node
        self.slurm = {k: v for k, v in dict(slurm_partition=partition, slurm_account=account,
                                              slurm_setup=setup or None,
                                              slurm_additional_parameters=additional or None).items() if v}
        # One rank failing ends the step: the others would otherwise wait at a barrier until the
        # collective timeout (hours) instead of failing the job at once. --export=ALL: the step gets
        # what launcher.setup set up, also where sbatch passes no environment on (SBATCH_EXPORT=NONE).
        self.slurm["slurm_srun_args"] = ["--kill-on-bad-exit=1", "--export=ALL"]
        # One GPU per task, as slurm/score_steps.sh binds them: never two ranks on one GPU (then
        # unbound, and hpcad's device check refuses with a clear message).
        if gpus_per_node and gpu_bind != "none":
            if tasks_per_node <= gpus_per_node:
                self.slurm["slurm_srun_args"].append(f"--gpu-bind={gpu_bind}")
            else:
                log.warning("launcher.tasks_per_node=%d but launcher.gpus_per_node=%d: GPUs not bound to tasks, and "
                            "on CUDA hpcad refuses two ranks on one GPU", tasks_per_node, gpus_per_node)
        self.cluster = cluster

    def launch(self, fn: Callable[[Any, Path], Any], cfg: Any, run_dir: Path) -> Any:
        import submitit

        from hpcad.errors import HpcadError

        run_dir.mkdir(parents=True, exist_ok=True)
        if "gpus_per_node" not in self.params and str(cfg.compute.device) != "cpu":
            log.warning("the job asks for no GPU (launcher.gpus_per_node=0): its ranks will run on CPU; on a GPU "
                        "partition set launcher.gpus_per_node (e.g. = launcher.tasks_per_node)")
        ex = submitit.AutoExecutor(folder=run_dir / "submitit" / "%j", cluster=self.cluster)
        ex.update_parameters(name=f"hpcad-{fn.__name__}", **self.params, **self.slurm)
        job = ex.submit(_remote, fn, cfg, run_dir)
        log.info("submitted %s as job %s (%s); logs in %s", fn.__name__, job.job_id, ex.cluster,
                 run_dir / "submitit" / str(job.job_id))
        try:
            results = job.results()
        except submitit.core.utils.FailedJobError as exc:
            raise HpcadError(f"job {job.job_id} failed; the end of its error log {job.paths.stderr}:\n"
                             f"{_trace_end(str(exc)) or _tail(job.paths.stderr) or str(exc).strip()}") from exc
        return results[0]


def _trace_end(message: str, lines: int = 12) -> str:
    """The end of the traceback a failed job's result file holds (submitit's ``FailedJobError`` quotes
    it between two rules of dashes): complete as soon as the job is seen to fail, when its stderr may
    still be being written (a test read that file's tail without the error's last line)."""
    parts = message.split("-" * 22 + "\n")
    kept = [ln for ln in parts[1].splitlines() if ln.strip()] if len(parts) >= 3 else []
    return "\n".join(kept[-lines:])


def _tail(path: Path, lines: int = 12) -> str:
    """The last lines of a job's stderr: the cause (hpcad's one-line error, or a traceback's end)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("srun: ")]
    return "\n".join(kept[-lines:])
