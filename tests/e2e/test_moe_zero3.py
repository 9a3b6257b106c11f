"""Mixture of experts under ZeRO-3 on 2 CPU ranks (gloo), with forced routing: rank 1 never routes a token to
expert 3 (tests.support.moe_skew_rank), the case that desynchronises ZeRO-3's parameter gathers.

Tiny Mixtral and Qwen2-MoE twins (tests.support.moe_twins: 4 experts, top-1), full fine-tuning (sharded reference)
and LoRA (adapter-off reference), 20 steps:

- without the leaf-module flag (``DPO_DIST_TEST_NO_MOE_LEAF=1``, test only) the ranks desynchronise: rank 0 gathers
  expert 3, rank 1 gathers the next module. gloo checks message sizes, so this shows either as a hang (killed at
  the deadline) or as gloo's "collective mismatch" abort; on NCCL/HCCL it is the reported hang;
- with it (dpo_dist/model/moe.py, the default) the run finishes and the loss falls;
- the merge post-step gathers (ZeRO checkpoint) or merges (adapter) the MoE model and verifies it.

The DeepSpeed config drops DeepSpeed 0.19's own default leaf list (``zero_optimization.leaf_module.classes: []``),
so that dpo-dist's flag is the only remedy, as under the Gaudi image's DeepSpeed, which has no such default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import PY, read_json, run_main
from dpo_dist.backend import cleanup_shm_buffers
from dpo_dist.model.moe import NO_LEAF_ENV
from tests.support.moe_twins import SKEW, SKEW_ENV, build_moe_twin
from tests.support.testing_utils import ROOT, cpu_env, free_port

pytestmark = pytest.mark.slow

CASES = [("mixtral", "full"), ("mixtral", "lora"), ("qwen2_moe", "full"), ("qwen2_moe", "lora")]
IDS = [f"{f}-{m}" for f, m in CASES]
STEPS = 20
DESYNC_DEADLINE_S = 90  # a run without the flag that is still alive then has hung
RUN_TIMEOUT_S = 240
# What gloo says when the ranks' collectives no longer pair up (the rank that received a message of the wrong
# size aborts; the other loses its peer).
DESYNC_MARKERS = ("distributed collective mismatch", "Connection reset by peer")


@pytest.fixture(scope="module")
def moe_setup(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    models = {f: build_moe_twin(f, tiny_assets.llama_dir, root / f) for f in ("mixtral", "qwen2_moe")}
    cfg = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["leaf_module"] = {"classes": []}  # no DeepSpeed default: dpo-dist's flag only
    ds_config = root / "zero3-no-default-leaves.json"
    ds_config.write_text(json.dumps(cfg, indent=2))
    return root, models, ds_config


def _args(moe_setup, tiny_assets, family, mode, out):
    _, models, ds_config = moe_setup
    args = [
        "--model_name_or_path", models[family], "--dataset_name", tiny_assets.data_dir, "--output_dir", out,
        "--deepspeed", ds_config, "--max_steps", STEPS, "--save_steps", STEPS, "--logging_steps", 1,
        "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8,
        "--learning_rate", 2e-3 if mode == "lora" else 1e-3, "--max_length", 128, "--max_prompt_length", 64,
        "--max_train_samples", 200, "--max_eval_samples", 16, "--beta", 0.1, "--seed", 7,
        "--dist_timeout", 600,  # longer than the deadline: a desynchronised run hangs rather than times out
        "--no_merge",  # test_moe_merge runs the merge on the outputs
    ]
    if mode == "lora":
        args += ["--use_peft", "--lora_r", 8, "--lora_alpha", 16]
    return [str(a) for a in args]


def _launch(args, *, leaf_flag: bool, deadline: float) -> dict:
    """2 ranks of tests.support.moe_skew_rank; on the deadline the whole process group is killed (no test fail)."""
    port = str(free_port())
    argv = [PY, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port", port,
            "--module", "tests.support.moe_skew_rank", *args]
    env = cpu_env(**{SKEW_ENV: SKEW})
    env.pop(NO_LEAF_ENV, None)
    if not leaf_flag:
        env[NO_LEAF_ENV] = "1"
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    finally:
        cleanup_shm_buffers(port)  # DeepSpeed's CPU all-reduce buffers of killed ranks stay in /dev/shm
    return dict(rc=None if timed_out else proc.returncode, timed_out=timed_out, out=out,
                seconds=time.monotonic() - start)


@pytest.fixture(scope="module")
def moe_run(moe_setup, tiny_assets):
    """``moe_run(family, mode, leaf_flag)``: one 2-rank run, launched once per module."""
    root = moe_setup[0]
    done: dict = {}

    def get(family, mode, leaf_flag):
        key = (family, mode, leaf_flag)
        if key not in done:
            out = root / f"run-{family}-{mode}-{'leaf' if leaf_flag else 'noleaf'}"
            res = _launch(_args(moe_setup, tiny_assets, family, mode, out), leaf_flag=leaf_flag,
                          deadline=RUN_TIMEOUT_S if leaf_flag else DESYNC_DEADLINE_S)
            res["dir"] = out
            done[key] = res
        return done[key]

    return get


@pytest.mark.parametrize("family,mode", CASES, ids=IDS)
def test_moe_zero3_without_leaf_flag_desyncs(moe_run, family, mode):
    r = moe_run(family, mode, False)
    out = r["out"]
    assert f"{NO_LEAF_ENV}=1 (test only)" in out, out[-4000:]
    assert f"expert {SKEW.split(':')[1]} never routed to" in out, out[-4000:]
    how = "hung, killed at the deadline" if r["timed_out"] else f"rc {r['rc']}"
    print(f"\n{family}/{mode} without the leaf flag: {how} after {r['seconds']:.0f}s")
    assert r["timed_out"] or (r["rc"] != 0 and any(m in out for m in DESYNC_MARKERS)), (
        f"expected a hang or gloo's collective mismatch, got rc {r['rc']}:\n{out[-6000:]}")
    assert not (r["dir"] / "training_metrics.json").exists()


@pytest.mark.parametrize("family,mode", CASES, ids=IDS)
def test_moe_zero3_with_leaf_flag_trains(moe_run, family, mode):
    r = moe_run(family, mode, True)
    out = r["out"]
    assert r["rc"] == 0, out[-6000:]
    assert f"expert {SKEW.split(':')[1]} never routed to" in out
    block = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock"}[family]
    # rank 0 logs each model it flags: the policy, and for full fine-tuning the sharded reference
    flagged = [line for line in out.splitlines() if "[rank0]" in line and f"2 {block} blocks are leaf modules" in line]
    assert len(flagged) == (2 if mode == "full" else 1), flagged
    m = read_json(r["dir"] / "training_metrics.json")
    assert m["world_size"] == 2 and m["zero_stage"] == 3 and m["steps"] == STEPS
    assert m["reference"] == ("adapter" if mode == "lora" else "sharded")
    print(f"\n{family}/{mode} with the leaf flag: loss {m['first_train_loss']:.4f} -> {m['last_train_loss']:.4f}, "
          f"held-out accuracy {m['eval_reward_accuracy']:.3f}, run {r['seconds']:.0f}s")
    assert m["last_train_loss"] < m["first_train_loss"] - 0.1, m["train_losses"]


@pytest.mark.parametrize("family,mode", CASES, ids=IDS)
def test_moe_merge_gathers_and_verifies(moe_run, moe_setup, tmp_path, family, mode):
    from safetensors import safe_open

    from dpo_dist.post.merge import main

    r = moe_run(family, mode, True)
    assert r["rc"] == 0, r["out"][-6000:]
    # full: the ZeRO-3 checkpoint, gathered from its shards; LoRA: the adapter on its base model
    source = r["dir"] / f"checkpoint-{STEPS}" if mode == "full" else r["dir"]
    merged = tmp_path / "merged"
    res = run_main(main, ["--checkpoint", source, "--output", merged], env=cpu_env())
    assert res.returncode == 0, res.stdout[-6000:]
    report = read_json(merged / "merge_report.json")
    assert report["kind"] == ("zero" if mode == "full" else "adapter")
    v = report["verification"]
    print(f"\n{family}/{mode} merge ({report['kind']}): {report['params']} params, max logit diff "
          f"{v['max_logit_diff']:.3g} <= {v['tolerance']:.3g}")
    assert v["max_logit_diff"] <= v["tolerance"] and v["roundtrip_max_logit_diff"] <= v["roundtrip_tolerance"], v
    with safe_open(str(moe_setup[1][family] / "model.safetensors"), "pt") as f:  # the twin: every expert
        base_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert report["params"] == base_params
    assert read_json(merged / "config.json")["model_type"] == family


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
