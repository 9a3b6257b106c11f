"""Preference data: load with `datasets`, normalise to prompt/chosen/rejected, hold out, filter.

`datasets.load_dataset` does the loading (hub name, local file or folder). What is
hand-written here is what no library has in this shape: the hh-rlhf transcript split with a
row-numbered error when the two transcripts disagree (the other schemas, conversational rows and the chat
template: dpo_dist.data.schemas and dpo_dist.data.conversation); the file-and-line checks of local text files
(`datasets` reports a bad line as a 0-based pyarrow "row" with a misleading cause, and does not check
UTF-8 at all: a bad byte surfaces later as a raw UnicodeDecodeError); the pairs that cannot teach a
preference; and the over-length accounting (TRL truncates inside the trainer and counts nothing).

Row numbers in messages are 1-based, as a person counts the records of a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.data.bucketing import row_lengths
from dpo_dist.data.errors import DataError
from dpo_dist.data.schemas import chat_to_text, detect_schema, log_detection, rename_to_canonical

logger = logging.getLogger(__name__)

ASSISTANT_TAG = "\n\nAssistant:"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")  # the local formats that are UTF-8 text
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
SHOW_ROWS = 5  # row numbers quoted in a warning about dropped rows


@dataclass(frozen=True)
class LengthStats:
    """What the trainer's truncation does to a split (see apply_length_policy)."""

    rows: int
    overlong: int  # rows the trainer would cut in any way (prompt or a response)
    dropped: int
    max_length: int
    prompts_truncated: int = 0  # rows whose prompt loses its start
    responses_truncated: int = 0  # rows with a response that loses its end


def split_hh_transcript(chosen: str, rejected: str, row: int) -> tuple[str, str, str]:
    """Split two Anthropic/hh-rlhf transcripts at the last `\\n\\nAssistant:`.

    Returns (prompt, chosen_response, rejected_response). The prompt ends with the tag, so
    the responses start with the space that follows it. The prompt is the shared prefix:
    if the two transcripts differ before their last assistant turn, that is an error.
    ``row`` is the 1-based row number the errors name.
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


def _local_data_files(path: Path) -> list[Path]:
    """The data files of a local --dataset_name: the file itself, or a folder's non-hidden files of a known type."""
    if path.is_file():
        return [path]
    return [f for f in sorted(path.rglob("*")) if f.is_file() and f.suffix.lower() in LOCAL_BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(path).parts)]


def _check_not_empty(name: str, path: Path) -> None:
    """An empty local file (or a folder whose data files are all empty) gets a clear error, not the
    `SchemaInferenceError` traceback that `datasets` raises for it."""
    files = _local_data_files(path)
    if files and all(_is_blank_file(f) for f in files):
        which = "the file is" if path.is_file() else f"its data files ({', '.join(f.name for f in files)}) are"
        raise DataError(
            f"--dataset_name {name}: {which} empty, so there are no preference pairs. Fix: write one JSON object "
            'per line with "prompt", "chosen" and "rejected" (or hh-rlhf "chosen"/"rejected" transcripts), or '
            "point --dataset_name at another file or folder."
        )


def _label(f: Path, root: Path) -> str:
    """How a message names a data file after `--dataset_name <root>:`: by its path inside a folder, or not again."""
    return f"{f.relative_to(root)} " if root.is_dir() else ""


