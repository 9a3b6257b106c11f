"""Conversational rows → text through the chat template: the tokenised rows are what `apply_chat_template` gives
for the same messages, every bad row gets a 1-based row number with the fix, conversational data without a
template stops with an error naming --chat_template, and --chat_template resolves files, folders and names."""

from __future__ import annotations

import json

import pytest

from dpo_dist.data.chat_templates import (
    BUILTIN_TEMPLATES,
    apply_chat_template_arg,
    resolve_chat_template,
    template_fingerprint,
)
from dpo_dist.data.conversation import conversation_to_text, prompt_text, split_row
from dpo_dist.data.errors import DataError
from dpo_dist.data.schemas import chat_to_text, detect_schema
from dpo_dist.tiny import read_jsonl
from dpo_dist.tiny.formats import FORMATS
from dpo_dist.util.errors import ArgumentError
from tests.support.chat_rows import assert_rows_match_template

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def toks(tiny_assets):
    from transformers import AutoTokenizer

    return {fam: AutoTokenizer.from_pretrained(tiny_assets.model_dir(fam)) for fam in ("llama", "gemma3")}


def _good(i: int) -> dict:
    return {"chosen": [U(f"How do I fix bug {i}?"), A(f"Here is how to fix bug {i}.")],
            "rejected": [U(f"How do I fix bug {i}?"), A("Figure it out.")]}


# --------------------------------------------------------------------------- the template's own rows


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenised_rows_equal_apply_chat_template(tiny_assets, toks, family, fmt):
    """Each format of the built-in data, through the loader's schema and template step and the engine's
    tokenisation, gives the template's own token ids (tests/support/chat_rows.py)."""
    import datasets

    tok = toks[family]
    raw = datasets.load_dataset(str(tiny_assets.format_dir(fmt)))["train"].select(range(40))
    out = chat_to_text(raw, detect_schema(raw), tok)
    for row, hh in zip(out, read_jsonl(tiny_assets.train_file)):
        assert_rows_match_template(row, hh, fmt, tok)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_render_equals_trl_apply_chat_template(tiny_assets, toks, family):
    """The rendering is trl 0.22's apply_chat_template (restated: the Gaudi stack's trl 0.9.6 lacks it), on single-
    and multi-turn rows, with and without a system message."""
    from trl.data_utils import apply_chat_template

    from dpo_dist.data.conversation import render
    from dpo_dist.tiny.formats import format_messages

    tok = toks[family]
    for fmt in ("conversational", "orca"):
        for hh in read_jsonl(tiny_assets.train_file)[:30]:
            p, c, r = format_messages(hh, fmt)
            assert render(p, c, r, tok, row=1) == apply_chat_template({"prompt": p, "chosen": c, "rejected": r}, tok)


