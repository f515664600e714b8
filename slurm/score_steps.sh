# Shared steps of train_all_nodes.sh and score_all_nodes.sh (sourced, not run):
# score on every rank, fit thresholds across ranks with MPI when mpi4py is installed, write the report.
# HPCAD_SCORE_ONLY=1 stops after scoring (the nightly job applies the trained thresholds itself).
# srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): pass it on (SRUN_CPT below).
SRUN_CPT=${SLURM_CPUS_PER_TASK:+--cpus-per-task=${SLURM_CPUS_PER_TASK}}

score_steps() {
  local run_dir=$1; shift
  # Each rank scores its share into errors-rank<r>.h5; rank 0 writes the errors.h5 index.
  srun --kill-on-bad-exit=1 ${SRUN_CPT} hpcad score "hydra.run.dir=${run_dir}" "$@" &
  wait $!
  [ "${HPCAD_SCORE_ONLY:-0}" = 1 ] && return 0
  if python3 -c "import mpi4py" 2>/dev/null; then
    srun --kill-on-bad-exit=1 ${SRUN_CPT} --mpi="${HPCAD_SRUN_MPI:-pmi2}" hpcad threshold "hydra.run.dir=${run_dir}" "$@" &
  else
    hpcad threshold "hydra.run.dir=${run_dir}" "$@" &
  fi
  wait $!
  hpcad report "hydra.run.dir=${run_dir}" "$@" &
  wait $!
}
