"""The family table against transformers, peft and optimum-habana: exact parameter counts on the meta device,
the config classes' defaults, the LoRA targets peft wraps, which families optimum-habana adapts, and what the plan
says about a mixture of experts and about a family Gaudi runs unoptimised."""

import dataclasses
import importlib.metadata
import json
import re

import pytest

from dpo_dist.model.lora import LORA_TARGETS, default_lora_targets
from launch.plan import HARDWARE, PlanOptions, dpo_step_flops, load_spec, make_plan
from launch.plan.specs import BUILTIN, FAMILIES, spec_from_config


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _meta_model(transformers, config):
    """The causal LM transformers builds for ``config``, on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _largest(model) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _saved(config) -> dict:
    """config.json as save_pretrained writes it: only the keys that differ from the class defaults."""
    return json.loads(config.to_json_string())


# Real hidden sizes, a few layers (counts are linear in layers), and the features each family switches on.
FAMILY_CONFIGS = {
    "llama-biased": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                         num_attention_heads=32, vocab_size=32000, attention_bias=True,
                                         mlp_bias=True)),
    "mistral-nemo": ("MistralConfig", dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=2,
                                           num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                           vocab_size=131072, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
    "qwen2-tied": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=3,
                                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=2,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=40960)),
    "qwen3-biased": ("Qwen3Config", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=2,
                                         num_attention_heads=16, num_key_value_heads=8, attention_bias=True)),
    "gemma": ("GemmaConfig", dict(num_hidden_layers=2)),  # Gemma 7B's shape is the class default
    "gemma2": ("Gemma2Config", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=2,
                                    num_attention_heads=16, num_key_value_heads=8)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, vocab_size=262144)),
    "phi3-medium": ("Phi3Config", dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=2,
                                       num_attention_heads=40, num_key_value_heads=10)),
    "mixtral": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                      num_attention_heads=32, num_key_value_heads=8)),
    "qwen2_moe-mixed": ("Qwen2MoeConfig", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=2,
                                         num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                         moe_intermediate_size=768)),
}


def test_every_family_is_instantiated_below():
    classes = {cls for cls, _ in FAMILY_CONFIGS.values()}
    assert {f.config_class for f in FAMILIES.values()} <= classes


@pytest.mark.parametrize("case", FAMILY_CONFIGS)
def test_counts_equal_transformers_on_meta_device(case):
    """The planner's count (parameters, largest module, active parameters) from the saved config.json equals what
    transformers instantiates."""
    transformers = pytest.importorskip("transformers")
    cls, kwargs = FAMILY_CONFIGS[case]
    config = getattr(transformers, cls)(**kwargs)
    model = _meta_model(transformers, config)
    spec = spec_from_config(_saved(config), name=case)
    assert spec.num_params == _count(model)
    assert spec.largest_layer_params == _largest(model)
    experts = [m for n, m in model.named_modules() if re.search(r"\.experts\.\d+$", n)]
    if experts:  # one expert's parameters: the routed ones count, the rest do not
        per_expert = _count(experts[0])
        idle = len(experts) - spec.moe_layers * spec.num_experts_per_tok
        assert spec.active_text_params == _count(model) - idle * per_expert
        assert len(experts) == spec.moe_layers * spec.num_experts
    else:
        assert spec.active_text_params == spec.num_params


def test_mixed_dense_and_sparse_layers_are_read_from_the_config():
    spec = spec_from_config({"model_type": "qwen2_moe", "num_hidden_layers": 4, "decoder_sparse_step": 2,
                             "mlp_only_layers": [1]}, "m")
    assert spec.moe_layers == 1  # layer 3 only: layer 1 is listed dense, 0 and 2 are off the step


# Published config.json values (the keys that matter) of built-in specs small enough to instantiate here.
PUBLISHED_CONFIGS = {
    "mistral-7b-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                            max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=32768, sliding_window=None, num_local_experts=8,
                         num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, sliding_window=32768, use_sliding_window=False,
                         tie_word_embeddings=True),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                        max_position_embeddings=32768, sliding_window=131072, use_sliding_window=False,
                        tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, sliding_window=None, use_sliding_window=False,
                     attention_bias=False, tie_word_embeddings=False),
    "phi3-mini-4k": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=4096, sliding_window=2047, pad_token_id=32000,
                         tie_word_embeddings=False),
}


@pytest.mark.parametrize("key", PUBLISHED_CONFIGS)
def test_builtin_specs_are_their_published_configs(key):
    """The built-in spec is what its published config.json parses to, and transformers builds as many parameters."""
    transformers = pytest.importorskip("transformers")
    published = PUBLISHED_CONFIGS[key]
    parsed = spec_from_config(published, name=BUILTIN[key].name, source="builtin")
    assert parsed == BUILTIN[key]
    config = transformers.AutoConfig.for_model(**published)
    assert _count(_meta_model(transformers, config)) == BUILTIN[key].num_params


@pytest.mark.parametrize("family", FAMILIES)
def test_family_defaults_are_the_config_classes(family):
    """save_pretrained leaves out keys equal to the class defaults, so the table's defaults must be them."""
    transformers = pytest.importorskip("transformers")
    row = FAMILIES[family]
    defaults = getattr(transformers, row.config_class)().to_dict()
    assert {k: defaults.get(k) for k in row.defaults} == dict(row.defaults)
    assert getattr(transformers, row.causal_lm).config_class.__name__ == row.config_class


