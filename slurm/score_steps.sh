# Shared parts of train_all_nodes.sh and score_all_nodes.sh (sourced, not run): the srun options of
# every step, and the scoring steps (score on every rank, fit thresholds across ranks with MPI when
# mpi4py is installed, write the report). HPCAD_SCORE_ONLY=1 stops after scoring (the nightly job
# applies the trained thresholds itself).

# srun options of every step. One rank failing ends the step (the others would wait at a barrier).
# srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): passed on. GPUs: one per task
# (task i of a node sees only GPU i: no stray CUDA context of another rank on it, and each rank's
# free-memory budget is its own), when every node has at least one GPU per task. HPCAD_GPU_BIND
# chooses the binding (an srun --gpu-bind value that leaves each task one GPU: per_task:1 by default,
# single:1, map_gpu:...; none: every task sees every GPU and hpcad takes the one at its local rank).
# --export=ALL: the steps get this script's environment, HPCAD_ENV's venv and modules included (a
# job submitted with --export=NONE or SBATCH_EXPORT=NONE would otherwise start its steps without
# them: "execve(): hpcad: No such file or directory").
srun_opts=(--kill-on-bad-exit=1 --export=ALL)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_opts+=("--cpus-per-task=${SLURM_CPUS_PER_TASK}")

# The job's log files (stdout and stderr: one file unless sbatch -e split them) and their sizes at
# this run's start: a requeued job appends to them, and run_step reads only this run's lines.
log_files=() log_sizes=()
while read -r f; do
  log_files+=("$f") log_sizes+=("$(stat -c %s "$f" 2>/dev/null || echo 0)")
