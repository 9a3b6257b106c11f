"""The Gaudi path end to end, in the twin: `launch selfcheck` → `launch train --hardware gaudi2` → launch.gaudi_spawn →
optimum-habana's real DistributedRunner (mpirun for 2 cards, as its own DPO baseline) → ranks running
GaudiDPOTrainer with the engine → merge post-step. The selfcheck's four runs are the matrix: Llama and Gemma 3, each
with LoRA (adapter reference) and full fine-tuning (the reference the plan picks: the cache), on 1 and 2 cards.
Then SFT through the same path, and the trackers (--report_to tensorboard) from inside optimum-habana's trainers."""

from __future__ import annotations

import math

import pytest

from conftest import free_port, read_json, run_cmd
from support.tb_events import EVAL_TAGS, TRAIN_TAGS, scalars
from support.twin import TWIN_PY, mpirun_skip_reason, twin_env, twin_skip_reason

pytestmark = pytest.mark.slow
RUNS = {"llama-lora-1card": ("llama", 1, True), "llama-full-2cards": ("llama", 2, False),
        "gemma3-lora-2cards": ("gemma3", 2, True), "gemma3-full-1card": ("gemma3", 1, False)}


def _skip():
    for reason in (twin_skip_reason(), mpirun_skip_reason()):
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="module")
def selfcheck(tmp_path_factory):
    _skip()
    out = tmp_path_factory.mktemp("selfcheck") / "report"
    r = run_cmd([str(TWIN_PY), "-m", "launch", "selfcheck", "--hardware", "gaudi2", "--cards", "2", "--out_dir", str(out),
                 "--skip_hub", "--master_port", str(free_port())], timeout=1500, env=twin_env())
    return r, out


def test_selfcheck_passes_and_writes_its_report(selfcheck):
    r, out = selfcheck
    assert r.returncode == 0, r.stdout[-6000:]
    report = (out / "selfcheck.md").read_text()
    assert report.startswith("# dpo-dist selfcheck: PASS")
    assert "Gaudi twin" in report and "| optimum-habana | 1.21.2 |" in report and "| trl | 0.9.6 |" in report
    assert "| habana-torch-plugin | 1.24.0 |" in report and "## doctor: pass" in report
    for name in RUNS:
        assert f"| {name} | {RUNS[name][1]} | pass |" in report, name
    assert "skipped (--skip_hub)" in report


@pytest.mark.parametrize("name", sorted(RUNS))
def test_twin_run(selfcheck, name):
    _, out = selfcheck
    family, cards, lora = RUNS[name]
    run = out / "runs" / name
    m = read_json(run / "output" / "training_metrics.json")
    # optimum-habana's trainer ran, on CPU ranks, with the engine's features
    assert m["trainer_api"] == "gaudi" and m["hpu_twin"] is True and m["world_size"] == cards
    assert m["packing"] and m["packing_attention"] == "block_mask" and m["static_shapes"] and m["chunked_logps"]
    assert 1 <= m["batch_shapes"] <= 8 and len(m["length_buckets"]) <= 8
    assert m["reference"] == ("adapter" if lora else "precomputed") and m["use_peft"] is lora
    if not lora:
        assert m["reference_cache"]["path"].endswith(".pt")
    # it learned: the loss starts at log 2 (averaged over accumulation, not summed) and falls; held-out accuracy
    assert abs(m["first_train_loss"] - math.log(2)) < 0.01, m["first_train_loss"]
    assert m["last_train_loss"] < m["first_train_loss"] - 0.1, (m["first_train_loss"], m["last_train_loss"])
    assert m["eval_reward_accuracy"] > 0.8
    assert m["padding_fraction"] < 0.15 and m["pairs_per_s_steady"] and m["tokens_per_s_steady"]
    # the launch: ZeRO-0 plan -> DDP without DeepSpeed; 2 cards through optimum-habana's mpirun
    plan = read_json(run / "plan.json")
    assert plan["zero_stage"] == 0 and plan["uses_deepspeed"] is False and plan["hardware"] == "gaudi2"
    command = (run / "command.sh").read_text()
    assert "launch.gaudi_spawn" in command and "--deepspeed" not in command and "--device hpu" in command
    assert ("--use_mpi" in command) is (cards > 1)
    assert not (run / "ds_config.json").exists()
    log = (run / "launch.log").read_text()
    if cards > 1:
        assert "DistributedRunner run(): command = mpirun -n 2" in log
    # the merge post-step verified and wrote the model
    assert (run / "output_merged" / "config.json").is_file() and "verified:" in log


