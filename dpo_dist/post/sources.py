"""What a training run left, found and read from disk: the merge post-step's input.

What ``--checkpoint`` may be (`Source.kind` says which was found; the merge report's ``kind`` repeats it):

* ``model``: a saved full model folder (``config.json`` + ``*.safetensors`` / ``pytorch_model.bin``),
  e.g. ``<output_dir>`` after a full fine-tune.
* ``adapter``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``). The base
  is ``--base_model`` or the adapter's ``base_model_name_or_path``; PEFT's ``merge_and_unload`` merges it.
* ``zero``: a DeepSpeed ZeRO checkpoint folder (``global_stepN/`` + ``latest``, e.g.
  ``<output_dir>/checkpoint-30``), gathered with DeepSpeed's own
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (fp32 master weights).
* ``zero+adapter``: the same with ``adapter_config.json`` beside it (LoRA under ZeRO-3): the gathered
  state dict holds PEFT-named LoRA weights; they are loaded into base + adapter structure, then merged.
* a folder with no model but ``checkpoint-*`` subfolders: its newest checkpoint.

A save made without ZeRO-3's 16-bit gather (``stage3_gather_16bit_weights_on_model_save: false``) holds
size-0 tensors (a failure users of other DPO trainers keep reporting). It is detected; the weights are
re-gathered from a ZeRO checkpoint in the folder or its newest ``checkpoint-*`` subfolder when that checkpoint
is as new as the trained model, and otherwise the merge is refused with the tensor names and the fix. A ZeRO
checkpoint with a missing per-rank shard file is refused with the missing file's name.

Nothing here builds a model: `dpo_dist.post.models` loads what is found.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.model.loader import check_source
from dpo_dist.post.errors import MergeArgumentError, MergeError
from dpo_dist.util.layout import CHECKPOINT_PREFIX, METRICS_FILE

logger = logging.getLogger("dpo_dist.merge")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# One rank's ZeRO shard in global_stepN/: <prefix>zero_pp_rank_<rank>_mp_rank_<mp>_(model|optim)_states.pt
SHARD_RE = re.compile(r"^(?P<prefix>.*?)zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_(?P<what>model|optim)_states\.pt$")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def natural_step(p: Path) -> int:
    m = re.search(r"(\d+)$", p.name)
    return int(m.group(1)) if m else -1


def _checkpoints(folder: Path, newest_first: bool = False) -> list[Path]:
    """The checkpoint-* subfolders of `folder`, oldest first (or newest first)."""
    return sorted((p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), key=natural_step, reverse=newest_first)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def weight_files(folder: Path) -> list[Path]:
    """The model weight files of a model folder (all shards of a sharded save)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.exists():
            data = read_json(index) or {}
            return [folder / f for f in sorted(set((data.get("weight_map") or {}).values()))]
        if (folder / single).exists():
            return [folder / single]
    return sorted(folder.glob("model-*-of-*.safetensors"))


def adapter_weight_file(folder: Path) -> Path | None:
    for name in ADAPTER_WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    return None


