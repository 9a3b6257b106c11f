"""Conversational preference rows → prompt/chosen/rejected text, through the tokenizer's chat template.

A conversational row has `chosen`/`rejected` (and optionally `prompt`) as lists of `{"role", "content"}` messages:

* explicit prompt: `prompt` is a messages list, or a string (a user turn); `chosen`/`rejected` are the answers
  (a messages list, or a string: one assistant turn);
* implicit prompt: `chosen` and `rejected` are whole conversations that share every turn but the last, which is
  the assistant's answer. They are split at that last assistant turn, as TRL's DPO data preparation does; a
  string `prompt` beside whole conversations (HuggingFaceH4/ultrafeedback_binarized) is left aside, as TRL's
  `maybe_extract_prompt` does;
* a `system` text (Intel/orca_dpo_pairs' column) becomes a system message in front of the prompt. What a
  template without a system role does with it is the template's business (Gemma 3 folds it into the first user
  turn).

The text is what trl 0.22's `apply_chat_template` (the one its DPOTrainer runs on conversational data) gives: the
prompt rendered by `tokenizer.apply_chat_template` with the template's generation prompt, each answer as the rest
of the rendered prompt + answer (so it ends with the template's end-of-turn marker). Those few lines are restated
in `render` rather than imported, because the Gaudi stack's trl 0.9.6 has no `trl.data_utils` (the equality with
trl 0.22's function is tested). What is hand-written here beyond that is the checking, because neither
transformers nor TRL checks the rows: a message without a role, an unknown role, an empty list, a None where text
should be, a conversation that does not end with an assistant turn, or chosen and rejected with different prompts
would otherwise train on a silently wrong split (TRL's `extract_prompt` takes the longest common prefix, whatever
it is) or fail deep inside jinja with no row number.

Row numbers are 1-based.
"""

from __future__ import annotations

import os

from dpo_dist.data.chat_templates import FLAG, template_text
from dpo_dist.data.errors import DataError
from dpo_dist.util.errors import ArgumentError

ROLES = ("system", "user", "assistant")


def is_messages(value) -> bool:
    """A list (a conversation, possibly empty or malformed: check_messages says what is wrong), not a string."""
    return isinstance(value, list | tuple)


def check_messages(value, *, column: str, row: int) -> list[dict]:
    """``value`` as a list of {"role", "content"} dicts with a known role and string content, or a row-numbered
    DataError that says what is wrong and the fix."""
    where = f"row {row}: {column!r}"
    if value is None:
        raise DataError(f"{where} is empty (None): expected its text or a list of {{\"role\", \"content\"}} messages. Fix: fill "
                        "it in, or drop the row.")
    if not is_messages(value):
        raise DataError(f"{where} is a {type(value).__name__}; expected a list of {{\"role\", \"content\"}} messages "
                        "(or a string). Fix: make it one, or drop the row.")
    if len(value) == 0:
        raise DataError(f"{where} is an empty messages list: there is no turn to train on. Fix: give it the "
                        "conversation's turns, or drop the row.")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise DataError(f"{where}, message {i} is a {type(m).__name__}; expected an object with \"role\" and "
                            "\"content\". Fix: make it one, or drop the row.")
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise DataError(f"{where}, message {i} has no \"role\"; expected one of {', '.join(ROLES)}. Fix: add "
                            "the role, or drop the row.")
        if role not in ROLES:
            raise DataError(f"{where}, message {i} has the unknown role {role!r}; expected one of "
                            f"{', '.join(ROLES)}. Fix: rename the role, or drop the row.")
        if not isinstance(content, str):
            got = "no \"content\" (None)" if content is None else f"a {type(content).__name__} \"content\""
            raise DataError(f"{where}, message {i} ({role}) has {got}; expected the text of the turn. Fix: fill in "
                            "the text, or drop the row.")
        out.append({"role": role, "content": content})
    return out


