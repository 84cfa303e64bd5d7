#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its single-node cluster: Debian's slurm-wlm and munge.
# Idempotent (does nothing when the daemons are already installed). Needs root or password-less sudo; elsewhere it
# says why and exits 0, and the Slurm tests are then skipped with that reason.
set -euo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_slurm.sh: not root and no password-less sudo; Slurm tests will be skipped" >&2; exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: no apt-get here; install slurm-wlm and munge yourself to run the Slurm tests" >&2; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# The package index may be stale or empty on a fresh image: refresh it only when the install fails.
$SUDO apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q slurm-wlm munge >/dev/null
}
echo "install_slurm.sh: installed $(slurmctld -V 2>/dev/null) and munge" >&2
