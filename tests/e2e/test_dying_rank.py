"""A dying rank and a stopped launcher, for real through `python -m launch train` on CPU.

- SIGKILL of rank 1 mid-training: the launcher notices, stops rank 0, exits non-zero within 60 s, names rank 1,
  and leaves no process behind.
- SIGTERM to the launcher: forwarded to the ranks, exit 143 within 60 s, no process left, and the checkpoint
  that was complete before the signal is still there, unchanged.
- `--dist_timeout` becomes the process group's timeout (mapping here; the measured value on a real 2-rank
  process group is asserted in test_resume.py via training_metrics.json's `dist_timeout_s`).
- The launcher's rank attribution, with fake ranks (no torch): DeepSpeed's own log line names the wrong rank
  when rank 0 dies, so this checks that spawn names rank 0.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.launched import LaunchedRun, cmdline, environ, kill_leftovers, pids, wait_no_leftovers

STOP_WITHIN_S = 60


def _training_step_logged(run: LaunchedRun) -> bool:
    return "{'loss':" in run.stdout


@pytest.mark.slow
def test_sigkill_of_a_rank_stops_the_run_and_names_it(tmp_path, tiny_assets):
    run = LaunchedRun(tmp_path, tiny_assets)
    try:
        run.wait_for(lambda: _training_step_logged(run), "training step log line")
        victim = run.wait_for(lambda: run.rank_pid(1), "rank 1 process", timeout=30)
        assert run.rank_pid(0) is not None
        run.note_tree()
        os.kill(victim, signal.SIGKILL)
        rc, took = run.wait_exit(STOP_WITHIN_S)
        print(f"SIGKILL rank 1: launcher exited {rc} after {took:.1f} s: {run.stderr.strip().splitlines()[-1]}")
        assert rc != 0
        assert took < STOP_WITHIN_S
        assert "rank 1 died (signal SIGKILL)" in run.stderr, run.stderr
        assert "the other ranks were stopped" in run.stderr
        left = wait_no_leftovers(str(run.run_dir), run.seen)
        assert not left, left
    finally:
        run.cleanup()


def _complete(ckpt: Path) -> bool:
    from dpo_dist.util.checkpoint import checkpoint_problems

    return ckpt.is_dir() and not checkpoint_problems(ckpt, world_size=2, deepspeed=True)


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigterm_to_the_launcher_is_forwarded_and_keeps_checkpoints(tmp_path, tiny_assets):
    # save_total_limit high enough that the rotation cannot delete checkpoint-2 while the test looks at it.
    run = LaunchedRun(tmp_path, tiny_assets, "--save_steps", "2", "--save_total_limit", "1000")
    ckpt = run.run_dir / "output" / "checkpoint-2"
    try:
        run.wait_for(lambda: _complete(ckpt), "complete checkpoint-2")
        before = _files(ckpt)
        run.note_tree()
        assert run.rank_pid(0) and run.rank_pid(1)
        os.kill(run.proc.pid, signal.SIGTERM)
        rc, took = run.wait_exit(STOP_WITHIN_S)
        print(f"SIGTERM launcher: exited {rc} after {took:.1f} s: {run.stderr.strip().splitlines()[-1]}")
        assert rc == 128 + signal.SIGTERM, (rc, run.stderr)
        assert "stopped by signal SIGTERM" in run.stderr, run.stderr
        left = wait_no_leftovers(str(run.run_dir), run.seen)
        assert not left, left
        # The checkpoint that was complete before the signal is still there, file for file.
        assert _complete(ckpt)
        assert _files(ckpt) == before
    finally:
        run.cleanup()


# --- --dist_timeout ------------------------------------------------------------------------------------------


def test_dist_timeout_maps_to_ddp_timeout_and_is_validated():
    from dpo_dist.args import parse_args, validate
    from dpo_dist.train.trl_trainer import dpo_config_kwargs
    from dpo_dist.util.errors import ArgumentError

    m, d, t = parse_args(["--model_name_or_path", "m"])
    assert t.dist_timeout == 1800
    m, d, t = parse_args(["--model_name_or_path", "m", "--dist_timeout", "90"])
    validate(m, d, t)
    assert dpo_config_kwargs(m, d, t, reference="sharded")["ddp_timeout"] == 90
    m, d, t = parse_args(["--model_name_or_path", "m", "--dist_timeout", "0"])
    with pytest.raises(ArgumentError, match="--dist_timeout must be a positive"):
        validate(m, d, t)


# --- rank attribution with fake ranks (fast, no torch) --------------------------------------------------------

# Mimics deepspeed/launcher/launch.py: spawns the ranks with RANK in their environment, polls once a second,
# and on the first failure SIGTERMs the others and exits with that code, printing DeepSpeed's line (whose
# argv is the last rank's, as in DeepSpeed). With "stuck" instead of "deepspeed" it never reacts: a hung
# inner launcher, which spawn must then stop by itself.
FAKE_LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    procs = []
    for r in range(int(sys.argv[1])):
        cmd = [sys.executable, "-c", "import time; time.sleep(120)", sys.argv[2], "--local_rank=%d" % r]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r)}))
        print("process %d spawned with command: %s" % (procs[-1].pid, cmd), flush=True)
    while True:
        for p in procs:
            if sys.argv[3] == "deepspeed" and p.poll() not in (None, 0):
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
                for q in procs:
                    q.wait()
                print("%s exits with return code = %d" % (cmd, p.returncode), flush=True)
                sys.exit(p.returncode)
        time.sleep(1)
""")


@pytest.mark.parametrize("victim,inner", [(0, "deepspeed"), (2, "deepspeed"), (1, "stuck")])
def test_spawn_names_the_rank_that_died(tmp_path, victim, inner):
    import threading

    from launch.spawn import spawn

    script = tmp_path / "fake_launcher.py"
    script.write_text(FAKE_LAUNCHER)
    marker = f"fake-rank-of-{tmp_path}"  # on every fake rank's command line: the test only touches those
    result_box = {}
    t = threading.Thread(target=lambda: result_box.setdefault(
        "r", spawn([[sys.executable, str(script), "3", marker, inner]], dict(os.environ), log_path=tmp_path / "launch.log",
                   grace_s=5, rank_failure_grace_s=2)))
    t.start()
    try:
        deadline = time.monotonic() + 30
        pid = None
        while pid is None and time.monotonic() < deadline:
            for p in pids():
                cmd = cmdline(p)
                if marker in cmd and str(script) not in cmd and f"--local_rank={victim}" in cmd \
                        and environ(p).get("RANK") == str(victim):
                    pid = p
            time.sleep(0.1)
        assert pid, "fake rank did not start"
        time.sleep(1.2)  # let spawn's watch discover the ranks
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        t.join(timeout=30)
        assert not t.is_alive()
        r = result_box["r"]
        assert r.returncode != 0
        assert r.failed == f"rank {victim} died (signal SIGKILL); the other ranks were stopped", r.failed
        assert time.monotonic() - t0 < (10 if inner == "stuck" else 5)
        assert not wait_no_leftovers(marker, {}, timeout=5)
    finally:
        kill_leftovers(marker, {})
        t.join(timeout=10)
