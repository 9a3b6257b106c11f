"""Resharding for real: a 2-rank DeepSpeed ZeRO-3 run on CPU (gloo, fp32) continued on 1 rank, then on 2 again.

Run A trains straight: the shared 2-rank ZeRO-3 run of the tiny Llama (conftest.zero3_run, 30 steps, 4 pairs per
rank and micro-step, global batch 8). Run B, with the same arguments, is cut twice by the test-only hook
$DPO_DIST_STOP_AFTER_STEP (which saves a checkpoint and stops without touching max_steps, so the LR schedule is the
30-step run's):

- B1: 2 ranks, steps 1-10 (checkpoint-10, ZeRO-3 shards of 2 ranks);
- B2: 1 rank, `--resume_from_checkpoint latest`, steps 11-20: 2 -> 1. The rank entry converts checkpoint-10 with
  DeepSpeed's ds_to_universal, loads it with `load_universal` and scales the accumulation 1 -> 2;
- B3: 2 ranks, `--resume_from_checkpoint latest`, steps 21-30: 1 -> 2 (accumulation 2 -> 1).

For full fine-tuning and LoRA (adapter trainable, base frozen): the loss right after each reshard (steps 11 and 21)
and at every step after it matches A's within TOL, the global step, the LR of every step and the pairs per step carry
over, the logs say what was converted, and the final weights match A's within TOL.

TOL = 1e-6 (fp32; the same as the exact-resume test). Each step sees the same pairs in the same micro-batches
(dpo_dist.train.reshard explains why), and the loss right after a reshard is computed from the checkpoint's fp32
master weights. What changes with the number of ranks is the order of reductions only: where the two micro-batch
gradients of a step are summed (all-reduce across ranks, or one rank's accumulation; a sum of two terms is the same
either way) and how the gradient norm for clipping is summed (over one partition or two), a difference in the last
bits of fp32 (~1e-7 relative). In the trial runs the curves agreed bit for bit. A reshard that lost state would
show far above 1e-6: without the repair of DeepSpeed's shared Adam step counter (reshard.unshare_step_counters),
the second step after the reshard was already 4e-6 off.

The launches of both modes run concurrently, each under a hard timeout that kills its whole process group.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from conftest import PY, ROOT, ZERO3_STEPS, cpu_env, read_json, run_main, run_ranks, zero3_args

pytestmark = pytest.mark.slow

CUT1, CUT2, STEPS = 10, 20, ZERO3_STEPS
GLOBAL_BATCH = 8  # 2 ranks x 4 pairs x 1 accumulation step (conftest.zero3_args)
TOL = 1e-6
MODES = ("full", "lora")

# As in test_resume.py: the venv's ninja first on PATH and this checkout's extension cache, so that DeepSpeed's
# CPU comm op is not rebuilt at every rank start.
ENV = cpu_env(TORCH_EXTENSIONS_DIR=ROOT / ".cache" / "torch_extensions",
              PATH=str(Path(PY).parent) + os.pathsep + os.environ.get("PATH", ""))


def _launch(tiny_assets, zero3_config, out, mode, nproc, stop, extra=()):
    args = zero3_args(tiny_assets, zero3_config, out, "llama", mode, extra)
    env = {**ENV, "DPO_DIST_STOP_AFTER_STEP": str(stop)} if stop else ENV
    t0 = time.monotonic()
    res = run_ranks(args, nproc=nproc, timeout=420, env=env)
    res.seconds = time.monotonic() - t0
    return res


def _phase(jobs: dict) -> dict:
    """Run {name: thunk} concurrently; {name: result}."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets, zero3_config, zero3_run):
    tmp = tmp_path_factory.mktemp("reshard")
    a = {m: zero3_run("llama", m) for m in MODES}
    b = {m: tmp / f"{m}_B" for m in MODES}
    t0 = time.monotonic()
    resume = ["--resume_from_checkpoint", "latest"]
    plan = [("B1", 2, CUT1, ()), ("B2", 1, CUT2, resume), ("B3", 2, None, resume)]
    results, metrics, folders, prev = {}, {}, {}, None
    live = list(MODES)  # a mode whose part failed does not go on
    for part, nproc, stop, extra in plan:
        done = _phase({f"{m}_{part}": partial(_launch, tiny_assets, zero3_config, b[m], m, nproc, stop, extra)
                       for m in live})
        results.update(done)
        live = [m for m in live if done[f"{m}_{part}"].returncode == 0]
        metrics.update({f"{m}_{part}": read_json(b[m] / "training_metrics.json") for m in live})
        if extra:  # what the resume left in the checkpoint it converted (the next part's save may rotate it away)
            folders.update({f"{m}_{part}": _files(b[m] / f"checkpoint-{prev}") for m in live})
        prev = stop
    print(f"reshard runs: {time.monotonic() - t0:.0f} s in all; "
          + ", ".join(f"{k} {r.seconds:.0f} s" for k, r in results.items()))
    return SimpleNamespace(a=a, b=b, results=results, metrics=metrics, folders=folders)


