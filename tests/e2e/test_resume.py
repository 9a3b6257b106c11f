"""Exact resume, for real: 2 ranks, DeepSpeed ZeRO-3 on CPU (gloo), fp32.

Run A trains straight: the shared 2-rank ZeRO-3 run of the tiny Llama (conftest.zero3_run, 30 steps). Run B, with
the same arguments, is cut in two by the test-only hook $DPO_DIST_STOP_AFTER_STEP=15 (which saves checkpoint-15 and
stops without touching max_steps, so the linear LR schedule is the one of the 30-step run), then resumed with
`--resume_from_checkpoint latest` to step 30. The unrounded per-step train losses
(`train_loss_by_step`) and the final weights of A and B must agree to 1e-6, for full fine-tuning and for LoRA.

Also: a resume that cannot be exact is refused up front (no checkpoint, a missing ZeRO shard, a truncated
trainer_state.json), with a message naming the checkpoint and what is missing, a non-zero exit, and the output
folder left exactly as it was.

To stay within a few minutes on two shared cores, independent launches run concurrently (each under a hard
timeout that kills its whole process group).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from conftest import PY, ROOT, ZERO3_STEPS, cpu_env, free_port, read_json, run_main, zero3_args

pytestmark = pytest.mark.slow

STEPS, CUT = ZERO3_STEPS, ZERO3_STEPS // 2
CKPT, GS = f"checkpoint-{CUT}", f"global_step{CUT}"  # the cut's checkpoint and its ZeRO shards
TOL = 1e-6
LAUNCH_TIMEOUT = 420

# DeepSpeed JIT-builds its shm comm op at every process-group start unless its cache is current. Two ninjas
# are installed (system 1.11: log v5, MurmurHash; the venv's 1.13: log v7, rapidhash): each takes the other's
# log entries for a changed command and rebuilds (15-150 s on two busy cores). So: the venv's ninja first on
# PATH (as `python -m launch train` does), and a cache of this checkout's own.
ENV = cpu_env(TORCH_EXTENSIONS_DIR=ROOT / ".cache" / "torch_extensions",
              PATH=str(Path(PY).parent) + os.pathsep + os.environ.get("PATH", ""))


def _dpo_args(tiny_assets, zero3_config, out_dir, mode, extra=()):
    """The shared run's arguments (conftest.zero3_args): B must be A with a cut."""
    return [str(a) for a in zero3_args(tiny_assets, zero3_config, out_dir, "llama", mode, extra)]


class Launch:
    """`deepspeed --num_accelerators 2 --module dpo_dist.dpo ARGS` in its own session, output to a file."""

    def __init__(self, name, args, tmp, **env):
        self.name = name
        self.log = tmp / f"{name}.log"
        self._fh = open(self.log, "w")
        argv = [PY, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port", str(free_port()),
                "--module", "dpo_dist.dpo", *args]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**ENV, **env}, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.t0 = time.monotonic()

    def wait(self, timeout=LAUNCH_TIMEOUT):
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._fh.close()
            pytest.fail(f"{self.name}: timed out after {timeout}s\n{self.output[-4000:]}")
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # nothing of this launch outlives it
            except ProcessLookupError:
                pass
        self._fh.close()
        self.seconds = time.monotonic() - self.t0
        return self

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def rc(self) -> int:
        return self.proc.returncode


def _wait_all(launches):
    try:
        for launch in launches:
            launch.wait()
    finally:
        for launch in launches:
            if launch.proc.poll() is None:
                os.killpg(launch.proc.pid, signal.SIGKILL)
                launch.proc.wait()
    return launches


def _ok(launch):
    assert launch.rc == 0, f"{launch.name} failed ({launch.rc}):\n{launch.output[-6000:]}"