def check_utf8(name: str, root: Path) -> None:
    """Every line of the local text data files under ``root`` (the --dataset_name file or folder) is UTF-8, or a
    DataError names the file, the 1-based line and column.

    Checked before loading because `datasets` (pyarrow) reads the bytes without checking them: a bad line then
    fails only when a row is read, as a bare UnicodeDecodeError with no file or line. One pass over the bytes,
    line by line (a large file is never held whole)."""
    for f in _local_data_files(root):
        if f.suffix.lower() not in TEXT_SUFFIXES:
            continue
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"--dataset_name {name}: {_label(f, root)}line {lineno}, column {e.start + 1}: byte "
                        f"0x{line[e.start]:02x} is not valid UTF-8 ({e.reason}); {f.suffix} data files must be UTF-8 "
                        "text. Fix: re-save the file "
                        f"as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {f.name} > fixed{f.suffix}` for Latin-1 text), or "
                        "repair or delete that line."
                    ) from None


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def json_problem(f: Path, label: str = "") -> str | None:
    """The first problem of a .json/.jsonl file as `<label>line N, column C: what; expected ...; Fix: ...`, or None.

    A file whose first non-blank line is a JSON value of its own is JSON Lines (what .jsonl is, and what `datasets`
    tries first for .json); otherwise it is one JSON document (an array of row objects). Only run after loading
    failed, so the happy path pays nothing for it."""
    text = f.read_text(encoding="utf-8")
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and friends unescaped
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as whole:
        try:
            json.loads(lines[first])
        except json.JSONDecodeError:
            if text.lstrip().startswith("[") or f.suffix.lower() == ".json":  # one document
                return (f"{label}line {whole.lineno}, column {whole.colno}: {whole.msg}: the file is not valid JSON. "
                        "Expected one JSON array of row objects, or JSON Lines (one object per line). Fix: repair the "
                        "JSON at that place")
        doc = None
    else:
        if isinstance(doc, list):
            bad = next((i for i, row in enumerate(doc, 1) if not isinstance(row, dict)), None)
            if bad is not None:
                return (f"{label}item {bad} of the JSON array is a JSON {_json_type(doc[bad - 1])}; expected an object "
                        'such as {"prompt": "...", "chosen": "...", "rejected": "..."}. Fix: make it one, or delete it')
            rows = enumerate(doc, 1)
            where = "item"
        else:
            return None
    if doc is None:  # JSON Lines
        rows = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                return (f"{label}line {lineno}, column {e.colno}: {e.msg}: the line is not valid JSON. Expected one JSON "
                        'object per line, such as {"prompt": "...", "chosen": "...", "rejected": "..."}. Fix: repair '
                        "or delete that line")
        where = "line"
    for n, row in rows:
        if not isinstance(row, dict):
            return (f"{label}{where} {n}: a JSON {_json_type(row)}; expected an object such as "
                    '{"prompt": "...", "chosen": "...", "rejected": "..."}. Fix: make it one, or delete it')
        bad_key = next((k for k in PAIR_COLUMNS if k in row and not isinstance(row[k], str | list)), None)
        if bad_key:
            return (f"{label}{where} {n}: {bad_key!r} is a JSON {_json_type(row[bad_key])}; expected a string (or a "
                    "list of {\"role\", \"content\"} messages). Fix: make it one, or delete the row")
    return None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@contextlib.contextmanager
def _quiet_json_builder():
    """Mute the json builder's own ERROR log for a local file: it names a bad line as a 0-based pyarrow "row" (and,
    for a .json document, the cause of its first attempt), before the DataError below names the file and line."""
    log = logging.getLogger("datasets.packaged_modules.json.json")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


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
            check_utf8(name, path)
            with _quiet_json_builder():
                return datasets.load_dataset(builder, data_files={"train": str(path)})
        if path.is_dir():
            _check_not_empty(name, path)
            check_utf8(name, path)
            with _quiet_json_builder():
                return datasets.load_dataset(str(path), config)
        if name.startswith(("/", "./", "../", "~")):
            raise DataError(f"--dataset_name {name}: no such file or folder. Check the path.")
        return datasets.load_dataset(name, config)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        msg = _first_line(e)
        if local:
            # Name the file and line: datasets' own message gives a 0-based pyarrow "row" and, for a .json file,
            # the cause of its first (JSON Lines) attempt rather than the real one.
            problem = next((p for f in _local_data_files(path) if f.suffix.lower() in (".json", ".jsonl")
                            for p in [json_problem(f, _label(f, path))] if p), None)
            if problem:
                raise DataError(f"--dataset_name {name}: {problem}.") from None
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


