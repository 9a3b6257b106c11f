"""End to end through the launcher, for real on CPU: plan → ds_config → command → spawn → train → merge."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import cpu_env, free_port, read_json, run_cmd

pytestmark = pytest.mark.slow

COMMON_DPO = ["--max_steps", "10", "--learning_rate", "1e-3", "--logging_steps", "5", "--max_train_samples", "320",
              "--max_eval_samples", "48", "--save_steps", "1000"]


def _launch(run_dir, model_dir, data_dir, *launch_args, dpo_args=()):
    argv = [sys.executable, "-m", "launch", "train", "--model", str(model_dir), "--hardware", "cpu",
            "--max_length", "256", "--max_prompt_length", "128", "--run_dir", str(run_dir),
            "--master_port", str(free_port()), *launch_args,
            "--", "--dataset_name", str(data_dir), *COMMON_DPO, *dpo_args]
    return run_cmd(argv, timeout=480, env=cpu_env())


def test_launch_train_cpu_two_cards_full_zero3(tmp_path, tiny_assets):
    run = tmp_path / "run"
    res = _launch(run, tiny_assets.llama_dir, tiny_assets.data_dir, "--cards", "2", "--full", "--zero_stage", "3")
    assert res.returncode == 0, res.stdout[-5000:]
    # The run dir records what ran.
    for name in ("plan.json", "ds_config.json", "command.sh", "launch.log"):
        assert (run / name).is_file(), name
    plan = read_json(run / "plan.json")
    ds = read_json(run / "ds_config.json")
    # The plan's defaults on cpu: the reference from the log-prob cache, packed micro-batches in <= 8 shapes.
    assert plan["zero_stage"] == 3 and plan["world_size"] == 2 and plan["reference"] == "precomputed"
    assert plan["packing"] and plan["length_buckets"] == 8
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == plan["micro_batch_size"] * plan["gradient_accumulation_steps"] * 2
    assert "DPO plan: FITS" in res.stdout  # the plan table is shown before launch

    m = read_json(run / "output" / "training_metrics.json")
    assert (m["world_size"], m["zero_stage"], m["reference"], m["steps"]) == (2, 3, "precomputed", 10)
    assert m["packing"] and 1 <= len(m["length_buckets"]) <= 8
    assert Path(m["reference_cache"]["path"]).is_file()  # the cache it trained from (a hit when an earlier run made it)
    assert m["last_train_loss"] < m["first_train_loss"]
    # The post-step merged and verified a loadable folder.
    merged = run / "output_merged"
    report = read_json(merged / "merge_report.json")
    assert report["kind"] == "model" and report["max_logit_diff"] <= report["tolerance"]
    weights = load_file(str(merged / "model.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values())


def test_launch_train_two_node_loopback_from_hostfile(tmp_path, tiny_assets):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two 'nodes' on this machine\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    run = tmp_path / "run"
    res = _launch(run, tiny_assets.llama_dir, tiny_assets.data_dir, "--cards", "1", "--hostfile", str(hostfile),
                  "--use_peft", "--zero_stage", "3", dpo_args=["--no_merge"])
    assert res.returncode == 0, res.stdout[-5000:]
    text = (run / "command.sh").read_text()
    assert "--node_rank 0" in text and "--node_rank 1" in text and "--no_ssh" in text
    assert "[node0]" in res.stdout and "[node1]" in res.stdout
    m = read_json(run / "output" / "training_metrics.json")
    assert (m["world_size"], m["zero_stage"], m["reference"], m["steps"]) == (2, 3, "adapter", 10)
    assert m["last_train_loss"] < m["first_train_loss"]
    assert load_file(str(run / "output" / "adapter_model.safetensors"))


def test_launch_refuses_more_cards_than_the_hostfile_slots(tmp_path, tiny_assets):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    res = _launch(tmp_path / "run", tiny_assets.llama_dir, tiny_assets.data_dir, "--cards", "2",
                  "--hostfile", str(hostfile), "--dry-run")
    assert res.returncode == 2
    assert "hosts:1:" in res.stdout and "slots=1" in res.stdout  # file:line:column of the offending entry
    assert not (tmp_path / "run").exists()

