"""--report_to on real runs (one CPU process each, the tiny Llama): the DPO step's event files hold the training
curves (loss, reward accuracy and margins, chosen/rejected rewards, learning rate, and dpo-dist's pairs/s, tokens/s,
padding fraction) at the logged steps and the eval scalars at --eval_steps, read back with TensorBoard's own event
reader; SFT and the comparison log to the same tracker; MLflow (a local file store) too, when mlflow is installed."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import PY, run_cmd
from tests.support.tb_events import EVAL_TAGS, TRAIN_TAGS, images, scalars
from tests.support.testing_utils import cpu_env

pytestmark = pytest.mark.slow

HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None


def test_dpo_run_writes_training_and_eval_curves(tmp_path, tiny_assets, monkeypatch):
    out = tmp_path / "out"
    trackers = "tensorboard,mlflow" if HAVE_MLFLOW else "tensorboard"
    env = cpu_env(MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
                  MLFLOW_EXPERIMENT_NAME="dpo-dist-test")
    res = run_cmd([PY, "-m", "dpo_dist.dpo", "--model_name_or_path", str(tiny_assets.llama_dir),
                   "--dataset_name", str(tiny_assets.data_dir), "--output_dir", str(out), "--device", "cpu",
                   "--max_steps", "6", "--logging_steps", "2", "--eval_steps", "3", "--per_device_train_batch_size",
                   "2", "--per_device_eval_batch_size", "4", "--max_train_samples", "64", "--max_eval_samples", "8",
                   "--max_length", "256", "--max_prompt_length", "128", "--learning_rate", "1e-3", "--packing",
                   "--length_buckets", "4", "--report_to", trackers, "--no_merge", "--save_steps", "100"],
                  timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-5000:]
    tb = scalars(out / "runs")
    logged = [1, 2, 4, 6]  # logging_first_step, then every 2
    for tag in TRAIN_TAGS:
        assert [s for s, _ in tb.get(f"train/{tag}", [])] == logged, (tag, sorted(tb))
    assert all(v > 0 for _, v in tb["train/pairs_per_s"] + tb["train/tokens_per_s"])
    assert all(0 <= v < 1 for _, v in tb["train/padding_fraction"])
    for tag in EVAL_TAGS:
        assert {3, 6} <= {s for s, _ in tb[f"eval/{tag}"]}, tag
    if HAVE_MLFLOW:
        import mlflow

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.7 keeps the file store behind this switch

        client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
        exp = client.get_experiment_by_name("dpo-dist-test")
        # transformers' callback ends its run with training; the final evaluate() then logs into a second one.
        runs = client.search_runs([exp.experiment_id])
        for key in ("loss", "rewards/accuracies", "pairs_per_s", "tokens_per_s", "learning_rate", "eval_loss"):
            assert any(client.get_metric_history(r.info.run_id, key) for r in runs), key
        train_run = next(r for r in runs if client.get_metric_history(r.info.run_id, "pairs_per_s"))
        assert [m.step for m in client.get_metric_history(train_run.info.run_id, "pairs_per_s")] == logged


def test_sft_and_comparison_log_to_the_same_tracker(tmp_path, tiny_assets):
    out = tmp_path / "sft"
    res = run_cmd([PY, "-m", "dpo_dist.sft", "--model_name_or_path", str(tiny_assets.llama_dir),
                   "--dataset_name", str(tiny_assets.data_dir), "--output_dir", str(out), "--device", "cpu",
                   "--max_steps", "2", "--logging_steps", "1", "--max_train_samples", "16", "--max_eval_samples", "4",
                   "--max_length", "256", "--report_to", "tensorboard", "--no_merge", "--save_steps", "100"],
                  timeout=600, env=cpu_env())
    assert res.returncode == 0, res.stdout[-5000:]
    tb = scalars(out / "runs")
    assert [s for s, _ in tb["train/loss"]] == [1, 2] and "train/learning_rate" in tb

    results = tmp_path / "cmp" / "results.json"
    res = run_cmd([PY, "-m", "dpo_dist.compare_base_vs_dpo", "--base_model", str(tiny_assets.llama_dir),
                   "--finetuned_model", str(tiny_assets.llama_dir), "--dataset_name", str(tiny_assets.data_dir),
                   "--output_json", str(results), "--max_eval_samples", "8", "--num_prompts", "1",
                   "--num_gen_prompts", "2", "--max_new_tokens", "8", "--max_length", "256", "--max_prompt_length",
                   "128", "--report_to", "tensorboard", "--greedy"], timeout=600, env=cpu_env())
    assert res.returncode == 0, res.stdout[-5000:]
    logdir = results.parent / "runs" / "compare"
    tb = scalars(logdir)
    for tag in ("compare/DPO/preference_accuracy", "compare/Base/preference_accuracy",
                "compare/dpo_vs_base/reward_accuracy", "compare/dpo_vs_base/kl_estimate"):
        assert tag in tb, (tag, sorted(tb))
    assert {"compare/accuracy", "compare/lengths"} <= images(logdir)
