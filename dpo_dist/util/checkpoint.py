"""The output folder and checkpoint layout: refuse an output folder that would lose work, and find a
checkpoint that is complete (every file of the ranks that saved it) before any model loads. A checkpoint saved
by another number of ranks is complete too: `dpo_dist.train.reshard` resumes it on this run's ranks.

Hand-written: transformers resumes from whatever folder it is given and fails late (or silently restarts
the LR schedule) on a checkpoint that a killed run left half-written; these checks name what is missing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from dpo_dist.backend import world_size as launched_world_size
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.layout import CHECKPOINT_PREFIX, TRAINER_STATE


def check_output_dir(train_args) -> None:
    """Refuse a non-empty output_dir (unless overwriting or resuming) and one we cannot write. Leaves nothing behind
    (the write probe is an empty folder, removed at once)."""
    out = Path(train_args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--output_dir {out}: exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()) and not (train_args.overwrite_output_dir or train_args.resume_from_checkpoint):
        raise ArgumentError(
            f"--output_dir {out}: exists and is not empty. Nothing was changed. Pass --overwrite_output_dir to write "
            "into it (existing files are kept unless replaced), --resume_from_checkpoint latest to continue, or choose "
            "a new folder."
        )
    merged = Path(str(out).rstrip("/") + "_merged")
    if not train_args.no_merge and merged.is_dir() and any(merged.iterdir()) and not train_args.overwrite_output_dir:
        raise ArgumentError(
            f"{merged} (where the merged model goes) exists and is not empty. Nothing was changed. Pass "
            "--overwrite_output_dir to replace it after a successful merge, --no_merge to skip the merge, or choose "
            "a new --output_dir."
        )
    parent = out
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArgumentError(
            f"--output_dir {out}: {parent} is a file, not a folder, so nothing can be created under it. Nothing was "
            "changed. Choose an --output_dir whose parent folders are folders you can write to."
        )
    # os.access alone is not enough: root passes it on read-only mounts and in /proc. Probe for real with a
    # uniquely named empty folder that is removed at once (safe when every rank probes at the same time).
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dpo_dist_write_probe_", dir=parent))
    except OSError as e:
        raise ArgumentError(
            f"--output_dir {out}: cannot create anything in {parent} ({e.strerror or e}). Nothing was changed. "
            "Choose a folder you can write to (check permissions, read-only mounts and free space)."
        ) from e


# DeepSpeed's engine-state files (deepspeed/runtime/engine.py: _get_ckpt_name, _get_rank_zero_ckpt_name).
_DS_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_DS_ZERO_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_DS_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "adapter_model.bin")


def _file_problem(path: Path) -> str | None:
    """Cheap integrity check of one file: empty, or a torch zip whose central directory is unreadable (truncated)."""
    import zipfile

    try:
        size = path.stat().st_size
        if size == 0:
            return f"{path.name} is empty"
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":  # torch.save's zip format: the directory sits at the end, so truncation shows
            with zipfile.ZipFile(path) as z:
                z.namelist()
    except zipfile.BadZipFile:
        return f"{path.name} is truncated or damaged (unreadable torch archive)"
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror})"
    return None


def _zero_shard_ranks(tag_dir: Path) -> tuple[set[int], set[int], list[str]]:
    """(ranks with a ZeRO-3 model-state file, ranks with a ZeRO optimizer-state file, plain model-state files)."""
    names = sorted(os.listdir(tag_dir))
    zero3_model = {int(m[1]) for n in names if (m := _DS_ZERO3_MODEL.match(n))}
    zero_optim = {int(m[1]) for n in names if (m := _DS_ZERO_OPTIM.match(n))}
    plain_model = [n for n in names if _DS_MODEL.match(n)]
    return zero3_model, zero_optim, plain_model


_RNG_RANK = re.compile(r"^rng_state_(\d+)\.pth$")


def deepspeed_tag(ckpt) -> str | None:
    """The DeepSpeed tag (global_stepN) of a checkpoint folder: what its 'latest' file names, else its one
    global_step* folder; None when it holds no DeepSpeed engine state."""
    ckpt = Path(ckpt)
    latest = ckpt / "latest"
    if latest.is_file():
        return latest.read_text().strip() or None
    ds_dirs = sorted(p.name for p in ckpt.glob("global_step*") if p.is_dir() and not p.name.endswith("_universal"))
    return ds_dirs[0] if len(ds_dirs) == 1 else None


def saved_world_size(ckpt) -> int | None:
    """How many ranks saved `ckpt`, from its file names alone: the ZeRO shards of its DeepSpeed tag (one per
    rank), else the trainer's RNG files (rng_state_R.pth per rank; rng_state.pth alone: one rank). None when
    the names do not tell."""
    ckpt = Path(ckpt)
    tag = deepspeed_tag(ckpt)
    if tag and (ckpt / tag).is_dir():
        zero3_model, zero_optim, _ = _zero_shard_ranks(ckpt / tag)
        if zero3_model or zero_optim:
            return max(zero3_model | zero_optim) + 1
    rng = {int(m[1]) for p in ckpt.glob("rng_state_*.pth") if (m := _RNG_RANK.match(p.name))}
    if rng:
        return max(rng) + 1
    return 1 if (ckpt / "rng_state.pth").is_file() else None


def _deepspeed_state_problems(tag_dir: Path, saved: int) -> list[str]:
    """What is missing or damaged in a DeepSpeed tag folder saved by `saved` ranks."""
    zero3_model, zero_optim, plain_model = _zero_shard_ranks(tag_dir)
    rel = tag_dir.name
    if not zero3_model and not plain_model:
        return [f"{rel}/ holds no *_model_states.pt (the DeepSpeed engine state was not saved)"]
    problems = []
    expected = range(saved)
    if zero3_model or (zero_optim and not plain_model):
        problems += [f"{rel}/zero_pp_rank_{r}_mp_rank_00_model_states.pt is missing" for r in expected if r not in zero3_model]
    if zero_optim or zero3_model:
        problems += [f"{rel}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt is missing" for r in expected if r not in zero_optim]
    for n in sorted(os.listdir(tag_dir)):
        if n.endswith(".pt") and (p := _file_problem(tag_dir / n)):
            problems.append(f"{rel}/{p}")
    return problems


def checkpoint_problems(ckpt, world_size: int = 1, deepspeed: bool = False) -> list[str]:
    """What stops a resume from `ckpt` (empty list: looks complete). Reads only names, sizes, the JSON
    state and zip directories, so it is cheap even for 70B checkpoints and needs no model or process group.
    Every file of the ranks that saved it must be there; `world_size` (this run's ranks) counts only when the
    file names do not tell how many ranks saved it."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return [f"{ckpt} is not a folder"]
    problems = []
    state_path = ckpt / TRAINER_STATE
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state.get("global_step"), int):
            problems.append("trainer_state.json has no global_step")
    except FileNotFoundError:
        problems.append("trainer_state.json is missing")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        problems.append(f"trainer_state.json is not valid JSON, truncated? ({e})")
    except OSError as e:
        problems.append(f"trainer_state.json cannot be read ({e.strerror})")
    latest = ckpt / "latest"
    ds_dirs = sorted(p.name for p in ckpt.glob("global_step*") if p.is_dir() and not p.name.endswith("_universal"))
    # The ranks that saved it (file names; this run's ranks when the names do not tell): its shards and RNG
    # files must all be there, whatever this run's number of ranks.
    saved = saved_world_size(ckpt) or world_size
    if deepspeed or latest.exists() or ds_dirs:
        tag = deepspeed_tag(ckpt)
        if not tag:
            problems.append("the DeepSpeed engine state is missing (no 'latest' file naming a global_step*/ folder)")
        elif not (ckpt / tag).is_dir():
            problems.append(f"{tag}/ (named by the 'latest' file) is missing")
        else:
            problems += _deepspeed_state_problems(ckpt / tag, saved)
    else:
        if not any((ckpt / n).is_file() for n in _HF_WEIGHTS):
            problems.append("no model weights (model.safetensors, adapter_model.safetensors, ...)")
        if not (ckpt / "optimizer.pt").is_file():
            problems.append("optimizer.pt is missing")
    if not (ckpt / "scheduler.pt").is_file():
        problems.append("scheduler.pt is missing")
    rng = [f"rng_state_{i}.pth" for i in range(saved)] if saved > 1 else ["rng_state.pth"]
    problems += [f"{n} is missing (the RNG state of that rank)" for n in rng if not (ckpt / n).is_file()]
    for p in sorted(ckpt.iterdir()):
        if p.is_file() and p.suffix in (".pt", ".pth") and (msg := _file_problem(p)):
            problems.append(msg)
    return problems


