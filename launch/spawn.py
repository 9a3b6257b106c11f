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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dpo_dist.logging_utils import redact

# DeepSpeed's launcher reports a dead rank as: "... '--local_rank=1', ...] exits with return code = -9"
_RANK_EXIT = re.compile(r"--local_rank=(\d+).*exits with return code = (-?\d+)")


@dataclass
class SpawnResult:
    returncode: int
    failed: Optional[str] = None  # which part failed, in words
    log_lines: list = field(default_factory=list)


def _pump(stream, sink, log_fh, lock, state, tag: str):
    for line in iter(stream.readline, ""):
        line = redact(line)
        m = _RANK_EXIT.search(line)
        if m and m.group(2) != "0" and state.get("rank") is None:
            state["rank"] = (int(m.group(1)), int(m.group(2)))
        with lock:
            sink.write(tag + line)
            sink.flush()
            if log_fh:
                log_fh.write(tag + line)
                log_fh.flush()
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


def spawn(commands: Sequence[Sequence[str]], env: dict, *, log_path: Optional[Path] = None, cwd=None,
          grace_s: float = 20.0, poll_s: float = 0.5) -> SpawnResult:
    """Run the node commands to completion. Returns 0 only if every one exits 0."""
    log_fh = open(log_path, "a") if log_path else None
    lock = threading.Lock()
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
            t = threading.Thread(target=_pump, args=(p.stdout, sys.stdout, log_fh, lock, state, tag), daemon=True)
            t.start()
            threads.append(t)

        failed = None
        rc = 0
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if stopping["signal"] is not None:
                # Forwarded already; give the ranks time to save, then make sure nothing is left.
                stop_all(procs, grace_s)
                rc = 128 + stopping["signal"]
                failed = f"stopped by signal {signal.Signals(stopping['signal']).name}"
                break
            if bad:
                i, c = bad[0]
                stop_all(procs, grace_s)
                rc = c if c > 0 else 128 + (-c)
                failed = f"node command {i} exited with {c}"
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(poll_s)
        for t in threads:
            t.join(timeout=5)
        for st in states:
            if st.get("rank") is not None:
                r, c = st["rank"]
                how = f"signal {signal.Signals(-c).name}" if c < 0 else f"exit code {c}"
                failed = f"rank {r} died ({how}); the other ranks were stopped"
                break
        return SpawnResult(rc, failed)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if log_fh:
            log_fh.close()
