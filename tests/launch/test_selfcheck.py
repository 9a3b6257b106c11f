"""The selfcheck's pure parts: which runs it makes, how it judges a run and what the report says. The runs
themselves go end to end in the Gaudi twin (tests/e2e/twin/test_twin_launch.py)."""

from pathlib import Path

import pytest

from launch.selfcheck import (
    PASS_ACCURACY,
    SelfcheckArguments,
    expected_tokens_per_s_per_card,
    judge,
    render_report,
    tiny_runs,
    train_argv,
)

GOOD = {"first_train_loss": 0.6931, "last_train_loss": 0.40, "eval_reward_accuracy": 0.95, "steps": 20,
        "tokens_per_s_steady": 1500.0, "pairs_per_s_steady": 11.0, "batch_shapes": 8}


def test_baseline_is_optimum_habanas_published_figure_per_card_scaled_by_size():
    # llama-7b LoRA DPO: 13.5 pairs/s on 8 x Gaudi2 at 2 x 1024 tokens a pair = 3456 tokens/s per card.
    assert expected_tokens_per_s_per_card("gaudi2", 6_738_415_616) == pytest.approx(13.5 * 2048 / 8)
    assert expected_tokens_per_s_per_card("gaudi3", 6_738_415_616) == pytest.approx(15.1 * 2048 / 8)
    # A model half the size does the same work per token in half the FLOPs: twice the tokens.
    assert expected_tokens_per_s_per_card("gaudi2", 6_738_415_616 // 2) == pytest.approx(2 * 3456, rel=1e-6)
    assert expected_tokens_per_s_per_card("cpu", 10**9) is None
    assert expected_tokens_per_s_per_card("gaudi2", 0) is None


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"last_train_loss": 0.70}, "loss did not fall"),
    ({"eval_reward_accuracy": PASS_ACCURACY}, "is not above"),
    ({"eval_reward_accuracy": None}, "is not above"),
])
def test_judge_passes_only_falling_loss_and_accuracy_above_the_bar(change, problem):
    problems = judge(0, {**GOOD, **change}, merged=True)
    assert problems == [] if problem is None else any(problem in p for p in problems)


def test_judge_names_exit_missing_metrics_and_unverified_merge():
    assert judge(1, GOOD, merged=True) == ["exit 1"]
    assert judge(0, GOOD, merged=False) == ["no verified merged model"]
    assert judge(124, None, merged=False) == ["exit 124", "no training_metrics.json"]


def test_runs_cover_both_families_both_modes_one_and_all_cards(tmp_path):
    runs = tiny_runs({"llama": "L", "gemma3": "G"}, cards=8, steps=20)
    assert {(r.model, r.full, r.cards) for r in runs} == {("L", False, 1), ("L", True, 8), ("G", False, 8),
                                                          ("G", True, 1)}
    argv = train_argv(runs[1], SelfcheckArguments(hardware="gaudi3"), "data", tmp_path / "r", 29600)
    assert argv[argv.index("--hardware") + 1] == "gaudi3" and argv[argv.index("--cards") + 1] == "8"
    assert "--full" in argv
    # The ranks' options come after "--": 8 pairs per card per step, so the run draws exactly its steps' worth.
    ranks = argv[argv.index("--") + 1:]
    assert ranks[ranks.index("--max_steps") + 1] == "20"
    assert ranks[ranks.index("--max_train_samples") + 1] == str(8 * 8 * 20)


def test_report_says_pass_or_fail_and_shows_a_failed_runs_log_tail(tmp_path):
    runs = tiny_runs({"llama": "L", "gemma3": "G"}, cards=2, steps=20)
    log = tmp_path / "bad.log"
    log.write_text("step 1\nTraceback (most recent call last):\nRuntimeError: graph compile failed\n")
    ok = {"run": runs[0], "metrics": GOOD, "plan": None, "wall_s": 80.0, "problems": [], "log": Path("x"),
          "vs_baseline": 7.1e-05}
    bad = {"run": runs[1], "metrics": None, "plan": None, "wall_s": 3.0, "problems": ["exit 1"], "log": log}
    args = SelfcheckArguments()
    passed = render_report(args, 2, True, {"torch": "2.10"}, (0, "doctor ok"), [ok], "skipped: offline")
    assert passed.startswith("# dpo-dist selfcheck: PASS") and "Gaudi twin" in passed
    assert "0.6931 → 0.4000" in passed and "7.1e-05×" in passed  # a tiny ratio keeps its digits
    failed = render_report(args, 2, False, {"torch": "2.10"}, (0, "doctor ok"), [ok, bad], "skipped: offline")
    assert failed.startswith("# dpo-dist selfcheck: FAIL") and "Gaudi twin" not in failed
    assert "FAIL: exit 1" in failed and "RuntimeError: graph compile failed" in failed
    doctor_failed = render_report(args, 2, False, {}, (1, "FAIL torch"), [ok], "skipped")
    assert doctor_failed.startswith("# dpo-dist selfcheck: FAIL") and "doctor: exit 1" in doctor_failed
