#!/usr/bin/env bash
# A real SLURM cluster on one machine, for trying hpcad without a cluster and for its tests:
# one slurmctld and four slurmd (n1..n4, all on localhost), munge authentication, no accounting;
# plus two more, spare1 and spare2, alone in partition `spare` (tests drain them while jobs run on n1..n4).
#
#   slurm/dev-cluster.sh up       # install (Debian: slurm-wlm, munge) if needed, start; idempotent
#   slurm/dev-cluster.sh status   # sinfo
#   slurm/dev-cluster.sh down     # stop the daemons
#   export SLURM_CONF=...         # `up` and `status` print the line to use
#
# Needs root (daemons run as root here). Each node advertises 4 GPUs in name only (gres without
# devices), so scripts written for 4-GPU nodes run unchanged; the jobs themselves use the CPU. State lives in $HPCAD_SLURM_DIR (default /tmp/hpcad-slurm).
set -euo pipefail
DIR=${HPCAD_SLURM_DIR:-/tmp/hpcad-slurm}
CONF=$DIR/slurm.conf
NODES=${HPCAD_SLURM_NODES:-4}
CPUS=${HPCAD_SLURM_CPUS:-32}  # advertised, not real: scripts sized for a Leonardo node run unchanged

die() { echo "dev-cluster: $*" >&2; exit 1; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat > "$CONF.tmp" <<CONF
ClusterName=hpcad-dev
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=16817
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# The scheduling loops run every second (not 60/30 s): a requeued or held job starts within seconds,
# and an srun allocation right after another job waits ~0.05 s instead of 0.4-1.6 s (defer_batch and
# 2 s loops before; the SLURM test files 153 s -> 137 s).
SchedulerParameters=sched_interval=1,bf_interval=1
GresTypes=gpu
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=n[1-$NODES] NodeHostname=localhost Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=16000 Gres=gpu:4 State=UNKNOWN
NodeName=spare[1-2] NodeHostname=localhost Port=[$((17001 + NODES))-$((17002 + NODES))] CPUs=2 RealMemory=500 State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
PartitionName=spare Nodes=spare[1-2] Default=NO MaxTime=INFINITE State=UP
CONF
  mv "$CONF.tmp" "$CONF"
  # Four GPUs per node in name only (no devices), so the Leonardo-style batch scripts
  # (--gpus-per-node=4) are accepted unchanged; jobs see no CUDA device and fall back to CPU.
  # slurmd drops file-less GPUs, so each gets a device node that no driver answers (major 195 is
  # NVIDIA's); task/none never opens them and torch sees no CUDA device.
  for g in 0 1 2 3; do [ -e "$DIR/fakegpu$g" ] || mknod "$DIR/fakegpu$g" c 195 "$g"; done
  printf 'AutoDetect=off\nNodeName=n[1-%s] Name=gpu File=%s/fakegpu[0-3]\n' "$NODES" "$DIR" > "$DIR/gres.conf"
}

start_munge() {
  for _ in $(seq 1 20); do  # a munged that is shutting down is not one to use
    [ -S /run/munge/munge.socket.2 ] || [ -S /var/run/munge/munge.socket.2 ] || ! pgrep -x munged >/dev/null || { sleep 0.25; continue; }
    break
  done
  pgrep -x munged >/dev/null && return 0  # a site's own munged: used, and left running by `down`
  mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R root:root /etc/munge /var/run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  munged --force
  touch "$DIR/munged.ours"  # started here: `down` stops it
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root to start slurmctld/slurmd (skip SLURM tests otherwise)"
  install
  write_conf
  start_munge
  export SLURM_CONF=$CONF
  pgrep -f "slurmctld -f $CONF" >/dev/null || slurmctld -f "$CONF"
  for node in $(seq -f 'n%g' 1 "$NODES") spare1 spare2; do
    pgrep -f "slurmd -f $CONF -N $node\b" >/dev/null || slurmd -f "$CONF" -N "$node"
  done
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      [ "$(sinfo -h -N -t idle,mixed,allocated -o '%N' | sort -u | wc -l)" -ge "$((NODES + 2))" ] && break
    fi
    sleep 0.5
  done
  scontrol update nodename="n[1-$NODES],spare[1-2]" state=resume >/dev/null 2>&1 || true
  sinfo -h -N -o '%N %T' | sort -u
  echo "export SLURM_CONF=$CONF"
}

down() {
  pkill -f "slurmd -f $CONF" 2>/dev/null || true
  pkill -f "slurmctld -f $CONF" 2>/dev/null || true
  for _ in $(seq 1 20); do pgrep -f "slurm(ctl)?d -f $CONF" >/dev/null || break; sleep 0.25; done
  if pgrep -f "slurm(ctl)?d -f $CONF" >/dev/null; then  # not gone after 5 s (e.g. munge already down)
    pkill -KILL -f "slurm(ctl)?d -f $CONF" 2>/dev/null || true
    sleep 0.5
  fi
  local what="slurmctld and slurmd"
  if [ -f "$DIR/munged.ours" ]; then
    pkill -x munged 2>/dev/null || true
    for _ in $(seq 1 20); do pgrep -x munged >/dev/null || break; sleep 0.25; done
    rm -f "$DIR/munged.ours"
    what="$what, munged"
  fi
  if pgrep -f "slurm(ctl)?d -f $CONF" >/dev/null; then
    echo "dev-cluster: some daemons are still running: $(pgrep -af "slurm(ctl)?d -f $CONF" | tr '\n' ';')" >&2
    exit 1
  fi
  echo "dev-cluster: stopped ($what)"
}

status() {
  [ -f "$CONF" ] || die "not set up (run: $0 up)"
  SLURM_CONF=$CONF sinfo
  echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