def _snapshot(folder: Path) -> dict:
    """Every file under folder with its size and mtime: proves nothing was written, deleted or replaced."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets, zero3_config, zero3_run):
    tmp = tmp_path_factory.mktemp("resume")
    out = {m: {"A": zero3_run("llama", m), "B": tmp / f"{m}_B"} for m in ("full", "lora")}
    t0 = time.monotonic()

    # Phase 1: B1 (cut after step CUT), both modes, concurrently.
    phase1 = [Launch(f"{m}_B1", _dpo_args(tiny_assets, zero3_config, out[m]["B"], m), tmp,
                     DPO_DIST_STOP_AFTER_STEP=str(CUT)) for m in ("full", "lora")]
    _wait_all(phase1)
    launches = {x.name: x for x in phase1}
    phase1_ok = {m: launches[f"{m}_B1"].rc == 0 for m in out}
    b1_metrics = {m: read_json(out[m]["B"] / "training_metrics.json") for m in out if phase1_ok[m]}
    _ok(launches["full_B1"])  # the broken copies below are made from it

    # Copies of B1's output (before B2 touches it) that are broken in one way each, plus a folder with no checkpoint.
    bad = {}
    for case in ("missing_shard", "truncated_state"):
        bad[case] = tmp / f"bad_{case}"
        shutil.copytree(out["full"]["B"], bad[case])
    (bad["missing_shard"] / CKPT / GS / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    state = bad["truncated_state"] / CKPT / "trainer_state.json"
    state.write_text(state.read_text()[: len(state.read_text()) // 2])
    bad["no_checkpoint"] = tmp / "bad_no_checkpoint"
    bad["no_checkpoint"].mkdir()
    (bad["no_checkpoint"] / "notes.txt").write_text("an earlier run without checkpoints\n")
    before = {case: _snapshot(folder) for case, folder in bad.items()}

    # Phase 2: B2 (resume to STEPS) for both modes, concurrently. The refused resumes stop before any model loads or
    # any rank starts working (the checkpoint check reads names, sizes and JSON): the rank entry's main() in this
    # process, as rank 0 of 2, is that same code.
    phase2 = [Launch(f"{m}_B2", _dpo_args(tiny_assets, zero3_config, out[m]["B"], m,
                                          ["--resume_from_checkpoint", "latest"]), tmp)
              for m in ("full", "lora") if phase1_ok[m]]
    from dpo_dist.train.dpo import main

    refused = {case: run_main(main, _dpo_args(tiny_assets, zero3_config, folder, "full",
                                              ["--resume_from_checkpoint", "latest"]),
                              env={**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
               for case, folder in bad.items()}
    _wait_all(phase2)
    launches.update({x.name: x for x in phase2})
    seconds = time.monotonic() - t0
    print(f"resume runs: {seconds:.0f} s in all; " + ", ".join(f"{x.name} {x.seconds:.0f} s" for x in phase1 + phase2))
    return SimpleNamespace(out=out, launches=launches, b1_metrics=b1_metrics, bad=bad, before=before, refused=refused)


def _losses(metrics) -> dict[int, float]:
    return {int(k): v for k, v in metrics["train_loss_by_step"].items()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_is_exact(runs, mode):
    for part in ("B1", "B2"):
        assert f"{mode}_{part}" in runs.launches, f"{mode}_{part} did not run: an earlier part failed"
        _ok(runs.launches[f"{mode}_{part}"])
    a = read_json(runs.out[mode]["A"] / "training_metrics.json")
    b1 = runs.b1_metrics[mode]
    b2 = read_json(runs.out[mode]["B"] / "training_metrics.json")
    assert (a["world_size"], a["zero_stage"], a["use_peft"]) == (2, 3, mode == "lora")
    assert (a["steps"], b1["steps"], b2["steps"]) == (STEPS, CUT, STEPS)
    # --dist_timeout reached the process group that the collectives run on.
    assert a["dist_timeout_s"] == b2["dist_timeout_s"] == 600.0

    la, lb1, lb2 = _losses(a), _losses(b1), _losses(b2)
    assert sorted(la) == list(range(1, STEPS + 1))
    assert sorted(lb1) == list(range(1, CUT + 1))
    # The resumed run's history carries the steps before the checkpoint (from its trainer_state.json) ...
    assert sorted(lb2) == list(range(1, STEPS + 1))
    assert all(lb2[s] == lb1[s] for s in range(1, CUT + 1))
    # ... and the rounded `train_losses` agree with the unrounded ones.
    assert b2["train_losses"] == [round(lb2[s], 4) for s in range(1, STEPS + 1)]
    # B1 (steps 1..CUT) + B2 (CUT+1..STEPS) against A, step by step.
    b = {**lb1, **{s: lb2[s] for s in range(CUT + 1, STEPS + 1)}}
    diffs = {s: abs(la[s] - b[s]) for s in la}
    print(f"{mode}: max |loss A - loss B| over steps 1-{STEPS} = {max(diffs.values()):.3g}")
    assert max(diffs.values()) <= TOL, diffs
    assert la[STEPS] < la[1], "training did not lower the loss"

    name = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    wa = load_file(str(runs.out[mode]["A"] / name))
    wb = load_file(str(runs.out[mode]["B"] / name))
    assert wa and wa.keys() == wb.keys()
    assert all(t.numel() > 0 for t in wa.values())
    wdiff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    print(f"{mode}: max |weight A - weight B| = {wdiff:.3g} over {len(wa)} tensors")
    assert wdiff <= TOL
    if mode == "lora":  # the adapter was trained and saved (an empty one would agree vacuously)
        assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)


@pytest.mark.parametrize("case,expected", [
    ("no_checkpoint", ["no checkpoint-* folder in"]),
    ("missing_shard", [CKPT, f"{GS}/zero_pp_rank_1_mp_rank_00_model_states.pt is missing"]),
    ("truncated_state", [CKPT, "trainer_state.json is not valid JSON"]),
])
def test_resume_refuses_a_missing_or_broken_checkpoint(runs, case, expected):
    res = runs.refused[case]
    text = res.stdout
    assert res.returncode == 2, text[-3000:]
    assert "--resume_from_checkpoint latest" in text, text[-3000:]
    for needle in expected:
        assert needle in text, (needle, text[-3000:])
    assert "Nothing was changed" in text
    # Refused before any model loaded or any file was written; nothing that existed was touched.
    assert "dpo_dist: backend=" not in text, "the trainer was set up before the checkpoint was checked"
    assert _snapshot(runs.bad[case]) == runs.before[case]


# --- the checkpoint check itself, in-process (no launch) -------------------------------------------------


def _args(output_dir, value="latest"):
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=value, deepspeed="ds.json")


def test_checkpoint_check_cases(runs, tmp_path, monkeypatch):
    from dpo_dist.util.checkpoint import checkpoint_problems, resolve_checkpoint
    from dpo_dist.util.errors import ArgumentError

    monkeypatch.setenv("WORLD_SIZE", "2")
    good = runs.out["full"]["B"] / CKPT
    assert checkpoint_problems(good, world_size=2, deepspeed=True) == []
    # The same checkpoint on 4 ranks is complete too: resharding it is dpo_dist.train.reshard's job (test_reshard_runs.py).
    assert checkpoint_problems(good, world_size=4, deepspeed=True) == []

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(good, out / CKPT)
    assert resolve_checkpoint(_args(out)) == str(out / CKPT)
    assert resolve_checkpoint(_args(out, str(out / CKPT))) == str(out / CKPT)

    # A newer, partial checkpoint (a save cut short): 'latest' names it and points at the complete one.
    newer = out / f"checkpoint-{CUT + 2}"
    shutil.copytree(good, newer)
    shard = newer / GS / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (newer / "rng_state_1.pth").unlink()
    with pytest.raises(ArgumentError) as e:
        resolve_checkpoint(_args(out))
    msg = str(e.value)
    assert str(newer) in msg and "zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated" in msg, msg
    assert "rng_state_1.pth is missing" in msg, msg
    assert f"--resume_from_checkpoint {out / CKPT}" in msg, msg

    # The folder named by DeepSpeed's 'latest' file is gone.
    (newer / "latest").write_text(f"global_step{CUT + 2}")
    assert f"global_step{CUT + 2}/ (named by the 'latest' file) is missing" in checkpoint_problems(newer, 2, True)

    # An explicit path that does not exist.
    with pytest.raises(ArgumentError, match="no such checkpoint folder"):
        resolve_checkpoint(_args(out, str(out / "checkpoint-99")))
