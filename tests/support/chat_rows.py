"""The check the conversational-data tests share: a rendered row's token ids are the chat template's own."""

from __future__ import annotations

from dpo_dist.tiny.formats import format_messages
from dpo_dist.train.engine import tokenize_pair


def assert_rows_match_template(row: dict, hh: dict, fmt: str, tok) -> None:
    """``row`` (prompt/chosen/rejected text from the loader) tokenised by the engine, against ``tok``'s
    apply_chat_template on the messages the built-in ``hh`` row stands for in format ``fmt``: prompt + chosen
    (rejected) ids are the template's ids for the whole conversation, then the EOS the trainer appends (as trl 0.22
    does); the prompt's ids are the template's with its generation prompt."""
    ids = tokenize_pair(row, tok, None, None)
    prompt, chosen, rejected = format_messages(hh, fmt)
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        assert ids["prompt_input_ids"] + ids[f"{key}_input_ids"][:-1] == tok.apply_chat_template(prompt + answer)
        assert ids[f"{key}_input_ids"][-1] == tok.eos_token_id
    assert ids["prompt_input_ids"] == tok.apply_chat_template(prompt, add_generation_prompt=True)
