"""Preference data: load with `datasets`, normalise to prompt/chosen/rejected, hold out, filter.

`datasets.load_dataset` does the loading (hub name, local file or folder). What is
hand-written here is what no library has in this shape: the hh-rlhf transcript split with a
row-numbered error when the two transcripts disagree, and the over-length accounting.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.data.bucketing import row_lengths
from dpo_dist.util.errors import UserError

logger = logging.getLogger(__name__)

ASSISTANT_TAG = "\n\nAssistant:"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(UserError):
    """Bad preference data: the message names the dataset, the row or column, and the fix."""


@dataclass(frozen=True)
class LengthStats:
    rows: int
    overlong: int
    dropped: int
    max_length: int


def split_hh_transcript(chosen: str, rejected: str, row: int) -> tuple[str, str, str]:
    """Split two Anthropic/hh-rlhf transcripts at the last `\\n\\nAssistant:`.

    Returns (prompt, chosen_response, rejected_response). The prompt ends with the tag, so
    the responses start with the space that follows it. The prompt is the shared prefix:
    if the two transcripts differ before their last assistant turn, that is an error.
    """
    parts = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise DataError(f"row {row}: column {name!r} must be a string transcript, got {type(text).__name__}.")
        cut = text.rfind(ASSISTANT_TAG)
        if cut < 0:
            raise DataError(
                f"row {row}: the {name!r} transcript has no {ASSISTANT_TAG.strip()!r} turn; hh-rlhf rows look like "
                "'\\n\\nHuman: ...\\n\\nAssistant: ...'. Fix the row or give explicit prompt/chosen/rejected columns."
            )
        cut += len(ASSISTANT_TAG)
        parts.append((text[:cut], text[cut:]))
    (p_chosen, r_chosen), (p_rejected, r_rejected) = parts
    if p_chosen != p_rejected:
        at = next((i for i, (a, b) in enumerate(zip(p_chosen, p_rejected)) if a != b), min(len(p_chosen), len(p_rejected)))
        raise DataError(
            f"row {row}: the chosen and rejected transcripts disagree before the last assistant turn "
            f"(first difference at character {at}: {p_chosen[at:at + 30]!r} vs {p_rejected[at:at + 30]!r}). "
            "In hh-rlhf format both must share every turn but the last; fix or drop the row."
        )
    return p_chosen, r_chosen, r_rejected


def _is_blank_file(path: Path) -> bool:
    """True for a file with no bytes, or (text formats) only whitespace."""
    size = path.stat().st_size
    if size == 0:
        return True
    if path.suffix.lower() == ".parquet" or size > 1 << 16:
        return False
    return not path.read_bytes().strip()


def _check_not_empty(name: str, path: Path) -> None:
    """An empty local file (or a folder whose data files are all empty) gets a clear error, not the
    `SchemaInferenceError` traceback that `datasets` raises for it."""
    if path.is_file():
        files = [path]
    else:
        files = [f for f in sorted(path.rglob("*")) if f.is_file() and f.suffix.lower() in LOCAL_BUILDERS
                 and not any(part.startswith(".") for part in f.relative_to(path).parts)]
    if files and all(_is_blank_file(f) for f in files):
        which = "the file is" if path.is_file() else f"its data files ({', '.join(f.name for f in files)}) are"
        raise DataError(
            f"--dataset_name {name}: {which} empty, so there are no preference pairs. Fix: write one JSON object "
            'per line with "prompt", "chosen" and "rejected" (or hh-rlhf "chosen"/"rejected" transcripts), or '
            "point --dataset_name at another file or folder."
        )


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _load_raw(name: str, config: str | None):
    import datasets

    path = Path(os.path.expanduser(name))
    local = path.is_file() or path.is_dir()
    try:
        if path.is_file():
            builder = LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"--dataset_name {name}: unsupported file type {path.suffix!r}; use one of {sorted(LOCAL_BUILDERS)}."
                )
            _check_not_empty(name, path)
            return datasets.load_dataset(builder, data_files={"train": str(path)})
        if path.is_dir():
            _check_not_empty(name, path)
            return datasets.load_dataset(str(path), config)
        if name.startswith(("/", "./", "../", "~")):
            raise DataError(f"--dataset_name {name}: no such file or folder. Check the path.")
        return datasets.load_dataset(name, config)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        msg = _first_line(e)
        if local:
            # datasets wraps the real problem (bad JSON, mixed columns, ...) in DatasetGenerationError.
            cause = e.__cause__ or e.__context__
            detail = f"{type(e).__name__}: {msg}" + (f"; caused by {type(cause).__name__}: {_first_line(cause)}" if cause else "")
            raise DataError(
                f"--dataset_name {name}: could not read this local dataset ({detail}). Fix: use .jsonl with one JSON "
                "object per line holding prompt/chosen/rejected strings (or hh-rlhf chosen/rejected transcripts)."
            ) from e
        raise DataError(
            f"--dataset_name {name}: could not load it ({type(e).__name__}: {msg}). If this is a hub dataset, the hub "
            "may be unreachable: download it on a machine with network and pass the local folder or .jsonl file."
        ) from e


def normalise(ds, split_name: str, source: str | None = None):
    """Map a split to exactly prompt/chosen/rejected string columns. `source` (the --dataset_name) goes in errors."""
    where = f"--dataset_name {source}: " if source else ""
    cols = set(ds.column_names)
    if len(ds) == 0:
        raise DataError(
            f"{where}split {split_name!r} is empty: there is nothing to train or evaluate on. Fix: add rows to it, "
            "or (for the held-out split) remove it so that a held-out part is carved from train."
        )
    if {"prompt", "chosen", "rejected"} <= cols:
        bad = next((i for i, r in enumerate(ds) if not all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))), None)
        if bad is not None:
            raise DataError(f"{where}split {split_name!r} row {bad}: prompt/chosen/rejected must be strings.")
        return ds.select_columns(["prompt", "chosen", "rejected"])
    if {"chosen", "rejected"} <= cols:

        def _split(row, idx):
            p, c, r = split_hh_transcript(row["chosen"], row["rejected"], idx)
            return {"prompt": p, "chosen": c, "rejected": r}

        out = ds.map(_split, with_indices=True, remove_columns=sorted(cols), desc=f"hh-rlhf split ({split_name})")
        return out.select_columns(["prompt", "chosen", "rejected"])
    raise DataError(
        f"{where}split {split_name!r} has columns {sorted(cols)}; expected either prompt/chosen/rejected or the "
        "Anthropic/hh-rlhf pair chosen/rejected (full transcripts). Fix: rename or add the columns (e.g. map your "
        "question/good/bad fields to prompt/chosen/rejected), or pick another --dataset_name."
    )


def load_preference_splits(data_args, seed: int):
    """Return (train, eval) datasets with prompt/chosen/rejected columns."""
    raw = _load_raw(data_args.dataset_name, data_args.dataset_config)
    splits = list(raw.keys())
    if data_args.dataset_train_split not in raw:
        raise DataError(
            f"--dataset_train_split {data_args.dataset_train_split!r} is not in {data_args.dataset_name}; "
            f"its splits are {splits}."
        )
    source = data_args.dataset_name
    train = normalise(raw[data_args.dataset_train_split], data_args.dataset_train_split, source)
    if data_args.dataset_test_split in raw:
        held_out = normalise(raw[data_args.dataset_test_split], data_args.dataset_test_split, source)
    else:
        if len(train) < 2:
            raise DataError(f"--dataset_name {source}: the dataset has one row: too few to hold any out; add a test "
                            "split or more rows.")
        parts = train.train_test_split(test_size=data_args.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
        logger.info("no %r split: held out %d of %d rows (seed %d)", data_args.dataset_test_split, len(held_out), len(train) + len(held_out), seed)
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        held_out = held_out.select(range(min(len(held_out), data_args.max_eval_samples)))
    return train, held_out


def with_bos(ds, tokenizer):
    """TRL tokenises decoder prompts without special tokens: put the BOS text in front, as the model expects."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ds
    return ds.map(lambda r: {"prompt": r["prompt"] if r["prompt"].startswith(bos) else bos + r["prompt"]}, desc="bos")


