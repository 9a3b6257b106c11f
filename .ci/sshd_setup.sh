#!/usr/bin/env bash
# A throwaway sshd on loopback for tests/e2e/test_multinode_ssh.py: DeepSpeed's default pdsh/ssh
# multi-node path, with two hostfile entries (localhost, 127.0.0.1) that are both this machine.
#
#   .ci/sshd_setup.sh            install openssh-server + pdsh if missing (apt, as root), start sshd, print what it did
#   .ci/sshd_setup.sh --stop     stop the sshd this script started (by the pid in its pid file)
#
# What it sets up (idempotent; a second run reuses the keys and the running daemon):
# - sshd on 127.0.0.1:$DPO_SSHD_PORT (default 2222) only, its own config, throwaway host key, pid file and log,
#   all under $DPO_SSHD_DIR (default /tmp/dpo-dist-sshd). Public keys only, no passwords,
#   PermitRootLogin prohibit-password. StrictModes is off because the key files live under /tmp.
# - a throwaway client key, authorised only through that sshd's own AuthorizedKeysFile (the user's
#   ~/.ssh/authorized_keys is not touched).
# - a block at the top of ~/.ssh/config that applies only to localhost/127.0.0.1 *on that port*
#   (`Match ... exec "test %p = PORT"`): the client key, and that daemon's throwaway host key accepted
#   without a prompt. ssh to any other host or port is unchanged. The port itself comes from
#   `python -m launch train --ssh --ssh_port PORT` (DeepSpeed passes it to ssh and pdsh).
# It never fails the caller: when apt, sshd or pdsh cannot be had it prints "SKIP: <reason>" and exits 0,
# and the test then skips with that reason.
set -uo pipefail

PORT="${DPO_SSHD_PORT:-2222}"
DIR="${DPO_SSHD_DIR:-/tmp/dpo-dist-sshd}"
SSH_CONFIG="${HOME}/.ssh/config"
BEGIN="# >>> dpo-dist loopback sshd (.ci/sshd_setup.sh) >>>"
END="# <<< dpo-dist loopback sshd <<<"

say() { echo "sshd_setup: $*"; }
skip() { echo "SKIP: $*"; exit 0; }

running_pid() {
  [ -f "$DIR/sshd.pid" ] || return 1
  local pid
  pid="$(cat "$DIR/sshd.pid" 2>/dev/null)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q sshd "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

if [ "${1:-}" = "--stop" ]; then
  if pid="$(running_pid)"; then kill "$pid" && say "stopped sshd (pid $pid)"; else say "no sshd of ours is running"; fi
  exit 0
fi

# 1. openssh-server and pdsh (Debian packages).
SSHD="$(command -v sshd || echo /usr/sbin/sshd)"
if [ ! -x "$SSHD" ] || ! command -v pdsh >/dev/null || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
  [ "$(id -u)" = 0 ] || skip "sshd/pdsh are not installed and this is not root (apt-get install openssh-server pdsh)"
  command -v apt-get >/dev/null || skip "sshd/pdsh are not installed and there is no apt-get"
  say "installing openssh-server pdsh with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh; } >"/tmp/dpo-dist-sshd-apt.log" 2>&1; then
    tail -5 /tmp/dpo-dist-sshd-apt.log
    skip "apt-get could not install openssh-server pdsh (no network or no Debian mirror?); log in /tmp/dpo-dist-sshd-apt.log"
  fi
  SSHD="$(command -v sshd || echo /usr/sbin/sshd)"
  [ -x "$SSHD" ] && command -v pdsh >/dev/null || skip "openssh-server/pdsh installed but sshd or pdsh is still missing"
fi
say "sshd: $SSHD, pdsh: $(command -v pdsh)"

# 2. Keys and config, under $DIR.
mkdir -p "$DIR" && chmod 700 "$DIR"
[ -f "$DIR/ssh_host_ed25519_key" ] || { ssh-keygen -q -t ed25519 -N "" -f "$DIR/ssh_host_ed25519_key" && say "made a throwaway host key"; }
[ -f "$DIR/id_ed25519" ] || { ssh-keygen -q -t ed25519 -N "" -C "dpo-dist-loopback-test" -f "$DIR/id_ed25519" && say "made a throwaway client key"; }
cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys" && chmod 600 "$DIR/authorized_keys"
cat >"$DIR/sshd_config" <<EOF
# Written by .ci/sshd_setup.sh: loopback only, public keys only, for the multi-node launch test.
Port $PORT
ListenAddress 127.0.0.1
HostKey $DIR/ssh_host_ed25519_key
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
AllowUsers $(id -un)
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
MaxStartups 64:30:128
LogLevel ERROR
EOF

# 3. Client side: ~/.ssh/config, only for loopback hosts on $PORT.
mkdir -p "${HOME}/.ssh" && chmod 700 "${HOME}/.ssh"
touch "$SSH_CONFIG" && chmod 600 "$SSH_CONFIG"
block="$BEGIN
Match host localhost,127.0.0.1 exec \"test %p = $PORT\"
    IdentityFile $DIR/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile $DIR/known_hosts
    BatchMode yes
    LogLevel ERROR
$END"
# Drop an older block of ours, then put the new one first (ssh uses the first value it finds).
rest="$(awk -v b="$BEGIN" -v e="$END" '$0==b{skip=1;next} $0==e{skip=0;next} !skip' "$SSH_CONFIG")"
printf '%s\n%s\n' "$block" "$rest" >"$SSH_CONFIG.dpo-dist.tmp" && mv "$SSH_CONFIG.dpo-dist.tmp" "$SSH_CONFIG"
say "~/.ssh/config: client key for localhost/127.0.0.1 on port $PORT only"

# 4. Start sshd (or keep the one already running).
if pid="$(running_pid)"; then
  say "sshd already running (pid $pid); sent SIGHUP to reload its config"
  kill -HUP "$pid"
  sleep 1
else
  mkdir -p /run/sshd 2>/dev/null && chmod 755 /run/sshd 2>/dev/null  # privilege-separation dir
  "$SSHD" -t -f "$DIR/sshd_config" || skip "sshd rejected its config ($DIR/sshd_config)"
  "$SSHD" -f "$DIR/sshd_config" -E "$DIR/sshd.log" || skip "sshd did not start (port $PORT busy?); see $DIR/sshd.log"
  for _ in 1 2 3 4 5 6 7 8 9 10; do running_pid >/dev/null && break; sleep 0.3; done
  pid="$(running_pid)" || skip "sshd exited at start; see $DIR/sshd.log"
  say "started sshd on 127.0.0.1:$PORT (pid $pid, log $DIR/sshd.log)"
fi

# 5. Check both names log in without a prompt.
for host in localhost 127.0.0.1; do
  if out="$(ssh -p "$PORT" -o ConnectTimeout=5 "$host" echo ok 2>&1)" && [ "$out" = ok ]; then
    say "ssh -p $PORT $host: ok"
  else
    skip "ssh -p $PORT $host does not log in: $out"
  fi
done
say "ready: python -m launch train --hardware cpu --hostfile H --ssh --ssh_port $PORT ..."
exit 0
