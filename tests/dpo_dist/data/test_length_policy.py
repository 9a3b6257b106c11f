"""The over-length policy counts what the trainer's truncation (trl 0.22, truncation_mode="keep_end") will cut:
prompts too long are left-truncated to --max_prompt_length, not refused; a set is refused only when no pair keeps
its whole responses even then; --overlong drop drops every row the trainer would cut."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset

from dpo_dist.data.preference import DataError, apply_length_policy, token_lengths
from dpo_dist.train.engine import tokenize_pair


@pytest.fixture(scope="module")
def tok(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)


LONG_PROMPT = "\n\nHuman: " + " ".join(["please tell me about the weather and the sea"] * 12) + "\n\nAssistant:"


def _rows(n_long: int, n_short: int, response: str = " Sunny.") -> Dataset:
    rows = [{"prompt": LONG_PROMPT, "chosen": response, "rejected": " No."} for _ in range(n_long)]
    rows += [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": response, "rejected": " No."} for _ in range(n_short)]
    return Dataset.from_list(rows)


def _policy(ds, tok, mode="truncate", max_length=48, max_prompt_length=16, max_completion_length=None):
    return apply_length_policy(ds, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                               max_completion_length=max_completion_length or max_length - max_prompt_length,
                               mode=mode, split_name="train")


def test_rows_too_long_only_because_of_the_prompt_are_truncated_not_refused(tok, caplog):
    ds = _rows(6, 0)
    lens = token_lengths(ds, tok)
    assert min(lens["prompt_len"]) > 48  # every row is longer than --max_length, by its prompt alone
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data.preference"):
        out, stats = _policy(ds, tok)
    assert len(out) == 6 and stats.prompts_truncated == 6 and stats.responses_truncated == 0 and stats.dropped == 0
    assert any("6 of 6 prompts are left-truncated to max_prompt_length=16" in r.getMessage() for r in caplog.records)
    # what the trainer then trains on: the END of the prompt, the whole response
    ids = tokenize_pair(out[0], tok, 16, 32)
    full = tok(LONG_PROMPT, add_special_tokens=False)["input_ids"]
    assert ids["prompt_input_ids"] == full[-16:]
    assert tok.decode(ids["chosen_input_ids"][:-1]).strip() == "Sunny."


def test_refused_only_when_no_pair_keeps_its_responses(tok):
    long_answer = " " + " ".join(["the answer goes on and on"] * 10)
    ds = _rows(3, 3, response=long_answer)
    with pytest.raises(DataError) as e:
        _policy(ds, tok)
    msg = str(e.value)
    assert "left-truncated to --max_prompt_length 16 no pair keeps its whole responses" in msg
    assert "a response gets at most 32 tokens" in msg and "Fix: raise --max_length (e.g. to" in msg
    # one pair that fits is enough to train: the others are truncated, as the trainer does
    mixed = Dataset.from_list(list(ds) + [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Yes.", "rejected": " No."}])
    out, stats = _policy(mixed, tok)
    assert len(out) == 7 and stats.responses_truncated == 6


def test_drop_mode_drops_every_row_the_trainer_would_cut(tok):
    ds = _rows(4, 3)
    out, stats = _policy(ds, tok, mode="drop")
    assert len(out) == 3 and stats.dropped == 4 and all(r["prompt"] != LONG_PROMPT for r in out)
    with pytest.raises(DataError, match=r"--overlong drop would drop all 4 rows.*Fix: use --overlong truncate"):
        _policy(_rows(4, 0), tok, mode="drop")


def test_rows_that_fit_are_left_alone(tok, caplog):
    ds = _rows(0, 5)
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data.preference"):
        out, stats = _policy(ds, tok, max_length=256, max_prompt_length=128)
    assert len(out) == 5 and stats.overlong == 0 and not caplog.records
