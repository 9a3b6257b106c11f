"""SFT rows for the Gaudi trainer: the loss is on the response only, as on the CPU path (trl 0.22's
completion-only loss), and a prompt too long for the budget keeps its end."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset

from dpo_dist.train.engine import tokenize_pair
from dpo_dist.train.sft import loss_token_fraction, sft_dataset, sft_features


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


LONG = {"prompt": "<bos>\n\nHuman: " + "tell me about the weather and the sea " * 20 + "\n\nAssistant:",
        "chosen": " Sunny, with a calm sea.", "rejected": " No."}


@pytest.mark.parametrize("api", ["trl", "gaudi"])
def test_sft_rows_keep_the_whole_response_when_the_prompt_is_too_long(tiny_assets, api, caplog):
    """A prompt longer than max_length keeps its end and the response stays whole, on both trainers' rows (trl
    0.22's own tokenisation would keep the start and leave no response to learn)."""
    tok = _tok(tiny_assets)
    ids = tokenize_pair(LONG, tok, None, None)
    assert len(ids["prompt_input_ids"]) > 64
    with caplog.at_level(logging.WARNING, logger="dpo_dist.sft"):
        out = sft_dataset(Dataset.from_list([LONG, ROW]), tok, 64, trainer_api=api, split_name="train")
    assert any("1 of 2 prompts are left-truncated to fit max_length=64" in r.getMessage() for r in caplog.records)
    row = out[0]
    assert len(row["input_ids"]) == 64 and row["input_ids"][-len(ids["chosen_input_ids"]):] == ids["chosen_input_ids"]
    if api == "trl":
        assert set(out.column_names) == {"input_ids", "completion_mask"}
        assert sum(row["completion_mask"]) == len(ids["chosen_input_ids"])
    else:
        assert set(out.column_names) == {"input_ids", "attention_mask", "labels"}
        assert [x for x in row["labels"] if x != -100] == ids["chosen_input_ids"]


def test_trl_sft_trainer_takes_the_rows_as_they_are(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = _tok(tiny_assets)
    rows = sft_dataset(Dataset.from_list([LONG, ROW] * 2), tok, 64, trainer_api="trl", split_name="train")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.llama_dir)
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, completion_only_loss=True, packing=False,
                     remove_unused_columns=False, report_to="none", use_cpu=True, max_steps=1,
                     per_device_train_batch_size=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    assert [r["input_ids"] for r in trainer.train_dataset] == rows["input_ids"]
    batch = trainer.data_collator([trainer.train_dataset[0]])
    n_resp = len(tokenize_pair(LONG, tok, None, None)["chosen_input_ids"])
    assert int((batch["labels"] != -100).sum()) == n_resp
    assert 0 < loss_token_fraction(trainer.train_dataset) < 1
