#!/usr/bin/env bash
# Score telemetry with the per-node models of an earlier training run, across a SLURM allocation:
#
#   sbatch -p <partition> -A <account> slurm/score_all_nodes.sh train_run=runs/train-1234 data.source=/exports/today
#
# Arguments are Hydra overrides for hpcad; `train_run` and `data.source` are required (with
# HPCAD_DATA_REQUIRED=0, no data.source means the synthetic demo cluster). Each rank scores its share of the
# nodes; thresholds are fitted across ranks with MPI when mpi4py is installed (labelled data) or
# taken from train_run (unlabelled data); then the report. Outputs: $HPCAD_RUN_DIR
# (default runs/score-<jobid>). Site set-up through HPCAD_ENV as in train_all_nodes.sh.
#
#SBATCH --job-name=hpcad-score
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --output=hpcad-score-%j.out
#SBATCH --open-mode=append
set -euo pipefail
if [ -n "${HPCAD_ENV:-}" ]; then
  # shellcheck disable=SC1090
  source "$HPCAD_ENV"
fi
command -v hpcad >/dev/null || { echo "score_all_nodes: hpcad not on PATH: set HPCAD_ENV to a file that loads its environment (where sbatch does not pass yours on, SBATCH_EXPORT=NONE: sbatch --export=HPCAD_ENV=/path/env.sh ...)" >&2; exit 2; }
case " $* " in *" train_run="*) ;; *) echo "score_all_nodes: give train_run=RUN_FOLDER" >&2; exit 2 ;; esac

RUN_DIR=${HPCAD_RUN_DIR:-runs/score-${SLURM_JOB_ID:-local}}
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
# sbatch runs a spooled copy of this script: find the original (and score_steps.sh beside it).
here=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
steps="$(dirname "${here:-${BASH_SOURCE[0]}}")/score_steps.sh"
[ -f "$steps" ] || steps="$(hpcad where slurm)/score_steps.sh"  # a site's copy of this script, kept elsewhere
source "$steps"
score_steps "$RUN_DIR" data.on_bad_node=skip "$@"
say_done score_all_nodes "$RUN_DIR" "$@"
