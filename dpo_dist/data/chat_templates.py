"""Chat templates: the built-in ones, and `--chat_template FILE|NAME` resolved to the template text.

The template itself is always run by `transformers` (`tokenizer.apply_chat_template`, jinja in a sandbox); this
module only decides WHICH template text a tokenizer carries:

* by default the tokenizer's own (`tokenizer_config.json` / `chat_template.jinja`);
* `--chat_template FILE`: a `.jinja` (or any text) file, a `tokenizer_config.json` / `chat_template.json` holding
  a `chat_template` key, or a model/tokenizer folder holding one of those;
* `--chat_template NAME`: one of the tokenizer's own named templates (a tokenizer may carry several, e.g.
  `default` and `tool_use`), else one of BUILTIN_TEMPLATES below.

The built-in templates are data, not code: `llama3` is Meta-Llama-3-8B-Instruct's own template, verbatim;
`gemma3` is Gemma 3 instruct's own template with its image and tool branches left out (text turns only: same
text for text-only conversations, including the system message folded into the first user turn, since Gemma 3
has no system role); `qwen2` is Qwen2-Instruct's own ChatML template, verbatim (a default system message when the
conversation has none); `hh` renders the Anthropic/hh-rlhf transcript format ("\\n\\nHuman: ...\\n\\nAssistant: ...").
The built-in tiny models carry them (dpo_dist.tiny: llama3 for the tiny Llama and the tiny Mixtral, gemma3 for the
tiny Gemma 3, qwen2 for the tiny Qwen2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dpo_dist.util.errors import ArgumentError

HH_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "gemma3": GEMMA3_TEMPLATE, "qwen2": QWEN2_TEMPLATE,
                     "hh": HH_TEMPLATE}

# The special tokens each built-in template writes (the tiny tokenizer reserves them, so that a turn marker is
# one token, as in the real models' vocabularies).
TEMPLATE_TOKENS = {
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma3": ("<start_of_turn>", "<end_of_turn>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "hh": (),
}

FLAG = "--chat_template"


def template_text(tokenizer) -> str | None:
    """The template `apply_chat_template` uses by default, or None: a tokenizer's `chat_template` is a string, or
    a dict of named templates of which `default` is the default."""
    t = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


def template_fingerprint(tokenizer) -> str | None:
    """sha256 of the tokenizer's default template (what a cache key holds), or None without one."""
    t = template_text(tokenizer)
    return hashlib.sha256(t.encode()).hexdigest() if t else None


def _from_json(path: Path, value: str) -> str:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArgumentError(f"{FLAG} {value}: cannot read {path.name} as JSON ({e}). Fix: point {FLAG} at a .jinja "
                            "file, or at a tokenizer_config.json / chat_template.json with a \"chat_template\" key.") from None
    t = doc.get("chat_template") if isinstance(doc, dict) else None
    if isinstance(t, list):  # transformers' form for several named templates: [{"name": ..., "template": ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    if not isinstance(t, str) or not t.strip():
        raise ArgumentError(f"{FLAG} {value}: {path.name} holds no \"chat_template\" string. Fix: point {FLAG} at a "
                            f".jinja file, or at a tokenizer_config.json that has one, or use a built-in name "
                            f"({', '.join(BUILTIN_TEMPLATES)}).")
    return t


def _from_path(path: Path, value: str) -> str:
    if path.is_dir():
        for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            if (path / name).is_file():
                return _from_path(path / name, value)
        raise ArgumentError(f"{FLAG} {value}: the folder has no chat_template.jinja, chat_template.json or "
                            f"tokenizer_config.json. Fix: point {FLAG} at a template file or a tokenizer folder.")
    if path.suffix.lower() == ".json":
        return _from_json(path, value)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArgumentError(f"{FLAG} {value}: cannot read the template file ({e}). Fix: give a UTF-8 .jinja file.") from None
    if not text.strip():
        raise ArgumentError(f"{FLAG} {value}: the template file is empty. Fix: write the jinja template into it, or "
                            f"use a built-in name ({', '.join(BUILTIN_TEMPLATES)}).")
    return text


def check_compiles(text: str, value: str) -> None:
    """The template parses as jinja (transformers' own compiler), or an ArgumentError names the line."""
    from jinja2 import TemplateError  # deferred with transformers' compiler (it imports jinja2 on first use)

    try:  # transformers' own compiler (its sandbox and extensions, e.g. {% generation %}); private, so guarded
        from transformers.utils.chat_template_utils import _compile_jinja_template  # deferred: transformers
    except ImportError:  # a transformers without it: the template is checked when it first renders a row
        return
    try:
        _compile_jinja_template(text)
    except TemplateError as e:
        line = f" line {e.lineno}:" if getattr(e, "lineno", None) else ""
        raise ArgumentError(f"{FLAG} {value}:{line} not a valid jinja template ({e.message if hasattr(e, 'message') else e}). "
                            "Fix: repair the template, or use a built-in name "
                            f"({', '.join(BUILTIN_TEMPLATES)}).") from None


def resolve_chat_template(value: str, tokenizer=None) -> str:
    """The template text `--chat_template value` names (see the module docstring), checked to compile."""
    path = Path(value).expanduser()
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if path.exists():
        text = _from_path(path, value)
    elif isinstance(own, dict) and value in own:
        text = own[value]
    elif value in BUILTIN_TEMPLATES:
        text = BUILTIN_TEMPLATES[value]
    else:
        names = sorted(own) if isinstance(own, dict) else []
        theirs = f", the tokenizer's own named templates ({', '.join(names)})" if names else ""
        raise ArgumentError(f"{FLAG} {value}: no such file or folder, and not a known template name. Expected a "
                            f".jinja file, a tokenizer_config.json / chat_template.json, a tokenizer folder, a "
                            f"built-in name ({', '.join(BUILTIN_TEMPLATES)}){theirs}. Fix: check the path or the name.")
    check_compiles(text, value)
    return text


def apply_chat_template_arg(tokenizer, value: str | None):
    """Give the tokenizer the template `--chat_template` names (nothing to do when it is not given): everything
    downstream (data, generation, the saved tokenizer of the trained model) then sees the same template."""
    if value:
        tokenizer.chat_template = resolve_chat_template(value, tokenizer)
    return tokenizer