def tensor_shapes(path: Path) -> dict[str, tuple]:
    """Shapes of every tensor in a safetensors or torch file, without loading the data (safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # deferred: safetensors imports torch for framework="pt"

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch  # deferred: torch takes seconds to import; --help and argument errors do not need it

    sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


def empty_tensors(files: list[Path]) -> list[str]:
    """Names (file:tensor) of size-0 tensors: what a ZeRO-3 save without the 16-bit gather writes."""
    out = []
    for f in files:
        if not f.exists():
            raise MergeError(f"{f}: listed in the weight index but missing; the save is incomplete.")
        for name, shape in tensor_shapes(f).items():
            n = 1
            for d in shape:
                n *= d
            if n == 0:
                out.append(f"{f.name}:{name}")
    return out


# --------------------------------------------------------------------------------------------------
# ZeRO checkpoints
# --------------------------------------------------------------------------------------------------

def zero_tag(folder: Path) -> str | None:
    """The ZeRO tag (global_stepN) of a DeepSpeed checkpoint folder, or None if it is not one."""
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        return tag or None
    steps = sorted((p for p in folder.glob("global_step*") if p.is_dir()), key=natural_step)
    return steps[-1].name if steps else None


def find_zero_checkpoint(folder: Path) -> Path | None:
    """The folder itself when it is a ZeRO checkpoint, else its newest checkpoint-* subfolder that is one."""
    if zero_tag(folder):
        return folder
    for ckpt in _checkpoints(folder, newest_first=True):
        if zero_tag(ckpt):
            return ckpt
    return None


def _step_of_tag(tag: str) -> int | None:
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else None


def check_zero_files(zero_dir: Path, tag: str) -> dict:
    """Every rank's model-state and optimizer-state file is there; raise MergeError naming what is missing.

    Needed: zero_to_fp32 checks the number of optimizer files against the partition count, but under ZeRO-3
    it reads parameter shapes from rank 0's model states only, so a deleted rank-1 model-states file gathers
    "successfully" (measured with deepspeed 0.19.8)."""
    import torch  # deferred: torch takes seconds to import; --help and argument errors do not need it

    step_dir = zero_dir / tag
    if not step_dir.is_dir():
        raise MergeError(f"{zero_dir}: 'latest' names {tag!r}, but {step_dir} does not exist; the checkpoint is "
                         "incomplete. Pass another checkpoint-* folder.")
    shards: dict[str, dict[int, Path]] = {"model": {}, "optim": {}}
    prefixes: dict[str, str] = {"model": "", "optim": ""}
    for p in step_dir.iterdir():
        m = SHARD_RE.match(p.name)
        if m:
            shards[m["what"]][int(m["rank"])] = p
            prefixes[m["what"]] = m["prefix"]
    stage12_model = step_dir / "mp_rank_00_model_states.pt"
    if not shards["optim"]:
        raise MergeError(f"{step_dir}: no *_optim_states.pt files (the fp32 master weights live there); the "
                         "checkpoint is incomplete or not a ZeRO checkpoint.")
    state_file = next(iter(sorted(shards["model"].values())), None) or (stage12_model if stage12_model.exists() else None)
    if state_file is None:
        raise MergeError(f"{step_dir}: no *_model_states.pt file; missing: zero_pp_rank_0_mp_rank_00_model_states.pt "
                         "(and the other ranks'). The checkpoint is incomplete.")
    try:
        state = torch.load(str(state_file), map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated file
        raise MergeError(f"{state_file}: cannot be read ({type(e).__name__}: {e}); the checkpoint is corrupt.") from e
    world = int(state.get("dp_world_size") or 0) or (max(shards["optim"]) + 1)
    world = max(world, max(shards["optim"]) + 1, (max(shards["model"]) + 1) if shards["model"] else 0)
    missing = []
    for r in range(world):
        if shards["model"] and r not in shards["model"]:
            missing.append(f"{prefixes['model']}zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        if r not in shards["optim"]:
            missing.append(f"{prefixes['optim']}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    if missing:
        raise MergeError(
            f"{step_dir}: ZeRO checkpoint of {world} ranks is missing {', '.join(missing)}. A rank did not finish "
            "saving or the file was deleted; the weights cannot be gathered. Use another checkpoint-* folder."
        )
    return {"world_size": world, "dir": str(step_dir)}


def gather_zero(zero_dir: Path, tag: str) -> dict:
    """fp32 state dict from a ZeRO checkpoint, with DeepSpeed's own zero_to_fp32 Python API."""
    # deferred: deepspeed (and torch under it) is only needed for a ZeRO checkpoint
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(zero_dir), tag=tag)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise MergeError(f"{zero_dir}: DeepSpeed could not gather the ZeRO checkpoint {tag}: {type(e).__name__}: {e}") from e
    for line in buf.getvalue().splitlines():
        if line.strip() and "it/s]" not in line:
            logger.debug("zero_to_fp32: %s", line.strip())
    bad = [k for k, v in sd.items() if v.numel() == 0]
    if bad:
        raise MergeError(f"{zero_dir}: the gathered ZeRO state has size-0 tensors: {', '.join(bad[:5])}.")
    return sd


# --------------------------------------------------------------------------------------------------
# What the checkpoint is
# --------------------------------------------------------------------------------------------------

@dataclass
class Source:
    kind: str  # model | adapter | zero | zero+adapter
    folder: Path  # where config / adapter config / tokenizer are read
    zero_dir: Path | None = None
    zero_tag: str | None = None
    notes: list = field(default_factory=list)
    metrics: dict | None = None

    @property
    def is_adapter(self) -> bool:
        return self.kind in ("adapter", "zero+adapter")


def _metrics_near(folder: Path) -> dict | None:
    for p in (folder / METRICS_FILE, folder.parent / METRICS_FILE):
        m = read_json(p)
        if isinstance(m, dict):
            return m
    return None


