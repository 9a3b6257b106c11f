"""The embedded default: what dpo-dist trains on when no hub is reachable.

Everything is generated locally and deterministically from a seed, and built on demand into a
versioned cache folder (nothing large is committed):

* ``preferences``: an Anthropic/hh-rlhf-style preference dataset written by templates over a dozen
  topics (sentences in ``corpus.json``): polite, helpful, on-topic chosen answers against rude,
  dismissive or off-topic rejected ones, so a tiny randomly initialised model learns the preference
  quickly (measured with trl 0.22 DPOTrainer, one CPU process, batch 8, beta 0.1: held-out reward
  accuracy 1.0 after 50 steps at lr 5e-4 for tiny Llama, 0.99 after 50 steps at lr 1e-4 for tiny Gemma 3);
* ``formats``: the same rows written in the other schemas dpo-dist reads (conversational,
  ultrafeedback_binarized, orca_dpo_pairs, stack-exchange-paired);
* ``tokenizer``: a byte-level BPE tokenizer trained with ``tokenizers`` on that data, with the turn markers
  of the Llama-3-like and Gemma-3-like chat templates as special tokens;
* ``models``: tiny Llama and Gemma 3 checkpoints from the real ``transformers`` config classes, each folder
  with its family's chat template, and the tiny Qwen2 (ChatML template) and Mixtral (Llama-3-like template) twins;
* ``assets``: the cache, ``ensure_tiny_assets()`` / ``ensure_bench_assets()``, safe for every rank at once.

CLI: ``python -m dpo_dist.tiny [--cache_dir D] [--force] [--bench]`` builds and prints the paths as JSON.
Importing this package loads neither torch, transformers nor tokenizers.
"""

from dpo_dist.tiny.assets import (
    BENCH_VERSION,
    COMPLETE_MARKER,
    TINY_VERSION,
    BenchAssets,
    TinyAssets,
    default_cache_dir,
    ensure_bench_assets,
    ensure_tiny_assets,
    read_marker,
    verify_cache,
)
from dpo_dist.tiny.models import (
    ALL_FAMILIES,
    FAMILIES,
    SIZES,
    TWIN_FAMILIES,
    build_tiny_model,
    param_count,
    tiny_config,
)
from dpo_dist.tiny.preferences import (
    ASSISTANT_TAG,
    HUMAN_TAG,
    make_preference_rows,
    read_jsonl,
    split_hh,
    write_preference_dataset,
)
from dpo_dist.tiny.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    HH_CHAT_TEMPLATE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    train_tokenizer,
)

__all__ = [
    "ALL_FAMILIES", "ASSISTANT_TAG", "BENCH_VERSION", "BOS_TOKEN", "BenchAssets", "COMPLETE_MARKER", "EOS_TOKEN", "FAMILIES",
    "HH_CHAT_TEMPLATE", "HUMAN_TAG", "PAD_TOKEN", "SIZES", "SPECIAL_TOKENS", "TINY_VERSION", "TWIN_FAMILIES", "TinyAssets",
    "UNK_TOKEN", "build_tiny_model", "default_cache_dir", "ensure_bench_assets", "ensure_tiny_assets",
    "make_preference_rows", "param_count", "read_jsonl", "read_marker", "split_hh", "tiny_config",
    "train_tokenizer", "verify_cache", "write_preference_dataset",
]
