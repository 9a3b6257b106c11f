"""dpo_dist.model.moe: the ZeRO-3 leaf-module rows and the flagging (single process; the 2-rank runs are in
tests/e2e/test_moe_zero3.py)."""

from __future__ import annotations

import importlib
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the in-process deepspeed import stays on CPU

from dpo_dist.model.moe import MOE_BLOCKS, NO_LEAF_ENV, mark_moe_leaves, moe_block_class
from launch.plan.specs import FAMILIES

_SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, max_position_embeddings=64)


def _model(family: str):
    import transformers

    if family == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=1, **_SMALL)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16, **_SMALL)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=16, **_SMALL)
    else:
        config = transformers.LlamaConfig(**_SMALL)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_every_moe_family_the_planner_sizes_has_a_block_row():
    assert {f for f, fam in FAMILIES.items() if fam.moe} == set(MOE_BLOCKS)
    assert moe_block_class("llama") is None and moe_block_class("mixtral") == "MixtralSparseMoeBlock"


@pytest.mark.parametrize("family", sorted(MOE_BLOCKS))
def test_block_class_exists_in_transformers(family):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    assert isinstance(getattr(module, MOE_BLOCKS[family]), type)


@pytest.mark.parametrize("family", sorted(MOE_BLOCKS))
def test_zero3_flags_every_block_and_only_the_blocks(family, monkeypatch):
    monkeypatch.delenv(NO_LEAF_ENV, raising=False)
    model = _model(family)
    assert mark_moe_leaves(model, family, zero_stage=2) == 0
    assert not any(getattr(m, "_z3_leaf", False) for m in model.modules())
    assert mark_moe_leaves(model, family, zero_stage=3) == 2
    flagged = [type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)]
    assert flagged == [MOE_BLOCKS[family]] * 2


def test_dense_model_and_test_switch_flag_nothing(monkeypatch):
    assert mark_moe_leaves(_model("llama"), "llama", zero_stage=3) == 0
    monkeypatch.setenv(NO_LEAF_ENV, "1")
    model = _model("mixtral")
    assert mark_moe_leaves(model, "mixtral", zero_stage=3) == 0
    assert not any(getattr(m, "_z3_leaf", False) for m in model.modules())


def test_moe_family_without_its_block_is_an_error(monkeypatch):
    monkeypatch.delenv(NO_LEAF_ENV, raising=False)
    with pytest.raises(RuntimeError, match="MixtralSparseMoeBlock"):
        mark_moe_leaves(_model("llama"), "mixtral", zero_stage=3)