def token_lengths(ds, tokenizer):
    """Add prompt_len/chosen_len/rejected_len (completions count their EOS, as the trainer appends it)."""

    def _lens(batch):
        enc = {k: tokenizer(batch[k], add_special_tokens=False)["input_ids"] for k in ("prompt", "chosen", "rejected")}
        return {
            "prompt_len": [len(x) for x in enc["prompt"]],
            "chosen_len": [len(x) + 1 for x in enc["chosen"]],
            "rejected_len": [len(x) + 1 for x in enc["rejected"]],
        }

    return ds.map(_lens, batched=True, desc="token lengths")


def pair_token_stats(ds, tokenizer, *, max_length: int, max_prompt_length: int, max_completion_length: int,
                     sample: int = 2000, seed: int = 0) -> tuple[float, int]:
    """(mean, max) tokens per pair, chosen row + rejected row as the trainer truncates them, over at
    most ``sample`` rows (seeded): what a packed micro-batch holds per pair (launch/plan/search.py). The
    pairs ``ds`` has in all: ``len(ds)``."""

    if len(ds) > sample:
        ds = ds.shuffle(seed=seed).select(range(sample))
    m = token_lengths(ds, tokenizer)
    pairs = []
    for p, c, r in zip(m["prompt_len"], m["chosen_len"], m["rejected_len"]):
        p = min(p, max_prompt_length)
        pairs.append(sum(row_lengths(p, min(x, max_completion_length), max_length) for x in (c, r)))
    if not pairs:
        raise DataError("no rows to measure token lengths on")
    return sum(pairs) / len(pairs), max(pairs)


def apply_length_policy(ds, tokenizer, *, max_length: int, mode: str, split_name: str):
    """Count rows longer than max_length; drop them (mode 'drop') or leave them to the trainer's truncation.

    Truncation ('truncate') is the trainer's: prompt left-truncated to max_prompt_length, responses
    right-truncated to max_length - max_prompt_length.
    """
    measured = token_lengths(ds, tokenizer)
    too_long = [
        p + max(c, r) > max_length
        for p, c, r in zip(measured["prompt_len"], measured["chosen_len"], measured["rejected_len"])
    ]
    n_over = sum(too_long)
    dropped = 0
    if too_long and n_over == len(too_long):
        lengths = [p + max(c, r) for p, c, r in zip(measured["prompt_len"], measured["chosen_len"], measured["rejected_len"])]
        raise DataError(
            f"split {split_name!r}: all {len(ds)} rows are longer than --max_length {max_length} tokens (the shortest "
            f"has {min(lengths)}, the longest {max(lengths)}). Fix: raise --max_length (and --max_prompt_length) to fit "
            "the data, or check that --tokenizer_name_or_path matches the data."
        )
    if mode == "drop" and n_over:
        ds = ds.select([i for i, t in enumerate(too_long) if not t])
        dropped = n_over
    stats = LengthStats(rows=len(too_long), overlong=n_over, dropped=dropped, max_length=max_length)
    if n_over:
        action = "dropped" if mode == "drop" else "truncated (prompt kept left-truncated)"
        logger.warning("%s: %d of %d rows exceed max_length=%d tokens and are %s", split_name, n_over, len(too_long), max_length, action)
    return ds, stats
