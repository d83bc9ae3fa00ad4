#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests of `tsq run --executor slurm`:
# installs Debian's slurm-wlm and munge when missing, writes a slurm.conf for this machine (its
# CPUs and memory, one partition `tsq`), starts munged, slurmctld and slurmd, and waits until
# the node is idle. Idempotent: a cluster already answering is left as it is.
#
#   scripts/slurm-cluster.sh up      # start (installing first if needed); needs root
#   scripts/slurm-cluster.sh down    # stop the daemons
#
# No accounting database: finished jobs stay visible to `scontrol show job` for MinJobAge
# (an hour here), which is what the driver reads after squeue; sacct would need slurmdbd.
set -euo pipefail

conf_dir=/etc/slurm
spool=/var/spool/tsq-slurm
log_dir=/var/log/tsq-slurm

answering() {
  timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  if [ "$(id -u)" != 0 ]; then
    echo "slurm-cluster: slurm-wlm and munge are missing and installing them needs root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null; }
}

write_conf() {
  local host cpus memory
  host="$(hostname -s)"
  cpus="$(nproc)"
  memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
  mkdir -p "$conf_dir" "$spool/ctld" "$spool/d" "$log_dir"
  cat >"$conf_dir/slurm.conf" <<EOF
ClusterName=tsq
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=$spool/ctld
SlurmdSpoolDir=$spool/d
SlurmctldPidFile=$spool/slurmctld.pid
SlurmdPidFile=$spool/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=3600
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=tsq Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmd loads a cgroup plugin whatever tracks processes; autodetect finds v1 or v2. Nothing
  # is constrained through it (proctrack/linuxproc, task/none).
  echo "CgroupPlugin=autodetect" >"$conf_dir/cgroup.conf"
}

up() {
  if answering; then
    echo "slurm-cluster: already up"
    return
  fi
  install
  write_conf
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
  fi
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 60); do
    if answering; then
      echo "slurm-cluster: up ($(sinfo -h -o '%N %c CPUs %m MiB %T'))"
      return
    fi
    # A node that came back after a restart may need telling.
    timeout 10 scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm-cluster: the node did not become idle; logs in $log_dir" >&2
  tail -n 20 "$log_dir"/*.log >&2 || true
  exit 1
}

down() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  # Gone before returning, so that an `up` right after starts them afresh.
  for _ in $(seq 30); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0
    sleep 0.5
  done
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
