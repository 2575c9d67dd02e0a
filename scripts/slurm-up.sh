#!/usr/bin/env bash
# Bring up a real Slurm "cluster" on this machine for tests and CI (Debian/Ubuntu, root, no systemd):
# munge, MariaDB + slurmdbd (so `sacct` works: submitit reads job states from it), slurmctld and one
# `slurmd -N nodeX` per fake node, all on 127.0.0.1. Idempotent: installs what is missing, starts what
# is not running (daemons are tracked by pidfile), rewrites slurm.conf and restarts the controller and
# nodes only when the configuration changed; waits until every node is idle and sacct answers.
# Stop with scripts/slurm-down.sh (kills only the PIDs in our pidfiles).
#   CSO_SLURM_NODES   fake nodes node1..nodeN          (default 2)
#   CSO_SLURM_CPUS    CPUs advertised per node         (default: nproc)
#   CSO_SLURM_MEM     MB advertised per node           (default 4000)
# Why each setting is what it is: the comment beside it below.
set -euo pipefail

NODES=${CSO_SLURM_NODES:-2}
CPUS=${CSO_SLURM_CPUS:-$(nproc)}
MEM=${CSO_SLURM_MEM:-4000}
RUN=/run/cso-slurm
LOGS=/var/log/slurm
CONF=/etc/slurm/slurm.conf
START=$(date +%s)
say() { echo "[slurm-up +$(( $(date +%s) - START ))s] $*"; }
ours() {  # pidfile $1 names a live daemon of ours
  [ -s "$1" ] || return 1
  local pid; pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && grep -qE '^(munged|mariadbd|slurmdbd|slurmctld|slurmd)$' "/proc/$pid/comm"
}
retry() {  # retry N CMD...: up to N tries, 0.2 s apart
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
stop() {  # stop the daemon of pidfile $1
  ours "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1"); kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$1"
}

# ------------------------------------------------------------------ packages
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ------------------------------------------------------------------ host names
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
for i in $(seq 1 "$NODES"); do
  getent hosts "node$i" >/dev/null || echo "127.0.0.1 node$i" >> /etc/hosts
done
mkdir -p "$RUN" "$LOGS" /var/spool/slurmctld /var/spool/slurmd

# ------------------------------------------------------------------ munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
ours /run/munge/munged.pid || { say "starting munged"; runuser -u munge -- /usr/sbin/munged; }
retry 50 bash -c 'munge -n </dev/null | unmunge'

# ------------------------------------------------------------------ accounting (MariaDB + slurmdbd)
mkdir -p /run/mysqld; chown mysql:root /run/mysqld
touch "$LOGS/mariadb.err"; chown mysql "$LOGS/mariadb.err"
if ! ours /run/mysqld/mysqld.pid; then
  say "starting mariadbd"
  /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
      --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M --log-error="$LOGS/mariadb.err" \
      </dev/null >/dev/null 2>&1 &
  retry 150 mariadb-admin ping
fi
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'cso-local';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=cso-local
EOF
chmod 600 /etc/slurm/slurmdbd.conf
ours "$RUN/slurmdbd.pid" || { say "starting slurmdbd"; /usr/sbin/slurmdbd; }
retry 150 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'

# ------------------------------------------------------------------ slurm.conf
nodes=""
for i in $(seq 1 "$NODES"); do
  nodes+="NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"$'\n'
done
want="# written by cso_dist scripts/slurm-up.sh
ClusterName=cso
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
MailProg=/bin/true
${nodes}PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' > /etc/slurm/cgroup.conf
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$want" ]; then
  say "writing $CONF (node[1-$NODES], $CPUS CPUs each)"
  printf '%s\n' "$want" > "$CONF"
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop "$f"; done
  stop "$RUN/slurmctld.pid"
fi

# ------------------------------------------------------------------ controller and nodes
ours "$RUN/slurmctld.pid" || { say "starting slurmctld"; /usr/sbin/slurmctld -c -i; }
retry 150 bash -c 'scontrol ping | grep -q "is UP"'
for i in $(seq 1 "$NODES"); do
  mkdir -p "/var/spool/slurmd/node$i"
  ours "$RUN/slurmd-node$i.pid" || { say "starting slurmd -N node$i"; /usr/sbin/slurmd -N "node$i"; }
done
idle() { [ "$(sinfo -h -N -o '%N %T' | grep -cE ' (idle|mixed|allocated)$')" -eq "$NODES" ]; }
if ! retry 300 idle; then
  echo "slurm-up: nodes not idle after 60 s" >&2
  sinfo -N -l >&2; tail -n 20 "$LOGS"/slurmctld.log "$LOGS"/slurmd-*.log >&2
  exit 1
fi
retry 150 sacct -n -X -S now-1minutes || { echo "slurm-up: sacct does not answer" >&2; exit 1; }
say "ready: $(sinfo -h -o '%D nodes, partition %P' | head -1)"
