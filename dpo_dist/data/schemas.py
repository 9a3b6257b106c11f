"""Which preference schema a split has, and how its columns map onto prompt/chosen/rejected (+ system).

Recognised without a flag, by their columns (and, for the generic shapes, by whether the values are text or
lists of messages):

* ``prompt/chosen/rejected`` text: used as it is (already formatted text, as TRL treats strings);
* ``Anthropic/hh-rlhf``: ``chosen``/``rejected`` transcripts, split at the last ``\\n\\nAssistant:``;
* conversational: ``chosen``/``rejected`` (and optionally ``prompt``) as ``{"role", "content"}`` message lists;
* ``HuggingFaceH4/ultrafeedback_binarized``: ``prompt`` text + ``chosen``/``rejected`` whole conversations;
* ``Intel/orca_dpo_pairs``: ``system``, ``question``, ``chosen``, ``rejected`` text;
* ``lvwerra/stack-exchange-paired``: ``question``, ``response_j`` (preferred), ``response_k``.

``--dataset_columns prompt=question,chosen=response_j,rejected=response_k[,system=system]`` maps any other schema.
The question/answer text of a mapped schema (orca, stack-exchange, or the flag) is a single-turn conversation:
the question is the user's turn, each response the assistant's, the system text a system message. It goes
through the chat template, like any conversational row (dpo_dist.data.conversation); a mapping without a prompt
column names hh-rlhf transcripts.

Hand-written: `datasets` loads whatever columns a file has, and TRL expects its own column names; neither knows
these public schemas.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.data import chat_templates, conversation
from dpo_dist.data.chat_templates import template_text
from dpo_dist.data.conversation import conversation_to_text, is_messages, require_template
from dpo_dist.data.errors import DataError
from dpo_dist.util.errors import ArgumentError

logger = logging.getLogger(__name__)

CANONICAL = ("prompt", "chosen", "rejected", "system")
COLUMNS_FLAG = "--dataset_columns"
KINDS = ("text", "hh", "chat")  # strings as they are; hh-rlhf transcripts; turns through the chat template
SCAN_ROWS = 100  # rows looked at to tell text from message lists (a column may start with None)
# The rendering code, for the cache key of the rendered rows: a change to it must not reuse rows rendered before.
_CODE_HASH = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (conversation, chat_templates)) +
                            Path(__file__).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Schema:
    """A recognised public schema: the columns that identify it, and the canonical name of each."""

    name: str
    columns: dict  # canonical name -> source column
    identify: frozenset  # source columns that must all be present
    describe: str


PUBLIC_SCHEMAS = (
    Schema("Intel/orca_dpo_pairs", {"system": "system", "prompt": "question", "chosen": "chosen",
                                    "rejected": "rejected"},
           frozenset({"system", "question", "chosen", "rejected"}), "system, question, chosen, rejected"),
    Schema("lvwerra/stack-exchange-paired", {"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
           frozenset({"question", "response_j", "response_k"}), "question, response_j (preferred), response_k"),
    Schema("HuggingFaceH4/ultrafeedback_binarized", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
           frozenset({"prompt", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}),
           "prompt + chosen/rejected message lists"),
)

RECOGNISED = (
    "prompt/chosen/rejected (text, or {role, content} message lists)",
    "Anthropic/hh-rlhf (chosen/rejected transcripts)",
    "chosen/rejected conversations (message lists; the prompt is every turn but the last)",
    *(f"{s.name} ({s.describe})" for s in PUBLIC_SCHEMAS),
)


@dataclass(frozen=True)
class Detection:
    """What a split is: its schema's name, canonical name -> source column, and how rows become text."""

    name: str
    columns: dict
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def describe(self) -> str:
        mapped = ", ".join(f"{k}={self.columns[k]}" for k in CANONICAL if k in self.columns)
        how = {"text": "text used as it is", "hh": "transcripts split at the last assistant turn",
               "chat": "conversations rendered with the chat template"}[self.kind]
        found = "given by" if self.name == COLUMNS_FLAG else "detected:"
        return f"schema {found} {self.name}, mapped {mapped}; {how}"


def parse_columns(text: str) -> dict:
    """``prompt=question,chosen=response_j,rejected=response_k[,system=system]`` → {canonical: source}, or an
    ArgumentError naming --dataset_columns, what was expected and the fix."""
    example = f"e.g. {COLUMNS_FLAG} prompt=question,chosen=response_j,rejected=response_k"
    out: dict = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, source = (x.strip() for x in item.partition("="))
        if not sep or not key or not source:
            raise ArgumentError(f"{COLUMNS_FLAG} {text!r}: {item!r} is not NAME=COLUMN. Expected comma-separated "
                                f"pairs of {'/'.join(CANONICAL)} and your dataset's column, {example}.")
        if key not in CANONICAL:
            raise ArgumentError(f"{COLUMNS_FLAG} {text!r}: {key!r} is not one of {', '.join(CANONICAL)}. Fix: name "
                                f"the canonical column on the left of '=', the dataset's on the right ({example}).")
        if key in out:
            raise ArgumentError(f"{COLUMNS_FLAG} {text!r}: {key!r} is given twice. Fix: give each name once.")
        out[key] = source
    missing = [k for k in ("chosen", "rejected") if k not in out]
    if missing:
        raise ArgumentError(f"{COLUMNS_FLAG} {text!r}: {' and '.join(missing)} missing; a preference pair needs both "
                            f"chosen and rejected ({example}).")
    return out


