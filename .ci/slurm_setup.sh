#!/usr/bin/env bash
# A one-host Slurm cluster on localhost for tests/e2e/test_slurm.py: `sbatch` of the launch.sbatch that
# `python -m launch train --emit slurm` writes, for real (munge, slurmctld, slurmd).
#
#   .ci/slurm_setup.sh            install slurm-wlm + munge if missing (apt, as root), start the daemons, print what it did
#   .ci/slurm_setup.sh --stop     stop the daemons this script started (by the pids in their pid files)
#
# What it sets up (idempotent; a second run keeps daemons that are running and answering):
# - munged with the package's key (/etc/munge/munge.key, made if missing), run as the munge user.
# - slurmctld + slurmd with their own slurm.conf, state, spool, pid and log files under $DPO_SLURM_DIR (default
#   /tmp/dpo-dist-slurm); the site's /etc/slurm is not touched. Clients find the cluster with
#   SLURM_CONF=$DPO_SLURM_DIR/slurm.conf (the test sets it).
# - one node (this host, `hostname -s`, address 127.0.0.1) with this machine's CPUs and 90% of its memory, one
#   partition `dpo` (default, no time limit); ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no cgroups, no
#   accounting daemon: sacct needs slurmdbd, so a job's exit code is read from the job completion log
#   ($DPO_SLURM_DIR/jobcomp.log, jobcomp/filetxt), from `scontrol show job` and from the job's own output.
# It never fails the caller: when apt or a daemon cannot be had it prints "SKIP: <reason>" and exits 0; the test then
# skips with that reason.
set -uo pipefail

DIR="${DPO_SLURM_DIR:-/tmp/dpo-dist-slurm}"
CONF="$DIR/slurm.conf"
CTLD_PORT="${DPO_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${DPO_SLURMD_PORT:-6818}"
export SLURM_CONF="$CONF"

say() { echo "slurm_setup: $*"; }
skip() { echo "SKIP: $*"; exit 0; }

pid_of() {  # pid in pid file $1 if that process is alive and is $2
  [ -f "$1" ] || return 1
  local pid
  pid="$(cat "$1" 2>/dev/null)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

if [ "${1:-}" = "--stop" ]; then
  for d in slurmd slurmctld; do
    if pid="$(pid_of "$DIR/$d.pid" "$d")"; then kill "$pid" && say "stopped $d (pid $pid)"; else say "no $d of ours is running"; fi
  done
  exit 0
fi

# 1. The packages (Debian: slurm-wlm, munge).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  [ "$(id -u)" = 0 ] || skip "slurm-wlm/munge are not installed and this is not root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || skip "slurm-wlm/munge are not installed and there is no apt-get"
  say "installing slurm-wlm munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  log=/tmp/dpo-dist-slurm-apt.log
  if ! { apt-get install -y -qq --no-install-recommends slurm-wlm munge \
         || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; }; } >"$log" 2>&1; then
    tail -5 "$log"
    skip "apt-get could not install slurm-wlm munge (no network or no Debian mirror?); log in $log"
  fi
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    || skip "slurm-wlm/munge installed but slurmctld, slurmd or munged is still missing"
fi
[ "$(id -u)" = 0 ] || skip "the daemons run as root here (SlurmdUser=root); run .ci/slurm_setup.sh as root"
say "$(slurmctld -V 2>/dev/null), $(munged -V 2>/dev/null | head -1)"

# 2. munge.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; } \
      || skip "cannot make /etc/munge/munge.key"
    say "made /etc/munge/munge.key"
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null; chmod 755 /run/munge
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged 2>/dev/null || su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.3; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || skip "munged did not start (see /var/log/munge/munged.log)"
  say "started munged"
else
  say "munged already running"
fi

# 3. slurm.conf.
NODE="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
mkdir -p "$DIR/state" "$DIR/spool"
cat >"$CONF.new" <<EOF
# Written by .ci/slurm_setup.sh: a one-host cluster on localhost for the tests.
ClusterName=dpodist
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=3600
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=dpo Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
changed=1
if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then changed=0; rm -f "$CONF.new"; else mv "$CONF.new" "$CONF"; fi
say "slurm.conf: $CONF (node $NODE, $CPUS CPUs, ${MEM_MB} MB)"

# 4. The daemons (restarted when the config changed).
for d in slurmctld slurmd; do
  if pid="$(pid_of "$DIR/$d.pid" "$d")"; then
    if [ "$changed" = 1 ]; then kill "$pid"; sleep 1; say "restarting $d (config changed)"; else say "$d already running (pid $pid)"; continue; fi
  fi
  if [ "$d" = slurmctld ]; then
    /usr/sbin/slurmctld -f "$CONF" || skip "slurmctld did not start; see $DIR/slurmctld.log"
  else
    /usr/sbin/slurmd -f "$CONF" || skip "slurmd did not start; see $DIR/slurmd.log"
  fi
  for _ in $(seq 1 30); do pid_of "$DIR/$d.pid" "$d" >/dev/null && break; sleep 0.3; done
  pid="$(pid_of "$DIR/$d.pid" "$d")" || skip "$d exited at start; see $DIR/$d.log: $(tail -3 "$DIR/$d.log" 2>/dev/null | tr '\n' ' ')"
  say "started $d (pid $pid, log $DIR/$d.log)"
done

# 5. The node answers and takes jobs.
state=""
for _ in $(seq 1 40); do
  state="$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1)"
  case "$state" in idle|mix|alloc|comp) break ;; drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;; esac
  sleep 0.5
done
case "$state" in
  idle|mix|alloc|comp) say "node $NODE is $state" ;;
  *) skip "node $NODE is '${state:-unknown}' ($(scontrol show node "$NODE" 2>/dev/null | sed -n 's/.*Reason=//p')); see $DIR/slurmd.log" ;;
esac
out="$(srun -N1 -n1 --time=1 true 2>&1)" || skip "srun true failed: $out"
say "ready: SLURM_CONF=$CONF sbatch RUN_DIR/launch.sbatch"
exit 0
