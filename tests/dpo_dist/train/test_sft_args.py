"""The SFT entry refuses the DPO-only options by name (exit 2, nothing written) and does not apply DPO's rules
(the prompt-length rule); the launcher, and so the pipeline, gives it none of them."""

from __future__ import annotations

from dataclasses import fields

import pytest

from conftest import cpu_env, run_main
from dpo_dist.args import ARG_DATACLASSES, DPO_ONLY_OPTIONS, parse_args, validate
from dpo_dist.train.sft import SFTArguments
from dpo_dist.util.errors import ArgumentError

SFT_TYPES = ARG_DATACLASSES + (SFTArguments,)
BASE = ["--model_name_or_path", "m", "--dataset_name", "d"]


def test_every_dpo_only_option_is_a_real_flag():
    names = {f.name for dc in ARG_DATACLASSES for f in fields(dc)}
    assert set(DPO_ONLY_OPTIONS) <= names
    assert not set(DPO_ONLY_OPTIONS) & {f.name for f in fields(SFTArguments)}


@pytest.mark.parametrize("argv, flag", [
    (["--beta", "0.2"], "beta"),
    (["--loss_type=ipo"], "loss_type"),
    (["--beta", "0.1"], "beta"),  # the default value, given explicitly, is still a DPO flag
    (["--max_prompt_length", "64"], "max_prompt_length"),
    (["--reference", "adapter"], "reference"),
    (["--no_chunked_logps"], "no_chunked_logps"),
    (["--bet", "0.2"], "beta"),  # an abbreviation argparse accepts
    (["--packing"], "packing"),
    (["--overlong", "drop"], "overlong"),
    (["--label_smoothing", "0.1"], "label_smoothing"),
])
def test_sft_refuses_dpo_only_flags(argv, flag):
    with pytest.raises(ArgumentError) as e:
        parse_args(BASE + argv, SFT_TYPES, task="sft")
    msg = str(e.value)
    assert msg.startswith(f"--{flag} is a DPO option") and "SFT step" in msg and "does not use it" in msg
    assert f"Fix: drop --{flag}" in msg
    parse_args(BASE + argv, ARG_DATACLASSES)  # the DPO entry takes them


def test_sft_refuses_dpo_only_recipe_keys(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("learning_rate: 2.0e-5\nbeta: 0.1\n")
    with pytest.raises(ArgumentError, match=rf"--config {recipe}: 'beta' is a DPO option; the SFT step does not use"):
        parse_args(BASE + ["--config", str(recipe)], SFT_TYPES, task="sft")


def test_sft_max_length_is_not_checked_against_the_prompt_length_rule():
    m, d, t, s = parse_args(BASE + ["--max_length", "100"], SFT_TYPES, task="sft")
    validate(m, d, t, task="sft")  # the DPO default --max_prompt_length 128 does not apply
    with pytest.raises(ArgumentError, match="--max_prompt_length"):
        validate(m, d, t)  # DPO keeps its rule
    with pytest.raises(ArgumentError, match="--max_length must be a positive number"):
        validate(*parse_args(BASE + ["--max_length", "0"], SFT_TYPES, task="sft")[:3], task="sft")


def test_dpo_refuses_a_zero_prompt_length():
    m, d, t = parse_args(BASE + ["--max_prompt_length", "0"])
    with pytest.raises(ArgumentError, match="--max_prompt_length must be a positive number of tokens"):
        validate(m, d, t)


def test_sft_entry_exits_2_and_writes_nothing(tmp_path):
    from dpo_dist.train.sft import main

    out = tmp_path / "out"
    res = run_main(main, [*BASE, "--output_dir", out, "--beta", "0.3", "--device", "cpu"], env=cpu_env())
    assert res.returncode == 2, res.stdout[-3000:]
    assert "dpo_dist.sft: error: --beta is a DPO option; the SFT step" in res.stdout
    assert "Traceback" not in res.stdout and not out.exists()


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_launcher_gives_sft_no_dpo_flags(tiny_assets, tmp_path, task):
    import launch.cli as cli

    a = cli.TrainArguments(model=str(tiny_assets.llama_dir), hardware="cpu", cards=1, full=True, task=task,
                           max_length=512, max_prompt_length=256)
    _, _, plan = cli.build_plan(a)
    argv = cli.dpo_args_for(plan, a, tmp_path / "ds.json", tmp_path / "out", ["--dataset_name", "d"])
    if task == "sft":
        parse_args(argv, SFT_TYPES, task="sft")  # would raise on a DPO-only flag
        assert "--max_prompt_length" not in argv and "--reference" not in argv
    else:
        assert "--max_prompt_length" in argv and "--reference" in argv


def test_the_sft_recipes_hold_no_dpo_option():
    from dpo_dist.util.paths import REPO_ROOT

    recipes = sorted((REPO_ROOT / "recipes").glob("*/sft.yaml"))
    assert recipes
    for recipe in recipes:
        parse_args(BASE + ["--config", str(recipe)], SFT_TYPES, task="sft")