def _turns(value, role: str, *, column: str, row: int) -> list[dict]:
    """A messages list, or a string as one turn of ``role``."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, column=column, row=row)


def _split_last_answer(conv: list[dict], *, column: str, row: int) -> tuple[list[dict], dict]:
    last = conv[-1]
    if last["role"] != "assistant":
        raise DataError(f"row {row}: the {column!r} conversation ends with a {last['role']} turn; a preference "
                        "answer is the assistant's, so it must end with an assistant turn. Fix: end it with the "
                        "assistant's answer, or drop the row.")
    return conv[:-1], last


def _show(message: dict) -> str:
    text = message["content"]
    return f"{message['role']} {text[:40] + '...' if len(text) > 40 else text!r}"


def split_row(row: dict, idx: int, names: dict | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists of one canonical row (keys prompt?, chosen, rejected, system?),
    checked. ``idx`` is the 1-based row number the errors name; ``names`` the dataset's own column names (canonical
    name -> column), which the errors use."""
    names = names or {}
    n = {k: names.get(k, k) for k in ("prompt", "chosen", "rejected", "system")}
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    whole = is_messages(chosen) and is_messages(rejected) and (
        prompt is None or not is_messages(prompt)) and any(
        isinstance(m, dict) and m.get("role") != "assistant" for m in [*chosen, *rejected])
    if whole:  # implicit prompt: split each conversation at its last assistant turn
        c_conv = check_messages(chosen, column=n["chosen"], row=idx)
        r_conv = check_messages(rejected, column=n["rejected"], row=idx)
        p_c, c_last = _split_last_answer(c_conv, column=n["chosen"], row=idx)
        p_r, r_last = _split_last_answer(r_conv, column=n["rejected"], row=idx)
        if p_c != p_r:
            at = next((i for i, (a, b) in enumerate(zip(p_c, p_r)) if a != b), min(len(p_c), len(p_r)))
            a, b = (_show(p[at]) if at < len(p) else "no message" for p in (p_c, p_r))
            raise DataError(
                f"row {idx}: the chosen and rejected conversations disagree before their last assistant turn "
                f"(first difference at message {at + 1}: {a} vs {b}). Both must share every turn but the last; "
                "fix or drop the row."
            )
        p_msgs, c_msgs, r_msgs = p_c, [c_last], [r_last]
    else:
        if prompt is None:
            raise DataError(f"row {idx}: {n['prompt']!r} is empty (None) and the chosen/rejected answers do not carry the "
                            "conversation. Fix: give the prompt (a string or a messages list), or give chosen and "
                            "rejected as whole conversations.")
        p_msgs = _turns(prompt, "user", column=n["prompt"], row=idx)
        c_msgs = _turns(chosen, "assistant", column=n["chosen"], row=idx)
        r_msgs = _turns(rejected, "assistant", column=n["rejected"], row=idx)
        for name, msgs in ((n["chosen"], c_msgs), (n["rejected"], r_msgs)):
            _split_last_answer(msgs, column=name, row=idx)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"row {idx}: {n['system']!r} is a {type(system).__name__}; expected text. Fix: make it a string.")
    if system and system.strip() and not (p_msgs and p_msgs[0]["role"] == "system"):
        p_msgs = [{"role": "system", "content": system}, *p_msgs]
    if not any(m["role"] == "user" for m in p_msgs):
        raise DataError(f"row {idx}: the prompt has no user turn (it is {[m['role'] for m in p_msgs] or 'empty'}); "
                        "the answers need a question to answer. Fix: add the user's turn, or drop the row.")
    if p_msgs[-1]["role"] != "user":
        raise DataError(f"row {idx}: the prompt ends with a {p_msgs[-1]['role']} turn; the answer being compared "
                        "must follow a user turn. Fix: end the prompt with the user's turn, or drop the row.")
    return p_msgs, c_msgs, r_msgs


def require_template(tokenizer, what: str) -> None:
    """Conversational data needs a chat template: an ArgumentError naming --chat_template, before any model loads."""
    if template_text(tokenizer) is None:
        name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
        raise ArgumentError(
            f"{what} is conversational (turns of a chat), but the tokenizer ({name}) has no chat template to render "
            f"it with. Fix: pass {FLAG} with a .jinja file, a tokenizer folder that has a template, or a built-in "
            "name (llama3, gemma3, qwen2, hh), e.g. --chat_template llama3; or use the model's instruct tokenizer "
            "(--tokenizer_name_or_path)."
        )


def render(p_msgs: list[dict], c_msgs: list[dict], r_msgs: list[dict], tokenizer, *, row: int) -> dict:
    """prompt/chosen/rejected text through the tokenizer's chat template, as trl 0.22's apply_chat_template: the
    prompt with the generation prompt; each answer is the whole rendered conversation less the prompt. Where a
    template renders the prompt differently inside the whole conversation, the prompt is the common start of the
    three (trl keeps the common start too)."""
    try:
        prompt = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
        chosen = tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=False)
        rejected = tokenizer.apply_chat_template(p_msgs + r_msgs, tokenize=False)
    except Exception as e:  # jinja's raise_exception (e.g. roles that do not alternate), TemplateError, ...
        raise DataError(f"row {row}: the chat template refused this conversation ({type(e).__name__}: {e}). Fix: "
                        f"make the row fit the template (roles {[m['role'] for m in p_msgs + c_msgs]}), or pass "
                        f"another {FLAG}.") from None
    prompt = os.path.commonprefix([prompt, chosen, rejected])
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def conversation_to_text(row: dict, idx: int, tokenizer, names: dict | None = None) -> dict:
    """One canonical conversational row → {"prompt", "chosen", "rejected"} text (``idx``: 1-based row number;
    ``names``: the dataset's column names, for the errors)."""
    p_msgs, c_msgs, r_msgs = split_row(row, idx, names)
    return render(p_msgs, c_msgs, r_msgs, tokenizer, row=idx)


def prompt_text(prompt: str, tokenizer) -> str:
    """A single user turn rendered with the tokenizer's chat template and its generation prompt (generation's
    --prompt), or the text itself when the tokenizer has no template."""
    if template_text(tokenizer) is None:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
