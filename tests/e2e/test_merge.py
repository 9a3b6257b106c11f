"""dpo_dist.merge on real ZeRO-3 training outputs (2 CPU ranks), trained once per session.

Every launch runs under a hard timeout (conftest's run_ranks / run_cmd, or the kill test's own deadline).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PY, ROOT, ZERO3_STEPS, cpu_env, run_main
from conftest import ZERO3_CHECKPOINT as CKPT

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # in-process DeepSpeed imports (zero_to_fp32) stay on CPU

pytestmark = pytest.mark.slow

SECRET = "hf_merge_test_secret_value_42"
TOL = 1e-4


@pytest.fixture(scope="session")
def trained(zero3_run):
    """The shared 2-rank ZeRO-3 runs (conftest.zero3_run), each with its final checkpoint (CKPT)."""
    return zero3_run


def _copy(src: Path, dst: Path, with_checkpoints: bool) -> Path:
    ignore = None if with_checkpoints else shutil.ignore_patterns("checkpoint-*")
    shutil.copytree(src, dst, ignore=ignore)
    return dst


def _cli(*args, env_extra=None):
    """`python -m dpo_dist.merge ARGS`, in this process (conftest.run_main)."""
    from dpo_dist.post.merge import main

    return run_main(main, args, env=cpu_env(**(env_extra or {})))


def _siblings(out: Path) -> list[str]:
    """Leftovers beside `out`: temp folders (<name>.tmp-*) and folders moved aside (.<name>.old-*, <name>.old-*)."""
    return sorted(p.name for pattern in (out.name + ".*", "." + out.name + ".*") for p in out.parent.glob(pattern))


def _load_dir_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _batch(tiny_assets, family):
    """A batch of held-out dialogues, tokenized independently of dpo_dist.merge's own verification batch."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir(family))
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = [json.loads(line) for line in tiny_assets.test_file.read_text().splitlines()[:4]]
    return tok([r["chosen"] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=128)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def _max_diff(a, b, batch) -> float:
    m = batch["attention_mask"].bool()
    return float((a - b).abs()[m].max())


def _causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32, attn_implementation="eager").eval()


def _tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _zero_sd(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))


# ----------------------------------------------------------------------------------------------
# LoRA: merged logits == adapter model logits (Llama and Gemma 3; adapter folder and ZeRO checkpoint)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lora_merge_matches_adapter_model(tmp_path, trained, tiny_assets, family):
    from peft import PeftModel

    from dpo_dist.post.merge import merge_model

    out = trained(family, "lora")
    batch = _batch(tiny_assets, family)
    base = _causal_lm(tiny_assets.model_dir(family))
    base_logits = _logits(base, batch)
    base_params = sum(p.numel() for p in base.parameters())
    adapter_logits = _logits(PeftModel.from_pretrained(base, str(out)).eval(), batch)  # adapter enabled
    assert _max_diff(adapter_logits, base_logits, batch) > 10 * TOL, "the adapter did not change the model"

    for source, kind in ((out, "adapter"), (out / CKPT, "zero+adapter")):
        merged_dir = tmp_path / f"merged-{kind}"
        report = merge_model(source, merged_dir)
        assert report["kind"] == kind
        assert report["params"] == base_params and report["max_logit_diff"] <= report["tolerance"] <= 2e-4
        merged = _causal_lm(merged_dir)
        diff = _max_diff(_logits(merged, batch), adapter_logits, batch)
        print(f"\n{family} {kind}: max |merged - adapter| logit diff {diff:.3g} (merge's own check "
              f"{report['max_logit_diff']:.3g} <= {report['tolerance']:.3g})")
        assert diff <= TOL, diff
        assert sum(p.numel() for p in merged.parameters()) == base_params
        assert not any("lora" in k for k in _load_dir_state(merged_dir))
        if family == "gemma3":
            assert _tied(merged), "Gemma 3 lm_head is not tied to embed_tokens after reload"
            assert "lm_head.weight" not in _load_dir_state(merged_dir)
        for name in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md"):
            assert (merged_dir / name).exists(), name
        card = (merged_dir / "README.md").read_text()
        metrics = json.loads((out / "training_metrics.json").read_text())
        assert "eval_reward_accuracy" in card and f"| steps | {metrics['steps']} |" in card
        assert _siblings(merged_dir) == [], _siblings(merged_dir)


