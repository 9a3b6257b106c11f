"""Tiny mixture-of-experts twins for the MoE ZeRO-3 tests: Mixtral and Qwen2-MoE built from their real
``transformers`` config classes (the tiny Llama's shape: hidden 64, 2 layers, 4 heads, 2 kv heads), 4 experts, top-1,
seeded random weights, saved with the built-in tiny tokenizer (and its chat template) from the tiny Llama's folder.
Mixtral is dpo_dist.tiny's own twin (``tiny_config("mixtral", ...)`` / ``build_tiny_model``); Qwen2-MoE is built here.

Also the test's forced routing (``SKEW_ENV``), applied by the rank wrapper ``tests.support.moe_skew_rank``.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("mixtral", "qwen2_moe")
EXPERTS = 4

# "<rank>:<expert>": on that global rank every router's logit of that expert is -1e4, so the rank routes no token
# to the expert (its router row, in effect, is -inf there), while the other rank routes tokens to every expert.
SKEW_ENV = "DPO_DIST_TEST_MOE_SKEW"
SKEW = "1:3"


def moe_config(family: str, tokenizer):
    import transformers

    from dpo_dist.tiny import tiny_config

    if family == "mixtral":
        return tiny_config("mixtral", tokenizer)
    common = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=1024,
        initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts_per_tok=1,
        output_router_logits=False, torch_dtype="float32", use_cache=True,
    )
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=EXPERTS, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                           mlp_only_layers=[], norm_topk_prob=False, use_sliding_window=False,
                                           **common)
    raise ValueError(f"unknown MoE twin {family!r}; choose one of {FAMILIES}")


def build_moe_twin(family: str, tokenizer_source: Path, out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny ``family`` MoE model and the tokenizer of ``tokenizer_source`` into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dpo_dist.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_source))
    out_dir = Path(out_dir)
    if family == "mixtral":
        model = build_tiny_model("mixtral", tok, seed=seed)
        model.save_pretrained(str(out_dir))
        tok.save_pretrained(str(out_dir))
        return out_dir
    config = moe_config(family, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, max_new_tokens=64)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir
