#!/usr/bin/env bash
# A real one-node Slurm on 127.0.0.1 for integration tests (tested as root on Debian 12, Slurm 22.05).
#   scripts/slurm-local.sh install     Debian packages (slurmctld, slurmd, slurm-client, munge), only when missing
#   scripts/slurm-local.sh start DIR   writes DIR/slurm.conf, starts a private munged, slurmctld and slurmd whose
#                                      state, spool, logs and pids all live under DIR; waits until the node is idle
#   scripts/slurm-local.sh stop DIR    stops the daemons that `start DIR` started (pids from DIR)
#   scripts/slurm-local.sh env DIR     prints `export SLURM_CONF=...` for sbatch, squeue, scontrol, scancel, srun
# Settings (environment): SLURM_LOCAL_CTLD_PORT (16817), SLURM_LOCAL_SLURMD_PORT (16818), SLURM_LOCAL_CPUS (2),
# SLURM_LOCAL_MIN_JOB_AGE (600: seconds a finished job stays visible to squeue/scontrol; no accounting database,
# but `sacct -c` reads the finished jobs from DIR/log/jobcomp.log),
# SLURM_LOCAL_CRED_EXPIRE (10: seconds; a requeued job waits about this long before it starts again).
set -euo pipefail

usage() { echo "usage: $0 install | start DIR | stop DIR | env DIR" >&2; exit 2; }
# Absolute path of DIR (created if missing).
absdir() { [ -n "${1:-}" ] || usage; mkdir -p "$1" && (cd "$1" && pwd); }

install() {
  local missing=()
  for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || missing+=("${cmd#*:}")
  done
  [ ${#missing[@]} = 0 ] && { echo "slurm-local: packages already installed"; return; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }
}

write_conf() { # DIR
  local d=$1 node user cpus
  node=$(hostname -s); user=$(id -un); cpus=${SLURM_LOCAL_CPUS:-2}
  cat >"$d/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: one node on 127.0.0.1, everything under $d.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-16817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-16818}
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s), but a step whose launch takes
# longer than it fails ("task launch failed"): on a loaded 2-core machine 10 s was seen to be too short.
AuthInfo=socket=$d/munge/munge.socket,cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-30}
MessageTimeout=30
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
# The PMIx plugin makes TmpFS/spmix_appdir_<uid>_<job>.<step> per step and leaves it behind when the
# step is cancelled; a later cluster's step with the same ids then fails to launch ("Cannot create
# client cli tmpdir: File exists"). Every cluster here restarts its job ids at 1: keep it in $d.
TmpFS=$d/tmp
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.log
PlugStackConfig=$d/plugstack.conf
# No systemd/cgroups needed: processes tracked through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting database; finished jobs are logged to jobcomp.log, read by: sacct -c.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$d/log/jobcomp.log
MailProg=/bin/true
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
# Quick tests: short kill grace, requeued/held jobs picked up soon, finished jobs kept visible a while.
JobRequeue=1
KillWait=5
MinJobAge=${SLURM_LOCAL_MIN_JOB_AGE:-600}
ReturnToService=2
SlurmdTimeout=60
# Trust the CPU count below even when it differs from the hardware (no DRAIN for "Low CPUs").
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  : >"$d/plugstack.conf"
}

# alive PIDFILE: the pid file names a live (not zombie) munged, slurmctld or slurmd.
alive() {
  [ -s "$1" ] && ps -o stat=,comm= -p "$(cat "$1" 2>/dev/null)" 2>/dev/null | grep -Eq '^[^Z ]+ +(munged|slurmctld|slurmd)$'
}
# running DIR: any daemon of DIR is alive.
running() { alive "$1/slurmd.pid" || alive "$1/slurmctld.pid" || alive "$1/munge/munged.pid"; }

start() {
  local d; d=$(absdir "${1:-}")
  export SLURM_CONF=$d/slurm.conf
  if alive "$d/munge/munged.pid" && alive "$d/slurmctld.pid" && alive "$d/slurmd.pid"; then
    echo "slurm-local: already running in $d"
  else
    running "$d" && stop "$d" # half started: begin again
    mkdir -p "$d/state" "$d/spool" "$d/log" "$d/munge" "$d/tmp"
    chmod 711 "$d/munge" # munged wants a socket dir that everyone can traverse, and a private key
    [ -s "$d/munge/munge.key" ] || dd if=/dev/urandom of="$d/munge/munge.key" bs=1024 count=1 2>/dev/null
    chmod 600 "$d/munge/munge.key"
    write_conf "$d"
    munged --socket="$d/munge/munge.socket" --key-file="$d/munge/munge.key" --pid-file="$d/munge/munged.pid" \
      --log-file="$d/log/munged.log" --seed-file="$d/munge/munged.seed" --origin=127.0.0.1
    slurmctld -c -f "$SLURM_CONF" # -c: a clean cluster, no jobs recovered from an earlier run
    slurmd -f "$SLURM_CONF" -N "$(hostname -s)"
  fi
  # Wait for the node to register and become idle (or busy with jobs, when it was already running).
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
    case $state in
      idle | mix | alloc) echo "slurm-local: node $(hostname -s) $state, SLURM_CONF=$SLURM_CONF"; return ;;
      *) sleep 1 ;;
    esac
  done
  echo "slurm-local: node not idle after 60s (state '${state}'); see $d/log/" >&2
  tail -n 20 "$d/log/slurmctld.log" "$d/log/slurmd.log" >&2 || true
  return 1
}

stop() {
  local d f; d=$(absdir "${1:-}")
  export SLURM_CONF=$d/slurm.conf
  # Cancel this cluster's jobs while the daemons still run, so that no task outlives them.
  if alive "$d/slurmctld.pid"; then
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 20); do [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  # slurmd, then the controller, then munge.
  for f in "$d/slurmd.pid" "$d/slurmctld.pid" "$d/munge/munged.pid"; do
    [ -s "$f" ] || continue
    if alive "$f"; then kill -TERM "$(cat "$f")" 2>/dev/null || true; fi
    for _ in $(seq 1 30); do alive "$f" || break; sleep 0.5; done
    if alive "$f"; then kill -KILL "$(cat "$f")" 2>/dev/null || true; fi
    rm -f "$f"
  done
  echo "slurm-local: stopped ($d)"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  env) echo "export SLURM_CONF=$(absdir "${2:-}")/slurm.conf" ;;
  *) usage ;;
esac
