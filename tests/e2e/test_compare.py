"""compare_base_vs_dpo and the generation test, on a tiny Llama really trained with DPO (2 ranks, ZeRO-3).

One training run and one comparison run are shared by the module (2 CPU cores); every launch has a hard timeout.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import PY, read_json, run_cmd

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def dpo_model(zero3_run) -> Path:
    """Full fine-tune of the tiny Llama (conftest.zero3_run): the output dir is a plain model folder."""
    out = zero3_run("llama", "full")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    return out


def _compare(tiny_assets, dpo_model, out_json: Path, *extra, timeout: float = 180):
    argv = [
        PY, "-m", "dpo_dist.compare_base_vs_dpo",
        "--base_model", tiny_assets.llama_dir,
        "--finetuned_model", dpo_model,
        "--dataset_name", tiny_assets.data_dir,
        "--max_eval_samples", 64,
        "--max_length", 256,
        "--max_prompt_length", 128,
        "--num_prompts", 3,
        "--num_gen_prompts", 16,
        "--max_new_tokens", 32,
        "--output_json", out_json,
        *extra,
    ]
    return run_cmd([str(x) for x in argv], timeout=timeout)


@pytest.fixture(scope="module")
def comparison(tiny_assets, dpo_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("compare_out")
    out_json = out_dir / "dpo_comparison_results.json"
    res = _compare(tiny_assets, dpo_model, out_json, "--seed", 1, "--greedy")
    assert res.returncode == 0, res.stdout[-6000:]
    return out_dir, read_json(out_json), res.stdout


def test_json_keeps_seed_keys_and_adds_metrics(comparison):
    _, results, _ = comparison
    # The seed's contract.
    assert isinstance(results["total_duration_sec"], float) and results["total_duration_sec"] > 0
    assert len(results["comparisons"]) == 3
    for comp in results["comparisons"]:
        assert isinstance(comp["prompt"], str) and "Assistant:" in comp["prompt"]
        for name in ("Base", "DPO"):
            r = comp["results"][name]
            assert isinstance(r["response"], str)
            assert isinstance(r["num_tokens"], int) and 0 <= r["num_tokens"] <= 32
    # The metrics beside them.
    m = results["metrics"]
    for name in ("Base", "DPO"):
        for key in ("preference_accuracy", "preference_accuracy_length_normalized", "mean_response_length",
                    "logp_margin_mean", "num_pairs"):
            assert key in m[name], (name, key)
        assert m[name]["num_pairs"] == 64
        assert len(m[name]["response_lengths"]) == 16
    rel = m["dpo_vs_base"]
    for key in ("reward_accuracy", "reward_margin_mean", "kl_estimate", "kl_estimate_stderr", "kl_estimate_unit",
                "kl_num_samples", "beta"):
        assert key in rel, key
    assert rel["kl_estimate_unit"] == "nats per response" and rel["kl_num_samples"] == 16
    assert rel["beta"] == 0.1 and rel["beta_source"] == "training_metrics.json"
    cfg = results["config"]
    assert cfg["greedy"] is True and cfg["seed"] == 1
    from dataclasses import fields

    from dpo_dist.post.compare import CompareArguments

    allowed = {f.name for f in fields(CompareArguments)} | {"max_completion_length", "device", "report", "versions"}
    assert set(cfg) <= allowed, set(cfg) - allowed  # the arguments only: no environment dump


def test_dpo_beats_base_on_held_out_pairs(comparison):
    _, results, stdout = comparison
    m = results["metrics"]
    base, dpo, rel = m["Base"], m["DPO"], m["dpo_vs_base"]
    # The learned preference, measured independently of the trainer.
    assert rel["reward_accuracy"] > 0.8, rel
    assert rel["reward_margin_mean"] > 0, rel
    assert dpo["preference_accuracy_length_normalized"] > base["preference_accuracy_length_normalized"] + 0.2, (base, dpo)
    assert dpo["preference_accuracy_length_normalized"] >= 0.9, dpo
    # Sum log-prob accuracy: on this data the chosen answer is longer in most pairs, so it moves little,
    # but the DPO model must not be below the base, and its log-prob margin must move towards chosen.
    assert dpo["preference_accuracy"] >= base["preference_accuracy"], (base, dpo)
    assert dpo["logp_margin_mean"] > base["logp_margin_mean"], (base, dpo)
    assert m["data"]["chosen_longer_fraction"] > 0.5
    # KL(DPO || base) >= 0; its Monte-Carlo estimate is noisy, so only check it is finite and consistent with >= 0.
    assert math.isfinite(rel["kl_estimate"]) and rel["kl_estimate"] + 3 * rel["kl_estimate_stderr"] > 0, rel
    assert abs(rel["kl_per_token"]) < 5, rel
    # The summary line quotes accuracy base -> DPO.
    assert "preference accuracy" in stdout and "->" in stdout and "reward accuracy" in stdout


def test_report_and_plots(comparison):
    from PIL import Image

    out_dir, results, _ = comparison
    report = out_dir / "dpo_comparison_report.md"
    assert report.is_file()
    text = report.read_text()
    assert "## Headline" in text and "reward accuracy" in text and "KL(DPO" in text and "Example generations" in text
    plots = results["report"]["plots"]
    assert set(plots) == {"accuracy", "lengths", "curves"}, plots  # curves: from checkpoint-30/trainer_state.json
    assert "checkpoint-30" in results["training"]["source"]
    for path in plots.values():
        p = Path(path)
        assert p.parent == out_dir and p.name in text, p
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert not list(out_dir.glob(".*.tmp")), "temp files left behind"


def test_greedy_is_deterministic(comparison, tiny_assets, dpo_model, tmp_path):
    _, first, _ = comparison
    out_json = tmp_path / "again.json"
    res = _compare(tiny_assets, dpo_model, out_json, "--seed", 2, "--greedy", "--no_report")
    assert res.returncode == 0, res.stdout[-6000:]
    again = read_json(out_json)
    assert [c["results"] for c in again["comparisons"]] == [c["results"] for c in first["comparisons"]]
    assert again["metrics"]["DPO"]["preference_accuracy"] == first["metrics"]["DPO"]["preference_accuracy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json"]  # --no_report writes only the JSON


def test_same_model_gives_zero_reward_and_kl(tiny_assets, tmp_path):
    """Base against itself: every relative figure is exactly zero and both sides agree."""
    out_json = tmp_path / "self.json"
    res = _compare(tiny_assets, tiny_assets.llama_dir, out_json, "--max_eval_samples", 8, "--num_gen_prompts", 4,
                   "--num_prompts", 1, "--max_new_tokens", 8, "--no_report")
    assert res.returncode == 0, res.stdout[-6000:]
    m = read_json(out_json)["metrics"]
    rel = m["dpo_vs_base"]
    assert rel["kl_estimate"] == 0 and rel["reward_margin_mean"] == 0 and rel["reward_accuracy"] == 0  # ties are misses
    assert m["Base"]["preference_accuracy"] == m["DPO"]["preference_accuracy"]
    assert m["Base"]["response_lengths"] == m["DPO"]["response_lengths"]


def test_generate_cli_prints_sequences(dpo_model):
    res = run_cmd(
        [PY, "-m", "dpo_dist.generate", "--model_name_or_path", str(dpo_model), "--prompt", "How do I make pancakes?",
         "--hh_format", "--max_new_tokens", "16", "--num_return_sequences", "2", "--seed", "3"],
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    assert "--- sequence 1/2" in res.stdout and "--- sequence 2/2" in res.stdout
    assert "generation test passed" in res.stdout


