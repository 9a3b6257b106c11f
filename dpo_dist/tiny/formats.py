"""The built-in preference data written in each schema dpo-dist reads, from the same hh-rlhf rows.

``FORMATS``:

* ``conversational``: ``chosen``/``rejected`` as whole ``{"role", "content"}`` conversations (implicit prompt);
* ``ultrafeedback``: HuggingFaceH4/ultrafeedback_binarized's columns: ``prompt`` (the first user turn),
  ``prompt_id``, ``chosen``/``rejected`` whole conversations, ``messages`` (= chosen), ``score_chosen``,
  ``score_rejected``;
* ``orca``: Intel/orca_dpo_pairs' columns: ``system``, ``question``, ``chosen``, ``rejected`` text;
* ``stack_exchange``: lvwerra/stack-exchange-paired's columns: ``qid``, ``question``, ``date``, ``metadata``,
  ``response_j`` (preferred), ``response_k``.

The two single-turn schemas (orca, stack_exchange) keep the row's last human turn as the question: their public
sets have one question per row. Each split is written as ``train.jsonl`` / ``test.jsonl`` in its own folder
(``TinyAssets.format_dir``), so the same tiny model trains on every format.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dpo_dist.data.preference import ASSISTANT_TAG
from dpo_dist.tiny.preferences import HUMAN_TAG, read_jsonl
from dpo_dist.util.atomic import write_atomic

FORMATS = ("conversational", "ultrafeedback", "orca", "stack_exchange")
SYSTEM_TEXT = "You are a polite assistant. Answer the question helpfully and stay on topic."


def hh_to_messages(transcript: str) -> list[dict]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a..."`` → [{"role": "user", "content": "q"}, {"role": "assistant", ...}]."""
    messages = []
    rest = transcript
    tags = {HUMAN_TAG: "user", ASSISTANT_TAG: "assistant"}
    while rest:
        tag = next(t for t in tags if rest.startswith(t))
        rest = rest[len(tag):]
        cut = min((i for i in (rest.find(t) for t in tags) if i >= 0), default=len(rest))
        messages.append({"role": tags[tag], "content": rest[:cut].strip()})
        rest = rest[cut:]
    return messages


def convert_row(row: dict, fmt: str, index: int) -> dict:
    """One hh-rlhf row ``{"chosen", "rejected"}`` in format ``fmt`` (one of FORMATS)."""
    chosen, rejected = hh_to_messages(row["chosen"]), hh_to_messages(row["rejected"])
    if fmt == "conversational":
        return {"chosen": chosen, "rejected": rejected}
    question = chosen[-2]["content"]
    qid = hashlib.sha256(row["chosen"][: -len(chosen[-1]["content"])].encode()).hexdigest()[:16]
    if fmt == "ultrafeedback":
        return {"prompt": chosen[0]["content"], "prompt_id": qid, "chosen": chosen, "rejected": rejected,
                "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.0}
    if fmt == "orca":
        return {"system": SYSTEM_TEXT, "question": question, "chosen": chosen[-1]["content"],
                "rejected": rejected[-1]["content"]}
    if fmt == "stack_exchange":
        return {"qid": index, "question": question, "date": "2023/01/01", "metadata": [f"tiny/{qid}"],
                "response_j": chosen[-1]["content"], "response_k": rejected[-1]["content"]}
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def write_format_dataset(hh_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str) -> dict[str, Path]:
    """Write ``hh_dir``'s train.jsonl / test.jsonl in format ``fmt`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "test"):
        rows = [convert_row(r, fmt, i) for i, r in enumerate(read_jsonl(Path(hh_dir) / f"{split}.jsonl"))]
        paths[split] = out / f"{split}.jsonl"
        write_atomic(paths[split], "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    return paths


def format_messages(row: dict, fmt: str) -> tuple[list[dict], list[dict], list[dict]]:
    """The (prompt, chosen, rejected) messages a row of format ``fmt`` written from the hh-rlhf ``row`` stands for:
    what the chat template should render for it (the single-turn schemas keep the last question, orca adds its
    system message)."""
    chosen, rejected = hh_to_messages(row["chosen"]), hh_to_messages(row["rejected"])
    prompt = chosen[:-1]
    if fmt in ("orca", "stack_exchange"):
        prompt = prompt[-1:]
    if fmt == "orca":
        prompt = [{"role": "system", "content": SYSTEM_TEXT}, *prompt]
    return prompt, chosen[-1:], rejected[-1:]