def normalise(ds, split_name: str, source: str | None = None, *, tokenizer=None, columns: str | None = None):
    """Map a split to exactly prompt/chosen/rejected string columns. `source` (the --dataset_name) goes in errors.

    The schema is detected (or mapped with ``columns``, the --dataset_columns text: dpo_dist.data.schemas) and
    logged; conversational rows are rendered with ``tokenizer``'s chat template (dpo_dist.data.conversation)."""
    where = f"--dataset_name {source}: " if source else ""
    if len(ds) == 0:
        raise DataError(
            f"{where}split {split_name!r} is empty: there is nothing to train or evaluate on. Fix: add rows to it, "
            "or (for the held-out split) remove it so that a held-out part is carved from train."
        )
    det = detect_schema(ds, columns=columns, where=where, split_name=split_name)
    log_detection(det, where=where, split_name=split_name)
    if det.kind == "chat":
        return chat_to_text(ds, det, tokenizer, where=where, split_name=split_name)
    ds = rename_to_canonical(ds, det)
    try:
        if det.kind == "text":
            bad = next((i for i, r in enumerate(ds, 1) if not all(isinstance(r[k], str) for k in PAIR_COLUMNS)), None)
            if bad is not None:
                raise DataError(f"{where}split {split_name!r} row {bad}: prompt/chosen/rejected must be strings. Fix: "
                                "give that row three strings, or delete it.")
            return ds.select_columns(list(PAIR_COLUMNS))

        def _split(row, idx):
            try:
                p, c, r = split_hh_transcript(row["chosen"], row["rejected"], idx + 1)
            except DataError as e:
                raise DataError(f"{where}split {split_name!r} {e}") from None
            return {"prompt": p, "chosen": c, "rejected": r}

        out = ds.map(_split, with_indices=True, remove_columns=ds.column_names, desc=f"hh-rlhf split ({split_name})")
        return out.select_columns(list(PAIR_COLUMNS))
    except UnicodeDecodeError as e:  # local text files are checked line by line before loading (check_utf8)
        raise DataError(
            f"{where}split {split_name!r} holds text that is not valid UTF-8 ({e.reason} at byte {e.start}). Fix: "
            "re-encode the dataset's files as UTF-8."
        ) from None


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(i) for i in rows[:SHOW_ROWS])
    return shown + (f" and {len(rows) - SHOW_ROWS} more" if len(rows) > SHOW_ROWS else "")


def drop_degenerate_pairs(ds, split_name: str, source: str | None = None):
    """Drop the pairs that cannot teach a preference, with a warning: chosen == rejected, or an empty (blank)
    chosen or rejected response. Their DPO margin is zero or undefined, and a split of nothing else trains to a
    NaN accuracy without a word. No pair left is a DataError. Hand-written: neither datasets nor TRL checks this."""
    where = f"--dataset_name {source}: " if source else ""
    same, empty = [], []
    for i, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"]), 1):
        if not c.strip() or not r.strip():
            empty.append(i)
        elif c == r:
            same.append(i)
    bad = sorted(same + empty)
    if not bad:
        return ds
    kinds = ", ".join(k for k in (f"{len(same)} with chosen == rejected" if same else "",
                                  f"{len(empty)} with an empty chosen or rejected response" if empty else "") if k)
    if len(bad) == len(ds):
        raise DataError(
            f"{where}split {split_name!r}: none of its {len(ds)} pairs can teach a preference ({kinds}; rows "
            f"{_rows_text(bad)}, 1-based). Fix: give each pair a non-empty chosen and a different non-empty rejected "
            "response, or point --dataset_name at the right data."
        )
    logger.warning("%ssplit %r: dropped %d of %d pairs that cannot teach a preference (%s): rows %s (1-based)",
                   where, split_name, len(bad), len(ds), kinds, _rows_text(bad))
    drop = set(bad)
    return ds.select([i for i in range(len(ds)) if i + 1 not in drop])


PREFERENCE_SPLIT_SUFFIX = "_prefs"  # HuggingFaceH4/ultrafeedback_binarized: train_prefs / test_prefs beside _sft, _gen


def _preference_split(raw, name: str) -> str:
    """``name``, or ``name + "_prefs"`` when only that exists (a set that keeps its preference pairs beside other
    splits), with a log line that says so."""
    if name not in raw and name + PREFERENCE_SPLIT_SUFFIX in raw:
        logger.info("no %r split: using %r (its preference pairs)", name, name + PREFERENCE_SPLIT_SUFFIX)
        return name + PREFERENCE_SPLIT_SUFFIX
    return name


