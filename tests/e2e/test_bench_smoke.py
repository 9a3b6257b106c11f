"""Smoke version of `make bench`: 1 short run each side (A, A-tuned, B; tiny model, 16 pairs), outputs complete."""

from __future__ import annotations

import json
import sys

from conftest import ROOT, cpu_env, run_cmd


def test_bench_smoke(tmp_path, tiny_assets):
    out = tmp_path / "results"
    r = run_cmd([sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--timeout", "240"],
                timeout=400, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:]
    res = json.loads((out / "latest.json").read_text())
    for key in ("pairs_per_s_ratio", "peak_memory_ratio", "padding_fraction_b", "mfu_b", "mfu_a", "n_runs",
                "planner_predicted_peak_gib_b", "measured_peak_above_baseline_gib_b"):
        assert res[key] is not None, key
    assert res["n_runs"] == 1 and res["mfu_a"] > 0 and res["mfu_b"] > 0 and res["mfu_a_tuned"] > 0
    assert 0 <= res["padding_fraction_b"] < res["padding_fraction_a"]  # buckets pad less than pad-to-longest
    assert res["padding_fraction_a_tuned"] == 0  # TRL's padding_free pads nothing
    tuned = res["tuned_trl"]
    assert tuned["options"]["padding_free"] is True and tuned["pairs_per_s_a_tuned"] > 0
    assert tuned["pairs_per_s_ratio"] > 0 and tuned["peak_memory_ratio"] > 0
    assert res["plan_b"]["bf16"] is True and res["peak_flops_bf16"] > 0
    assert res["card_memory_gib_b"] == 2.0  # smoke: the tiny model's peaks are the runtime alone
    assert len(res["buckets_b"]) <= 8
    md = (out / "latest.md").read_text()
    assert md.startswith("# dpo-dist bench") and "A-tuned: TRL tuned" in md and "B/A-tuned" in md
    assert (out / "latest.png").stat().st_size > 1000