def _holds_messages(ds, column: str) -> bool:
    """Whether the column holds message lists (looks at the first SCAN_ROWS values that are not None)."""
    for value in ds.select(range(min(len(ds), SCAN_ROWS)))[column]:
        if value is not None:
            return is_messages(value)
    return False


def unknown_schema_error(where: str, split_name: str, cols) -> DataError:
    listed = "; ".join(RECOGNISED)
    return DataError(
        f"{where}split {split_name!r} has columns {sorted(cols)}, which match no recognised preference schema. "
        f"Recognised: {listed}. Fix: map your columns with {COLUMNS_FLAG} prompt=COL,chosen=COL,rejected=COL"
        "[,system=COL], rename them, or pick another --dataset_name."
    )


def detect_schema(ds, *, columns: str | None = None, where: str = "", split_name: str = "train") -> Detection:
    """The split's schema (see the module docstring). ``columns``: the --dataset_columns text, which wins."""
    cols = set(ds.column_names)
    if columns:
        mapping = parse_columns(columns)
        absent = [f"{k}={v}" for k, v in mapping.items() if v not in cols]
        if absent:
            raise ArgumentError(f"{COLUMNS_FLAG}: {', '.join(absent)}: {'that column is' if len(absent) == 1 else 'those columns are'} "
                                f"not in {where.rstrip(': ') or 'the dataset'} split {split_name!r}, whose columns are "
                                f"{sorted(cols)}. Fix: name existing columns on the right of '='.")
        kind = "chat" if "prompt" in mapping or any(_holds_messages(ds, mapping[k]) for k in ("chosen", "rejected")) \
            else "hh"
        return Detection(COLUMNS_FLAG, mapping, kind)
    for schema in PUBLIC_SCHEMAS:
        if schema.identify <= cols:
            return Detection(schema.name, dict(schema.columns), "chat")
    if {"chosen", "rejected"} <= cols:
        conv = any(_holds_messages(ds, k) for k in ("chosen", "rejected"))
        if "prompt" in cols:
            identity = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
            if conv or _holds_messages(ds, "prompt"):
                return Detection("conversational, explicit prompt", identity, "chat")
            return Detection("prompt/chosen/rejected", identity, "text")
        if conv:
            return Detection("conversational, implicit prompt", {"chosen": "chosen", "rejected": "rejected"}, "chat")
        return Detection("Anthropic/hh-rlhf", {"chosen": "chosen", "rejected": "rejected"}, "hh")
    raise unknown_schema_error(where, split_name, cols)


def rename_to_canonical(ds, det: Detection):
    """The split with only the canonical columns of ``det``, under their canonical names (text and hh kinds)."""
    keep = ds.select_columns([det.columns[k] for k in CANONICAL if k in det.columns])
    renames = {v: k for k, v in det.columns.items() if v != k}
    return keep.rename_columns(renames) if renames else keep


def chat_to_text(ds, det: Detection, tokenizer, *, where: str = "", split_name: str = "train"):
    """A conversational split → prompt/chosen/rejected text through the tokenizer's chat template; a bad row is a
    DataError naming the split and its 1-based row."""
    require_template(tokenizer, f"{where}split {split_name!r} ({det.name})")
    src = {k: det.columns[k] for k in CANONICAL if k in det.columns}

    def _row(row, idx):
        try:
            return conversation_to_text({k: row[v] for k, v in src.items()}, idx + 1, tokenizer, src)
        except DataError as e:
            raise DataError(f"{where}split {split_name!r} {e}") from None

    # The map's cache key: the rows, the mapping, the template and the code that renders them (hashing the
    # tokenizer object itself, as `datasets` would, is slow and not stable across processes).
    fingerprint = hashlib.sha256(repr((getattr(ds, "_fingerprint", None), sorted(src.items()), template_text(tokenizer),
                                       _CODE_HASH)).encode()).hexdigest()[:32]
    return ds.map(_row, with_indices=True, remove_columns=ds.column_names, new_fingerprint=fingerprint,
                  desc=f"chat template ({split_name})").select_columns(["prompt", "chosen", "rejected"])


def log_detection(det: Detection, *, where: str, split_name: str) -> None:
    """The log line that says which schema a split has and how its columns were mapped."""
    logger.info("data: %ssplit %r: %s", where, split_name, det.describe())
