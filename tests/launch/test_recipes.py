"""Checked-in recipes (recipes/<hardware>/*.yaml) are what the planner writes now, and `launch train --recipe` (make
RECIPE=...) uses one, with flags after `--` still winning."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cmd
from dpo_dist.args import parse_args, validate
from launch.recipes import (
    LAUNCH_FIELDS,
    MODES,
    NODE_CARDS,
    RECIPE_HARDWARE,
    RECIPE_MODELS,
    RECIPES_DIR,
    differences,
    recipe_model_name,
    render_all,
    smallest_fit,
    write_all,
)

LLAMA70_LORA = RECIPES_DIR / "gaudi2" / "llama-3-70b-lora.yaml"


@pytest.fixture(scope="module")
def rendered():
    return render_all()


def test_checked_in_recipes_are_what_the_planner_writes_now(rendered):
    problems = differences(RECIPES_DIR, rendered)
    assert not problems, ("the checked-in recipes differ from the planner's: regenerate them with "
                          "`python -m launch recipes --write` (make recipes) and commit\n" + "\n".join(problems))


def test_every_model_hardware_and_mode_has_its_recipes(rendered):
    for hardware in RECIPE_HARDWARE:
        for key in RECIPE_MODELS:
            for mode in MODES:
                name = recipe_model_name(key)
                small = smallest_fit(key, hardware, mode)
                assert small is not None, (hardware, key, mode)
                cards = small[0]
                if cards == NODE_CARDS:
                    assert f"{hardware}/{name}-{mode}.yaml" in rendered
                else:
                    suffix = f"-{cards}card{'s' if cards > 1 else ''}"
                    assert f"{hardware}/{name}-{mode}{suffix}.yaml" in rendered
                    if cards < NODE_CARDS:  # fits on fewer: fits on one node of 8 too
                        assert f"{hardware}/{name}-{mode}.yaml" in rendered
    assert recipe_model_name("llama3.1-70b") == "llama-3.1-70b" and recipe_model_name("gemma3-270m") == "gemma-3-270m"


def test_each_recipe_holds_the_plan_a_header_and_flags_the_ranks_take(rendered, tmp_path):
    for rel, text in rendered.items():
        data = yaml.safe_load(text)
        assert set(data["launch"]) == set(LAUNCH_FIELDS), rel
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                    "reference", "length_buckets", "learning_rate", "beta", "loss_type"):
            assert key in data, (rel, key)
        header = [ln for ln in text.splitlines() if ln.startswith("#")]
        head = "\n".join(header)
        for needle in ("Memory per card (planned)", "headroom", "Measured vs assumed", "measured:", "assumed:",
                       "ZeRO-", "offload", "micro-batch", "python -m launch recipes --write"):
            assert needle in head, (rel, needle)
        assert "0.00B" not in head.split("Plan notes:")[0], rel
    # Every key is a dpo_dist.dpo flag (the launch block is skipped by the ranks), and the values pass its checks.
    path = tmp_path / "r.yaml"
    path.write_text(rendered["gaudi2/llama-3-70b-lora.yaml"])
    m, d, t = parse_args(["--model_name_or_path", "m", "--config", str(path), "--learning_rate", "1e-6"])
    validate(m, d, t)
    assert m.use_peft and t.learning_rate == 1e-6 and t.report_to == "tensorboard"
    assert t.per_device_train_batch_size == yaml.safe_load(path.read_text())["per_device_train_batch_size"]


def test_write_regenerates_and_removes_stale_files(tmp_path):
    stale = tmp_path / "gaudi2" / "old-model-lora.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("x: 1\n")
    written = write_all(tmp_path)
    assert len(written) == len(render_all()) and not stale.exists()
    assert differences(tmp_path) == []
    (tmp_path / "gaudi3" / "gemma-3-1b-lora.yaml").write_text("edited by hand\n")
    assert differences(tmp_path) == [f"differs: {tmp_path / 'gaudi3' / 'gemma-3-1b-lora.yaml'}"]


def test_recipes_command_check_exit_codes(tmp_path, capsys):
    from launch.cli import main

    assert main(["recipes", "--write", "--out", str(tmp_path)]) == 0
    assert main(["recipes", "--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "gaudi2" / "llama-2-7b-full.yaml").unlink()
    assert main(["recipes", "--check", "--out", str(tmp_path)]) == 1
    assert "python -m launch recipes --write" in capsys.readouterr().err


def _exec_argv(run_dir: Path) -> list[str]:
    line = next(ln for ln in (run_dir / "command.sh").read_text().splitlines() if ln.startswith("exec "))
    return shlex.split(line)[1:]


def _last(argv: list[str], flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def test_train_with_a_recipe_plans_with_it_and_flags_after_dashes_win(tmp_path, capsys):
    from launch.cli import main

    recipe = yaml.safe_load(LLAMA70_LORA.read_text())
    run_dir = tmp_path / "run"
    rc = main(["train", "--model", "meta-llama/Llama-3-70B", "--hardware", "gaudi2", "--cards", "8", "--recipe",
               str(LLAMA70_LORA), "--dry_run", "--run_dir", str(run_dir), "--",
               "--learning_rate", "1e-6", "--gradient_accumulation_steps", "8"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    plan = json.loads((run_dir / "plan.json").read_text())
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert plan["zero_stage"] == recipe["launch"]["zero_stage"] == ds["zero_optimization"]["stage"]
    assert plan["micro_batch_size"] == recipe["per_device_train_batch_size"]
    assert plan["gradient_accumulation_steps"] == 8 == ds["gradient_accumulation_steps"]  # the flag after `--` wins
    argv = _exec_argv(run_dir)
    assert _last(argv, "--config") == str(LLAMA70_LORA.resolve())
    assert _last(argv, "--learning_rate") == "1e-6" and _last(argv, "--gradient_accumulation_steps") == "8"
    # What the ranks will read: the recipe, then the command line (its last word for a flag wins).
    i = argv.index("--model_name_or_path")
    m, d, t = parse_args([w for w in argv[i:] if w])
    assert t.learning_rate == 1e-6 and t.gradient_accumulation_steps == 8 and t.beta == recipe["beta"]
    assert t.per_device_train_batch_size == recipe["per_device_train_batch_size"] and m.use_peft


def test_a_recipe_for_other_hardware_or_cards_is_refused_before_writing(tmp_path, capsys):
    from launch.cli import main

    for flags, needle in ((["--hardware", "gaudi3", "--cards", "8"], "--hardware gaudi2"),
                          (["--hardware", "gaudi2", "--cards", "1"], "--cards 8")):
        run_dir = tmp_path / "run"
        rc = main(["train", "--model", "meta-llama/Llama-3-70B", *flags, "--recipe", str(LLAMA70_LORA), "--dry_run",
                   "--run_dir", str(run_dir)])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Fix:" in err, err
        assert not run_dir.exists()
    rc = main(["train", "--model", "m", "--recipe", str(tmp_path / "none.yaml"), "--dry_run"])
    assert rc == 2 and "--recipe" in capsys.readouterr().err
    rc = main(["train", "--model", "meta-llama/Llama-3-70B", "--recipe", str(LLAMA70_LORA), "--dry_run", "--run_dir",
               str(tmp_path / "run"), "--", "--config", str(LLAMA70_LORA)])
    assert rc == 2 and "both name a recipe" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_make_train_8x_with_recipe_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MODEL", "HARDWARE", "ARGS", "RECIPE", "RUN_DIR")}
    if subprocess.run(["make", "-s", "-q", ".venv/.installed"], cwd=ROOT, env=env).returncode == 1:
        pytest.skip("the venv is older than its requirements: `make setup` first (this test must not install)")
    env.update(HF_HUB_OFFLINE="1", GAUDI_SPAWN="")
    run_dir = tmp_path / "run"
    res = run_cmd(["make", "-s", "train-8x", "MODEL=meta-llama/Llama-3-70B", "HARDWARE=gaudi2", "DRY_RUN=1",
                   f"RUN_DIR={run_dir}", f"RECIPE={LLAMA70_LORA.relative_to(ROOT)}",
                   "ARGS=--per_device_train_batch_size 1"], timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:]
    argv = _exec_argv(run_dir)
    assert _last(argv, "--config") == str(LLAMA70_LORA.resolve()) and _last(argv, "--per_device_train_batch_size") == "1"
    assert json.loads((run_dir / "plan.json").read_text())["micro_batch_size"] == 1
