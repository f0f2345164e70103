#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for the test suite and for trying the launchers
# without a cluster: munged, MariaDB (accounting storage), slurmdbd, slurmctld, slurmd.
#
#   slurm/local_cluster.sh start    install the Debian packages if missing, configure, start, wait until idle
#   slurm/local_cluster.sh stop     stop the daemons this script started (by PID file), nothing else
#   slurm/local_cluster.sh status   exit 0 when the cluster answers and its node is usable
#
# Accounting is not optional: submitit polls `sacct`, and without it a cancelled job stays UNKNOWN.
# Needs root (packages, daemons). Everything it creates lives under $HYBRIDQUANT_SLURM_STATE
# (default /var/tmp/hybridquant-slurm) except /etc/slurm/{slurm,slurmdbd}.conf, which it writes only
# when they are absent or were written by this script, so it never takes over a real cluster's config.
set -euo pipefail

STATE=${HYBRIDQUANT_SLURM_STATE:-/var/tmp/hybridquant-slurm}
CPUS=${HYBRIDQUANT_SLURM_CPUS:-16}        # declared, not real: lets array tasks run side by side
MARK="# written by hybridquant slurm/local_cluster.sh"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)   # stop order

die() { echo "error: local SLURM: $*" >&2; exit 1; }
log() { echo "local-slurm: $*" >&2; }

pid_of() { # running PID from a daemon's PID file, or nothing
  local file="$STATE/run/$1.pid"
  [ -s "$file" ] && kill -0 "$(cat "$file")" 2>/dev/null && cat "$file"
  return 0
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what did not come up within ${limit} s (logs: $STATE/log)"
    sleep 0.2
  done
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || die "packages ${missing[*]} are missing and installing them needs root"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts try to start services; there is no init system here, so deny that.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; created_policy=1; fi
  { apt-get install -y -q "${missing[@]}" >"$STATE/log/apt.log" 2>&1 \
    || { apt-get update -q >>"$STATE/log/apt.log" 2>&1 && apt-get install -y -q "${missing[@]}" >>"$STATE/log/apt.log" 2>&1; }; } \
    || { [ $created_policy -eq 1 ] && rm -f $policy; die "apt-get install ${missing[*]} failed (see $STATE/log/apt.log)"; }
  [ $created_policy -eq 1 ] && rm -f $policy
  return 0
}

own_or_absent() { [ ! -e "$1" ] || head -1 "$1" | grep -qF "$MARK"; }

write_configs() {
  own_or_absent $CONF || die "$CONF exists and was not written by this script; refusing to replace it"
  own_or_absent $DBD_CONF || die "$DBD_CONF exists and was not written by this script; refusing to replace it"
  mkdir -p /etc/slurm
  cat > $CONF <<EOF
$MARK
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
# sbatch --wait sleeps 2 s between polls, 4x longer each time while below MinJobAge/2 (up to 32 s): with
# the default 300 a finished job waited up to half a minute to be seen; 4 keeps the polls 2 s apart.
# Finished jobs stay in the accounting (sacct), which submitit and the tests read.
MinJobAge=4
InactiveLimit=0
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  cat > $DBD_CONF <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 $DBD_CONF
}

start_munge() {
  [ -n "$(pid_of munged)" ] && return
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid --force
  wait_for 10 munged test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/run/munged.pid"
  wait_for 10 munged bash -c 'munge -n | unmunge'
}

start_mariadb() {
  # Its own data directory, socket, PID file and log, all owned by the mysql user.
  local db="$STATE/db" sock="$STATE/db/mysql.sock"
  if [ -z "$(pid_of mariadbd)" ]; then
    mkdir -p "$db"; chown mysql:mysql "$db"
    if [ ! -d "$db/data/mysql" ]; then
      rm -rf "$db/data"
      mariadb-install-db --user=mysql --datadir="$db/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $STATE/log)"
    fi
    /usr/sbin/mariadbd --user=mysql --datadir="$db/data" --bind-address=127.0.0.1 --port=3307 \
      --socket="$sock" --pid-file="$db/mariadbd.pid" --log-error="$db/mariadb.log" \
      --skip-log-bin </dev/null >/dev/null 2>&1 &
    wait_for 30 MariaDB mariadb --socket="$sock" -e 'select 1'
    cp "$db/mariadbd.pid" "$STATE/run/mariadbd.pid"
  fi
  mariadb --socket="$sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
  if [ -z "$(pid_of slurmdbd)" ]; then
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  sacctmgr -i -Q add cluster local >/dev/null 2>&1 || true
  if [ -z "$(pid_of slurmctld)" ]; then
    slurmctld -c   # -c: no state from an earlier instance (jobs of a previous session)
    wait_for 30 slurmctld scontrol ping
  fi
  if [ -z "$(pid_of slurmd)" ]; then
    slurmd -N localhost
  fi
  wait_for 30 "the node" node_ready
}

node_ready() {
  local state
  state=$(sinfo -h -N -n localhost -o '%t' 2>/dev/null | head -1)
  case "$state" in
    idle|mix|alloc) return 0 ;;
    down*|drain*|fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

status() {
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    [ -n "$(pid_of $d)" ] || { echo "$d is not running" >&2; return 1; }
  done
  scontrol ping >/dev/null 2>&1 && sacct -n -X -S now >/dev/null 2>&1 && node_ready
}

stop() {
  local pids=()
  for d in "${DAEMONS[@]}"; do
    local pid; pid=$(pid_of "$d")
    [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; pids+=("$pid"); }
    # slurmctld must be gone before slurmdbd goes, and slurmdbd before its database
    for _ in $(seq 50); do kill -0 "${pid:-0}" 2>/dev/null || break; sleep 0.2; done
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    rm -f "$STATE/run/$d.pid"
  done
  log "stopped ${#pids[@]} daemons"
}

case "${1:-}" in
  start)
    [ "$(id -u)" -eq 0 ] || die "starting the daemons needs root"
    mkdir -p "$STATE"/{run,log,ctld,spool}
    if status 2>/dev/null; then log "already running"; exit 0; fi
    t0=$SECONDS
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
    log "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %t %c' | head -1)"
    ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
