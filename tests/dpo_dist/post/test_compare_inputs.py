"""compare_base_vs_dpo and generate without a training run: their metric and report functions on synthetic
data, and bad arguments (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest

from conftest import cpu_env, run_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

def test_generate_cli_bad_model_exits_2(tmp_path):
    from dpo_dist.post.generate import main

    res = run_main(main, ["--model_name_or_path", str(tmp_path / "missing"), "--prompt", "hi"], env=cpu_env())
    assert res.returncode == 2, res.stdout
    assert "--model_name_or_path" in res.stdout and "no such model folder" in res.stdout


@pytest.mark.parametrize(
    "case",
    ["missing_base", "missing_folder", "bad_top_p"],
)
def test_compare_bad_arguments_exit_2_and_write_nothing(case, tiny_assets, tmp_path):
    from dpo_dist.post.compare import main

    work = tmp_path / "work"
    work.mkdir()
    argv = ["--finetuned_model", str(tiny_assets.llama_dir)]
    if case == "missing_base":
        expect = "--base_model is required"
    elif case == "missing_folder":
        argv += ["--base_model", str(tmp_path / "no_such_model")]
        expect = "no such model folder"
    else:
        argv += ["--base_model", str(tiny_assets.llama_dir), "--top_p", "1.5"]
        expect = "--top_p must be in (0, 1]"
    res = run_main(main, argv, cwd=work, env=cpu_env())
    assert res.returncode == 2, res.stdout
    assert expect in res.stdout, res.stdout
    assert "Traceback" not in res.stdout
    assert list(work.iterdir()) == [], "bad arguments must write nothing"


def test_metric_functions():
    from dpo_dist.post.compare import kl_metrics, preference_metrics, reward_metrics

    p = preference_metrics([-10.0, -5.0, -3.0], [-8.0, -6.0, -3.0], [10, 5, 3], [4, 6, 3])
    assert p["preference_accuracy"] == pytest.approx(1 / 3)  # ties are misses
    assert p["preference_accuracy_length_normalized"] == pytest.approx(1 / 3)  # per token: -1 > -2, then two ties
    r = reward_metrics([-9.0, -5.0], [-9.0, -5.0], [-10.0, -5.0], [-8.0, -6.0], beta=0.5)
    # rewards chosen [0.5, 0], rejected [-0.5, 0.5]: margins [1.0, -0.5]
    assert r["reward_accuracy"] == 0.5 and r["reward_margin_mean"] == pytest.approx(0.25)
    k = kl_metrics([-1.0, -2.0], [-2.0, -2.5], [2, 3])
    assert k["kl_estimate"] == pytest.approx(0.75) and k["kl_per_token"] == pytest.approx(1.5 / 5)


def test_report_functions_on_synthetic_data(tmp_path):
    from dpo_dist.post.report import curves_from_log_history, plot_training_curves

    history = [
        {"loss": 0.69, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "step": 1},
        {"loss": 0.3, "rewards/accuracies": 0.9, "rewards/margins": 1.2, "step": 5},
        {"eval_loss": 0.2, "eval_rewards/accuracies": 1.0, "step": 5},
        {"train_loss": 0.4, "step": 5},
    ]
    curves = curves_from_log_history(history)
    assert curves["loss"] == [(1.0, 0.69), (5.0, 0.3)]
    assert curves["eval_loss"] == [(5.0, 0.2)] and curves["eval_rewards/accuracies"] == [(5.0, 1.0)]
    assert plot_training_curves({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    path = plot_training_curves(curves, tmp_path / "c.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert json.loads(json.dumps(curves))  # plain data
