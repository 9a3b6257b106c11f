"""A real `python -m launch train` on CPU ranks, watched from outside: its process tree (from /proc), its output,
the ranks by number, and a cleanup that leaves nothing of the run alive. Shared by the dying-rank, restart and
full-disk tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.testing_utils import ROOT, cpu_env, free_port

PY = sys.executable
START_TIMEOUT_S = 240
# Same JIT-extension cache and ninja as test_resume.py (see there): no rebuild between the files.
ENV = cpu_env(TORCH_EXTENSIONS_DIR=ROOT / ".cache" / "torch_extensions",
              PATH=str(Path(PY).parent) + os.pathsep + os.environ.get("PATH", ""))


# --- /proc helpers -------------------------------------------------------------------------------------------


def stat(pid: int):
    """(state, ppid, start time) or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw.split(b"\0") if b"=" in kv)


def pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in pids():
        st = stat(pid)
        if st:
            children.setdefault(st[1], []).append(pid)
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int, start=None) -> bool:
    """Running (not a zombie), and, given its start time, still the same process (pids get reused)."""
    st = stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[2] == start)


def leftovers(marker: str, seen: dict) -> list[int]:
    """Live processes of this run: one seen under its launcher (same pid and start time), or one whose command
    line holds `marker` (a path unique to this test)."""
    found = {pid for pid, start in seen.items() if alive(pid, start)}
    found |= {pid for pid in pids() if pid != os.getpid() and marker in cmdline(pid) and alive(pid)}
    return sorted(found)


def wait_no_leftovers(marker: str, seen: dict, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(marker, seen)
        if not left or time.monotonic() > deadline:
            return [f"{pid}: {cmdline(pid)[:200]}" for pid in left]
        time.sleep(0.2)


def kill_leftovers(marker: str, seen: dict) -> None:
    for pid in leftovers(marker, seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --- a real launch ------------------------------------------------------------------------------------------


class LaunchedRun:
    def __init__(self, tmp_path: Path, tiny_assets, *dpo_extra: str, launch_extra=(), name: str = "run",
                 run_dir: Path | None = None):
        self.run_dir = run_dir or tmp_path / name
        self.stdout_path, self.stderr_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        # LoRA (the adapter-off reference: no reference pass before the first step) under ZeRO-3, as the planner's
        # launch would run it; batch size: the plan's (ds_config.json pins it).
        argv = [PY, "-m", "launch", "train", "--model", str(tiny_assets.llama_dir), "--hardware", "cpu",
                "--cards", "2", "--zero_stage", "3", "--max_length", "256", "--max_prompt_length", "128",
                "--run_dir", str(self.run_dir), "--master_port", str(free_port()), *map(str, launch_extra),
                "--", "--dataset_name", str(tiny_assets.data_dir), "--max_steps", "100000", "--logging_steps", "1",
                "--no_merge", "--max_train_samples", "64", "--max_eval_samples", "16",
                *map(str, dpo_extra)]
        self._out, self._err = open(self.stdout_path, "w"), open(self.stderr_path, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=self._out, stderr=self._err,
                                     start_new_session=True)
        self.seen: dict[int, int] = {}  # pid -> start time of every process seen under the launcher

    def note_tree(self) -> set[int]:
        now = descendants(self.proc.pid)
        for pid in now:
            st = stat(pid)
            if st and pid not in self.seen:
                self.seen[pid] = st[2]
        return now

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = START_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.note_tree()
            if self.proc.poll() is not None:
                pytest.fail(f"the launcher exited ({self.proc.returncode}) while waiting for {what}:\n"
                            f"{self.stdout[-4000:]}\n{self.stderr[-2000:]}")
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        pytest.fail(f"no {what} within {timeout}s:\n{self.stdout[-4000:]}")

    def rank_pid(self, rank: int):
        for pid in self.note_tree():
            if "dpo_dist.dpo" in cmdline(pid) and environ(pid).get("RANK") == str(rank) \
                    and environ(stat(pid)[1] if stat(pid) else 0).get("RANK") is None:
                return pid
        return None

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {timeout}s:\n{self.stdout[-3000:]}\n{self.stderr[-2000:]}")
        return rc, time.monotonic() - t0

    def cleanup(self):
        """Whatever happened: nothing of this run survives the test."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: the launcher started it with setsid
        kill_leftovers(str(self.run_dir), self.seen)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._out.close()
        self._err.close()
