"""Model architecture specs for the planner: parameter counts and layer shapes of decoder-only families.

Hand-written on purpose: the planner must run without torch/transformers, so it cannot instantiate a model
(``accelerate.init_empty_weights`` would need torch) to count parameters. ``FAMILIES`` says, per family, how
transformers 4.55 builds a decoder layer from ``config.json`` (norms, fused projections, biases, experts);
``ModelSpec`` turns that and the config's sizes into exact counts. tests/launch/plan/test_specs.py checks them
against every family instantiated on the meta device and against the published parameter counts of ``BUILTIN``.
A family whose shape cannot be read from its config is refused by name (``REFUSED``, with the reason).

``load_spec(model)`` resolves, in order:
  1. a local folder with ``config.json`` (any family of ``FAMILIES``, or a multimodal Gemma3Config whose
     decoder sits under ``text_config``);
  2. the Hub's ``config.json`` via ``huggingface_hub`` (skipped when HF_HUB_OFFLINE or
     TRANSFORMERS_OFFLINE is set; every network/auth error falls through);
  3. the built-in table below (the published configs), so planning works offline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from dpo_dist.model.loader import family_of, hub_offline

GEMMA3_SIZES = ("270m", "1b", "4b", "12b", "27b")
LLAMA_SIZES = {"2": ("7b", "13b", "70b"), "3": ("8b", "70b"), "3.1": ("8b", "70b")}
QWEN_SIZES = {"2.5": ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b"),
              "3": ("0.6b", "1.7b", "4b", "8b", "14b", "32b", "30b-a3b", "235b-a22b")}


class SpecError(ValueError):
    """A model name or config the planner cannot size; the message says how to fix it."""


# --------------------------------------------------------------------------- #
# The family table: how each decoder-only family builds its layers
# --------------------------------------------------------------------------- #

# The gated MLP's projections, (gate, up, down), as the dense families name them.
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """How transformers 4.55 builds one decoder-only family from its config.json.

    ``defaults`` are the config class's defaults for the keys the planner reads: ``save_pretrained`` writes only
    the keys that differ from them, so a missing key means its default (a test compares them with the classes).
    A bias is always there (True), never (False), or switched by the config key named."""

    config_class: str  # transformers' config class
    causal_lm: str  # transformers' causal-LM class (the one optimum-habana replaces when it adapts the family)
    defaults: Mapping[str, object]
    layer_norms: int = 2  # RMSNorms over hidden_size per decoder layer (Gemma 2/3: pre and post, 4)
    qk_norm: bool = False  # q_norm and k_norm over head_dim (Qwen3, Gemma 3)
    fused: bool = False  # one qkv_proj and one gate_up_proj (Phi-3) instead of q/k/v and gate/up
    qkv_bias: bool | str = False
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    # Mixture of experts: the config keys of the expert count and of an expert's MLP width, the experts' projection
    # names (gate, up, down); every layer is sparse unless decoder_sparse_step / mlp_only_layers say otherwise.
    # The router is ``gate`` (hidden -> experts); ``shared_expert``: one more MLP of
    # shared_expert_intermediate_size and its ``shared_expert_gate`` (hidden -> 1) in each sparse layer.
    experts_key: str = ""
    expert_width_key: str = ""
    expert_names: tuple[str, str, str] = GATED_MLP
    shared_expert: bool = False
    # How config.json turns on sliding-window attention: "window" (a sliding_window value), "flag"
    # (use_sliding_window as well), "" (it has none).
    sliding: str = ""
    # On Gaudi: "adapted" when optimum-habana 1.21.2's adapt_transformers_to_gaudi replaces the family's modeling
    # classes (fused RoPE / RMSNorm / FusedSDPA, static shapes); "unoptimised" when it runs on transformers' own
    # modeling code there (a test reads the installed optimum-habana to keep this column true).
    gaudi: str = "adapted"

    @property
    def moe(self) -> bool:
        return bool(self.experts_key)


_LLAMA_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    vocab_size=32000, tie_word_embeddings=False)

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM",
                    dict(_LLAMA_SHAPE, max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
                    qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": Family("MistralConfig", "MistralForCausalLM",
                      dict(_LLAMA_SHAPE, intermediate_size=14336, num_key_value_heads=8,
                           max_position_embeddings=131072, sliding_window=4096),
                      sliding="window"),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM",
                    dict(_LLAMA_SHAPE, intermediate_size=22016, vocab_size=151936, max_position_embeddings=32768,
                         use_sliding_window=False, sliding_window=None),
                    qkv_bias=True, sliding="flag"),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM",
                    dict(_LLAMA_SHAPE, intermediate_size=22016, vocab_size=151936, head_dim=128,
                         max_position_embeddings=32768, attention_bias=False, use_sliding_window=False,
                         sliding_window=None),
                    qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias", sliding="flag"),
    "gemma": Family("GemmaConfig", "GemmaForCausalLM",
                    dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=16, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
                         max_position_embeddings=8192, attention_bias=False),
                    qkv_bias="attention_bias", o_bias="attention_bias"),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM",
                     dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
                          max_position_embeddings=8192, attention_bias=False, sliding_window=4096),
                     layer_norms=4, qkv_bias="attention_bias", o_bias="attention_bias", sliding="window"),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM",
                     dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=256, vocab_size=262208, tie_word_embeddings=True,
                          max_position_embeddings=131072, attention_bias=False, sliding_window=4096),
                     layer_norms=4, qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias",
                     sliding="window"),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM",
                   dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                        vocab_size=32064, tie_word_embeddings=False, max_position_embeddings=4096,
                        sliding_window=None),
                   fused=True, sliding="window", gaudi="unoptimised"),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM",
                      dict(_LLAMA_SHAPE, intermediate_size=14336, num_key_value_heads=8,
                           max_position_embeddings=131072, sliding_window=None, num_local_experts=8,
                           num_experts_per_tok=2),
                      experts_key="num_local_experts", expert_width_key="intermediate_size",
                      expert_names=("w1", "w3", "w2"), sliding="window"),
    "qwen2_moe": Family("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=151936, tie_word_embeddings=False,
                             max_position_embeddings=32768, qkv_bias=True, use_sliding_window=False,
                             sliding_window=None, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                             shared_expert_intermediate_size=5632, decoder_sparse_step=1, mlp_only_layers=[]),
                        qkv_bias="qkv_bias", experts_key="num_experts", expert_width_key="moe_intermediate_size",
                        shared_expert=True, sliding="flag"),
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                        dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=151936, tie_word_embeddings=False,
                             max_position_embeddings=32768, attention_bias=False, use_sliding_window=False,
                             sliding_window=None, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                             decoder_sparse_step=1, mlp_only_layers=[]),
                        qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias", experts_key="num_experts",
                        expert_width_key="moe_intermediate_size", sliding="flag"),
}

_VISION = "a multimodal model: its vision tower's shape is not modelled (only Gemma 3's is)"
# Families whose shape the planner cannot read from config.json, and why.
REFUSED: dict[str, str] = {
    "deepseek_v2": "multi-head latent attention (q_lora_rank / kv_lora_rank) and dense-then-MoE layers "
                   "(first_k_dense_replace) are not modelled",
    "deepseek_v3": "multi-head latent attention (q_lora_rank / kv_lora_rank) and dense-then-MoE layers "
                   "(first_k_dense_replace) are not modelled",
    "gpt_oss": "its experts are fused 3-D parameters with biases and its attention has learned sinks, "
               "which are not modelled",
    "llama4": "its experts are fused 3-D parameters, MoE layers interleave with dense ones "
              "(interleave_moe_layer_step), and the checkpoints carry a vision tower: not modelled",
    "llama4_text": "its experts are fused 3-D parameters and MoE layers interleave with dense ones "
                   "(interleave_moe_layer_step): not modelled",
    "mamba": "state-space layers, not attention: not modelled",
    "falcon_mamba": "state-space layers, not attention: not modelled",
    "jamba": "it mixes state-space (Mamba) and attention layers: not modelled",
    "t5": "an encoder-decoder model, not a decoder-only causal LM",
    "bart": "an encoder-decoder model, not a decoder-only causal LM",
    "llava": _VISION, "mllama": _VISION, "qwen2_vl": _VISION, "qwen2_5_vl": _VISION, "paligemma": _VISION,
}


class Linear(NamedTuple):
    """One linear module of a decoder layer: its leaf name (what peft's target_modules matches), shape and bias;
    ``count`` instances per layer (the experts), ``active`` of them per token."""
    name: str
    fan_in: int
    fan_out: int
    bias: bool = False
    count: int = 1
    active: int = 1

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of FAMILIES
    hidden_size: int
    intermediate_size: int  # the dense MLP's width (Mixtral: each expert's)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Mixture of experts (0: dense): experts per sparse layer, routed per token, an expert's MLP width, the shared
    # expert's width (0: none) and how many layers are sparse (the others have the dense MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: int = 0
    sliding_window: int | None = None  # the attention window, on some or all layers (None: full attention)
    # Parameters outside the text decoder that are loaded (and trained in a full
    # fine-tune): Gemma 3 4b/12b/27b load as Gemma3ForConditionalGeneration, with a
    # SigLIP vision tower and a projector. 0 for text-only models.
    extra_params: int = 0
    source: str = "builtin"  # "local" | "hub" | "builtin"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"unsupported family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_experts and not (FAMILIES[self.family].moe and 0 < self.num_experts_per_tok <= self.num_experts
                                     and 0 < self.moe_layers <= self.num_hidden_layers):
            raise SpecError(f"{self.name}: experts need a mixture-of-experts family, 0 < num_experts_per_tok "
                            f"({self.num_experts_per_tok}) <= num_experts ({self.num_experts}) and 0 < moe_layers "
                            f"({self.moe_layers}) <= num_hidden_layers ({self.num_hidden_layers})")

    @property
    def family_row(self) -> Family:
        return FAMILIES[self.family]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    # -- the modules of a decoder layer --
    def _mlp(self, names: tuple[str, str, str], width: int, count: int = 1, active: int = 1) -> tuple[Linear, ...]:
        h, bias = self.hidden_size, self.mlp_bias
        gate, up, down = names
        if self.family_row.fused:
            return (Linear("gate_up_proj", h, 2 * width, bias, count, active),
                    Linear("down_proj", width, h, bias, count, active))
        return (Linear(gate, h, width, bias, count, active), Linear(up, h, width, bias, count, active),
                Linear(down, width, h, bias, count, active))

    def linears(self, sparse: bool = False) -> tuple[Linear, ...]:
        """A decoder layer's linear modules: the attention projections, then the dense MLP, or (``sparse``) the
        router, the experts (all of them counted, ``num_experts_per_tok`` active) and the shared expert."""
        h, q, kv, fam = self.hidden_size, self.q_dim, self.kv_dim, self.family_row
        if fam.fused:
            attn = (Linear("qkv_proj", h, q + 2 * kv, self.qkv_bias),)
        else:
            attn = (Linear("q_proj", h, q, self.qkv_bias), Linear("k_proj", h, kv, self.qkv_bias),
                    Linear("v_proj", h, kv, self.qkv_bias))
        attn += (Linear("o_proj", q, h, self.o_bias),)
        if not sparse:
            return attn + self._mlp(GATED_MLP, self.intermediate_size)
        out = (attn + (Linear("gate", h, self.num_experts),)
               + self._mlp(fam.expert_names, self.moe_intermediate_size, self.num_experts, self.num_experts_per_tok))
        if self.shared_expert_intermediate_size:
            out += self._mlp(GATED_MLP, self.shared_expert_intermediate_size) + (Linear("shared_expert_gate", h, 1),)
        return out

    def _layer_kinds(self) -> tuple[tuple[bool, int], ...]:
        """(sparse, how many layers) for the dense and the sparse layers."""
        return ((False, self.num_hidden_layers - self.moe_layers), (True, self.moe_layers))

    @property
    def layer_norm_params(self) -> int:
        """One decoder layer's RMSNorms: over hidden_size, and q_norm / k_norm over head_dim."""
        return self.family_row.layer_norms * self.hidden_size + (2 * self.head_dim if self.family_row.qk_norm else 0)

    def _text_params(self, active: bool) -> int:
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        layers = sum(n * (self.layer_norm_params + sum(m.params * (m.active if active else m.count)
                                                       for m in self.linears(sparse)))
                     for sparse, n in self._layer_kinds() if n)
        return embed + lm_head + layers + self.hidden_size  # + the final norm

    # -- parameter counts --
    @property
    def text_params(self) -> int:
        """Every parameter of the text decoder (with a mixture of experts: all experts)."""
        return self._text_params(active=False)

    @property
    def active_text_params(self) -> int:
        """The text decoder's parameters one token goes through: dense models all of them; a mixture of experts the
        routed ``num_experts_per_tok`` experts of each sparse layer (what the FLOPs count)."""
        return self._text_params(active=True)

    @property
    def num_params(self) -> int:
        """Every parameter the training process loads (text decoder + ``extra_params``): what memory counts."""
        return self.text_params + self.extra_params

    @property
    def largest_layer_params(self) -> int:
        """Parameters of the largest single module, as DeepSpeed's ``model_to_params``
        counts them (``m.parameters(recurse=False)``): usually the embedding."""
        modules = [m.params for sparse, n in self._layer_kinds() if n for m in self.linears(sparse)]
        return max(self.vocab_size * self.hidden_size, *modules)

    @property
    def mlp_width(self) -> int:
        """The widest MLP activation one token makes in a layer: the dense MLP's, or the routed experts' and the
        shared expert's together."""
        sparse = self.num_experts_per_tok * self.moe_intermediate_size + self.shared_expert_intermediate_size
        return max(self.intermediate_size if self.moe_layers < self.num_hidden_layers else 0,
                   sparse if self.moe_layers else 0)

    def lora_params(self, r: int, target_modules: Iterable[str]) -> int:
        """LoRA adapter parameters: r * (in + out) per targeted linear (every expert's), per layer.
        (Targets are matched in the text decoder only, by the modules' leaf names. What the ranks target by
        default is dpo_dist.model.lora's rule, which PlanOptions.lora_targets applies.)"""
        kinds = [(self.linears(sparse), n) for sparse, n in self._layer_kinds() if n]
        known = list(dict.fromkeys(m.name for mods, _ in kinds for m in mods))
        total = 0
        for target in target_modules:
            if target not in known:
                raise SpecError(f"unknown LoRA target module {target!r} for a {self.family} model; "
                                f"its linear modules: {', '.join(known)}")
            total += sum(n * r * (m.fan_in + m.fan_out) * m.count for mods, n in kinds for m in mods
                         if m.name == target)
        return total


# --------------------------------------------------------------------------- #
# Built-in table: published config.json values.
# --------------------------------------------------------------------------- #

def _siglip_params(text_hidden: int, hidden: int = 1152, intermediate: int = 4304, layers: int = 27,
                   patch: int = 14, image: int = 896, channels: int = 3, use_head: bool = False) -> int:
    """Gemma 3's SigLIP vision tower (biased linears, LayerNorms) + multimodal projector.
    Defaults: the published Gemma 3 vision_config (which sets vision_use_head false)."""
    mlp = 2 * hidden * intermediate + intermediate + hidden
    patch_embed = channels * patch * patch * hidden + hidden
    pos_embed = (image // patch) ** 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + mlp
    tower = patch_embed + pos_embed + layers * layer + 2 * hidden  # + post_layernorm
    if use_head:  # attention-pooling head: probe, nn.MultiheadAttention, LayerNorm, MLP
        tower += hidden + 4 * (hidden * hidden + hidden) + 2 * hidden + mlp
    projector = hidden * text_hidden + hidden  # mm_input_projection_weight + mm_soft_emb_norm
    return tower + projector


def _gemma3(size: str, h: int, i: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int,
            max_pos: int, multimodal: bool) -> ModelSpec:
    return ModelSpec(
        name=f"google/gemma-3-{size}", family="gemma3", hidden_size=h, intermediate_size=i,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=max_pos,
        sliding_window=1024 if multimodal else 512,
        extra_params=_siglip_params(h) if multimodal else 0,
    )


def _decoder(family: str, name: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, max_pos: int,
             tie: bool = False, head_dim: int | None = None, **kw) -> ModelSpec:
    return ModelSpec(
        name=name, family=family, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim or h // heads, vocab_size=vocab,
        tie_word_embeddings=tie, max_position_embeddings=max_pos, **kw,
    )


def _llama(name: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, max_pos: int) -> ModelSpec:
    return _decoder("llama", name, h, i, layers, heads, kv, vocab, max_pos)


def _qwen25(size: str, h: int, i: int, layers: int, heads: int, kv: int, tie: bool = False) -> ModelSpec:
    return _decoder("qwen2", f"Qwen/Qwen2.5-{size}", h, i, layers, heads, kv, 151936 if tie else 152064, 32768,
                    tie=tie, qkv_bias=True)


def _mistral7b(version: str, vocab: int, sliding: int | None) -> ModelSpec:
    return _decoder("mistral", f"mistralai/Mistral-7B-v{version}", 4096, 14336, 32, 32, 8, vocab, 32768,
                    sliding_window=sliding)


def _phi3_mini(context: str, max_pos: int, sliding: int) -> ModelSpec:
    return _decoder("phi3", f"microsoft/Phi-3-mini-{context}-instruct", 3072, 8192, 32, 32, 32, 32064, max_pos,
                    sliding_window=sliding)


# google/gemma-3-*: 270m and 1b are text-only (vocab 262144); 4b/12b/27b are multimodal
# (text_config vocab 262208, SigLIP vision tower).
BUILTIN: dict[str, ModelSpec] = {
    "gemma3-270m": _gemma3("270m", 640, 2048, 18, 4, 1, 256, 262144, 32768, False),
    "gemma3-1b": _gemma3("1b", 1152, 6912, 26, 4, 1, 256, 262144, 32768, False),
    "gemma3-4b": _gemma3("4b", 2560, 10240, 34, 8, 4, 256, 262208, 131072, True),
    "gemma3-12b": _gemma3("12b", 3840, 15360, 48, 16, 8, 256, 262208, 131072, True),
    "gemma3-27b": _gemma3("27b", 5376, 21504, 62, 32, 16, 128, 262208, 131072, True),
    "llama2-7b": _llama("meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, 4096),
    "llama2-13b": _llama("meta-llama/Llama-2-13b-hf", 5120, 13824, 40, 40, 40, 32000, 4096),
    "llama2-70b": _llama("meta-llama/Llama-2-70b-hf", 8192, 28672, 80, 64, 8, 32000, 4096),
    "llama3-8b": _llama("meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, 8192),
    "llama3-70b": _llama("meta-llama/Meta-Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, 8192),
    "llama3.1-8b": _llama("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, 131072),
    "llama3.1-70b": _llama("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, 131072),
    # mistralai/Mistral-7B-v0.1 slides a 4096-token window; v0.2 dropped it; v0.3 grew the vocabulary.
    "mistral-7b-v0.1": _mistral7b("0.1", 32000, 4096),
    "mistral-7b-v0.2": _mistral7b("0.2", 32000, None),
    "mistral-7b-v0.3": _mistral7b("0.3", 32768, None),
    "mixtral-8x7b": _decoder("mixtral", "mistralai/Mixtral-8x7B-v0.1", 4096, 14336, 32, 32, 8, 32000, 32768,
                             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336, moe_layers=32),
    # Qwen/Qwen2.5-*: q/k/v biases; the small ones tie their embeddings (vocab 151936), the rest do not (152064).
    "qwen2.5-0.5b": _qwen25("0.5B", 896, 4864, 24, 14, 2, tie=True),
    "qwen2.5-1.5b": _qwen25("1.5B", 1536, 8960, 28, 12, 2, tie=True),
    "qwen2.5-3b": _qwen25("3B", 2048, 11008, 36, 16, 2, tie=True),
    "qwen2.5-7b": _qwen25("7B", 3584, 18944, 28, 28, 4),
    "qwen2.5-14b": _qwen25("14B", 5120, 13824, 48, 40, 8),
    "qwen2.5-32b": _qwen25("32B", 5120, 27648, 64, 40, 8),
    "qwen2.5-72b": _qwen25("72B", 8192, 29568, 80, 64, 8),
    "qwen3-8b": _decoder("qwen3", "Qwen/Qwen3-8B", 4096, 12288, 36, 32, 8, 151936, 40960, head_dim=128),
    "qwen3-32b": _decoder("qwen3", "Qwen/Qwen3-32B", 5120, 25600, 64, 64, 8, 151936, 40960, head_dim=128),
    "qwen3-30b-a3b": _decoder("qwen3_moe", "Qwen/Qwen3-30B-A3B", 2048, 6144, 48, 32, 4, 151936, 40960,
                              head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                              moe_layers=48),
    "phi3-mini-4k": _phi3_mini("4k", 4096, 2047),
    "phi3-mini-128k": _phi3_mini("128k", 131072, 262144),
}


class _Names(NamedTuple):
    """How hub names of one family map onto BUILTIN keys: ``pattern`` (over the lower-cased last path part, with
    named groups), ``key`` (a format string over those groups), ``real`` (the sizes that exist per version;
    None when the pattern admits only real ones) and ``label`` (the family, in messages)."""
    pattern: re.Pattern
    key: str
    real: Mapping[str, tuple[str, ...]] | None
    label: str


_SUFFIX = r"(?:-.*)?$"  # -it, -pt, -hf, -chat-hf, -Instruct, -Instruct-2507, ...
NAMES = (
    _Names(re.compile(r"^gemma-?(?P<version>3)-(?P<size>\d+(?:\.\d+)?[mb])" + _SUFFIX), "gemma{version}-{size}",
           {"3": GEMMA3_SIZES}, "Gemma"),
    _Names(re.compile(r"^(?:meta-)?llama-?(?P<version>2|3(?:\.\d+)?)-(?P<size>\d+(?:\.\d+)?b)" + _SUFFIX),
           "llama{version}-{size}", LLAMA_SIZES, "Llama"),
    _Names(re.compile(r"^qwen(?P<version>2\.5|3)-(?P<size>\d+(?:\.\d+)?b(?:-a\d+(?:\.\d+)?b)?)" + _SUFFIX),
           "qwen{version}-{size}", QWEN_SIZES, "Qwen"),
    _Names(re.compile(r"^mistral-(?P<size>7b)(?:-instruct)?-v(?P<version>0\.[1-3])" + _SUFFIX),
           "mistral-{size}-v{version}", None, "Mistral"),
    _Names(re.compile(r"^mixtral-(?P<size>8x7b)(?:-instruct)?(?:-v0\.1)?" + _SUFFIX), "mixtral-{size}", None,
           "Mixtral"),
    _Names(re.compile(r"^phi-?3-(?P<size>mini)-(?P<context>4k|128k)" + _SUFFIX), "phi3-{size}-{context}", None,
           "Phi-3"),
)

_HOW_TO_FIX = (
    "Pass --model a local folder that holds the model's config.json (any of these families: "
    f"{', '.join(FAMILIES)}), or one of the built-in names: google/gemma-3-{{270m,1b,4b,12b,27b}}[-it|-pt], "
    "meta-llama/Llama-2-{7b,13b,70b}[-hf|-chat-hf], meta-llama/Meta-Llama-3-{8B,70B}[-Instruct], "
    "meta-llama/Llama-3.1-{8B,70B}[-Instruct], mistralai/Mistral-7B[-Instruct]-v0.{1,2,3}, "
    "mistralai/Mixtral-8x7B[-Instruct]-v0.1, Qwen/Qwen2.5-{0.5B,1.5B,3B,7B,14B,32B,72B}[-Instruct], "
    "Qwen/Qwen3-{8B,32B,30B-A3B}, microsoft/Phi-3-mini-{4k,128k}-instruct."
)


def _match(model: str) -> str | None:
    """Built-in table key for ``model``, None when it is not a name we have built in, or SpecError
    when it names a size of a known family that does not exist (e.g. gemma-3-2b).

    Tolerates owners, case, ``_``/`` `` for ``-`` and suffixes (-it, -pt, -hf, -chat-hf,
    -Instruct, ...): the architecture is fixed by family, version and size."""
    base = model.strip().rstrip("/").split("/")[-1].lower().replace("_", "-").replace(" ", "-")
    for rule in NAMES:
        m = rule.pattern.match(base)
        if not m:
            continue
        groups = m.groupdict()
        if rule.real is not None:
            version, size = groups["version"], groups["size"]
            if version not in rule.real:
                return None  # e.g. Llama 3.2: a real model, just not built in
            if size not in rule.real[version]:
                raise SpecError(
                    f"--model {model!r}: a {rule.label} {version} {size} model does not exist; the real sizes are "
                    f"{', '.join(rule.real[version])}."
                )
        key = rule.key.format(**groups)
        return key if key in BUILTIN else None  # a real size that is not built in
    return None


def builtin_key(model: str) -> str:
    """Key of ``model`` in BUILTIN; SpecError (with how to fix it) when there is none."""
    key = _match(model)
    if key is None:
        raise SpecError(f"unknown model {model!r}. {_HOW_TO_FIX}")
    return key


# --------------------------------------------------------------------------- #
# config.json parsing
# --------------------------------------------------------------------------- #

# Class defaults of transformers 4.55's SiglipVisionConfig (Gemma 3's vision tower).
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, image_size=224, patch_size=16,
                        num_channels=3, vision_use_head=True)


def _switch(rule: bool | str, config: Mapping) -> bool:
    """A bias that is always there, never, or switched by the config key ``rule`` names."""
    return rule if isinstance(rule, bool) else bool(config.get(rule))


def _multimodal_gemma3(config: Mapping, name: str) -> tuple[dict, int]:
    """(text config, vision tower + projector parameters) of a multimodal Gemma3Config."""
    text = dict(config.get("text_config") or {})
    if (config.get("model_type") or "gemma3") != "gemma3" or text.get("model_type", "gemma3_text") != "gemma3_text":
        raise SpecError(f"{name}: model_type {config.get('model_type')!r} is {_VISION}. Pass --model a model of a "
                        f"family the planner sizes ({', '.join(FAMILIES)}).")
    text.setdefault("model_type", "gemma3_text")
    v = {**_SIGLIP_DEFAULTS, **(config.get("vision_config") or {})}
    hidden = int({**FAMILIES["gemma3"].defaults, **text}["hidden_size"])
    return text, _siglip_params(hidden, hidden=v["hidden_size"], intermediate=v["intermediate_size"],
                                layers=v["num_hidden_layers"], patch=v["patch_size"], image=v["image_size"],
                                channels=v["num_channels"], use_head=bool(v["vision_use_head"]))


def _moe_fields(fam: Family, text: Mapping, layers: int) -> dict:
    """The mixture-of-experts fields of a spec: experts, routed per token, widths, and which layers are sparse
    (as the modeling code decides: not in mlp_only_layers, and every decoder_sparse_step-th)."""
    experts = int(text.get(fam.experts_key) or 0) if fam.moe else 0
    if not experts:
        return {}
    dense = set(text.get("mlp_only_layers") or ())
    step = int(text.get("decoder_sparse_step") or 1)
    return dict(num_experts=experts, num_experts_per_tok=int(text["num_experts_per_tok"]),
                moe_intermediate_size=int(text[fam.expert_width_key]),
                shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size") or 0)
                if fam.shared_expert else 0,
                moe_layers=sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0))


def _sliding_window(fam: Family, text: Mapping) -> int | None:
    on = fam.sliding == "window" or (fam.sliding == "flag" and text.get("use_sliding_window"))
    return int(text["sliding_window"]) if on and text.get("sliding_window") else None


def _refused(name: str, model_type: str) -> str:
    return (f"{name}: model_type {model_type!r} cannot be planned: {REFUSED[model_type]}. Pass --model a model of "
            f"a family the planner sizes ({', '.join(FAMILIES)}).")


def spec_from_config(config: Mapping, name: str, source: str = "local") -> ModelSpec:
    """Build a spec from a parsed config.json: any family of FAMILIES, or a multimodal Gemma3Config."""
    model_type = config.get("model_type")
    if not model_type and "text_config" not in config:
        raise SpecError(f"{name}: config.json has no model_type, so its family is unknown. Restore the model's "
                        f"config.json (one of these families: {', '.join(FAMILIES)}).")
    extra = 0
    if model_type == "gemma3" or "text_config" in config:
        if model_type in REFUSED:
            raise SpecError(_refused(name, model_type))
        config, extra = _multimodal_gemma3(config, name)
        model_type = config["model_type"]
    if model_type in REFUSED:
        raise SpecError(_refused(name, model_type))
    family = family_of(model_type)
    fam = FAMILIES.get(family)
    if fam is None:
        raise SpecError(f"{name}: model_type {model_type!r} is not a family the planner sizes (it sizes "
                        f"{', '.join(FAMILIES)}); pass --model a model of one of those families.")
    text = {**fam.defaults, **config}
    h, heads, layers = int(text["hidden_size"]), int(text["num_attention_heads"]), int(text["num_hidden_layers"])
    return ModelSpec(
        name=name,
        family=family,
        hidden_size=h,
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or h // heads),
        vocab_size=int(text["vocab_size"]),
        tie_word_embeddings=bool(text["tie_word_embeddings"]),
        max_position_embeddings=int(text["max_position_embeddings"]),
        qkv_bias=_switch(fam.qkv_bias, text),
        o_bias=_switch(fam.o_bias, text),
        mlp_bias=_switch(fam.mlp_bias, text),
        sliding_window=_sliding_window(fam, text),
        extra_params=extra,
        source=source,
        **_moe_fields(fam, text, layers),
    )


def _hub_config(model: str, timeout_s: float = 5.0) -> dict | None:
    """config.json from the Hub, or None on any failure (offline, gated, 404, no network)."""
    if hub_offline() or "/" not in model:
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=model, filename="config.json", etag_timeout=timeout_s)
        return json.loads(Path(path).read_text())
    except Exception:
        return None


def _parsed(config: Mapping, model: str, source: str) -> ModelSpec:
    """spec_from_config, its errors naming the argument they came from."""
    try:
        return spec_from_config(config, name=model, source=source)
    except SpecError as e:
        raise SpecError(f"--model {e}") from None


def load_spec(model: str) -> ModelSpec:
    """Resolve ``model`` (local folder, Hub id, or built-in name) to a ModelSpec."""
    if not model or not model.strip():
        raise SpecError(f"--model: no model given. {_HOW_TO_FIX}")
    path = Path(model).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise SpecError(f"--model {model}: the folder has no config.json, so it is not a Hugging Face model "
                            "folder. Pass the folder that holds the model's config.json (the one from_pretrained "
                            "loads).")
        try:
            config = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"--model {model}: cannot read {cfg} ({e}). Fix its permissions, or pass a readable "
                            "copy of the model folder.") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"--model {model}: {cfg} is not valid JSON ({e}). Restore the model's config.json "
                            "(download it again), then plan again.") from None
        if not isinstance(config, dict):
            raise SpecError(f"--model {model}: {cfg} holds a JSON {type(config).__name__}, not a config object. "
                            "Restore the model's config.json (download it again), then plan again.")
        return _parsed(config, model, "local")

    key = _match(model)  # names that cannot exist are refused before any network access
    config = _hub_config(model)
    if config is not None:
        return _parsed(config, model, "hub")
    if key is None:
        raise SpecError(f"--model {model!r}: unknown model (not a local folder, not reachable on the Hub, not "
                        f"built in). {_HOW_TO_FIX}")
    return replace(BUILTIN[key], name=model, source="builtin")

