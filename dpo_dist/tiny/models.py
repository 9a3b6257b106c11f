"""Tiny Llama (``LlamaForCausalLM``) and Gemma 3 (``Gemma3ForCausalLM``, tied embeddings) models,
built from the real ``transformers`` config classes with seeded random weights.

Parameter counts (vocab 1024, the size of the trained tokenizer):

=============  ============  =============
size           llama         gemma3
=============  ============  =============
``tiny``           205,120        139,904
``bench``       26,354,176     25,839,104
=============  ============  =============

(Llama keeps an untied ``lm_head`` like Llama 2/3 7B/8B; Gemma 3 ties it to the
embedding, so it counts once.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: the data side needs neither torch nor transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("llama", "gemma3")
SIZES = ("tiny", "bench")

_SHAPES = {
    # hidden, layers, heads, kv heads, head_dim, intermediate, max positions, gemma3 sliding window
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, max_position_embeddings=1024, sliding_window=256),
    "bench": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  head_dim=64, intermediate_size=1376, max_position_embeddings=2048, sliding_window=512),
}


def tiny_config(family: str, tokenizer: PreTrainedTokenizerFast, size: str = "tiny"):
    """The ``LlamaConfig`` / ``Gemma3TextConfig`` for ``build_tiny_model`` (fp32, random init)."""
    import transformers  # deferred: transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
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


def build_tiny_model(family: str, tokenizer: PreTrainedTokenizerFast, size: str = "tiny",
                     seed: int = 0) -> PreTrainedModel:
    """A randomly initialised ``LlamaForCausalLM`` or ``Gemma3ForCausalLM`` (fp32), seeded.

    ``tiny``: hidden 64, 2 layers, 4 heads (2 kv), head_dim 16, MLP 128, 1024 positions
    (llama 205,120 / gemma3 139,904 parameters with a 1024-token vocab).
    ``bench``: hidden 512, 8 layers, 8 heads, head_dim 64, MLP 1376, 2048 positions
    (llama 26,354,176 / gemma3 25,839,104 parameters with a 1024-token vocab).
    The caller's torch RNG state is left untouched.
    """
    import torch  # deferred: torch
    from transformers import Gemma3ForCausalLM, GenerationConfig, LlamaForCausalLM  # deferred: transformers

    config = tiny_config(family, tokenizer, size)
    cls = LlamaForCausalLM if family == "llama" else Gemma3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