def _checkpoints_newest_first(output_dir) -> list[Path]:
    rx = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
    found = [(int(m[1]), p) for p in Path(output_dir).iterdir() if p.is_dir() and (m := rx.match(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def resolve_checkpoint(train_args) -> str | None:
    """'latest' or a path → a checkpoint folder that is complete; otherwise an error naming the checkpoint and
    what is missing. Runs before any model loads and writes nothing. Whether it can resume on this run's number
    of ranks is `dpo_dist.train.reshard`'s question."""
    value = train_args.resume_from_checkpoint
    if not value:
        return None
    world_size = launched_world_size()
    deepspeed = bool(train_args.deepspeed)
    out = Path(train_args.output_dir)
    if value == "latest":
        candidates = _checkpoints_newest_first(out) if out.is_dir() else []
        if not candidates:
            raise ArgumentError(
                f"--resume_from_checkpoint latest: no checkpoint-* folder in {out}. Nothing was changed. Start "
                "without --resume_from_checkpoint (into a new --output_dir) or point it at a checkpoint folder."
            )
        ckpt = candidates[0]
    else:
        ckpt = Path(value)
        if not ckpt.is_dir():
            raise ArgumentError(
                f"--resume_from_checkpoint {value}: no such checkpoint folder. Nothing was changed. Use an existing "
                "checkpoint-* folder or 'latest'."
            )
        candidates = _checkpoints_newest_first(ckpt.parent)
    problems = checkpoint_problems(ckpt, world_size=world_size, deepspeed=deepspeed)
    if problems:
        hint = "start without --resume_from_checkpoint (into a new --output_dir)"
        for other in candidates:
            if other.resolve() != ckpt.resolve() and not checkpoint_problems(other, world_size, deepspeed):
                hint = f"resume from the newest complete one, --resume_from_checkpoint {other}, or {hint}"
                break
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ArgumentError(
            f"--resume_from_checkpoint {value}: checkpoint {ckpt} is incomplete or corrupt: {shown}. "
            f"Nothing was changed or deleted. To go on, {hint}."
        )
    return str(ckpt)


def checkpoint_step(ckpt) -> int | None:
    """The global step in the name checkpoint-<step>, or None."""
    m = re.match(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$", Path(ckpt).name)
    return int(m[1]) if m else None


def newest_complete_checkpoint(output_dir, world_size: int, deepspeed: bool) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """(the newest checkpoint-* in output_dir that is complete for this world size, or None; the newer ones that
    are not, each with what is wrong). A checkpoint a rank died while writing is torn: it is skipped, never used."""
    out = Path(output_dir)
    skipped = []
    for ckpt in _checkpoints_newest_first(out) if out.is_dir() else []:
        problems = checkpoint_problems(ckpt, world_size=world_size, deepspeed=deepspeed)
        if not problems:
            return ckpt, skipped
        skipped.append((ckpt, problems))
    return None, skipped
