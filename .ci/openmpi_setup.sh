#!/usr/bin/env bash
# Open MPI for the Gaudi twin's DDP launches: gaudi_spawn.py --use_mpi runs `mpirun -n N ... python dpo.py`, the way
# optimum-habana's own DPO baseline starts its ranks (Habana's images ship Open MPI; Debian has it as openmpi-bin).
#
#   .ci/openmpi_setup.sh     install openmpi-bin with apt when mpirun is missing (as root), print what it did
#
# It never fails the caller: when mpirun cannot be had it prints "SKIP: <reason>" and exits 0; the twin tests that
# launch through MPI then skip with that reason.
set -uo pipefail

say() { echo "openmpi_setup: $*"; }
skip() { echo "SKIP: $*"; exit 0; }

if command -v mpirun >/dev/null; then
  say "mpirun: $(command -v mpirun) ($(mpirun --version 2>/dev/null | head -1))"
  exit 0
fi
[ "$(id -u)" = 0 ] || skip "mpirun is not installed and this is not root (apt-get install openmpi-bin)"
command -v apt-get >/dev/null || skip "mpirun is not installed and there is no apt-get"
say "installing openmpi-bin with apt-get"
export DEBIAN_FRONTEND=noninteractive
log=/tmp/dpo-dist-openmpi-apt.log
if ! { apt-get install -y -qq --no-install-recommends openmpi-bin || { apt-get update -qq && apt-get install -y -qq --no-install-recommends openmpi-bin; }; } >"$log" 2>&1; then
  tail -5 "$log"
  skip "apt-get could not install openmpi-bin (no network or no Debian mirror?); log in $log"
fi
command -v mpirun >/dev/null || skip "openmpi-bin installed but mpirun is still missing"
say "mpirun: $(command -v mpirun) ($(mpirun --version 2>/dev/null | head -1))"
