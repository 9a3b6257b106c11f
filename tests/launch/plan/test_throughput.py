"""The plan's throughput counts the tokens a run measures (real where the data's are known, and it says which);
model sizes print in readable units; after a run, planned and measured figures sit side by side."""

from __future__ import annotations

import dataclasses
import json

import pytest

from launch.plan import HARDWARE, PlanOptions, load_spec, make_plan, tokens_per_pair
from launch.plan.report import format_count, render_plan_table, throughput_text
from launch.plan.speed import micro_step_tokens
from launch.runmetrics import KEY, planned_vs_measured, record_plan_in_metrics, summary_lines


@pytest.mark.parametrize("n,text", [(950, "950"), (205_632, "206k"), (353_088, "353k"), (26_423_808, "26.4M"),
                                    (268_098_176, "268.1M"), (70_553_706_496, "70.55B"), (6_738_415_616, "6.74B")])
def test_format_count(n, text):
    assert format_count(n) == text


def test_without_data_the_throughput_counts_padded_tokens_and_says_so():
    opts = PlanOptions(cards=8)
    p = make_plan(load_spec("meta-llama/Llama-3-8B"), HARDWARE["gaudi2"], opts)
    assert tokens_per_pair(opts) == (2048.0, "padded") and p.est_tokens_basis == "padded"
    assert p.est_pairs_per_s == pytest.approx(p.global_batch_size / p.est_step_time_s, rel=1e-3)
    assert p.est_tokens_per_s == pytest.approx(p.est_pairs_per_s * 2 * opts.max_length, rel=1e-3)
    assert "padded tokens: 2,048 per pair" in throughput_text(p)
    assert p.model_params == load_spec("meta-llama/Llama-3-8B").num_params


def test_with_the_datas_tokens_the_throughput_counts_real_tokens():
    spec, hw = load_spec("meta-llama/Llama-3-8B"), HARDWARE["gaudi2"]
    padded = make_plan(spec, hw, PlanOptions(cards=8))
    real = make_plan(spec, hw, PlanOptions(cards=8, pair_tokens=(540.0, 1900.0)))
    assert real.est_tokens_basis == "real" and real.est_tokens_per_pair == 540.0
    assert real.est_tokens_per_s == pytest.approx(real.global_batch_size / real.est_step_time_s * 540, rel=1e-3)
    assert "real tokens: 540 per pair" in throughput_text(real)
    # Packed rows carry the real tokens: a step of the same batch takes less time than padded rows would.
    if real.micro_batch_size == padded.micro_batch_size and real.zero_stage == padded.zero_stage:
        assert real.est_step_time_s < padded.est_step_time_s
    assert real.est_tokens_per_s < padded.est_tokens_per_s  # 540 real tokens per pair, not 2,048 padded ones


def test_micro_step_tokens_packed_vs_rows():
    assert micro_step_tokens(PlanOptions(cards=1), 4) == 2 * 4 * 1024
    assert micro_step_tokens(PlanOptions(cards=1, pair_tokens=(500.0, 900.0)), 4) == 2000
    assert micro_step_tokens(PlanOptions(cards=1, pair_tokens=(500.0, 900.0), packing=False), 4) == 2 * 4 * 1024


def test_a_small_model_prints_readable_sizes(tiny_assets):
    spec = load_spec(str(tiny_assets.llama_dir))
    p = make_plan(spec, HARDWARE["cpu"], PlanOptions(cards=2, card_memory_gib=64))
    # A short model name: a long cache path (CI's checkout lives deeper) would wrap the cell mid-phrase.
    table = render_plan_table(dataclasses.replace(p, model="tiny-llama"))
    assert f"tiny-llama ({format_count(spec.num_params)} parameters)" in table and "0.00B parameters)" not in table
    assert p.model_params == spec.num_params < 1e9


PLAN = {"micro_batch_size": 2, "gradient_accumulation_steps": 4, "world_size": 2, "est_step_time_s": 0.5,
        "est_tokens_per_s": 8000.0, "est_pairs_per_s": 32.0, "est_tokens_per_pair": 250.0, "est_tokens_basis": "real",
        "memory_gib": {"total": 1.5}, "card_memory_gib": 16.0, "max_length": 512}
