"""The built-in data in each conversational / public schema, trained for real: 2 ranks under ZeRO-3 on CPU, packed,
with the reference cache. Per format: the log names the detected schema and its mapping, the loss falls, the
held-out reward accuracy is above 0.8, and the rows the run trained on tokenise to what the saved tokenizer's
`apply_chat_template` gives for the same messages.

Short runs (20 steps, ~20 s each): the tiny models learn the preference within them. The tiny Llama carries a
Llama-3-like template and the tiny Gemma 3 a Gemma-3-like one; the stack-exchange run overrides the Llama's with
`--chat_template gemma3`, so the flag is covered end to end (the saved model carries the override)."""

from __future__ import annotations

import pytest

from conftest import read_json, run_ranks
from dpo_dist.data.chat_templates import BUILTIN_TEMPLATES
from dpo_dist.tiny import read_jsonl
from dpo_dist.tiny.assets import FAMILY_TEMPLATES
from tests.support.chat_rows import assert_rows_match_template

pytestmark = pytest.mark.slow

STEPS = 20
# format -> (family, extra flags, the schema the log must name)
RUNS = {
    "conversational": ("llama", [], "conversational, implicit prompt"),
    "ultrafeedback": ("gemma3", [], "HuggingFaceH4/ultrafeedback_binarized"),
    "orca": ("llama", [], "Intel/orca_dpo_pairs"),
    "stack_exchange": ("llama", ["--chat_template", "gemma3"], "lvwerra/stack-exchange-paired"),
}


def format_args(tiny_assets, zero3_config, out, fmt, ref_cache):
    family, extra, _ = RUNS[fmt]
    return [
        "--model_name_or_path", tiny_assets.model_dir(family), "--dataset_name", tiny_assets.format_dir(fmt),
        "--output_dir", out, "--deepspeed", zero3_config, "--max_steps", STEPS,
        "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8, "--learning_rate", 1e-3,
        "--max_length", 256, "--max_prompt_length", 128, "--max_train_samples", 400, "--max_eval_samples", 64,
        "--logging_steps", 1, "--save_steps", 1000, "--beta", 0.1, "--seed", 7, "--dist_timeout", 600, "--no_merge",
        "--packing", "--length_buckets", 8, "--reference", "precomputed", "--ref_cache_dir", ref_cache, *extra,
    ]


@pytest.fixture(scope="module")
def format_run(tiny_assets, zero3_config, tmp_path_factory):
    """``format_run(fmt)``: (output folder, log) of the format's run, trained once per module on first use."""
    root = tmp_path_factory.mktemp("format-runs")
    done: dict = {}

    def get(fmt: str):
        if fmt not in done:
            out = root / fmt
            res = run_ranks(format_args(tiny_assets, zero3_config, out, fmt, root / "refcache"), nproc=2, timeout=300)
            assert res.returncode == 0, res.stdout[-6000:]
            done[fmt] = (out, res.stdout)
        return done[fmt]

    return get


@pytest.mark.parametrize("fmt", list(RUNS))
def test_format_trains(format_run, tiny_assets, fmt):
    from transformers import AutoTokenizer

    from dpo_dist.args import DataArguments
    from dpo_dist.data.preference import load_preference_splits

    family, extra, schema = RUNS[fmt]
    out, log = format_run(fmt)
    line = next((x for x in log.splitlines() if f"split 'train': schema detected: {schema}, mapped" in x), None)
    assert line, log[-4000:]
    m = read_json(out / "training_metrics.json")
    assert (m["world_size"], m["zero_stage"], m["packing"], m["reference"]) == (2, 3, True, "precomputed")
    assert m["reference_cache"]["hit"] is False and m["steps"] == STEPS
    assert m["last_train_loss"] < m["first_train_loss"] - 0.1, m["train_losses"]
    assert m["eval_reward_accuracy"] > 0.8, m
    print(f"FORMAT | {fmt} | {family} | loss {m['first_train_loss']:.4f} -> {m['last_train_loss']:.4f} | "
          f"held-out reward accuracy {m['eval_reward_accuracy']:.3f} | {line[line.index('data:'):]}")

    # The saved tokenizer carries the template the run used; the rows it trained on are that template's tokens.
    tok = AutoTokenizer.from_pretrained(out)
    expected = "gemma3" if "--chat_template" in extra else FAMILY_TEMPLATES[family]
    assert tok.chat_template == BUILTIN_TEMPLATES[expected]
    train, _ = load_preference_splits(DataArguments(dataset_name=str(tiny_assets.format_dir(fmt)),
                                                    max_train_samples=32), 7, tok)
    for row, hh in zip(train, read_jsonl(tiny_assets.train_file)):
        assert_rows_match_template(row, hh, fmt, tok)
