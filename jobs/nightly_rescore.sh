#!/bin/bash
# Re-score the previous day with a trained hpcad run; meant for cron (jobs/crontab.example).
#
#   nightly_rescore.sh [--env FILE] [--date YYYY-MM-DD | --from YYYY-MM-DD --to YYYY-MM-DD] [hydra overrides...]
#
# Everything site-specific comes from one env file (default /etc/hpcad/nightly.env, or
# $HPCAD_NIGHTLY_ENV, or --env; template: jobs/nightly.env.example), so the script runs under
# cron's bare environment: it sets PATH itself, needs no HOME, no interactive shell, no cwd.
# Without --date it scores yesterday in HPCAD_TZ, after the nights of the week before that were
# not published (cron did not run, or they failed) and have exports now (nightly.catch_up_days).
# Outputs: $HPCAD_OUT/<date>/ (alarms.csv, alarms.json, report.html, ...), $HPCAD_OUT/history.csv,
# logs in $HPCAD_OUT/logs/ (kept HPCAD_LOG_DAYS days, default 90).
# Exit status: 0 done; 2 bad or missing input / config, or another run holds the lock (message on
# stderr, outputs unchanged); 64 usage; 78 env file missing or incomplete.
set -euo pipefail
umask 022

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
env_file=${HPCAD_NIGHTLY_ENV:-/etc/hpcad/nightly.env}
date_spec=""
from="" to=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --env) env_file=${2:?--env needs a file}; shift 2 ;;
    --date) date_spec=${2:?--date needs YYYY-MM-DD}; shift 2 ;;
    --from) from=${2:?}; shift 2 ;;
    --to) to=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    --*) echo "nightly_rescore: unknown option $1" >&2; usage ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [ -n "$from$to" ]; then
  [ -n "$from" ] && [ -n "$to" ] && [ -z "$date_spec" ] || { echo "nightly_rescore: --from needs --to (and no --date)" >&2; exit 64; }
  date_spec="$from..$to"
fi

if [ ! -r "$env_file" ]; then
  echo "nightly_rescore: env file $env_file not readable (copy jobs/nightly.env.example there, or pass --env)" >&2
  exit 78
fi
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a
for v in HPCAD_VENV HPCAD_TRAIN_RUN HPCAD_INPUT HPCAD_OUT; do
  if [ -z "${!v:-}" ]; then echo "nightly_rescore: $v is not set in $env_file" >&2; exit 78; fi
done
[ -x "$HPCAD_VENV/bin/hpcad" ] || { echo "nightly_rescore: $HPCAD_VENV/bin/hpcad not found (HPCAD_VENV)" >&2; exit 78; }
log_days=${HPCAD_LOG_DAYS:-90}
case "$log_days" in
  ''|*[!0-9]*) echo "nightly_rescore: HPCAD_LOG_DAYS=$log_days in $env_file: a number of days (0: keep every log)" >&2; exit 78 ;;
esac

# cron: minimal PATH, maybe no HOME. Caches and matplotlib's config go under the output folder.
export PATH="$HPCAD_VENV/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
export HOME="${HOME:-$HPCAD_OUT}"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$HPCAD_OUT/.cache}" MPLCONFIGDIR="${MPLCONFIGDIR:-$HPCAD_OUT/.cache/matplotlib}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${HPCAD_THREADS:-4}}"
# Another nightly run holds the lock: say so and create nothing (not even a log folder); hpcad
# takes the same flock itself, so this only spares the refused run its traces.
if [ -e "$HPCAD_OUT/.nightly.lock" ] && command -v flock >/dev/null && ! flock -n "$HPCAD_OUT/.nightly.lock" true; then
  echo "nightly_rescore: another nightly run holds the lock ($(head -c 300 "$HPCAD_OUT/.nightly.lock" 2>/dev/null)); not starting" >&2
  exit 2
fi
mkdir -p "$HPCAD_OUT/logs" "$MPLCONFIGDIR"
cd "$HPCAD_OUT"
# Each run's log folder (logs/<UTC time>-<pid>/: nightly.log, the run's config) is kept HPCAD_LOG_DAYS
# days (default 90; 0 keeps every one): a year of runs is no pile of small files on the file system.
if [ "$log_days" -gt 0 ]; then
  find "$HPCAD_OUT/logs" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*T[0-9]*Z-[0-9]*' -mtime +"$log_days" \
    -exec rm -rf -- {} + || echo "nightly_rescore: could not remove every log folder older than $log_days days" >&2
fi

q() { local s=${1//\\/\\\\}; printf "'%s'" "${s//\'/\\\'}"; }  # a quoted Hydra value: {date}, spaces, '=' survive
args=(nightly "train_run=$(q "$HPCAD_TRAIN_RUN")" "nightly.input=$(q "$HPCAD_INPUT")" "nightly.out=$(q "$HPCAD_OUT")"
      "nightly.timezone=${HPCAD_TZ:-UTC}" "hydra.run.dir=$(q "$HPCAD_OUT/logs/$(date -u +%Y%m%dT%H%M%SZ)-$$")"
      "compute.progress=false")
[ -n "$date_spec" ] && args+=("nightly.date=$date_spec")
[ -n "${HPCAD_JOBS:-}" ] && args+=("nightly.jobs=$(q "$HPCAD_JOBS")")
[ -n "${HPCAD_CHANGES:-}" ] && args+=("nightly.changes=$(q "$HPCAD_CHANGES")")
[ "${HPCAD_SLURM:-0}" = 1 ] && args+=("nightly.slurm=true")
# shellcheck disable=SC2206
[ -n "${HPCAD_OVERRIDES:-}" ] && args+=($HPCAD_OVERRIDES)
exec "$HPCAD_VENV/bin/hpcad" "${args[@]}" "${extra[@]}"
