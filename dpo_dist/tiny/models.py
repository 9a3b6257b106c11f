"""Tiny Llama (``LlamaForCausalLM``) and Gemma 3 (``Gemma3ForCausalLM``, tied embeddings) models, and the tiny
Qwen2 (``Qwen2ForCausalLM``, q/k/v biases) and Mixtral (``MixtralForCausalLM``, 4 experts, top-1) twins, built from
the real ``transformers`` config classes with seeded random weights.

Parameter counts (vocab 1024, the size of the trained tokenizer):

=============  ============  =============
size           llama         gemma3
=============  ============  =============
``tiny``           205,120        139,904
``bench``       26,354,176     25,839,104
=============  ============  =============

(Llama keeps an untied ``lm_head`` like Llama 2/3 7B/8B; Gemma 3 ties it to the
embedding, so it counts once.)

The twins (``TWIN_FAMILIES``) exist in the ``tiny`` size only, with the tiny Llama's shape: Qwen2 205,632 parameters
(vocab 1026: the tiny tokenizer plus the ChatML turn markers ``<|im_start|>`` / ``<|im_end|>``; untied ``lm_head``
like Qwen2-7B), Mixtral 353,088 (vocab 1024, 4 experts of width 128, one routed per token, no sliding window).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: the data side needs neither torch nor transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("llama", "gemma3")  # the embedded default's families, in the tiny and the bench size
TWIN_FAMILIES = ("qwen2", "mixtral")  # further tiny twins (tiny size only)
ALL_FAMILIES = (*FAMILIES, *TWIN_FAMILIES)
SIZES = ("tiny", "bench")
MIXTRAL_EXPERTS = 4

_SHAPES = {
    # hidden, layers, heads, kv heads, head_dim, intermediate, max positions, gemma3 sliding window
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, max_position_embeddings=1024, sliding_window=256),
    "bench": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  head_dim=64, intermediate_size=1376, max_position_embeddings=2048, sliding_window=512),
}


def tiny_config(family: str, tokenizer: PreTrainedTokenizerFast, size: str = "tiny"):
    """The ``LlamaConfig`` / ``Gemma3TextConfig`` / ``Qwen2Config`` / ``MixtralConfig`` for ``build_tiny_model``
    (fp32, random init)."""
    import transformers  # deferred: transformers

    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {ALL_FAMILIES}")
    if size not in SIZES or (family in TWIN_FAMILIES and size != "tiny"):
        raise ValueError(f"unknown size {size!r} for {family}; choose one of "
                         f"{SIZES if family in FAMILIES else ('tiny',)}")
    if family in TWIN_FAMILIES:
        return _twin_config(family, tokenizer)
    shape = dict(_SHAPES[size])
    sliding_window = shape.pop("sliding_window")
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        attention_bias=False,
        attention_dropout=0.0,
        use_cache=True,
        torch_dtype="float32",
        **shape,
    )
    if family == "llama":
        # Llama 2/3 7B/8B layout: SiLU MLP, RoPE, untied lm_head.
        return transformers.LlamaConfig(
            hidden_act="silu", rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False,
            mlp_bias=False, **common)
    n = shape["num_hidden_layers"]
    # Gemma 3: 5 local (sliding) layers per global one; a 2-layer model keeps one of each.
    layer_types = (["sliding_attention", "full_attention"] if n < 6 else
                   ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)])
    return transformers.Gemma3TextConfig(
        hidden_activation="gelu_pytorch_tanh",
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling=None,
        query_pre_attn_scalar=shape["head_dim"],
        sliding_window=sliding_window,
        layer_types=layer_types,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        attn_implementation="eager",
        **common,
    )


def _twin_config(family: str, tokenizer: PreTrainedTokenizerFast):
    import transformers  # deferred: transformers

    shape = dict(_SHAPES["tiny"])
    shape.pop("sliding_window")
    common = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
        torch_dtype="float32", use_cache=True, **shape,
    )
    if family == "qwen2":
        # Qwen2 (7B layout): SiLU MLP, RoPE theta 1e6, biases on q/k/v (not on o), no sliding window, untied lm_head.
        return transformers.Qwen2Config(hidden_act="silu", rope_theta=1_000_000.0, rope_scaling=None,
                                        use_sliding_window=False, sliding_window=None, attention_dropout=0.0,
                                        **common)
    # Mixtral: 4 experts, one routed per token (the MoE ZeRO-3 test forces one rank's routing away from one).
    return transformers.MixtralConfig(num_local_experts=MIXTRAL_EXPERTS, num_experts_per_tok=1, sliding_window=None,
                                      router_jitter_noise=0.0, output_router_logits=False, **common)


def build_tiny_model(family: str, tokenizer: PreTrainedTokenizerFast, size: str = "tiny",
                     seed: int = 0) -> PreTrainedModel:
    """A randomly initialised ``LlamaForCausalLM``, ``Gemma3ForCausalLM``, ``Qwen2ForCausalLM`` or
    ``MixtralForCausalLM`` (fp32), seeded.

    ``tiny``: hidden 64, 2 layers, 4 heads (2 kv), head_dim 16, MLP 128, 1024 positions
    (llama 205,120 / gemma3 139,904 parameters with a 1024-token vocab).
    ``bench``: hidden 512, 8 layers, 8 heads, head_dim 64, MLP 1376, 2048 positions
    (llama 26,354,176 / gemma3 25,839,104 parameters with a 1024-token vocab).
    Twins (``tiny`` only): Qwen2 205,632 parameters (1026-token vocab), Mixtral 353,088 (1024).
    The caller's torch RNG state is left untouched.
    """
    import torch  # deferred: torch
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, GenerationConfig, LlamaForCausalLM  # deferred

    config = tiny_config(family, tokenizer, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in TWIN_FAMILIES:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        else:
            cls = LlamaForCausalLM if family == "llama" else Gemma3ForCausalLM
            model = cls(config).to(torch.float32)
    if family == "gemma3":
        model.config._attn_implementation = "eager"
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    return model


def param_count(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
