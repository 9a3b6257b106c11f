"""Schema detection and column mapping: the public Gaudi DPO sets are recognised by their columns with no flag,
--dataset_columns maps any other schema, and an unknown schema or a bad mapping is an error that lists the
recognised schemas and names the flag."""

from __future__ import annotations

import logging

import pytest

from dpo_dist.data.errors import DataError
from dpo_dist.data.schemas import COLUMNS_FLAG, detect_schema, log_detection, parse_columns, rename_to_canonical
from dpo_dist.util.errors import ArgumentError

MSG = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def _ds(row: dict, n: int = 2):
    import datasets

    return datasets.Dataset.from_list([row] * n)


@pytest.mark.parametrize(("row", "name", "kind", "columns"), [
    ({"system": "s", "question": "q", "chosen": "a", "rejected": "b"}, "Intel/orca_dpo_pairs", "chat",
     {"system": "system", "prompt": "question", "chosen": "chosen", "rejected": "rejected"}),
    ({"qid": 1, "question": "q", "date": "d", "metadata": ["m"], "response_j": "a", "response_k": "b"},
     "lvwerra/stack-exchange-paired", "chat", {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}),
    ({"prompt": "q", "prompt_id": "x", "chosen": MSG, "rejected": MSG, "messages": MSG, "score_chosen": 8.0,
      "score_rejected": 3.0}, "HuggingFaceH4/ultrafeedback_binarized", "chat",
     {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
    ({"chosen": MSG, "rejected": MSG}, "conversational, implicit prompt", "chat",
     {"chosen": "chosen", "rejected": "rejected"}),
    ({"prompt": MSG[:1], "chosen": MSG[1:], "rejected": MSG[1:]}, "conversational, explicit prompt", "chat",
     {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "prompt/chosen/rejected", "text",
     {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "Anthropic/hh-rlhf",
     "hh", {"chosen": "chosen", "rejected": "rejected"}),
])
def test_recognised_schemas(row, name, kind, columns, caplog):
    det = detect_schema(_ds(row))
    assert (det.name, det.kind, det.columns) == (name, kind, columns)
    with caplog.at_level(logging.INFO, logger="dpo_dist.data.schemas"):
        log_detection(det, where="--dataset_name d: ", split_name="train")
    line = caplog.records[-1].getMessage()
    assert line.startswith(f"data: --dataset_name d: split 'train': schema detected: {name}, mapped ")
    assert all(f"{k}={v}" in line for k, v in columns.items())


def test_messages_found_past_leading_none():
    import datasets

    ds = datasets.Dataset.from_list([{"chosen": None, "rejected": None}, {"chosen": MSG, "rejected": MSG}])
    assert detect_schema(ds).kind == "chat"


def test_dataset_columns_maps_any_schema(caplog):
    ds = _ds({"q": "question", "good": "yes", "bad": "no", "sys": "s", "other": 1})
    det = detect_schema(ds, columns="prompt=q, chosen=good,rejected=bad,system=sys")
    assert det.kind == "chat" and det.columns == {"prompt": "q", "chosen": "good", "rejected": "bad", "system": "sys"}
    with caplog.at_level(logging.INFO, logger="dpo_dist.data.schemas"):
        log_detection(det, where="", split_name="test")
    assert "schema given by --dataset_columns, mapped prompt=q, chosen=good, rejected=bad, system=sys" in caplog.text
    hh = detect_schema(_ds({"good": "\n\nHuman: q\n\nAssistant: a", "bad": "\n\nHuman: q\n\nAssistant: b"}),
                       columns="chosen=good,rejected=bad")
    assert hh.kind == "hh"
    assert rename_to_canonical(_ds({"good": "a", "bad": "b", "x": 1}), hh).column_names == ["chosen", "rejected"]


def test_dataset_columns_wins_over_detection():
    ds = _ds({"prompt": "p", "chosen": "a", "rejected": "b", "alt": "c"})
    assert detect_schema(ds, columns="prompt=prompt,chosen=alt,rejected=rejected").columns["chosen"] == "alt"


def test_unknown_schema_lists_recognised_and_flag():
    with pytest.raises(DataError) as e:
        detect_schema(_ds({"instruction": "q", "output": "a"}), where="--dataset_name d.jsonl: ", split_name="train")
    msg = str(e.value)
    assert msg.startswith("--dataset_name d.jsonl: split 'train' has columns ['instruction', 'output']")
    for name in ("Anthropic/hh-rlhf", "Intel/orca_dpo_pairs", "lvwerra/stack-exchange-paired",
                 "HuggingFaceH4/ultrafeedback_binarized", "prompt/chosen/rejected", COLUMNS_FLAG):
        assert name in msg


@pytest.mark.parametrize(("text", "expected"), [
    ("prompt=q,chosen", "'chosen' is not NAME=COLUMN"),
    ("question=q,chosen=a,rejected=b", "'question' is not one of prompt, chosen, rejected, system"),
    ("chosen=a,chosen=b,rejected=c", "'chosen' is given twice"),
    ("prompt=q,chosen=a", "rejected missing"),
])
def test_bad_dataset_columns(text, expected):
    with pytest.raises(ArgumentError) as e:
        parse_columns(text)
    assert str(e.value).startswith(f"{COLUMNS_FLAG} {text!r}: ") and expected in str(e.value)


def test_dataset_columns_naming_absent_columns():
    with pytest.raises(ArgumentError) as e:
        detect_schema(_ds({"q": "x", "a": "y", "b": "z"}), columns="prompt=q,chosen=good,rejected=b",
                      where="--dataset_name d: ", split_name="train")
    msg = str(e.value)
    assert "chosen=good: that column is not in --dataset_name d split 'train'" in msg and "['a', 'b', 'q']" in msg
