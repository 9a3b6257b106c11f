"""The restart supervisor and the spawn's failure kinds, with fake launches and fake ranks (no torch)."""

from __future__ import annotations

import errno
import json
import sys
import textwrap
import time
from pathlib import Path

from conftest import free_port
from dpo_dist.util.layout import METRICS_FILE
from launch.spawn import FAILED, HANG, NO_SPACE, OK, STOPPED, SpawnResult, spawn
from launch.supervise import record_restarts_in_metrics, supervise


def _complete_checkpoint(out: Path, step: int) -> Path:
    """A checkpoint folder that util.checkpoint takes as complete for one rank (a ZeRO-0 DeepSpeed engine state)."""
    ckpt = out / f"checkpoint-{step}"
    (ckpt / f"global_step{step}").mkdir(parents=True)
    (ckpt / "latest").write_text(f"global_step{step}")
    (ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name in ("model.safetensors", "scheduler.pt", "rng_state.pth"):
        (ckpt / name).write_bytes(b"x")
    return ckpt


class FakeLaunches:
    def __init__(self, results):
        self.results = list(results)
        self.calls: list[list[str]] = []

    def __call__(self, more):
        self.calls.append(list(more))
        return self.results.pop(0)


def test_a_dead_rank_is_restarted_from_the_newest_complete_checkpoint_skipping_a_torn_one(tmp_path):
    out = tmp_path / "output"
    good = _complete_checkpoint(out, 4)
    torn = out / "checkpoint-8"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")  # the rank died while writing: no trainer_state.json
    launches = FakeLaunches([SpawnResult(137, "rank 1 died (signal SIGKILL); the other ranks were stopped", FAILED),
                             SpawnResult(0)])
    logged = []
    result, restarts = supervise(launches, output_dir=out, world_size=1, deepspeed=False, max_restarts=1,
                                 record=tmp_path / "restarts.json", log=logged.append)
    assert result.returncode == 0
    assert launches.calls == [[], ["--resume_from_checkpoint", str(good)]]
    (r,) = restarts
    assert (r.restart, r.step, r.checkpoint) == (1, 4, str(good))
    assert "rank 1 died" in r.cause and r.seconds_lost >= 0
    assert r.skipped and r.skipped[0].startswith("checkpoint-8: trainer_state.json is missing")
    assert any("skipping torn checkpoint" in line and "checkpoint-8" in line for line in logged)
    assert json.loads((tmp_path / "restarts.json").read_text())[0]["step"] == 4


def test_a_rank_that_dies_at_every_start_stops_after_max_restarts_with_the_reason(tmp_path):
    dead = SpawnResult(1, "rank 0 died (exit code 1); the other ranks were stopped", FAILED)
    launches = FakeLaunches([dead] * 10)
    result, restarts = supervise(launches, output_dir=tmp_path / "output", world_size=2, deepspeed=True,
                                 max_restarts=2, log=lambda _: None)
    assert len(launches.calls) == 3 and len(restarts) == 2  # the first launch and two restarts, no loop
    assert launches.calls[1] == ["--overwrite_output_dir"]  # no checkpoint yet: from the start, same folder
    assert result.returncode == 1
    assert "gave up after 2 restart(s) (--max_restarts 2)" in result.failed
    assert "rank 0 died (exit code 1)" in result.failed


def test_no_restart_for_a_usage_error_a_stop_or_by_default(tmp_path):
    for result, max_restarts, why in [
        (SpawnResult(2, "rank 0 died (exit code 2)", FAILED), 3, "refused their arguments"),
        (SpawnResult(143, "stopped by signal SIGTERM", STOPPED), 3, None),
        (SpawnResult(1, "rank 1 died", FAILED), 0, None),
    ]:
        launches = FakeLaunches([result])
        got, restarts = supervise(launches, output_dir=tmp_path, world_size=1, deepspeed=False,
                                  max_restarts=max_restarts, log=lambda _: None)
        assert len(launches.calls) == 1 and not restarts
        assert got.returncode == result.returncode
        if why:
            assert why in got.failed


def test_a_full_disk_is_named_and_not_restarted(tmp_path, monkeypatch):
    import launch.supervise as sup

    monkeypatch.setattr(sup, "no_space_message", lambda p: f"no space left on {p} (0 bytes free). Free space there")
    launches = FakeLaunches([SpawnResult(1, "rank 0 died (exit code 1)", FAILED)])
    got, restarts = supervise(launches, output_dir=tmp_path, world_size=1, deepspeed=False, max_restarts=3,
                              disk_paths=[tmp_path], log=lambda _: None)
    assert len(launches.calls) == 1 and not restarts
    assert got.kind == NO_SPACE and got.failed.startswith(f"no space left on {tmp_path}")


def test_restarts_go_into_training_metrics(tmp_path):
    from launch.supervise import Restart

    (tmp_path / METRICS_FILE).write_text(json.dumps({"steps": 12}))
    record_restarts_in_metrics(tmp_path, [Restart(1, "rank 1 died", 4, "x/checkpoint-4", [], 7.5)])
    m = json.loads((tmp_path / METRICS_FILE).read_text())
    assert m["steps"] == 12
    assert m["restarts"] == [{"restart": 1, "cause": "rank 1 died", "step": 4, "checkpoint": "x/checkpoint-4",
                              "skipped": [], "seconds_lost": 7.5}]


# --- the spawn's side: hangs and writes that fail -------------------------------------------------------------

def test_a_silent_job_is_a_hang_and_is_stopped():
    t0 = time.monotonic()
    r = spawn([[sys.executable, "-c", "import time; print('start', flush=True); time.sleep(60)"]], {},
              idle_timeout_s=1.5, grace_s=2)
    assert r.kind == HANG and r.returncode != 0
    assert "no output from any rank for 2 s" in r.failed
    assert time.monotonic() - t0 < 15


class _FullDisk:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass


CHATTY = textwrap.dedent("""
    import sys
    for i in range(20000):
        sys.stdout.write("x" * 100 + "\\n")
    print("done", flush=True)
""")


def test_a_console_that_cannot_be_written_never_stalls_the_ranks():
    """Without the fix the pump thread dies at the first failed write, the pipe fills (64 KiB) and the rank blocks
    for ever; 2 MB of output must go through."""
    t0 = time.monotonic()
    r = spawn([[sys.executable, "-c", CHATTY]], {}, sink=_FullDisk(), idle_timeout_s=20)  # a stall: HANG
    assert r.returncode == 0 and r.kind == OK
    assert time.monotonic() - t0 < 30


def test_a_launch_log_on_a_full_disk_stops_the_ranks_with_one_clear_error():
    t0 = time.monotonic()
    r = spawn([[sys.executable, "-c", "import time\nwhile True: print('step', flush=True); time.sleep(0.1)"]], {},
              log_path=Path("/dev/full"), grace_s=2, sink=_Quiet())
    assert r.kind == NO_SPACE and r.returncode == 1
    assert "cannot write the launch log /dev/full (No space left on device), so the ranks were stopped: " \
           "no space left on /dev" in r.failed
    assert time.monotonic() - t0 < 15


class _Quiet:
    def write(self, text):
        pass

    def flush(self):
        pass


def test_launch_train_relaunches_with_the_checkpoint_and_records_the_restart(tmp_path, monkeypatch, capsys):
    """cmd_train's wiring, with the spawn faked: the relaunch's command resumes from the checkpoint, and
    training_metrics.json and restarts.json get the restart."""
    import launch.cli as cli

    run_dir = tmp_path / "run"
    calls = []

    def fake_spawn(commands, env, **kw):
        calls.append([list(c) for c in commands])
        if len(calls) == 1:
            _complete_checkpoint(run_dir / "output", 6)
            return SpawnResult(137, "rank 1 died (signal SIGKILL); the other ranks were stopped", FAILED)
        (run_dir / "output" / METRICS_FILE).write_text(json.dumps({"steps": 10}))
        return SpawnResult(0)

    monkeypatch.setattr(cli, "spawn", fake_spawn)
    rc = cli.main(["train", "--model", "google/gemma-3-270m", "--hardware", "cpu", "--cards", "1",
                   "--run_dir", str(run_dir), "--max_restarts", "1", "--master_port", str(free_port())])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert len(calls) == 2
    first, second = calls[0][0], calls[1][0]
    assert "--resume_from_checkpoint" not in first
    assert second[-2:] == ["--resume_from_checkpoint", str(run_dir / "output" / "checkpoint-6")]
    assert json.loads((run_dir / "output" / METRICS_FILE).read_text())["restarts"][0]["step"] == 6
    assert json.loads((run_dir / "restarts.json").read_text())[0]["cause"].startswith("rank 1 died")
    assert "done after 1 restart(s)" in out.out

    rc = cli.main(["train", "--model", "google/gemma-3-270m", "--hardware", "cpu", "--cards", "1",
                   "--run_dir", str(tmp_path / "other"), "--max_restarts", "-1"])
    assert rc == 2 and "--max_restarts must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_rank_stopped_by_the_launcher_is_not_named_as_the_one_that_died():
    """A rank that died before the watch saw it: DeepSpeed's launcher reports its code (-9) and SIGTERMs the others.
    The SIGTERMed rank must not be named as the rank that died."""
    import signal as sig

    from launch.spawn import RankWatch, _failure_message

    watch = RankWatch([])
    watch.ranks = {101: (0, 1)}  # only rank 0 was seen
    watch.ended = {101: (3, sig.SIGTERM)}  # ended by the launcher's SIGTERM
    msg = _failure_message(watch, [{"code": -9}])
    assert msg.startswith("a rank died (signal SIGKILL; which one is not visible from here)"), msg
    assert "rank 0" not in msg
    # A rank seen dying of its own signal is named, unless a rank of this node was never seen (it may be the one).
    watch.ended = {101: (3, sig.SIGKILL)}
    assert _failure_message(watch, [{"code": -9}], expected_ranks=1).startswith("rank 0 died (signal SIGKILL)")
    assert _failure_message(watch, [{"code": -9}], expected_ranks=2).startswith("a rank died (signal SIGKILL; which")
