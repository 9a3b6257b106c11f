"""Automatic restart, for real: `python -m launch train --max_restarts N` on 2 CPU ranks (DeepSpeed ZeRO-3, gloo,
fp32, LoRA with the adapter-off reference, the plan's own batch shaping).

- Rank 1 is SIGKILLed once, from outside, after checkpoint-4 is complete. With --max_restarts 1 the launcher stops
  rank 0, relaunches from the newest complete checkpoint and finishes with rc 0; the final adapter weights and the
  per-step losses equal those of the same run left alone (the exact-resume tolerance of test_resume.py, 1e-6),
  and training_metrics.json records the restart (step, cause, seconds lost).
- A rank 1 that is killed at every start ends after --max_restarts 2 restarts (three launches), with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from safetensors.torch import load_file

from support.launched import LaunchedRun, wait_no_leftovers

pytestmark = pytest.mark.slow

STEPS, SAVE = 12, 4
TOL = 1e-6
FINISH_TIMEOUT_S = 480
RUN_ARGS = ("--max_steps", STEPS, "--save_steps", SAVE, "--save_total_limit", 1000)


def _complete(run: LaunchedRun, step: int) -> bool:
    from dpo_dist.util.checkpoint import checkpoint_problems

    ckpt = run.run_dir / "output" / f"checkpoint-{step}"
    return ckpt.is_dir() and not checkpoint_problems(ckpt, world_size=2, deepspeed=True)


def _losses(run: LaunchedRun) -> dict:
    return json.loads((run.run_dir / "output" / "training_metrics.json").read_text())


def test_a_rank_killed_mid_run_is_restarted_and_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_assets):
    straight = LaunchedRun(tmp_path, tiny_assets, *RUN_ARGS, name="straight")
    killed = LaunchedRun(tmp_path, tiny_assets, *RUN_ARGS, launch_extra=("--max_restarts", 1), name="killed")
    try:
        killed.wait_for(lambda: _complete(killed, SAVE), f"complete checkpoint-{SAVE}")
        victim = killed.wait_for(lambda: killed.rank_pid(1), "rank 1 process", timeout=30)
        killed.note_tree()
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        rc_k, _ = killed.wait_exit(FINISH_TIMEOUT_S)
        rc_s, _ = straight.wait_exit(FINISH_TIMEOUT_S)
        assert rc_s == 0, straight.stderr[-3000:]
        assert rc_k == 0, killed.stdout[-4000:] + killed.stderr[-3000:]
        print(f"killed run: restarted and finished {time.monotonic() - t_kill:.0f} s after the kill")
        assert "launch: restart 1/1 after: rank 1 died (signal SIGKILL)" in killed.stdout
        assert "after 1 restart(s)" in killed.stdout

        m_k, m_s = _losses(killed), _losses(straight)
        (restart,) = m_k["restarts"]
        assert restart["step"] >= SAVE and restart["step"] % SAVE == 0 and restart["checkpoint"].endswith(
            f"checkpoint-{restart['step']}")
        assert "rank 1 died (signal SIGKILL)" in restart["cause"] and restart["seconds_lost"] > 0
        assert m_k["steps"] == m_s["steps"] == STEPS
        lk, ls = m_k["train_loss_by_step"], m_s["train_loss_by_step"]
        assert lk.keys() == ls.keys() and len(lk) == STEPS
        loss_diff = max(abs(lk[k] - ls[k]) for k in ls)
        wk = load_file(str(killed.run_dir / "output" / "adapter_model.safetensors"))
        ws = load_file(str(straight.run_dir / "output" / "adapter_model.safetensors"))
        assert wk.keys() == ws.keys() and wk
        weight_diff = max((wk[k] - ws[k]).abs().max().item() for k in ws)
        print(f"restart: resumed from step {restart['step']}, seconds lost {restart['seconds_lost']}, "
              f"max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e} ({len(ws)} tensors)")
        assert loss_diff <= TOL and weight_diff <= TOL
        assert not wait_no_leftovers(str(killed.run_dir), killed.seen)
    finally:
        straight.cleanup()
        killed.cleanup()


def test_a_rank_that_dies_at_every_start_gives_up_after_max_restarts(tmp_path, tiny_assets):
    run = LaunchedRun(tmp_path, tiny_assets, launch_extra=("--max_restarts", 2), name="doomed")
    killed, first_seen = [], {}
    try:
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while run.proc.poll() is None and time.monotonic() < deadline:
            pid = run.rank_pid(1)
            # Killed while it starts up (importing, loading), once it has lived a second: a rank killed within its
            # first moments can be reaped before the launcher's watch has seen it, and then cannot be named.
            if pid is not None and pid not in killed and time.monotonic() - first_seen.setdefault(pid, time.monotonic()) > 1.0:
                run.note_tree()
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)
        rc, _ = run.wait_exit(30)
        print(f"dies at every start: {len(killed)} launches killed, rc {rc}: {run.stderr.strip().splitlines()[-1]}")
        assert rc != 0
        assert len(killed) == 3  # the first launch and two restarts: not a loop
        assert run.stdout.count("launch: restart ") == 2
        assert "gave up after 2 restart(s) (--max_restarts 2)" in run.stderr
        assert "rank 1 died (signal SIGKILL)" in run.stderr
        restarts = json.loads((run.run_dir / "restarts.json").read_text())
        assert [r["restart"] for r in restarts] == [1, 2]
        assert all(r["cause"].startswith("rank 1 died (signal SIGKILL)") for r in restarts), restarts
        assert not wait_no_leftovers(str(run.run_dir), run.seen)
    finally:
        run.cleanup()
