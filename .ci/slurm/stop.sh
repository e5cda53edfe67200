#!/usr/bin/env bash
# Stop what .ci/slurm/start.sh started (slurmd x2, slurmctld, munged), by their pid files.
# GKD_SLURM_KEEP_STATE=1 keeps $GKD_SLURM_DIR (logs, state) for inspection.
set -uo pipefail
DIR=${GKD_SLURM_DIR:-/tmp/gkd-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf

stop_pid_file() {
  local file=$1
  [ -f "$file" ] || return 0
  local pid
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
}

# Jobs first, so no step outlives its slurmd.
scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
for node in n1 n2; do stop_pid_file "$DIR/run/slurmd-$node.pid"; done
stop_pid_file "$DIR/run/slurmctld.pid"
stop_pid_file "$DIR/run/munged.pid"
if [ "${GKD_SLURM_KEEP_STATE:-0}" != 1 ]; then
  rm -rf "$DIR"
fi
echo "slurm stopped"
