#!/usr/bin/env bash
# Train one autoencoder per monitored node across a SLURM allocation, then score, fit thresholds
# and write the report. Defaults suit a Leonardo-class booster node (4 A100, 32 cores): one task
# per GPU. Partition, account and time come from the command line or the environment, never from
# this file:
#
#   sbatch -p boost_usr_prod -A my_account slurm/train_all_nodes.sh data.source=/path/exports
#   sbatch --nodes=4 slurm/train_all_nodes.sh data.source=/path/store.h5 model.hidden=[64,16]
#   SBATCH_PARTITION=... SBATCH_ACCOUNT=... sbatch slurm/train_all_nodes.sh ...
#
# Arguments are Hydra overrides for hpcad; `data.source` is required (HPCAD_DATA_REQUIRED=0: without
# it, the synthetic demo cluster). Outputs go to $HPCAD_RUN_DIR (default
# runs/train-<jobid>, stable across requeues). Baselines run only when named ('baselines.methods=[kde]').
# A preempted, timed-out or requeued job restarts here
# and skips the nodes whose model file is already complete (see docs/cluster.md).
#
#SBATCH --job-name=hpcad-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=hpcad-train-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# Site set-up: modules or a virtualenv. HPCAD_ENV names a file to source (e.g. one that runs
# `module load python cuda` and activates the venv); otherwise hpcad must already be on PATH.
if [ -n "${HPCAD_ENV:-}" ]; then
  # shellcheck disable=SC1090
  source "$HPCAD_ENV"
fi
command -v hpcad >/dev/null || { echo "train_all_nodes: hpcad not on PATH: set HPCAD_ENV to a file that loads its environment (where sbatch does not pass yours on, SBATCH_EXPORT=NONE: sbatch --export=HPCAD_ENV=/path/env.sh ...)" >&2; exit 2; }

RUN_DIR=${HPCAD_RUN_DIR:-runs/train-${SLURM_JOB_ID:-local}}
mkdir -p "$RUN_DIR"
# The job log beside the outputs (sbatch writes it where the job was submitted): a link to it.
job_log=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *StdOut=//p')
link="$RUN_DIR/slurm-${SLURM_JOB_ID:-0}.out"
if [ -n "$job_log" ] && [ "$(realpath -m "$job_log")" != "$(realpath -m "$link")" ]; then
  ln -sfn "$job_log" "$link" || echo "$(basename "$0"): could not link the job log into $RUN_DIR" >&2
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export HPCAD_WORLD_SIZE=${SLURM_NTASKS:-1}
# No data.source: stop (hpcad/options.py) rather than run on the embedded synthetic demo cluster.
export HPCAD_DATA_REQUIRED=${HPCAD_DATA_REQUIRED:-1}

# Before the time limit SLURM sends USR1 to this script: requeue the job. Finished nodes' models
# are complete files (written under a temporary name, then renamed), so the rerun skips them.
requeue() {
  requeueing=1
  echo "train_all_nodes: USR1 (the time limit is near, or a preemption notice): requeueing job ${SLURM_JOB_ID}" >&2
  scontrol requeue "${SLURM_JOB_ID}"
}
trap requeue USR1

echo "train_all_nodes: job ${SLURM_JOB_ID:-?}, ${SLURM_NTASKS:-1} ranks, run folder ${RUN_DIR}"
# The srun options (GPU binding, CPUs per task) and steps 2-4, shared with score_all_nodes.sh.
# sbatch runs a spooled copy of this script: find the original (and score_steps.sh beside it).
here=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
steps="$(dirname "${here:-${BASH_SOURCE[0]}}")/score_steps.sh"
[ -f "$steps" ] || steps="$(hpcad where slurm)/score_steps.sh"  # a site's copy of this script, kept elsewhere
source "$steps"
# 0. Every rank's view (node, GPU, budgets) and the ranks' meeting, checked in seconds.
preflight_step "$RUN_DIR" "$@"
# 1. Each rank trains its share of the monitored nodes (balanced by row counts).
# A node with a corrupt export is logged, recorded and skipped; the others go on (override: data.on_bad_node=error).
run_step training srun "${srun_opts[@]}" hpcad train "hydra.run.dir=${RUN_DIR}" data.on_bad_node=skip "$@"
# 2-4. Score (and the baselines, when named), fit thresholds, report.
score_steps "$RUN_DIR" data.on_bad_node=skip "$@"
say_done train_all_nodes "$RUN_DIR" "$@"