# ----------------------------------------------------------------------------------------------
# Full fine-tune: gathered == zero_to_fp32 == trainer.save_model; Gemma 3 stays tied
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_full_finetune_gather_equals_zero_to_fp32_and_save_model(tmp_path, trained, tiny_assets, family):
    from safetensors.torch import load_file

    from dpo_dist.post.merge import merge_model

    out = trained(family, "full")
    report = merge_model(out / CKPT, tmp_path / "merged")
    assert report["kind"] == "zero" and report["zero_checkpoint"].endswith(f"global_step{ZERO3_STEPS}")
    merged = _load_dir_state(tmp_path / "merged")
    zero = _zero_sd(out / CKPT)
    saved = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(saved), (set(merged) ^ set(saved))
    for k, v in merged.items():
        assert v.numel() > 0 and v.dtype == torch.float32, k
        assert torch.equal(v, zero[k]), f"{k} differs from zero_to_fp32"
        assert torch.equal(v, saved[k]), f"{k} differs from trainer.save_model's model.safetensors"
    base = _causal_lm(tiny_assets.model_dir(family))
    assert any(not torch.equal(merged[k], base.state_dict()[k]) for k in merged), "weights did not change"
    reloaded = _causal_lm(tmp_path / "merged")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in base.parameters())
    if family == "gemma3":
        # zero_to_fp32 gives lm_head.weight as the same tensor as embed_tokens; one copy is written, tied on reload.
        assert "lm_head.weight" in zero and torch.equal(zero["lm_head.weight"], zero["model.embed_tokens.weight"])
        assert "lm_head.weight" not in merged
        assert _tied(reloaded)

    # The saved model folder, as bf16 in small shards: index + shards, reloads, within the bf16 tolerance.
    report = merge_model(out, tmp_path / "merged-bf16", dtype="bf16", max_shard_size="150KB")
    assert report["kind"] == "model"
    shards = sorted((tmp_path / "merged-bf16").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "merged-bf16" / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert json.loads((tmp_path / "merged-bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in _load_dir_state(tmp_path / "merged-bf16").values())
    v = report["verification"]
    print(f"\n{family} full bf16: max logit diff {v['max_logit_diff']:.3g} <= {v['tolerance']:.3g}; "
          f"round trip {v['roundtrip_max_logit_diff']:.3g}")
    assert v["max_logit_diff"] <= v["tolerance"] and v["roundtrip_max_logit_diff"] <= v["roundtrip_tolerance"]


# ----------------------------------------------------------------------------------------------
# Saves made without the 16-bit gather (size-0 tensors)
# ----------------------------------------------------------------------------------------------

def _break(weights: Path) -> list[str]:
    """Rewrite a safetensors file the way ZeRO-3 without the 16-bit gather saves it: every tensor size 0."""
    from safetensors.torch import load_file, save_file

    names = sorted(load_file(str(weights)))
    save_file({k: torch.empty(0) for k in names}, str(weights), metadata={"format": "pt"})
    return names


def test_save_without_gather_and_no_checkpoint_is_refused(tmp_path, trained):
    from dpo_dist.post.merge import MergeError, merge_model

    src = _copy(trained("llama", "full"), tmp_path / "broken", with_checkpoints=False)
    names = _break(src / "model.safetensors")
    out = tmp_path / "merged"
    res = _cli("--checkpoint", src, "--output", out)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "size-0" in res.stdout and f"model.safetensors:{names[0]}" in res.stdout, res.stdout[-3000:]
    assert "stage3_gather_16bit_weights_on_model_save" in res.stdout and "Traceback" not in res.stdout
    assert not out.exists() and _siblings(out) == []

    # The LoRA flavour of the same peer bug: an empty adapter file.
    lsrc = _copy(trained("llama", "lora"), tmp_path / "broken-lora", with_checkpoints=False)
    lnames = _break(lsrc / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="adapter_model.safetensors:" + lnames[0].replace(".", r"\.")):
        merge_model(lsrc, tmp_path / "merged-lora")
    assert not (tmp_path / "merged-lora").exists()


def test_save_without_gather_is_regathered_from_checkpoint(tmp_path, trained, tiny_assets):
    from peft import PeftModel

    from dpo_dist.post.merge import MergeError, merge_model

    # Full fine-tune: the output's and checkpoint's model.safetensors are both empty; the ZeRO shards are intact.
    orig = trained("llama", "full")
    src = _copy(orig, tmp_path / "broken", with_checkpoints=True)
    _break(src / "model.safetensors")
    _break(src / CKPT / "model.safetensors")
    report = merge_model(src, tmp_path / "merged")
    assert report["kind"] == "zero" and report["zero_checkpoint"].endswith(f"{CKPT}/global_step{ZERO3_STEPS}")
    assert any("re-gathered" in n for n in report["notes"]), report["notes"]
    assert "re-gathered" in (tmp_path / "merged" / "README.md").read_text()
    merged, zero = _load_dir_state(tmp_path / "merged"), _zero_sd(orig / CKPT)
    assert merged and all(torch.equal(v, zero[k]) for k, v in merged.items())

    # A checkpoint older than the trained model is not silently used.
    metrics = json.loads((src / "training_metrics.json").read_text())
    (src / "training_metrics.json").write_text(json.dumps({**metrics, "steps": ZERO3_STEPS + 10}))
    with pytest.raises(MergeError, match=f"step {ZERO3_STEPS} while training ran {ZERO3_STEPS + 10} steps"):
        merge_model(src, tmp_path / "merged-stale")
    assert not (tmp_path / "merged-stale").exists()

    # LoRA: an empty adapter file, re-gathered from the checkpoint's ZeRO shards; logits == the real adapter's.
    lorig = trained("llama", "lora")
    lsrc = _copy(lorig, tmp_path / "broken-lora", with_checkpoints=True)
    _break(lsrc / "adapter_model.safetensors")
    report = merge_model(lsrc, tmp_path / "merged-lora")
    assert report["kind"] == "zero+adapter"
    batch = _batch(tiny_assets, "llama")
    ref = _logits(PeftModel.from_pretrained(_causal_lm(tiny_assets.llama_dir), str(lorig)).eval(), batch)
    assert _max_diff(_logits(_causal_lm(tmp_path / "merged-lora"), batch), ref, batch) <= TOL


# ----------------------------------------------------------------------------------------------
# Atomicity: a merge killed mid-write leaves no output; the next one cleans up and succeeds
# ----------------------------------------------------------------------------------------------

def test_killed_merge_leaves_no_output_and_next_merge_cleans_up(tmp_path, trained):
    src = _copy(trained("llama", "lora"), tmp_path / "src", with_checkpoints=False)
    metrics = json.loads((src / "training_metrics.json").read_text())
    # A training_metrics.json that carries a secret must not leak it into the model card.
    (src / "training_metrics.json").write_text(json.dumps({**metrics, "hf_token": SECRET, "env": {"HF_TOKEN": SECRET}}))
    out = tmp_path / "merged"
    log = tmp_path / "merge.log"
    env = cpu_env(DPO_DIST_MERGE_PAUSE_BEFORE_RENAME=300, HF_TOKEN=SECRET)
    with open(log, "w") as fh:
        proc = subprocess.Popen([PY, "-m", "dpo_dist.merge", "--checkpoint", str(src), "--output", str(out)], cwd=ROOT,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while "pausing" not in log.read_text():
            assert proc.poll() is None, f"merge exited early (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"merge never reached the rename:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        tmps = list(tmp_path.glob("merged.tmp-*"))
        assert len(tmps) == 1 and (tmps[0] / "config.json").exists() and (tmps[0] / "model.safetensors").exists()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed merge left an output folder"
    assert tmps[0].exists()  # the stale temp folder, until the next merge

    res = _cli("--checkpoint", src, "--output", out, env_extra={"HF_TOKEN": SECRET})
    assert res.returncode == 0, res.stdout[-3000:]
    assert "removed stale merged.tmp-" in res.stdout
    assert not tmps[0].exists() and _siblings(out) == []
    assert json.loads(res.stdout.strip().splitlines()[-1])["kind"] == "adapter"
    for f in out.iterdir():
        assert SECRET not in f.read_text(errors="ignore"), f"secret leaked into {f.name}"


# ----------------------------------------------------------------------------------------------
# Refusals: missing shard, existing output, bad arguments
# ----------------------------------------------------------------------------------------------

def test_missing_zero_shard_is_named(tmp_path, trained):
    from dpo_dist.post.merge import MergeError, merge_model

    ckpt = _copy(trained("llama", "full") / CKPT, tmp_path / "ckpt", with_checkpoints=True)
    (ckpt / f"global_step{ZERO3_STEPS}" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    out = tmp_path / "merged"
    res = _cli("--checkpoint", ckpt, "--output", out)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "missing zero_pp_rank_1_mp_rank_00_model_states.pt" in res.stdout and "Traceback" not in res.stdout
    assert not out.exists() and _siblings(out) == []

    ckpt2 = _copy(trained("llama", "full") / CKPT, tmp_path / "ckpt2", with_checkpoints=True)
    (ckpt2 / f"global_step{ZERO3_STEPS}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(MergeError, match="missing zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        merge_model(ckpt2, out)
    assert not out.exists() and _siblings(out) == []


def test_existing_output_is_refused_without_overwrite(tmp_path, trained):
    from dpo_dist.post.merge import MergeArgumentError, merge_model

    src = trained("llama", "lora")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch")
    res = _cli("--checkpoint", src, "--output", out)
    assert res.returncode == 2 and "--overwrite" in res.stdout and "Traceback" not in res.stdout, res.stdout[-3000:]
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "do not touch"

    # --overwrite replaces an earlier merged model, never a folder of other files.
    with pytest.raises(MergeArgumentError, match="not a model folder"):
        merge_model(src, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    earlier = tmp_path / "earlier"
    merge_model(src, earlier)
    (earlier / "stale.txt").write_text("left by the earlier merge")
    report = merge_model(src, earlier, overwrite=True)
    assert report["kind"] == "adapter" and (earlier / "config.json").exists() and not (earlier / "stale.txt").exists()
    assert _siblings(earlier) == []


