"""Stand-ins for `srun`, `scontrol` and `mpirun` on PATH, so that what a launch.sbatch or an MPIJob's launcher runs on
several nodes runs on one machine.

Slurm:
`srun` starts its command once per node here (in the background, with SLURM_NODEID / SLURM_PROCID / SLURM_LOCALID set
as Slurm sets them, and the stand-ins first on PATH) and exits with the first failing node's status; `scontrol show
hostnames` prints loopback names, one per node. `record_deepspeed` adds a `deepspeed` that only writes down what it
was asked to run, for the checks that need no training.

mpirun: `-np N ... -x NAME ... CMD ARGS` runs CMD once per rank here with OMPI_COMM_WORLD_RANK set and, as over ssh
into a worker pod, only a login environment (PATH, HOME, PYTHONPATH of this process) plus the `-x` names: a variable
the launcher does not forward is missing on the nodes here too."""

from __future__ import annotations

import os
import stat
from pathlib import Path

FAKE_SRUN = r"""#!/usr/bin/env bash
# fake srun (tests/support/fake_launchers.py): --nodes=N ... CMD ARGS -> CMD ARGS once per node, here.
set -u
nodes=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) nodes="${1#--nodes=}"; shift ;;
    -N) nodes="$2"; shift 2 ;;
    --*=*) shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "$*" >>"${FAKE_SLURM_LOG:-/dev/null}"
pids=()
for ((i = 0; i < nodes; i++)); do
  PATH="$FAKE_SLURM_BIN:$PATH" SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NNODES=$nodes "$@" &
  pids+=("$!")
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || { s=$?; [ "$rc" -ne 0 ] || rc=$s; }; done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# fake scontrol (tests/support/fake_launchers.py): `scontrol show hostnames LIST` -> $FAKE_SLURM_HOSTS, one per line.
if [ "${1:-}" = show ] && [ "${2:-}" = hostnames ]; then
  tr , '\n' <<<"${FAKE_SLURM_HOSTS:-127.0.0.1,localhost}"
  exit 0
fi
echo "fake scontrol: only 'show hostnames' is faked" >&2
exit 1
"""

FAKE_MPIRUN = r"""#!/usr/bin/env bash
# fake mpirun (tests/support/fake_launchers.py): -np N [-x NAME]... CMD ARGS -> CMD ARGS once per rank, here.
set -u
np=1
keep=(PATH HOME PYTHONPATH FAKE_SLURM_RECORD FAKE_SLURM_BIN FAKE_SLURM_LOG)  # the stand-ins' own plumbing too
while [ $# -gt 0 ]; do
  case "$1" in
    -np|-n) np="$2"; shift 2 ;;
    -x) keep+=("$2"); shift 2 ;;
    --map-by|--bind-to|--mca) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "ranks=$np forwarded=${keep[*]}" >>"${FAKE_SLURM_LOG:-/dev/null}"
pids=()
for ((i = 0; i < np; i++)); do
  vars=()
  for name in "${keep[@]}"; do [ -z "${!name+x}" ] || vars+=("$name=${!name}"); done
  env -i "${vars[@]}" OMPI_COMM_WORLD_RANK=$i OMPI_COMM_WORLD_SIZE=$np "$@" &
  pids+=("$!")
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || { s=$?; [ "$rc" -ne 0 ] || rc=$s; }; done
exit "$rc"
"""

RECORD_DEEPSPEED = r"""#!/usr/bin/env bash
# fake deepspeed (tests/support/fake_launchers.py): writes its words and a few variables, one per line, and exits 0.
out="$FAKE_SLURM_RECORD/node-${SLURM_NODEID:-${OMPI_COMM_WORLD_RANK:-x}}"
printf '%s\n' "$@" >"$out.argv"
for v in MASTER_ADDR DS_ACCELERATOR OMP_NUM_THREADS PT_HPU_LAZY_MODE HCCL_SOCKET_IFNAME; do
  [ -z "${!v+x}" ] || echo "$v=${!v}"
done >"$out.env"
prev=""
for a in "$@"; do [ "$prev" != --hostfile ] || cp "$a" "$out.hostfile"; prev="$a"; done
exit 0
"""


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_slurm(bin_dir: Path, *, record_deepspeed: bool = False) -> dict:
    """Write the stand-ins into `bin_dir`; returns the environment variables that point at them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    _write(bin_dir / "srun", FAKE_SRUN)
    _write(bin_dir / "scontrol", FAKE_SCONTROL)
    _write(bin_dir / "mpirun", FAKE_MPIRUN)
    env = {"FAKE_SLURM_BIN": str(bin_dir), "FAKE_SLURM_LOG": str(bin_dir / "srun.log"),
           "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", "")}
    if record_deepspeed:
        record = bin_dir / "record"
        record.mkdir(exist_ok=True)
        _write(bin_dir / "deepspeed", RECORD_DEEPSPEED)
        env["FAKE_SLURM_RECORD"] = str(record)
    return env