def _regather_or_refuse(folder: Path, what: str, bad: list[str], metrics: dict | None) -> Source:
    names = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
    zero = find_zero_checkpoint(folder)
    if zero is None:
        raise MergeError(
            f"{folder}: the saved {what} has size-0 tensors: {names}. It was saved under ZeRO-3 without the 16-bit "
            "gather, so it holds no weights. Set \"stage3_gather_16bit_weights_on_model_save\": true in the "
            "DeepSpeed config and save again, or pass the ZeRO checkpoint folder (checkpoint-N with global_stepN/) "
            "as --checkpoint."
        )
    tag = zero_tag(zero)
    ckpt_step = _step_of_tag(tag)
    trained = (metrics or {}).get("steps")
    if zero != folder and isinstance(trained, int) and ckpt_step is not None and ckpt_step < trained:
        raise MergeError(
            f"{folder}: the saved {what} has size-0 tensors ({names}), and the newest ZeRO checkpoint "
            f"{zero.name}/{tag} is from step {ckpt_step} while training ran {trained} steps; re-gathering it would "
            f"silently drop steps. Pass --checkpoint {zero} to merge that older state anyway, or retrain with "
            "\"stage3_gather_16bit_weights_on_model_save\": true."
        )
    note = (f"the saved {what} in {folder} has size-0 tensors ({names}): saved without the 16-bit gather; "
            f"re-gathered from the ZeRO checkpoint {zero}/{tag}")
    logger.warning("%s", note)
    kind = "zero+adapter" if (folder / ADAPTER_CONFIG).exists() or (zero / ADAPTER_CONFIG).exists() else "zero"
    # Config / adapter config come from the folder the user named when it has them, else the checkpoint.
    meta = folder if (folder / "config.json").exists() or (folder / ADAPTER_CONFIG).exists() else zero
    return Source(kind, meta, zero, tag, [note], metrics)


def detect_source(checkpoint: Path) -> Source:
    folder = checkpoint
    metrics = _metrics_near(folder)
    has_adapter_cfg = (folder / ADAPTER_CONFIG).exists()
    tag = zero_tag(folder)
    if tag:
        kind = "zero+adapter" if has_adapter_cfg else "zero"
        return Source(kind, folder, folder, tag, [], metrics)
    if has_adapter_cfg:
        wf = adapter_weight_file(folder)
        if wf is None:
            zero = find_zero_checkpoint(folder)
            if zero is None:
                raise MergeError(f"{folder}: adapter_config.json but no adapter_model.safetensors, and no ZeRO "
                                 "checkpoint to gather from; the save is incomplete.")
            return _regather_or_refuse(folder, "adapter", ["(no adapter_model.safetensors)"], metrics)
        bad = empty_tensors([wf])
        if bad:
            return _regather_or_refuse(folder, "adapter", bad, metrics)
        return Source("adapter", folder, metrics=metrics)
    if (folder / "config.json").exists():
        files = weight_files(folder)
        if files:
            bad = empty_tensors(files)
            if bad:
                return _regather_or_refuse(folder, "model", bad, metrics)
            return Source("model", folder, metrics=metrics)
    ckpts = _checkpoints(folder)
    if ckpts:
        newest = ckpts[-1]
        logger.info("%s has no saved model; using its newest checkpoint %s", folder, newest.name)
        src = detect_source(newest)
        src.notes.insert(0, f"{folder} has no saved model; merged its newest checkpoint {newest.name}")
        src.metrics = src.metrics or metrics
        return src
    raise MergeArgumentError(
        f"--checkpoint {folder}: not a model folder (config.json + weights), a PEFT adapter folder "
        "(adapter_config.json + adapter_model.safetensors), a DeepSpeed ZeRO checkpoint (global_stepN/ + latest) "
        "or a training output with checkpoint-* folders."
    )


# --------------------------------------------------------------------------------------------------
# The base model
# --------------------------------------------------------------------------------------------------

def _check_base(name: str, flag: str) -> str:
    return check_source(name, flag, error=MergeArgumentError,
                        fix="Pass --base_model with the base model's folder or hub id.")


def resolve_base(base_model: str | None, source: Source) -> tuple[str | None, str]:
    """(base model to load, where the name came from)."""
    if base_model:
        return _check_base(base_model, "--base_model"), "--base_model"
    if source.is_adapter:
        cfg = read_json(source.folder / ADAPTER_CONFIG) or {}
        if not cfg and source.zero_dir is not None:
            cfg = read_json(source.zero_dir / ADAPTER_CONFIG) or {}
        name = cfg.get("base_model_name_or_path")
        if not name:
            raise MergeArgumentError(f"{source.folder}/adapter_config.json names no base_model_name_or_path; pass "
                                     "--base_model.")
        try:
            return _check_base(name, "base_model_name_or_path (adapter_config.json)"), ADAPTER_CONFIG
        except MergeArgumentError as e:
            raise MergeArgumentError(f"{e} (relative paths are relative to where training ran; pass --base_model "
                                     "to name it from here)") from e
    name = (source.metrics or {}).get("model")
    if isinstance(name, str) and name:
        expanded = os.path.expanduser(name)
        if os.path.isdir(expanded) and (Path(expanded) / "config.json").exists():
            return expanded, METRICS_FILE
        logger.info("base model %r from %s is not reachable from here; the parameter count is checked against the "
                    "checkpoint's config.json", name, METRICS_FILE)
    return None, "checkpoint config"
