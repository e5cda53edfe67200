#!/usr/bin/env bash
# CI's Slurm tier, start to end: install slurm-wlm and munge (Debian), start a two-node cluster
# on localhost, run `make test-slurm` (tests/slurm), and stop the daemons whatever happens.
# Runs as root, without stdin. Prints the tier's wall time.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
export GKD_SLURM_DIR=${GKD_SLURM_DIR:-/tmp/gkd-slurm}
export SLURM_CONF=$GKD_SLURM_DIR/etc/slurm.conf
started=$(date +%s)

.ci/slurm/install.sh
trap '.ci/slurm/stop.sh' EXIT
.ci/slurm/start.sh
status=0
make test-slurm || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- slurm daemon logs (tail) ---"
  tail -n 30 "$GKD_SLURM_DIR"/log/*.log || true
fi
echo "slurm tier: $(( $(date +%s) - started )) s (install, start, tests, stop)"
exit "$status"