METRICS = {"backend": "cpu", "steps": 10, "train_seconds": 6.0, "step_time_s": 0.6, "step_time_s_steady": 0.55,
           "tokens_per_s": 7000.0, "tokens_per_s_steady": 7500.0, "pairs_per_s": 28.0, "pairs_per_s_steady": 30.0,
           "peak_memory_gib_per_rank_max": 1.8, "global_batch_pairs": 16}


def test_planned_vs_measured_block():
    b = planned_vs_measured(PLAN, METRICS, "run/plan.json")
    assert b["step_time_s"] == {"planned": 0.5, "measured": 0.6, "measured_steady": 0.55,
                                "measured_over_planned": 1.1}
    assert b["tokens_per_s"]["planned"] == 8000.0 and b["tokens_per_s"]["measured"] == 7000.0
    assert b["tokens_per_s"]["planned_basis"].startswith("real: 250 tokens per pair")
    assert b["memory_gib_per_card"] == {"planned": 1.5, "measured": 1.8, "card": 16.0,
                                        "measured_what": "peak RSS per rank", "measured_over_planned": 1.2}
    assert "note" not in b and b["plan"] == "run/plan.json"
    other = planned_vs_measured({**PLAN, "est_tokens_basis": "padded"}, {**METRICS, "global_batch_pairs": 32})
    assert "padded" in other["tokens_per_s"]["planned_basis"] and "global batch (32 pairs)" in other["note"]
    text = "\n".join(summary_lines(b))
    assert "step time   planned 0.500 s, measured 0.600 s; steady 0.550" in text and "peak RSS" in text


def test_record_plan_in_metrics(tmp_path):
    assert record_plan_in_metrics(tmp_path, PLAN) is None  # no metrics file: nothing to add to
    (tmp_path / "training_metrics.json").write_text(json.dumps(METRICS))
    block = record_plan_in_metrics(tmp_path, PLAN, "p.json")
    saved = json.loads((tmp_path / "training_metrics.json").read_text())
    assert saved[KEY] == block and saved["steps"] == 10


# Measured CPU step times (2 ranks of one thread, ZeRO-3, full fine-tuning, packed, precomputed reference, fp32):
# `make demo`'s DPO step (training_metrics.json step_time_s_steady) and the bench's B-fp32 run
# (bench/results/latest.json: 29.47 s for 96 pairs, reference pass included, at 64 pairs per step).
CPU_STEP_POINTS = [
    dict(what="make demo DPO step", model="tiny", mb=32, ga=1, pair_tokens=(132.0, 400.0), seconds=0.217),
    dict(what="bench B-fp32", model="bench", mb=16, ga=2, pair_tokens=(268.0, 707.0), seconds=29.47 / 1.5),
]


@pytest.mark.parametrize("point", CPU_STEP_POINTS, ids=lambda p: p["what"])
def test_cpu_step_time_is_calibrated_on_measured_steps(point, tiny_assets, tmp_path, monkeypatch):
    """The CPU speed constants (launch/plan/hardware.py: mfu, micro_step_overhead_s) reproduce the two step times they
    were fitted on, within 5%: a small model's step is its fixed overhead, a larger one's its FLOPs."""
    from transformers import AutoTokenizer

    from dpo_dist.tiny.models import tiny_config
    from launch.plan.speed import step_time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    tiny_config("llama", tok, point["model"]).save_pretrained(tmp_path)  # the model's config is all a plan reads
    spec = load_spec(str(tmp_path))
    assert spec.num_params == {"tiny": 205_120, "bench": 26_354_176}[point["model"]]
    opts = PlanOptions(cards=2, max_length=512, max_prompt_length=256, use_peft=False, zero_stage=3,
                       pair_tokens=point["pair_tokens"], card_memory_gib=16.0)
    t = step_time(spec, HARDWARE["cpu"], opts, 1, 3, "none", point["mb"], False, "precomputed", point["ga"])
    assert abs(t / point["seconds"] - 1) <= 0.05, (point["what"], t, point["seconds"])
    assert HARDWARE["cpu"].mfu == 0.13 and HARDWARE["cpu"].micro_step_overhead_s == 0.13