def load_preference_splits(data_args, seed: int, tokenizer=None):
    """Return (train, eval) datasets with prompt/chosen/rejected columns, without degenerate pairs.

    Every schema dpo_dist.data.schemas recognises (or --dataset_columns maps) is normalised here, conversational
    rows through ``tokenizer``'s chat template, so that DPO, SFT, the comparison and the planner read the same
    text."""
    raw = _load_raw(data_args.dataset_name, data_args.dataset_config)
    splits = list(raw.keys())
    train_split = _preference_split(raw, data_args.dataset_train_split)
    test_split = _preference_split(raw, data_args.dataset_test_split)
    if train_split not in raw:
        raise DataError(
            f"--dataset_train_split {data_args.dataset_train_split!r} is not in {data_args.dataset_name}; "
            f"its splits are {splits}."
        )
    source = data_args.dataset_name

    def clean(split):
        ds = normalise(raw[split], split, source, tokenizer=tokenizer, columns=data_args.dataset_columns)
        return drop_degenerate_pairs(ds, split, source)

    train = clean(train_split)
    if test_split in raw:
        held_out = clean(test_split)
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


def apply_length_policy(ds, tokenizer, *, max_length: int, max_prompt_length: int, max_completion_length: int,
                        mode: str, split_name: str):
    """Count what the trainer's truncation will cut; drop those rows (mode 'drop') or leave them to it ('truncate').

    The trainer's truncation is trl 0.22's (``DPOTrainer.tokenize_row`` with ``truncation_mode="keep_end"``; the
    engine's ``tokenize_pair`` and ``build_rows`` do the same): the prompt is left-truncated to max_prompt_length
    (its end is kept), each response (+ EOS) is right-truncated to max_completion_length, and a row still longer
    than max_length loses tokens from its start (more of the prompt). The counting is hand-written because TRL
    truncates batch by batch inside the trainer and reports nothing.

    'truncate' refuses only when no row keeps its whole responses even with its prompt truncated: every pair would
    be trained on cut-off answers. 'drop' removes every row the trainer would cut and refuses when none is left.
    """
    measured = token_lengths(ds, tokenizer)
    lens = list(zip(measured["prompt_len"], measured["chosen_len"], measured["rejected_len"]))
    room = min(max_completion_length, max_length)  # the most tokens of a response that survive
    prompt_cut = [p > max_prompt_length or min(p, max_prompt_length) + min(max(c, r), max_completion_length) > max_length
                  for p, c, r in lens]
    response_cut = [max(c, r) > room for _, c, r in lens]
    cut = [a or b for a, b in zip(prompt_cut, response_cut)]
    n, n_cut = len(lens), sum(cut)
    dropped = 0
    if n and all(response_cut):
        longest = [max(c, r) for _, c, r in lens]
        too_long = all(p + max(c, r) > max_length for p, c, r in lens)
        head = (f"all {n} rows are longer than --max_length {max_length} tokens, and even with their prompts "
                if too_long else "even with the prompts ")
        raise DataError(
            f"split {split_name!r}: {head}left-truncated to --max_prompt_length {max_prompt_length} no pair keeps its "
            f"whole responses: a response gets at most {room} tokens (--max_length minus --max_prompt_length, or "
            f"--max_target_length) and every pair has a longer one (from {min(longest)} to {max(longest)} tokens). "
            f"Fix: raise --max_length (e.g. to {max_prompt_length + min(longest)}) or lower --max_prompt_length to "
            "leave the responses more room, or check that --tokenizer_name_or_path matches the data."
        )
    if mode == "drop" and n_cut:
        if n_cut == n:
            raise DataError(
                f"split {split_name!r}: --overlong drop would drop all {n} rows: each has a prompt longer than "
                f"--max_prompt_length {max_prompt_length} or does not fit --max_length {max_length}. Fix: use "
                "--overlong truncate (the default: prompts keep their end), or raise --max_length and "
                "--max_prompt_length to fit the data."
            )
        ds = ds.select([i for i, t in enumerate(cut) if not t])
        dropped = n_cut
        logger.warning("%s: dropped %d of %d rows that the trainer would truncate (prompt over %d tokens or row over "
                       "max_length=%d; --overlong drop)", split_name, n_cut, n, max_prompt_length, max_length)
    elif n_cut:
        logger.warning("%s: %d of %d prompts are left-truncated to max_prompt_length=%d tokens (the end is kept, as "
                       "TRL's truncation_mode='keep_end'); %d of %d rows have a response right-truncated to %d tokens",
                       split_name, sum(prompt_cut), n, max_prompt_length, sum(response_cut), n, room)
    return ds, LengthStats(rows=n, overlong=n_cut, dropped=dropped, max_length=max_length,
                           prompts_truncated=sum(prompt_cut), responses_truncated=sum(response_cut))
