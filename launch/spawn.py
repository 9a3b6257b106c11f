"""Side effects at the edge: start the launcher process(es), stream and log their output, forward
signals, stop everything when one part fails, and return one exit code.

One process per node command (one on a single node; one per node for the CPU loopback
multi-node case). Each runs in its own process group so that a stop reaches the DeepSpeed
launcher and every rank under it, and nothing is left orphaned.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.util.disk import is_no_space, no_space_message
from dpo_dist.util.logs import redact

# DeepSpeed's launcher (deepspeed/launcher/launch.py) reports the first rank that failed as
# "[<argv>] exits with return code = -9". The return code is that rank's, but the argv is the LAST rank
# spawned on the node (a leaked loop variable), and under --no_local_rank it holds no rank at all: so the
# rank is named from the processes themselves (RankWatch), and this line only supplies the code.
_RANK_EXIT = re.compile(r"exits with return code = (-?\d+)")
_RANK_OK = re.compile(r"Process (\d+) exits successfully")  # the same launcher, on a rank that exited 0
_RANK_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, start time, exit status as waitpid reports it) from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # the name (field 2) may hold spaces and parentheses
    exit_status = int(rest[49]) if len(rest) > 49 else 0  # field 52, Linux >= 3.5
    return rest[0], int(rest[1]), int(rest[19]), exit_status


def _proc_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
    except OSError:
        return None
    for name in _RANK_ENV:
        v = env.get(name.encode())
        if v is not None and v.isdigit():
            return int(v)
    return None


def _describe_status(status: int | None) -> str:
    if status is None:
        return "exit status unknown"
    if status & 0x7F:
        try:
            return f"signal {signal.Signals(status & 0x7F).name}"
        except ValueError:
            return f"signal {status & 0x7F}"
    return f"exit code {(status >> 8) & 0xFF}"


class RankWatch:
    """The rank processes on this machine under our launcher processes, and which one ended first.

    A rank is the top-most descendant with RANK in its environment (its own children inherit RANK). Each poll
    notes ranks that became zombies (exit status readable until their parent reaps them) or vanished (reaped).
    DeepSpeed's launcher polls once a second, reaps the failed rank and only then SIGTERMs the others, so at
    the first poll that sees a failure: a rank already reaped went first, and a SIGTERM exit is a consequence.
    Remote nodes' ranks are not visible here (then the message says the rank is unknown)."""

    def __init__(self, roots: Sequence[int]):
        self.roots = set(roots)
        self.ranks: dict[int, tuple[int, int]] = {}  # pid -> (rank, start time)
        self.ended: dict[int, tuple[int, int | None]] = {}  # pid -> (poll number, exit status or None)
        self.polls = 0
        self.failed_at: float | None = None  # when a rank was first seen to have failed (a non-zero status)

    def discover(self) -> None:
        children: dict[int, list[int]] = {}
        stats = {}
        try:
            names = os.listdir("/proc")
        except OSError:  # no procfs (not Linux): no rank attribution, DeepSpeed's own handling only
            return
        for name in names:
            if name.isdigit() and (st := _proc_stat(int(name))) is not None:
                stats[int(name)] = st
                children.setdefault(st[1], []).append(int(name))
        todo = list(self.roots)
        while todo:
            pid = todo.pop()
            for child in children.get(pid, ()):
                if child in self.ranks:
                    continue
                rank = _proc_rank(child)
                if rank is not None:
                    self.ranks[child] = (rank, stats[child][2])
                else:
                    todo.append(child)

    def poll(self) -> None:
        self.polls += 1
        for pid in self.ranks:
            if pid in self.ended:
                continue
            st = _proc_stat(pid)
            if st is None or st[2] != self.ranks[pid][1]:
                self.ended[pid] = (self.polls, None)
            elif st[0] in ("Z", "X"):
                self.ended[pid] = (self.polls, st[3])
                if st[3] != 0 and self.failed_at is None:
                    self.failed_at = time.monotonic()

    def first_failure(self, clean=()) -> tuple[list[int], int | None] | None:
        """([rank] or the candidate ranks, exit status or None) of the rank that failed first. `clean`: pids
        the launcher reported as having exited 0 (they may have been reaped before a poll saw them)."""
        bad = {pid: e for pid, e in self.ended.items() if e[1] != 0 and pid not in clean}
        if not bad:
            return None
        first = min(n for n, _ in bad.values())
        now = {pid: status for pid, (n, status) in bad.items() if n == first}
        reaped = [pid for pid, status in now.items() if status is None]
        if reaped:
            now = dict.fromkeys(reaped)
        elif len(now) > 1:
            not_term = {pid: st for pid, st in now.items() if st & 0x7F != signal.SIGTERM}
            now = not_term or now
        ranks = sorted(self.ranks[pid][0] for pid in now)
        return ranks, (next(iter(now.values())) if len(now) == 1 else None)

    def kill_leftovers(self) -> None:
        for pid, (_, start) in self.ranks.items():
            st = _proc_stat(pid)
            if st is not None and st[2] == start and st[0] not in ("Z", "X"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


# What ended a spawn, for whoever decides what comes next (the restart supervisor): only "failed" and "hang"
# are worth a restart; "stopped" was asked for, and "no_space" would fail again the same way.
OK, FAILED, STOPPED, HANG, NO_SPACE = "ok", "failed", "stopped", "hang", "no_space"


@dataclass
class SpawnResult:
    returncode: int
    failed: str | None = None  # which part failed, in words
    kind: str = OK  # OK, FAILED, STOPPED, HANG or NO_SPACE
    seconds: float = 0.0  # how long the node commands ran


class _Output:
    """Where the pumps write: the console and the launch log. A write that fails (a full disk, a closed console)
    is remembered, not raised: the pumps keep draining the ranks' pipes, so a rank never blocks on a full pipe,
    and the spawn loop decides what the failure means."""

    def __init__(self, sink, log_fh, log_path):
        self.lock = threading.Lock()
        self.sink, self.log_fh, self.log_path = sink, log_fh, log_path
        self.log_error: OSError | None = None
        self.last_line = time.monotonic()

    def write(self, text: str) -> None:
        with self.lock:
            self.last_line = time.monotonic()
            if self.sink is not None:
                try:
                    self.sink.write(text)
                    self.sink.flush()
                except (OSError, ValueError):  # a console that is gone must not stop the run
                    self.sink = None
            if self.log_fh is not None:
                try:
                    self.log_fh.write(text)
                    self.log_fh.flush()
                except OSError as e:
                    self.log_error = e
                    self.log_fh = None


def _pump(stream, out: _Output, state, tag: str):
    for line in iter(stream.readline, ""):
        line = redact(line)
        m = _RANK_EXIT.search(line)
        if m and m.group(1) != "0" and state.get("code") is None:
            state["code"] = int(m.group(1))
        m = _RANK_OK.search(line)
        if m:
            state.setdefault("clean", set()).add(int(m.group(1)))
        out.write(tag + line)
    stream.close()


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every group, wait up to grace_s, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # also reaps grandchildren whose parent already exited
        if p.poll() is None:
            p.wait()


def _failure_message(watch: RankWatch, states: list[dict], expected_ranks: int | None = None) -> str | None:
    code = next((st["code"] for st in states if st.get("code") is not None), None)
    found = watch.first_failure(clean=set().union(*(st.get("clean", set()) for st in states)))
    unseen = expected_ranks is not None and len(watch.ranks) < expected_ranks
    if found is not None and found[1] is not None and code is not None and (
            (found[1] & 0x7F == signal.SIGTERM and code != -signal.SIGTERM) or (unseen and found[1] & 0x7F)):
        # The rank seen to end was stopped by a signal, and a rank this watch never saw (one that died in its first
        # moments, reaped before a poll) may be the one that failed: do not blame the wrong one.
        found = None
    if found is None:
        if code is None:
            return None
        how = _describe_status(-code if code < 0 else (code & 0xFF) << 8)
        return f"a rank died ({how}; which one is not visible from here); the other ranks were stopped"
    ranks, status = found
    if status is None and code is not None and code < 0:
        status = -code  # a reaped rank: its code from DeepSpeed's line, as a waitpid status
    elif status is None and code is not None:
        status = (code & 0xFF) << 8
    how = _describe_status(status)
    if len(ranks) == 1:
        return f"rank {ranks[0]} died ({how}); the other ranks were stopped"
    return f"rank {' or rank '.join(map(str, ranks))} died first ({how}); the other ranks were stopped"


def spawn(commands: Sequence[Sequence[str]], env: dict, *, log_path: Path | None = None, cwd=None,
          grace_s: float = 20.0, poll_s: float = 0.1, discover_s: float = 0.25,
          rank_failure_grace_s: float = 15.0, idle_timeout_s: float | None = None, sink=None,
          expected_ranks: int | None = None) -> SpawnResult:
    """Run the node commands to completion. Returns 0 only if every one exits 0. When a rank dies, the
    failure message names it (RankWatch), and every process is stopped (stop_all): by the node command itself
    (DeepSpeed's launcher stops the other ranks and exits), or, if it has not within rank_failure_grace_s
    of the rank's death, by us. With idle_timeout_s, a job that prints nothing for that long is a hang and is
    stopped. When the launch log cannot be written (a full disk), the ranks are stopped with that reason.
    expected_ranks: how many ranks this machine should see (None: unknown), so that a rank never seen is allowed for."""
    log_fh = open(log_path, "a") if log_path else None
    out = _Output(sys.stdout if sink is None else sink, log_fh, log_path)
    t_start = time.monotonic()
    procs, threads, states = [], [], []
    stopping = {"signal": None}

    def _forward(signum, _frame):
        stopping["signal"] = signum
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signum)

    old = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)} if threading.current_thread() is threading.main_thread() else {}
    try:
        for i, argv in enumerate(commands):
            p = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1, start_new_session=True)
            procs.append(p)
            state: dict = {}
            states.append(state)
            tag = f"[node{i}] " if len(commands) > 1 else ""
            t = threading.Thread(target=_pump, args=(p.stdout, out, state, tag), daemon=True)
            t.start()
            threads.append(t)

        watch = RankWatch([p.pid for p in procs])
        next_discover = 0.0
        failed = None
        kind = OK
        rc = 0
        while True:
            if time.monotonic() >= next_discover:
                watch.discover()
                next_discover = time.monotonic() + discover_s
            watch.poll()
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if stopping["signal"] is not None:
                # Forwarded already; give the ranks time to save, then make sure nothing is left.
                stop_all(procs, grace_s)
                rc = 128 + stopping["signal"]
                failed = f"stopped by signal {signal.Signals(stopping['signal']).name}"
                kind = STOPPED
                break
            if out.log_error is not None:
                stop_all(procs, grace_s)
                rc, kind = 1, (NO_SPACE if is_no_space(out.log_error) else FAILED)
                where = Path(log_path).parent
                failed = (f"cannot write the launch log {log_path} ({out.log_error.strerror or out.log_error}), so "
                          "the ranks were stopped: " + ((no_space_message(where) or f"no space left on {where}.")
                                                         if kind == NO_SPACE else "see the error above."))
                break
            if bad:
                i, c = bad[0]
                watch.poll()
                stop_all(procs, grace_s)
                rc = c if c > 0 else 128 + (-c)
                failed, kind = f"node command {i} exited with {c}", FAILED
                break
            if all(c == 0 for c in codes):
                break
            if watch.failed_at is not None and time.monotonic() - watch.failed_at > rank_failure_grace_s:
                stop_all(procs, grace_s)
                rc, kind = 1, FAILED
                failed = "a rank failed and the launcher did not stop the others"
                break
            if idle_timeout_s is not None and time.monotonic() - out.last_line > idle_timeout_s:
                stop_all(procs, grace_s)
                rc, kind = 1, HANG
                failed = (f"no output from any rank for {idle_timeout_s:.0f} s (past --dist_timeout): the job hung; "
                          "the ranks were stopped")
                break
            time.sleep(poll_s)
        watch.kill_leftovers()
        for t in threads:
            t.join(timeout=5)
        if kind == FAILED:
            failed = _failure_message(watch, states, expected_ranks) or failed
        return SpawnResult(rc, failed, kind, time.monotonic() - t_start)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if log_fh:
            try:
                log_fh.close()
            except OSError:  # its last buffered lines did not fit: the failure is already reported
                pass