done < <(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Std\(Out\|Err\)=//p' | sort -u)

# One step: started in the background and waited for, so that USR1 reaches the script's trap at
# once. A step that fails ends the script with a last line naming the step and repeating the first
# hpcad error line of this run's log (the ranks' own lines above it can run to thousands, and srun's
# "Terminated" lines for the ranks it stopped come last), and with hpcad's exit status 2 when hpcad
# stopped with such an error (srun's own is 143 when it terminated the other ranks), else srun's.
run_step() {
  local name=$1 rc=0 first="" i; shift
  "$@" &
  wait $! || rc=$?
  [ "$rc" = 0 ] && return 0
  [ "${requeueing:-0}" = 1 ] && exit "$rc"  # USR1: the trap requeued the job, which ends here
  for i in "${!log_files[@]}"; do
    [ -n "$first" ] || first=$(tail -c "+$((log_sizes[i] + 1))" "${log_files[i]}" 2>/dev/null |
                               grep -m1 -E '^hpcad [a-z]+: error: ' || true)
  done
  echo "$(basename "${here:-$0}" .sh): the $name step failed (exit $rc)${first:+; the first error: $first}" >&2
  [ -n "$first" ] && exit 2
  exit "$rc"
}

gpu_binding() {
  local bind=${HPCAD_GPU_BIND:-per_task:1} gpus=${SLURM_GPUS_ON_NODE:-} tasks
  if [ -z "$gpus" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then  # older SLURM: count the job's GPU list
    gpus=$(tr ',' '\n' <<<"$SLURM_JOB_GPUS" | grep -c .)
  fi
  [ "${gpus:-0}" -gt 0 ] 2>/dev/null || return 0  # a CPU partition (--gpus-per-node=0): nothing to bind
  [ "$bind" = none ] && { echo "hpcad: every task sees the node's $gpus GPUs (HPCAD_GPU_BIND=none)"; return 0; }
  # the most tasks on one node: SLURM_TASKS_PER_NODE reads like 4(x2),1
  tasks=$(tr ',' '\n' <<<"${SLURM_TASKS_PER_NODE:-1}" | sed 's/(.*//' | sort -n | tail -n 1)
  if [ "$tasks" -gt "$gpus" ]; then
    echo "hpcad: $tasks tasks on a node with $gpus GPUs: no GPU binding (on CUDA two ranks would share a GPU," \
         "and hpcad refuses; ask for --ntasks-per-node equal to --gpus-per-node)" >&2
    return 0
  fi
  srun_opts+=("--gpu-bind=${bind}")
  echo "hpcad: GPUs bound to tasks with srun --gpu-bind=${bind} ($tasks tasks, $gpus GPUs per node)"
}
gpu_binding

# What every rank sees, and whether the ranks meet, in seconds (hpcad preflight): a rank that cannot
# reach rank 0 would otherwise wait HPCAD_DIST_TIMEOUT_MIN (12 h) in the first stage. HPCAD_PREFLIGHT=0 skips it.
preflight_step() {
  local run_dir=$1; shift
  [ "${HPCAD_PREFLIGHT:-1}" = 0 ] && return 0
  run_step preflight srun "${srun_opts[@]}" hpcad preflight "hydra.run.dir=${run_dir}" "$@"
}

# The srun MPI plugin of the threshold step: HPCAD_SRUN_MPI, else pmi2 (MPICH and Intel MPI; Open MPI
# 5 wants pmix). One task is started with it first: a plugin this SLURM lacks or cannot load (its
# library missing) would otherwise fail the job after training and scoring; the step then runs with
# --mpi=none, and its ranks share the work over a gloo group instead (the same thresholds), as they do
# without mpi4py. A plugin that starts but does not match mpi4py's MPI is reported by hpcad threshold
# itself ("MPI did not join the ranks"), which then does the same.
mpi_plugin() {
  local mpi=${HPCAD_SRUN_MPI:-pmi2}
  if srun --export=ALL -N1 -n1 --mpi="$mpi" true; then
    echo "$mpi"
  else
    echo "hpcad: srun --mpi=${mpi} does not start a task here (srun --mpi=list names this SLURM's plugins;" \
         "HPCAD_SRUN_MPI picks one): the ranks fit the thresholds over a gloo group instead (--mpi=none)" >&2
    return 1
  fi
}

# The last value the job's overrides give KEY (key=, +key= or ++key=; none: empty).
last_override() {
  local key=$1 a v=""; shift
  for a in "$@"; do
    case "$a" in "$key"=*|+"$key"=*|++"$key"=*) v=${a#*=} ;; esac
  done
  printf '%s' "$v"
}

# The baselines are a comparison, costly at scale: run only when the job's overrides name them
# (the last baselines.methods=[...] given, not empty), as `hpcad run` would run them.
asked_baselines() {
  local methods
  methods=$(last_override baselines.methods "$@")
  [ -n "${methods//[][ ]/}" ]
}

score_steps() {
  local run_dir=$1; shift
  # Each rank scores its share into errors-rank<r>.h5; rank 0 writes the errors.h5 index.
  run_step scoring srun "${srun_opts[@]}" hpcad score "hydra.run.dir=${run_dir}" "$@"
  [ "${HPCAD_SCORE_ONLY:-0}" = 1 ] && return 0
  # Each rank fits and scores its share of the nodes for each baseline; the thresholds step applies them.
  if asked_baselines "$@"; then
    run_step baselines srun "${srun_opts[@]}" hpcad baselines "hydra.run.dir=${run_dir}" "$@"
  fi
  local mpi=none  # without MPI the ranks reduce over a gloo group (hpcad/threshold/reduce.py)
  if python3 -c "import mpi4py" 2>/dev/null; then
    mpi=$(mpi_plugin) || mpi=none
  fi
  run_step threshold srun "${srun_opts[@]}" --mpi="$mpi" hpcad threshold "hydra.run.dir=${run_dir}" "$@"
  run_step report hpcad report "hydra.run.dir=${run_dir}" "$@"
}

# The job's last line: where its report is, or why there is none. With report.enabled=false among the
# overrides (the last one given) a report.html in the folder is an earlier run's: not pointed at.
say_done() {
  local name=$1 run_dir=$2 off; shift 2
  off=$(last_override report.enabled "$@")
  case "${off,,}" in
    false|no|off|n|0) echo "$name: done; outputs in ${run_dir} (no report: report.enabled=false)" ;;
    *) if [ "${HPCAD_SCORE_ONLY:-0}" = 1 ] || [ ! -f "${run_dir}/report.html" ]; then
         echo "$name: done; outputs in ${run_dir} (no report)"
       else
         echo "$name: done; report at ${run_dir}/report.html"
       fi ;;
  esac
}
