"""Argument contract and hh-rlhf splitting (no training)."""

from __future__ import annotations

import sys

import pytest

from conftest import cpu_env, run_cmd, run_main
from dpo_dist.args import parse_args, validate
from dpo_dist.data.preference import DataError, normalise, split_hh_transcript
from dpo_dist.util.errors import ArgumentError

H, A = "\n\nHuman:", "\n\nAssistant:"


def test_single_turn_split():
    p, c, r = split_hh_transcript(f"{H} hi{A} hello there", f"{H} hi{A} go away", 0)
    assert p == f"{H} hi{A}" and c == " hello there" and r == " go away"


def test_multi_turn_split_keeps_shared_history():
    hist = f"{H} hi{A} hello{H} how do I boil an egg?{A}"
    p, c, r = split_hh_transcript(hist + " Boil it for 8 minutes.", hist + " No.", 3)
    assert p == hist and c == " Boil it for 8 minutes." and r == " No."


def test_assistant_word_inside_the_answer_is_not_a_turn():
    hist = f"{H} what is an Assistant:?{A}"
    p, c, _ = split_hh_transcript(hist + " A role.", hist + " Dunno.", 0)
    assert p == hist and c == " A role."


def test_transcripts_disagreeing_before_last_turn_is_an_error_with_row_number():
    with pytest.raises(DataError, match=r"row 12: .*disagree before the last assistant turn"):
        split_hh_transcript(f"{H} hi{A} a{H} q1{A} x", f"{H} hi{A} b{H} q1{A} y", 12)


def test_missing_assistant_turn_is_an_error():
    with pytest.raises(DataError, match="row 5"):
        split_hh_transcript(f"{H} hi", f"{H} hi{A} x", 5)


def test_normalise_dataset_formats():
    from datasets import Dataset

    hh = Dataset.from_list([{"chosen": f"{H} q{A} yes", "rejected": f"{H} q{A} no"}])
    out = normalise(hh, "train")
    assert out.column_names == ["prompt", "chosen", "rejected"] and out[0]["prompt"] == f"{H} q{A}"
    explicit = Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r", "extra": 1}])
    assert normalise(explicit, "train").column_names == ["prompt", "chosen", "rejected"]
    with pytest.raises(DataError, match="match no recognised preference schema"):
        normalise(Dataset.from_list([{"text": "x"}]), "train")
    with pytest.raises(DataError, match="empty"):
        normalise(Dataset.from_list([{"chosen": "x", "rejected": "y"}]).select([]), "train")


def test_seed_contract_flags_parse():
    m, d, t = parse_args([
        "--model_name_or_path", "m", "--tokenizer_name_or_path", "t", "--dataset_name", "d", "--dataset_config", "c",
        "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-5",
        "--max_length", "256", "--max_prompt_length", "64", "--beta", "0.2", "--loss_type", "ipo",
        "--num_train_epochs", "2", "--max_steps", "7", "--output_dir", "o", "--use_peft", "--lora_r", "4",
        "--lora_alpha", "8", "--lora_dropout", "0.0", "--lora_target_modules", "q_proj,v_proj",
        "--gradient_checkpointing", "--deepspeed", "ds.json", "--bf16", "--seed", "3", "--save_steps", "5",
        "--logging_steps", "1", "--overwrite_output_dir", "--resume_from_checkpoint", "latest",
        "--per_device_eval_batch_size", "2", "--lr_scheduler_type", "cosine", "--warmup_steps", "1",
        "--max_target_length", "100", "--eval_steps", "3", "--max_train_samples", "10",
    ])
    validate(m, d, t)
    assert (m.model_name_or_path, m.use_peft, m.lora_r, d.dataset_config) == ("m", True, 4, "c")
    assert (t.loss_type, t.beta, t.bf16, t.max_completion_length, t.gradient_checkpointing) == ("ipo", 0.2, True, 100, True)


def test_yaml_recipe_defaults_and_cli_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: from-yaml\nbeta: 0.3\nuse_peft: true\n")
    m, _, t = parse_args(["--config", str(recipe), "--beta", "0.05"])
    assert m.model_name_or_path == "from-yaml" and m.use_peft and t.beta == 0.05
    recipe.write_text("not_a_flag: 1\n")
    with pytest.raises(ArgumentError, match="unknown keys"):
        parse_args(["--config", str(recipe)])


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "--model_name_or_path is required: there are no default models"),
        (["--model_name_or_path", "m", "--loss_type", "banana"], "--loss_type 'banana' is not a known DPO loss"),
        (["--model_name_or_path", "m", "--beta", "0"], "--beta must be > 0"),
        (["--model_name_or_path", "m", "--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--model_name_or_path", "m", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive"),
        (["--model_name_or_path", "m", "--max_length", "64", "--max_prompt_length", "64"], "--max_prompt_length (64) must be smaller"),
        (["--model_name_or_path", "m", "--not_a_flag", "1"], "unknown arguments"),
        (["--model_name_or_path", "m", "--packing", "--no_chunked_logps"], "--packing needs --chunked_logps"),
        (["--model_name_or_path", "m", "--packing", "--attn_implementation", "flash_attention_2"],
         "--packing runs on sdpa or eager attention, not --attn_implementation flash_attention_2"),
        (["--model_name_or_path", "m", "--length_buckets", "-1"], "--length_buckets must be 0 (off) or a positive"),
    ],
)
def test_bad_arguments_exit_2_and_create_nothing(tmp_path, argv, needle):
    from dpo_dist.train.dpo import main

    out = tmp_path / "never"
    res = run_main(main, [*argv, "--output_dir", str(out)], env=cpu_env())
    assert res.returncode == 2, res.stdout
    assert needle in res.stdout
    assert not out.exists()
    assert "Traceback" not in res.stdout


def test_non_empty_output_dir_is_refused_and_kept(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = run_cmd([sys.executable, "-m", "dpo_dist.dpo", "--model_name_or_path", "m", "--output_dir", str(out)],
                  timeout=120, env=cpu_env())  # the real CLI, once: exit code and message through a fresh interpreter
    assert res.returncode == 2 and "exists and is not empty" in res.stdout
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_cleanup_shm_buffers_removes_only_that_runs_files(tmp_path):
    from dpo_dist.backend import cleanup_shm_buffers

    names = ["deepspeed_allreduce_buffer_0_127.0.0.1_29601_0", "deepspeed_allreduce_buffer_0_127.0.0.1_29601_1",
             "deepspeed_allreduce_buffer_0_127.0.0.1_29602_0", "unrelated"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert cleanup_shm_buffers(29601, rank=1, shm_dir=str(tmp_path)) == 1
    assert cleanup_shm_buffers(29601, shm_dir=str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deepspeed_allreduce_buffer_0_127.0.0.1_29602_0", "unrelated"]
