"""--bf16 on each backend: bf16 weights (HPU, CUDA) or DeepSpeed's torch_autocast over fp32 weights (CPU)."""

from __future__ import annotations

import json

import pytest

from dpo_dist.backend import BACKENDS
from dpo_dist.train.deepspeed import check_bf16, weights_bf16
from dpo_dist.util.errors import ArgumentError
from launch.cli import dpo_args_for


def test_weights_stay_fp32_where_bf16_is_autocast():
    assert weights_bf16(BACKENDS["cpu"], True) is False
    assert weights_bf16(BACKENDS["cuda"], True) is True and weights_bf16(BACKENDS["hpu"], True) is True
    assert weights_bf16(BACKENDS["cuda"], False) is False


def test_cpu_bf16_needs_torch_autocast_in_the_deepspeed_config(tmp_path):
    plain = tmp_path / "zero3.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ArgumentError, match="torch_autocast") as e:
        check_bf16(BACKENDS["cpu"], True, str(plain))
    assert "launch train --bf16 true" in str(e.value)  # how to fix it
    with pytest.raises(ArgumentError, match=r"\(none\)"):
        check_bf16(BACKENDS["cpu"], True, None)
    auto = tmp_path / "auto.json"
    auto.write_text(json.dumps({"zero_optimization": {"stage": 3},
                                "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    check_bf16(BACKENDS["cpu"], True, str(auto))
    check_bf16(BACKENDS["cpu"], False, str(plain))  # fp32: nothing to check
    check_bf16(BACKENDS["cuda"], True, str(plain))  # bf16 weights: DeepSpeed's bf16 mode, no autocast needed


def test_launcher_passes_bf16_from_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from launch.cli import TrainArguments
    from launch.plan import HARDWARE, PlanOptions, load_spec, make_plan

    spec = load_spec("google/gemma-3-270m")
    a = TrainArguments(model="google/gemma-3-270m", hardware="cpu", cards=2)
    for bf16 in (True, False):
        plan = make_plan(spec, HARDWARE["cpu"], PlanOptions(cards=2, card_memory_gib=64, bf16=bf16))
        args = dpo_args_for(plan, a, tmp_path / "ds.json", tmp_path / "out", [])
        assert ("--bf16" in args) is bf16