def test_gaudi_column_is_what_optimum_habana_adapts():
    """A family is "adapted" exactly when the installed optimum-habana's adapt_transformers_to_gaudi replaces its
    causal-LM class (read from its source: importing it needs Habana's libraries)."""
    try:
        dist = importlib.metadata.distribution("optimum-habana")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optimum-habana is not installed")
    source = dist.locate_file("optimum/habana/transformers/modeling_utils.py").read_text()
    body = source[source.index("def adapt_transformers_to_gaudi"):]
    adapted = set(re.findall(r"transformers\.models\.\w+\.modeling_\w+\.(\w+ForCausalLM) = ", body))
    assert "LlamaForCausalLM" in adapted
    got = {family: "adapted" if row.causal_lm in adapted else "unoptimised" for family, row in FAMILIES.items()}
    assert got == {family: row.gaudi for family, row in FAMILIES.items()}
    assert got["phi3"] == "unoptimised"


def test_every_family_has_lora_targets_it_has_modules_for():
    assert set(FAMILIES) == set(LORA_TARGETS)
    for family in FAMILIES:
        spec = spec_from_config({"model_type": "gemma3_text" if family == "gemma3" else family}, family)
        assert spec.lora_params(8, default_lora_targets(family)) > 0  # every default target is a module it has


LORA_CONFIGS = {  # tiny shapes: peft wraps every matching module
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, head_dim=16)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "qwen2": ("Qwen2Config", {}),
    "gemma2": ("Gemma2Config", dict(head_dim=16)),
}


@pytest.mark.parametrize("family", LORA_CONFIGS)
def test_default_lora_targets_are_what_peft_wraps(family):
    """The planner's adapter size for the family's default targets is peft's, and no router is wrapped."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cls, extra = LORA_CONFIGS[family]
    config = getattr(transformers, cls)(**{**dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
                                           **extra})
    targets = default_lora_targets(family)
    model = peft.get_peft_model(_meta_model(transformers, config), peft.LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert spec_from_config(_saved(config), family).lora_params(4, targets) == trainable
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(targets) and not wrapped & {"gate", "shared_expert_gate", "lm_head"}


# --------------------------------------------------------------------------- #
# What the plan says
# --------------------------------------------------------------------------- #

def test_moe_plan_counts_all_experts_for_memory_and_the_active_ones_for_flops():
    s = load_spec("mistralai/Mixtral-8x7B-v0.1")
    lean = dataclasses.replace(s, num_experts=2, num_experts_per_tok=2)  # the same active path, fewer experts
    opts = PlanOptions(cards=8, use_peft=False, zero_stage=3)
    big, small = (make_plan(x, HARDWARE["gaudi2"], opts) for x in (s, lean))
    assert big.memory_gib.params > 3 * small.memory_gib.params  # memory: all 8 experts
    matmul = s.active_text_params - s.vocab_size * s.hidden_size
    assert dpo_step_flops(s, 1.0, use_peft=False, reference="precomputed") == 6 * matmul  # FLOPs: the 2 routed
    router = 6 * s.moe_layers * s.hidden_size * (s.num_experts - lean.num_experts)  # the router's outputs differ
    assert dpo_step_flops(s, 1.0, False, "precomputed") == dpo_step_flops(lean, 1.0, False, "precomputed") + router
    note = next(n for n in big.notes if n.startswith("mixture of experts"))
    assert "8 experts in 32 of 32 layers, 2 routed per token" in note
    assert f"all {s.num_params / 1e9:.2f}B parameters" in note and f"the {s.active_text_params / 1e9:.2f}B" in note


@pytest.mark.parametrize("hardware,noted", [("gaudi2", True), ("gaudi3", True), ("cuda", False), ("cpu", False)])
def test_a_family_optimum_habana_does_not_adapt_is_planned_with_a_note_on_gaudi(hardware, noted):
    plan = make_plan(load_spec("microsoft/Phi-3-mini-4k-instruct"), HARDWARE[hardware], PlanOptions(cards=1))
    assert any("does not adapt phi3 models" in n and "unoptimised" in n for n in plan.notes) == noted
    adapted = make_plan(load_spec("mistralai/Mistral-7B-v0.3"), HARDWARE[hardware], PlanOptions(cards=1))
    assert not any("does not adapt" in n for n in adapted.notes)


@pytest.mark.parametrize("model", ["mistralai/Mistral-7B-v0.3", "Qwen/Qwen2.5-72B-Instruct",
                                   "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B",
                                   "microsoft/Phi-3-mini-4k-instruct", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_new_builtin_models_plan_on_8_gaudi2_cards(model):
    plan = make_plan(load_spec(model), HARDWARE["gaudi2"], PlanOptions(cards=8))
    assert plan.fits
    lora = next(n for n in plan.notes if n.startswith("LoRA"))
    assert ", ".join(LORA_TARGETS[load_spec(model).family]) in lora


def test_a_short_sliding_window_is_noted():
    plan = make_plan(load_spec("mistralai/Mistral-7B-v0.1"), HARDWARE["gaudi2"], PlanOptions(cards=8,
                                                                                              max_length=8192))
    assert any(n.startswith("sliding-window attention (4096 tokens)") for n in plan.notes)
    plan = make_plan(load_spec("mistralai/Mistral-7B-v0.1"), HARDWARE["gaudi2"], PlanOptions(cards=8))
    assert not any(n.startswith("sliding-window") for n in plan.notes)  # 1024-token rows: the window is moot
