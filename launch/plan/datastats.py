"""Tokens per preference pair of the training data, for the planner's packed micro-batch size.

The one side effect the planner's inputs need beyond the model config: read the training data
the ranks will read (same arguments, same loader: dpo_dist.data.preference) and measure (mean, max) tokens
per pair on a seeded sample. Only local data with a local tokenizer is read: a hub id may hang
on a machine without network, and a plan must work on a laptop. Otherwise the planner sizes
packed micro-batches for the worst case (every row max_length) and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dpo_dist.args import DataArguments, ModelArguments, TrainArguments, parse_args
from dpo_dist.data.preference import load_preference_splits, pair_token_stats, with_bos
from dpo_dist.model.loader import load_tokenizer

SAMPLE = 2000


def _local(name: str | None) -> bool:
    return bool(name) and os.path.exists(os.path.expanduser(name))


def parse_pair_tokens(text: str) -> tuple[float, float]:
    """``--pair_tokens MEAN,MAX`` → (mean, max); ValueError naming the expected form."""
    try:
        mean, mx = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--pair_tokens {text!r}: expected MEAN,MAX tokens per pair (chosen + rejected rows), "
                         "e.g. --pair_tokens 540,2048") from None
    if not 0 < mean <= mx:
        raise ValueError(f"--pair_tokens {text!r}: need 0 < MEAN <= MAX")
    return mean, mx


def measure_pair_tokens(model: str, rank_args: list[str], *, max_length: int, max_prompt_length: int):
    """(DataShape, note) for the data named in the dpo_dist.dpo arguments, or (None, why)."""
    try:
        m, d, t = parse_args(["--model_name_or_path", model, "--max_length", str(max_length),
                              "--max_prompt_length", str(max_prompt_length), *rank_args])
    except (Exception, SystemExit):  # the ranks report bad arguments themselves, with their own message
        m, d, t = ModelArguments(model_name_or_path=model), DataArguments(), TrainArguments()
    tok_name = m.tokenizer_name_or_path or m.model_name_or_path
    if not (_local(d.dataset_name) and _local(tok_name)):
        return None, (f"token lengths not measured (--dataset_name {d.dataset_name} or the tokenizer is not a local "
                      "path): packed micro-batches sized for max_length rows; pass --pair_tokens MEAN,MAX to size them")
    try:
        tok = load_tokenizer(m)
        train, _ = load_preference_splits(d, t.seed, tok)
        stats = pair_token_stats(with_bos(train, tok), tok, max_length=t.max_length,
                                 max_prompt_length=t.max_prompt_length,
                                 max_completion_length=t.max_completion_length, sample=SAMPLE, seed=t.seed)
    except Exception as e:  # the ranks will say what is wrong with the data; the plan stays conservative
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return None, f"token lengths not measured ({type(e).__name__}: {first}): packed micro-batches sized for max_length rows"
    n = min(len(train), SAMPLE)
    note = (f"data: {len(train)} training pairs, {stats[0]:.0f} tokens per pair on average, {stats[1]} at most "
            f"(measured on {n} of them, {d.dataset_name})")
    return DataShape(stats, len(train)), note


@dataclass(frozen=True)
class DataShape:
    pair_tokens: tuple[float, float] | None  # (mean, max) tokens per pair
    train_pairs: int | None = None