def test_turn_markers_and_system_per_family(toks):
    """Llama-3-like: the system message is a turn of its own; Gemma-3-like (no system role): folded into the first
    user turn. Each answer ends with the template's end-of-turn token."""
    row = {"system": "Be brief.", "prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    llama = conversation_to_text(row, 1, toks["llama"])
    assert llama["prompt"] == ("<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama["chosen"] == "Hello.<|eot_id|>" and llama["rejected"] == "Go away.<|eot_id|>"
    gemma = conversation_to_text(row, 1, toks["gemma3"])
    assert gemma["prompt"] == "<bos><start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\n"
    assert gemma["chosen"] == "Hello.<end_of_turn>\n"
    for tok in toks.values():
        for marker in ("<|eot_id|>", "<end_of_turn>"):
            assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1


def test_explicit_and_implicit_prompts_agree(toks):
    """The same pair as an explicit messages prompt, a string prompt (a user turn) and whole conversations
    (split at the last assistant turn) gives the same text; a string prompt beside whole conversations is left
    aside, as TRL's maybe_extract_prompt does."""
    tok = toks["llama"]
    history = [U("Hi"), A("Hello! How can I help?"), U("Tips for tea?")]
    implicit = {"chosen": [*history, A("Steep it for three minutes.")], "rejected": [*history, A("No.")]}
    explicit = {"prompt": history, "chosen": [A("Steep it for three minutes.")], "rejected": [A("No.")]}
    beside = {**implicit, "prompt": "Tips for tea?"}
    texts = [conversation_to_text(r, 1, tok) for r in (implicit, explicit, beside)]
    assert texts[0] == texts[1] == texts[2]
    one = conversation_to_text({"prompt": "Tips for tea?", "chosen": "Steep it.", "rejected": "No."}, 1, tok)
    assert one == conversation_to_text({"prompt": [U("Tips for tea?")], "chosen": [A("Steep it.")],
                                        "rejected": [A("No.")]}, 1, tok)


# --------------------------------------------------------------------------- bad rows


BAD_ROWS = {
    "message without role": ({"chosen": [{"content": "q"}, A("a")], "rejected": [U("q"), A("b")]},
                             "'chosen', message 1 has no \"role\""),
    "unknown role": ({"chosen": [{"role": "human", "content": "q"}, A("a")], "rejected": [U("q"), A("b")]},
                     "unknown role 'human'"),
    "not ending with an assistant turn": ({"chosen": [U("q"), A("a"), U("more?")], "rejected": [U("q"), A("b")]},
                                          "'chosen' conversation ends with a user turn"),
    "different prompts": ({"chosen": [U("q1"), A("a")], "rejected": [U("q2"), A("b")]},
                          "disagree before their last assistant turn (first difference at message 1"),
    "empty messages list": ({"prompt": [U("q")], "chosen": [], "rejected": [A("b")]},
                            "'chosen' is an empty messages list"),
    "None content": ({"chosen": [U("q"), {"role": "assistant", "content": None}], "rejected": [U("q"), A("b")]},
                     "message 2 (assistant) has no \"content\" (None)"),
    "None answer": ({"prompt": [U("q")], "chosen": None, "rejected": [A("b")]}, "'chosen' is empty (None)"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_named_by_its_number(toks, case):
    """Each bad row, third in a split of good ones, is a DataError naming the split, row 3, what is wrong and the
    fix; nothing is returned."""
    import datasets

    bad, expected = BAD_ROWS[case]
    rows = [_good(0), _good(1), bad, _good(3)]
    if "prompt" in bad:
        rows = [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
                for r in rows[:2]] + [bad] + [{"prompt": [U("q")], "chosen": [A("x")], "rejected": [A("y")]}]
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(DataError) as e:
        chat_to_text(ds, detect_schema(ds), toks["llama"], where="--dataset_name d.jsonl: ", split_name="train")
    msg = str(e.value)
    assert msg.startswith("--dataset_name d.jsonl: split 'train' row 3: "), msg
    assert expected in msg and ("Fix" in msg or "fix" in msg), msg


def test_template_refusal_names_the_row(toks):
    """A conversation the template itself refuses (Gemma 3's roles must alternate) names the row and the flag."""
    row = {"chosen": [U("a"), U("b"), A("c")], "rejected": [U("a"), U("b"), A("d")]}
    with pytest.raises(DataError, match=r"row 5: the chat template refused this conversation .*--chat_template"):
        conversation_to_text(row, 5, toks["gemma3"])


def test_prompt_without_user_turn(toks):
    with pytest.raises(DataError, match="row 2: the prompt has no user turn"):
        split_row({"prompt": [{"role": "system", "content": "s"}], "chosen": [A("a")], "rejected": [A("b")]}, 2)


# --------------------------------------------------------------------------- templates


def test_conversational_data_without_template_names_the_flag(tiny_assets):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.llama_dir)
    tok.chat_template = None
    ds = datasets.Dataset.from_list([_good(0), _good(1)])
    with pytest.raises(ArgumentError) as e:
        chat_to_text(ds, detect_schema(ds), tok, where="--dataset_name x: ", split_name="train")
    msg = str(e.value)
    assert "has no chat template" in msg and "--chat_template" in msg and "llama3" in msg


def test_chat_template_from_file_folder_json_and_name(tmp_path, tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.llama_dir)
    jinja = tmp_path / "t.jinja"
    jinja.write_text(BUILTIN_TEMPLATES["hh"])
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": BUILTIN_TEMPLATES["gemma3"]}))
    assert resolve_chat_template(str(jinja), tok) == BUILTIN_TEMPLATES["hh"]
    assert resolve_chat_template(str(cfg), tok) == BUILTIN_TEMPLATES["gemma3"]
    assert resolve_chat_template(str(tiny_assets.gemma3_dir), tok) == BUILTIN_TEMPLATES["gemma3"]
    assert resolve_chat_template("gemma3", tok) == BUILTIN_TEMPLATES["gemma3"]
    tok.chat_template = {"default": BUILTIN_TEMPLATES["llama3"], "short": BUILTIN_TEMPLATES["hh"]}
    assert resolve_chat_template("short", tok) == BUILTIN_TEMPLATES["hh"]
    before = template_fingerprint(tok)
    apply_chat_template_arg(tok, "hh")
    assert tok.chat_template == BUILTIN_TEMPLATES["hh"] and template_fingerprint(tok) != before
    assert prompt_text("Hi?", tok) == "\n\nHuman: Hi?\n\nAssistant:"


@pytest.mark.parametrize(("value", "expected"), [
    ("no-such-template", "no such file or folder, and not a known template name"),
    ("BAD_JINJA", "line 1: not a valid jinja template"),
    ("EMPTY", "the template file is empty"),
    ("JSON_WITHOUT", "holds no \"chat_template\" string"),
])
def test_chat_template_errors(tmp_path, value, expected):
    files = {"BAD_JINJA": ("bad.jinja", "{% for m in messages %}{{ m['content'] }"),
             "EMPTY": ("empty.jinja", "\n"), "JSON_WITHOUT": ("tokenizer_config.json", "{}")}
    if value in files:
        name, text = files[value]
        (tmp_path / name).write_text(text)
        value = str(tmp_path / name)
    with pytest.raises(ArgumentError) as e:
        resolve_chat_template(value)
    assert str(e.value).startswith(f"--chat_template {value}") and expected in str(e.value)
    assert "Fix" in str(e.value)


def test_bad_row_of_a_mapped_schema_names_the_dataset_column(toks):
    """A None answer in a stack-exchange-style split is named by the dataset's own column (response_k)."""
    import datasets

    rows = [{"question": f"q{i}", "response_j": "good", "response_k": None if i == 1 else "bad"} for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(DataError, match=r"^split 'test' row 2: 'response_k' is empty \(None\)"):
        chat_to_text(ds, detect_schema(ds), toks["llama"], split_name="test")