def _files(folder: Path) -> dict[str, str | None]:
    """Every file under folder: the text of the small tag files, None for the rest."""
    return {str(p.relative_to(folder)): p.read_text() if p.name.startswith("latest") else None
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _ok(runs, name):
    assert name in runs.results, f"{name} did not run: an earlier part failed"
    res = runs.results[name]
    assert res.returncode == 0, f"{name} failed ({res.returncode}):\n{res.stdout[-6000:]}"
    return res.stdout


def _losses(metrics) -> dict[int, float]:
    return {int(k): v for k, v in metrics["train_loss_by_step"].items()}


def _lrs(trainer_state: Path) -> dict[int, float]:
    history = json.loads(trainer_state.read_text())["log_history"]
    return {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}


@pytest.mark.parametrize("mode", MODES)
def test_reshard_logs_the_conversion_and_keeps_the_global_batch(runs, mode):
    out = {part: _ok(runs, f"{mode}_{part}") for part in ("B1", "B2", "B3")}
    for part, ckpt, step, frm, to, accum in (("B2", f"checkpoint-{CUT1}", CUT1, 2, 1, "1 -> 2"),
                                               ("B3", f"checkpoint-{CUT2}", CUT2, 1, 2, "2 -> 1")):
        text = out[part]
        assert f"resharding {runs.b[mode] / ckpt} from {frm} to {to} ranks (ZeRO-3): gradient_accumulation_steps " \
               f"{accum} keeps the global batch at {GLOBAL_BATCH} pairs (4 per rank and micro-step)" in text, text[-4000:]
        assert f"converted {runs.b[mode] / ckpt}/global_step{step} (saved by {frm} ranks) to DeepSpeed's universal " \
               f"checkpoint global_step{step}_universal" in text, text[-4000:]
        files = runs.folders[f"{mode}_{part}"]
        assert files["latest_universal"] == f"global_step{step}_universal"
        assert f"global_step{step}_universal/zero/optimizer_state.pt" in files
        assert f"global_step{step}_universal/zero_pp_rank_0_mp_rank_00_model_states.pt" in files
        assert not any(name.startswith(".universal-partial") for name in files)
        # The ZeRO shards as saved stay, for a resume at the saved number of ranks.
        assert files["latest"] == f"global_step{step}"
        assert f"global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
    assert "resharding" not in out["B1"]

    m1, m2, m3 = (runs.metrics[f"{mode}_{p}"] for p in ("B1", "B2", "B3"))
    assert (m1["world_size"], m2["world_size"], m3["world_size"]) == (2, 1, 2)
    assert (m1["steps"], m2["steps"], m3["steps"]) == (CUT1, CUT2, STEPS)
    # The pairs each part trained (summed over its ranks): the global batch per step on either number of ranks.
    assert m2["pairs_trained"] == (CUT2 - CUT1) * GLOBAL_BATCH
    assert m3["pairs_trained"] == (STEPS - CUT2) * GLOBAL_BATCH


@pytest.mark.parametrize("mode", MODES)
def test_loss_continues_the_uninterrupted_curve(runs, mode):
    for part in ("B1", "B2", "B3"):
        _ok(runs, f"{mode}_{part}")
    a = read_json(runs.a[mode] / "training_metrics.json")
    assert (a["world_size"], a["zero_stage"], a["use_peft"], a["steps"]) == (2, 3, mode == "lora", STEPS)
    la = _losses(a)
    l1, l2, l3 = (_losses(runs.metrics[f"{mode}_{p}"]) for p in ("B1", "B2", "B3"))
    # Each resumed part's history carries the steps before its checkpoint.
    assert sorted(l2) == list(range(1, CUT2 + 1)) and sorted(l3) == list(range(1, STEPS + 1))
    assert all(l2[s] == l1[s] for s in range(1, CUT1 + 1)) and all(l3[s] == l2[s] for s in range(1, CUT2 + 1))
    b = {**l1, **{s: l2[s] for s in range(CUT1 + 1, CUT2 + 1)}, **{s: l3[s] for s in range(CUT2 + 1, STEPS + 1)}}
    diffs = {s: abs(la[s] - b[s]) for s in la}
    for s in (CUT1 + 1, CUT2 + 1):
        print(f"{mode}: step {s} (right after the reshard): A {la[s]:.9f}, B {b[s]:.9f}, |diff| {diffs[s]:.3g}")
    print(f"{mode}: max |loss A - loss B| over steps 1-{STEPS} = {max(diffs.values()):.3g} (TOL {TOL:g})")
    assert diffs[CUT1 + 1] <= TOL and diffs[CUT2 + 1] <= TOL, diffs
    assert max(diffs.values()) <= TOL, diffs
    assert la[STEPS] < la[1], "training did not lower the loss"

    # The LR schedule carried over: every logged step's LR equals A's (the 30-step linear schedule).
    lr_a = _lrs(runs.a[mode] / f"checkpoint-{STEPS}" / "trainer_state.json")
    lr_b = _lrs(runs.b[mode] / f"checkpoint-{STEPS}" / "trainer_state.json")
    assert sorted(lr_a) == sorted(lr_b) == list(range(1, STEPS + 1))
    assert lr_a == lr_b, {s: (lr_a[s], lr_b[s]) for s in lr_a if lr_a[s] != lr_b[s]}
    print(f"{mode}: LR at steps {CUT1 + 1}, {CUT2 + 1}: {lr_b[CUT1 + 1]:.6g}, {lr_b[CUT2 + 1]:.6g} (A: the same)")

    name = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    wa, wb = load_file(str(runs.a[mode] / name)), load_file(str(runs.b[mode] / name))
    assert wa and wa.keys() == wb.keys() and all(t.numel() > 0 for t in wa.values())
    wdiff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    print(f"{mode}: max |weight A - weight B| = {wdiff:.3g} over {len(wa)} tensors")
    assert wdiff <= TOL


def test_reshard_that_cannot_keep_the_global_batch_is_refused(runs, tiny_assets, zero3_config):
    """3 ranks cannot carry the global batch of 8 (2 ranks x 4 pairs x 1 step): refused by the rank entry before the
    trainer or any model is set up, with the numbers and the fix, and nothing in the output folder changes."""
    _ok(runs, "full_B3")
    from dpo_dist.train.dpo import main

    folder = runs.b["full"]
    before = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}
    args = zero3_args(tiny_assets, zero3_config, folder, "llama", "full", ["--resume_from_checkpoint", "latest"])
    res = run_main(main, args, env={**ENV, "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"})
    text = res.stdout
    assert res.returncode == 2, text[-3000:]
    assert f"--resume_from_checkpoint latest: {folder / f'checkpoint-{STEPS}'} (saved by 2 ranks; this run has 3)" \
        in text, text[-3000:]
    assert "its global batch is 8 pairs (2 ranks x 4 pairs x 1 accumulation steps)" in text, text[-3000:]
    assert "Launch with a number of ranks that divides 2 (1, 2)" in text and "Nothing was changed" in text
    assert "dpo_dist: backend=" not in text, "the trainer was set up before the reshard was checked"
    after = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}
    assert after == before