def test_sft_on_the_twin(tiny_assets, tmp_path):
    """SFT on the HPU path (GaudiSFTTrainer) through the launcher: the loss is on the response only, and falls; the
    training curve reaches TensorBoard."""
    _skip()
    run = tmp_path / "sft"
    r = run_cmd([str(TWIN_PY), "-m", "launch", "train", "--task", "sft", "--model", str(tiny_assets.llama_dir),
                 "--hardware", "gaudi2", "--cards", "1", "--full", "--run_dir", str(run), "--master_port", str(free_port()),
                 "--max_length", "256", "--max_prompt_length", "128", "--", "--dataset_name", str(tiny_assets.data_dir),
                 "--max_steps", "15", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
                 "--gradient_accumulation_steps", "1", "--logging_steps", "5", "--max_train_samples", "160",
                 "--max_eval_samples", "32", "--save_steps", "1000", "--report_to", "tensorboard"], timeout=600,
                env=twin_env())
    assert r.returncode == 0, r.stdout[-5000:]
    m = read_json(run / "output" / "training_metrics.json")
    assert m["stage"] == "sft" and m["backend"] == "cpu" and m["trainer"] == "GaudiSFTTrainer"
    assert 0.05 < m["loss_token_fraction"] < 0.8  # the response only: optimum-habana's default would be 1.0
    assert m["last_train_loss"] < m["first_train_loss"] - 0.5, (m["first_train_loss"], m["last_train_loss"])
    assert (run / "output_merged" / "config.json").is_file()
    tb = scalars(run / "output" / "runs")
    assert [s for s, _ in tb["train/loss"]] == [1, 5, 10, 15] and "train/learning_rate" in tb, sorted(tb)
    losses = [v for _, v in tb["train/loss"]]
    assert losses[-1] < losses[0]


def test_dpo_tracking_on_the_twin(tiny_assets, tmp_path):
    """--report_to tensorboard from inside GaudiDPOTrainer: the DPO curves, dpo-dist's throughput and padding
    figures, and the eval scalars at --eval_steps, as on the CPU path."""
    _skip()
    run = tmp_path / "dpo"
    r = run_cmd([str(TWIN_PY), "-m", "launch", "train", "--model", str(tiny_assets.llama_dir), "--hardware", "gaudi2",
                 "--cards", "1", "--run_dir", str(run), "--master_port", str(free_port()), "--max_length", "256",
                 "--max_prompt_length", "128", "--", "--dataset_name", str(tiny_assets.data_dir), "--max_steps", "6",
                 "--logging_steps", "2", "--eval_steps", "3", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "4", "--max_train_samples",
                 "64", "--max_eval_samples", "8", "--save_steps", "1000", "--report_to", "tensorboard",
                 "--no_merge"], timeout=600, env=twin_env())
    assert r.returncode == 0, r.stdout[-5000:]
    assert read_json(run / "output" / "training_metrics.json")["trainer_api"] == "gaudi"
    tb = scalars(run / "output" / "runs")
    for tag in TRAIN_TAGS:
        assert [s for s, _ in tb.get(f"train/{tag}", [])] == [1, 2, 4, 6], (tag, sorted(tb))
    assert all(v > 0 for _, v in tb["train/pairs_per_s"])
    for tag in EVAL_TAGS:
        assert {3, 6} <= {s for s, _ in tb[f"eval/{tag}"]}, (tag, sorted(tb))
