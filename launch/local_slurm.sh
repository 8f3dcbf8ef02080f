#!/usr/bin/env bash
# A throwaway two-node SLURM cluster on one machine, on loopback (nodes n1, n2; partition "debug").
#   launch/local_slurm.sh start|stop|status
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (start installs them with apt-get
# if missing and INSTALL=1, the default). State lives in $LOCAL_SLURM_DIR (default /tmp/moe_dist_slurm);
# point clients at it with:  export SLURM_CONF=$LOCAL_SLURM_DIR/slurm.conf
# Jobs here should set OMP_NUM_THREADS=1 and distinct MASTER_PORTs (both nodes share one machine).
# start on a cluster that does not answer (a killed session's) starts it empty: its saved jobs are dropped.
set -euo pipefail
DIR=${LOCAL_SLURM_DIR:-/tmp/moe_dist_slurm}
CONF=$DIR/slurm.conf
CPUS=${LOCAL_SLURM_CPUS:-2}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then return; fi
  if [ "${INSTALL:-1}" != 1 ]; then echo "local_slurm: SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool/n1" "$DIR/spool/n2"
  cat > "$CONF" <<CONF
ClusterName=moedistlocal
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=6818 CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=6819 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
}

start_munge() {
  if munge -n >/dev/null 2>&1; then return; fi  # a working munged answers
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
}

idle_nodes() { SLURM_CONF=$CONF sinfo -h -t idle -o %D 2>/dev/null | awk '{s+=$1} END {print s+0}'; }

start() {
  if [ -f "$CONF" ] && [ "$(idle_nodes)" = 2 ]; then echo "local SLURM cluster already up. export SLURM_CONF=$CONF"; return; fi
  if [ -f "$CONF" ] && SLURM_CONF=$CONF sinfo >/dev/null 2>&1; then
    echo "local_slurm: the cluster in $DIR is up but its nodes are busy; wait for its jobs or run: $0 stop" >&2
    SLURM_CONF=$CONF sinfo >&2 || true
    exit 1
  fi
  install
  # not answering: start empty. Daemons of a half-started cluster go, and so does the saved state of one
  # that died (a killed session): its jobs would be recovered as running and hold both nodes forever.
  stop >/dev/null
  rm -rf "$DIR/state"
  write_conf
  start_munge
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N n1
  slurmd -f "$CONF" -N n2
  for _ in $(seq 1 60); do
    if [ "$(idle_nodes)" = 2 ]; then
      echo "local SLURM cluster up: 2 idle nodes. export SLURM_CONF=$CONF"
      return
    fi
    sleep 1
  done
  echo "local_slurm: nodes did not become idle; logs in $DIR" >&2
  SLURM_CONF=$CONF sinfo >&2 || true
  exit 1
}

stop() {
  local pids=()
  for pidfile in "$DIR"/slurmd.n1.pid "$DIR"/slurmd.n2.pid "$DIR"/slurmctld.pid; do
    if [ -f "$pidfile" ]; then
      local pid; pid=$(cat "$pidfile")
      # a stale pidfile (the machine restarted) may name an unrelated process now
      if grep -qE '^slurm(ctl)?d$' "/proc/$pid/comm" 2>/dev/null; then pids+=("$pid"); kill "$pid" 2>/dev/null || true; fi
      rm -f "$pidfile"
    fi
  done
  for _ in $(seq 1 100); do  # gone, so a start right after can bind their ports
    local alive=0
    for pid in "${pids[@]}"; do  # (a zombie counts as gone)
      if [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then alive=1; fi
    done
    if [ "$alive" = 0 ]; then break; fi
    sleep 0.1
  done
  echo "local SLURM cluster stopped"
}

status() {
  if [ -f "$CONF" ] && SLURM_CONF=$CONF sinfo >/dev/null 2>&1; then
    SLURM_CONF=$CONF sinfo
  else
    echo "local SLURM cluster is not running"; return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
