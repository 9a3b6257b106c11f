"""SFT rows for the Gaudi trainer: the loss is on the response only, as on the CPU path (trl 0.22's
completion-only loss), and a prompt too long for the budget keeps its end."""

from __future__ import annotations

from datasets import Dataset

from dpo_dist.train.engine import tokenize_pair
from dpo_dist.train.sft import loss_token_fraction, sft_features


def _tok(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)


ROW = {"prompt": "<bos>\n\nHuman: how do I bake bread?\n\nAssistant:", "chosen": " Knead the dough, let it rise, bake.",
       "rejected": " No."}


def test_labels_cover_the_response_only(tiny_assets):
    tok = _tok(tiny_assets)
    f = sft_features(ROW, tok, 256)
    ids = tokenize_pair(ROW, tok, None, None)
    n_prompt, n_resp = len(ids["prompt_input_ids"]), len(ids["chosen_input_ids"])
    assert f["input_ids"] == ids["prompt_input_ids"] + ids["chosen_input_ids"]
    assert f["labels"] == [-100] * n_prompt + ids["chosen_input_ids"] and f["labels"][-1] == tok.eos_token_id
    assert f["attention_mask"] == [1] * (n_prompt + n_resp)


def test_long_prompt_keeps_its_end_and_the_whole_response(tiny_assets):
    tok = _tok(tiny_assets)
    ids = tokenize_pair(ROW, tok, None, None)
    n_resp = len(ids["chosen_input_ids"])
    budget = n_resp + 3
    f = sft_features(ROW, tok, budget)
    assert len(f["input_ids"]) == budget
    assert f["input_ids"][:3] == ids["prompt_input_ids"][-3:]
    assert f["labels"][3:] == ids["chosen_input_ids"]
    short = sft_features(ROW, tok, 4)  # not even the response fits: its start, no prompt
    assert short["input_ids"] == ids["chosen_input_ids"][:4] and -100 not in short["labels"]


def test_loss_token_fraction_reads_either_trainers_rows():
    gaudi = Dataset.from_dict({"labels": [[-100, -100, 5, 6], [-100, 7]]})
    assert loss_token_fraction(gaudi) == 3 / 6
    trl = Dataset.from_dict({"input_ids": [[1, 2, 3]], "completion_mask": [[0, 1, 1]]})
    assert loss_token_fraction(trl) == 2 / 3
    assert loss_token_fraction(Dataset.from_dict({"text": ["x"]})) is None
