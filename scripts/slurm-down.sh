#!/usr/bin/env bash
# Stop what scripts/slurm-up.sh started, by the PIDs in its pidfiles only (never by name).
# PURGE=1 also drops the accounting database and wipes Slurm state, spool and logs.
set -uo pipefail
RUN=/run/cso-slurm
ours() {
  [ -s "$1" ] || return 1
  local pid; pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && grep -qE '^(munged|mariadbd|slurmdbd|slurmctld|slurmd)$' "/proc/$pid/comm"
}
stop() {
  if ours "$1"; then
    local pid; pid=$(cat "$1")
    echo "slurm-down: stopping $(cat "/proc/$pid/comm") (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}
if ours "$RUN/slurmctld.pid"; then  # let running jobs' steps end cleanly first
  scancel --quiet --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
fi
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop "$f"; done
stop "$RUN/slurmctld.pid"
stop "$RUN/slurmdbd.pid"
if [ "${PURGE:-0}" = 1 ] && ours /run/mysqld/mysqld.pid; then
  mariadb -e 'DROP DATABASE IF EXISTS slurm_acct_db' 2>/dev/null || true
fi
stop /run/mysqld/mysqld.pid
stop /run/munge/munged.pid
[ "${PURGE:-0}" = 1 ] && rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
exit 0
