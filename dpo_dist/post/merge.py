"""Post-step: turn a training output into a verified Hugging Face model folder.

    python -m dpo_dist.merge --checkpoint DIR --output DIR [--base_model M] [--dtype fp32|bf16]
                             [--no_verify] [--overwrite] [--max_shard_size 2GB]

What it accepts as ``--checkpoint`` (the report's ``kind`` says which it found):

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
size-0 tensors (a failure users of other DPO trainers keep reporting). It is detected; the weights are re-gathered from a ZeRO
checkpoint in the folder or its newest ``checkpoint-*`` subfolder when that checkpoint is as new as the
trained model, and otherwise the merge is refused with the tensor names and the fix. A ZeRO checkpoint
with a missing per-rank shard file is refused with the missing file's name.

Gemma 3 ties ``lm_head`` to ``embed_tokens``. ``zero_to_fp32 --safe_serialization`` fails on such shared
tensors, so the Python API is used: both names point at one tensor, it is loaded into a
model whose weights are tied, and ``save_pretrained`` writes it once; after reload they must be tied again.

Output: sharded safetensors (with ``model.safetensors.index.json`` when sharded), ``config.json``,
``generation_config.json``, the tokenizer (from the checkpoint folder, else the base model), a model card
``README.md`` with the training metrics (allow-listed keys only: never environment values), and
``merge_report.json``. The write is atomic: everything goes into ``<output>.tmp-<pid>``, is verified
there, and is renamed into place. An existing non-empty ``<output>`` is refused unless ``--overwrite``
(then it is moved aside and deleted only after the new one is in place). Temp folders of a killed merge
are found (their ``flock`` is free) and removed at the next merge; a folder moved aside by a killed
``--overwrite`` is put back. A failed or interrupted merge leaves no ``<output>``.

Verification (on by default) is hand-written: no library checks a merged model end to end.

* no written tensor has size 0, and a sharded save has its index covering every shard;
* the parameter count (unique parameters: tied ones count once) equals the base model's;
* tied input/output embeddings (Gemma 3) are still tied after reload (same ``data_ptr``);
* the folder reloads with ``AutoModelForCausalLM.from_pretrained`` and its fp32 logits on a fixed batch of
  tokenized sentences match the reference: the unmerged PEFT model (base + adapter, adapter enabled) for
  an adapter, the in-memory model before saving otherwise. Tolerance, on the maximum absolute difference
  over real (unpadded) tokens: ``1e-4 + 1e-5 * max|reference logit|`` for ``--dtype fp32`` (merging
  changes the summation order only), ``1e-2 + 2e-2 * max|reference logit|`` for ``--dtype bf16`` (bf16
  rounds every weight to 8 significant bits; the written model is reloaded in fp32 for the comparison).

A second check compares the written folder with the in-memory model it was saved from (after the dtype
cast, evaluated in fp32): a save/reload round trip is exact, so its tolerance is ``1e-5 + 1e-6 * max|logit|``
for either dtype, which keeps a bf16 verification strict.

Memory: everything runs on the CPU of one host in fp32; the peak is about two fp32 copies of the model
(the gathered state dict while it is loaded, or base + merged-in-place model; the in-memory model is freed
before the written folder is reloaded for verification).

Exit codes: 0 ok; 1 merge or verification failure (``MergeError``); 2 bad arguments (``MergeArgumentError``:
missing or unrecognised ``--checkpoint``, an existing ``--output`` without ``--overwrite``, an unreachable base
model path, a bad ``--max_shard_size``). Test hook: ``DPO_DIST_MERGE_PAUSE_BEFORE_RENAME=<seconds>`` sleeps
after verification, before the rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpo_dist.args import ArgumentError, UserError

logger = logging.getLogger("dpo_dist.merge")

PAUSE_ENV = "DPO_DIST_MERGE_PAUSE_BEFORE_RENAME"
METRICS_FILE = "training_metrics.json"
REPORT_FILE = "merge_report.json"
DTYPES = ("fp32", "bf16")
# (atol, rtol): max |logits_written - logits_reference| <= atol + rtol * max |logits_reference|
TOLERANCES = {"fp32": (1e-4, 1e-5), "bf16": (5e-2, 5e-2)}
# The written folder against the in-memory model it was saved from (after the dtype cast): a save/reload
# round trip is exact, so this is tight whatever the dtype; it is what makes a bf16 verification strict.
ROUNDTRIP_TOLERANCE = (1e-5, 1e-6)
VERIFY_SENTENCES = (
    "Human: How do I make banana bread?\n\nAssistant: Mash three ripe bananas and mix them with flour.",
    "Human: What should I pack for a week in Japan?\n\nAssistant: Check the weather before you pack.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a unit test for each function so you notice when something breaks.",
)
VERIFY_MAX_TOKENS = 64
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_SHARD_RE = re.compile(r"^(?P<prefix>.*?)zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_(?P<what>model|optim)_states\.pt$")
# Training metrics shown in the model card: an allow-list, so nothing else (env, tokens) can leak in.
CARD_METRICS = (
    "model", "backend", "world_size", "zero_stage", "reference", "use_peft", "loss_type", "beta", "steps",
    "pairs_trained", "first_train_loss", "last_train_loss", "eval_loss", "eval_reward_accuracy",
    "eval_reward_margin", "pairs_per_s", "tokens_per_s", "peak_memory_gib_per_rank_max", "train_seconds",
)


class MergeError(UserError):
    """The merge or its verification failed: the message says what failed and how to fix it (exit 1)."""


class MergeArgumentError(ArgumentError):
    """Bad --checkpoint / --output / --base_model / ... (exit 2)."""


@dataclass
class MergeArguments:
    checkpoint: str = field(
        metadata={"help": "Training output to merge: a model folder, a PEFT adapter folder, a DeepSpeed ZeRO "
                          "checkpoint folder (global_stepN/ + latest), or an output_dir with checkpoint-* folders."}
    )
    output: str = field(metadata={"help": "Folder to write the merged Hugging Face model into (written atomically)."})
    base_model: Optional[str] = field(
        default=None,
        metadata={"help": "Base model (hub id or folder). Default: the adapter's base_model_name_or_path, else the "
                          "'model' in training_metrics.json."},
    )
    dtype: str = field(default="fp32", metadata={"help": "dtype of the written weights.", "choices": list(DTYPES)})
    no_verify: bool = field(default=False, metadata={"help": "Skip the verification (not recommended)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output folder."})
    max_shard_size: str = field(default="2GB", metadata={"help": "Largest safetensors shard, e.g. 500MB, 2GB, 5GB."})


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _stage(name: str, timings: dict):
    logger.info("%s ...", name)
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    timings[name] = round(dt, 3)
    logger.info("%s done in %.2fs", name, dt)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_path_like(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".")) or os.path.exists(os.path.expanduser(name))


def _natural_step(p: Path) -> int:
    m = re.search(r"(\d+)$", p.name)
    return int(m.group(1)) if m else -1


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def _weight_files(folder: Path) -> list[Path]:
    """The model weight files of a model folder (all shards of a sharded save)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.exists():
            data = _read_json(index) or {}
            return [folder / f for f in sorted(set((data.get("weight_map") or {}).values()))]
        if (folder / single).exists():
            return [folder / single]
    return sorted(folder.glob("model-*-of-*.safetensors"))


def _adapter_weight_file(folder: Path) -> Optional[Path]:
    for name in ADAPTER_WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    return None


def tensor_shapes(path: Path) -> dict[str, tuple]:
    """Shapes of every tensor in a safetensors or torch file, without loading the data (safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

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


def _zero_tag(folder: Path) -> Optional[str]:
    """The ZeRO tag (global_stepN) of a DeepSpeed checkpoint folder, or None if it is not one."""
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        return tag or None
    steps = sorted((p for p in folder.glob("global_step*") if p.is_dir()), key=_natural_step)
    return steps[-1].name if steps else None


def find_zero_checkpoint(folder: Path) -> Optional[Path]:
    """The folder itself when it is a ZeRO checkpoint, else its newest checkpoint-* subfolder that is one."""
    if _zero_tag(folder):
        return folder
    for ckpt in sorted((p for p in folder.glob("checkpoint-*") if p.is_dir()), key=_natural_step, reverse=True):
        if _zero_tag(ckpt):
            return ckpt
    return None


def _step_of_tag(tag: str) -> Optional[int]:
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else None


def check_zero_files(zero_dir: Path, tag: str) -> dict:
    """Every rank's model-state and optimizer-state file is there; raise MergeError naming what is missing.

    Needed: zero_to_fp32 checks the number of optimizer files against the partition count, but under ZeRO-3
    it reads parameter shapes from rank 0's model states only, so a deleted rank-1 model-states file gathers
    "successfully" (measured with deepspeed 0.19.8)."""
    import torch

    step_dir = zero_dir / tag
    if not step_dir.is_dir():
        raise MergeError(f"{zero_dir}: 'latest' names {tag!r}, but {step_dir} does not exist; the checkpoint is "
                         "incomplete. Pass another checkpoint-* folder.")
    shards: dict[str, dict[int, Path]] = {"model": {}, "optim": {}}
    prefixes: dict[str, str] = {"model": "", "optim": ""}
    for p in step_dir.iterdir():
        m = _SHARD_RE.match(p.name)
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
    zero_dir: Optional[Path] = None
    zero_tag: Optional[str] = None
    notes: list = field(default_factory=list)
    metrics: Optional[dict] = None


def _metrics_near(folder: Path) -> Optional[dict]:
    for p in (folder / METRICS_FILE, folder.parent / METRICS_FILE):
        m = _read_json(p)
        if isinstance(m, dict):
            return m
    return None


def _regather_or_refuse(folder: Path, what: str, bad: list[str], metrics: Optional[dict]) -> Source:
    names = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
    zero = find_zero_checkpoint(folder)
    if zero is None:
        raise MergeError(
            f"{folder}: the saved {what} has size-0 tensors: {names}. It was saved under ZeRO-3 without the 16-bit "
            "gather, so it holds no weights. Set \"stage3_gather_16bit_weights_on_model_save\": true in the "
            "DeepSpeed config and save again, or pass the ZeRO checkpoint folder (checkpoint-N with global_stepN/) "
            "as --checkpoint."
        )
    tag = _zero_tag(zero)
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
    kind = "zero+adapter" if (folder / "adapter_config.json").exists() or (zero / "adapter_config.json").exists() else "zero"
    # Config / adapter config come from the folder the user named when it has them, else the checkpoint.
    meta = folder if (folder / "config.json").exists() or (folder / "adapter_config.json").exists() else zero
    return Source(kind, meta, zero, tag, [note], metrics)


def detect_source(checkpoint: Path) -> Source:
    folder = checkpoint
    metrics = _metrics_near(folder)
    has_adapter_cfg = (folder / "adapter_config.json").exists()
    tag = _zero_tag(folder)
    if tag:
        kind = "zero+adapter" if has_adapter_cfg else "zero"
        return Source(kind, folder, folder, tag, [], metrics)
    if has_adapter_cfg:
        wf = _adapter_weight_file(folder)
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
        files = _weight_files(folder)
        if files:
            bad = empty_tensors(files)
            if bad:
                return _regather_or_refuse(folder, "model", bad, metrics)
            return Source("model", folder, metrics=metrics)
    ckpts = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir()), key=_natural_step)
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
# Atomic output
# --------------------------------------------------------------------------------------------------

def _lock_dir(path: Path, blocking: bool = True) -> Optional[int]:
    """flock a directory; returns the fd, or None when another live process holds it."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)


def clean_stale(output: Path) -> list[str]:
    """Remove temp folders of killed merges into `output`; put back a folder a killed --overwrite moved aside.
    A live merge holds an flock on its folders, so only dead ones are touched."""
    actions = []
    parent, name = output.parent, output.name
    if not parent.is_dir():
        return actions
    for p in sorted(parent.glob(f"{name}.old-*")):
        fd = _lock_dir(p, blocking=False) if p.is_dir() else None
        if fd is None:
            continue
        try:
            if output.is_dir() and not _output_nonempty(output):
                output.rmdir()
            if not output.exists():
                os.rename(p, output)
                actions.append(f"restored {p.name} -> {name} (moved aside by an interrupted --overwrite merge)")
            else:
                shutil.rmtree(p, ignore_errors=True)
                actions.append(f"removed stale {p.name}")
        finally:
            _unlock(fd)
    for p in sorted(parent.glob(f"{name}.tmp-*")):
        fd = _lock_dir(p, blocking=False) if p.is_dir() else None
        if fd is None:
            if p.is_dir():
                logger.warning("%s belongs to a merge that is still running; left alone", p)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed stale {p.name} (left by an interrupted merge)")
        finally:
            _unlock(fd)
    for a in actions:
        logger.info("%s", a)
    return actions


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            _fsync(p)
    _fsync(root)


def _make_readable(root: Path) -> None:
    """safetensors writes 0600 files: open the folder up to the umask, like any other saved model."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _output_nonempty(output: Path) -> bool:
    return output.exists() and (not output.is_dir() or any(output.iterdir()))


# --------------------------------------------------------------------------------------------------
# Model building
# --------------------------------------------------------------------------------------------------

def _check_base(name: str, flag: str) -> str:
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not (Path(expanded) / "config.json").exists():
            raise MergeArgumentError(f"{flag} {name}: the folder has no config.json, so it is not a model folder.")
        return expanded
    if _is_path_like(name) or name.count("/") > 1:
        raise MergeArgumentError(f"{flag} {name}: no such model folder. Pass --base_model with the base model's "
                                 "folder or hub id.")
    return name


def _resolve_base(base_model: Optional[str], source: Source) -> tuple[Optional[str], str]:
    """(base model to load, where the name came from)."""
    if base_model:
        return _check_base(base_model, "--base_model"), "--base_model"
    if source.kind in ("adapter", "zero+adapter"):
        cfg = _read_json(source.folder / "adapter_config.json") or {}
        if not cfg and source.zero_dir is not None:
            cfg = _read_json(source.zero_dir / "adapter_config.json") or {}
        name = cfg.get("base_model_name_or_path")
        if not name:
            raise MergeArgumentError(f"{source.folder}/adapter_config.json names no base_model_name_or_path; pass "
                                     "--base_model.")
        try:
            return _check_base(name, "base_model_name_or_path (adapter_config.json)"), "adapter_config.json"
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


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _count_params_from_config(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return _count_params(m)


def _load_causal_lm(src: str, what: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager")
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MergeError(f"{what} {src}: cannot be loaded ({type(e).__name__}: {first}).") from e
    return model.eval()


def _cast_params(model, dtype) -> None:
    """Cast parameters only: buffers that are not saved (rotary inv_freq, Gemma's embed_scale) stay as
    from_pretrained would build them, so the in-memory model computes what the reloaded folder will."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def _tied(model) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _load_gathered_full(source: Source, sd: dict, base: Optional[str]):
    """A causal LM built from the checkpoint's config and loaded with the gathered fp32 state dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    candidates = [source.folder, source.zero_dir, source.zero_dir.parent if source.zero_dir else None]
    cfg_src = next((c for c in candidates if c is not None and (c / "config.json").exists()), None)
    if cfg_src is None and base is None:
        raise MergeArgumentError(f"{source.folder}: a ZeRO checkpoint without config.json; pass --base_model so the "
                                 "model's architecture is known.")
    config = AutoConfig.from_pretrained(str(cfg_src) if cfg_src else base)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    expected = set(model.state_dict().keys())
    tied = _tied(model)
    if tied:  # Gemma 3: lm_head.weight and model.embed_tokens.weight are one parameter
        emb = model.get_input_embeddings().weight
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is emb]
        present = [n for n in names if n in sd]
        if not present:
            raise MergeError(f"{source.zero_dir}: the gathered weights have none of {names}.")
        first = sd[present[0]]
        for n in present[1:]:
            if sd[n] is not first and not torch.equal(sd[n], first):
                raise MergeError(f"{source.zero_dir}: the config ties {n} to {present[0]}, but the gathered weights "
                                 "differ; a tied model cannot represent this checkpoint.")
        sd = dict(sd)
        for n in names:
            sd[n] = first
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise MergeError(
            f"{source.zero_dir}: the gathered weights do not fit the model of {cfg_src or base}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Is this a LoRA checkpoint without adapter_config.json, "
            "or the wrong --base_model?"
        )
    model.load_state_dict(sd, strict=True)
    if tied and not _tied(model):
        model.tie_weights()
    return model.eval()


def _peft_from_gathered(source: Source, sd: dict, base_model):
    """Base + LoRA structure from adapter_config.json, loaded with the gathered PEFT-named state dict."""
    from peft import PeftConfig, get_peft_model

    cfg_dir = source.folder if (source.folder / "adapter_config.json").exists() else source.zero_dir
    peft_config = PeftConfig.from_pretrained(str(cfg_dir))
    peft_config.inference_mode = True
    model = get_peft_model(base_model, peft_config)
    own = set(model.state_dict().keys())
    lora_keys = {k for k in own if "lora_" in k}
    unexpected = sorted(set(sd) - own)
    missing = sorted(lora_keys - set(sd))
    if unexpected or missing:
        raise MergeError(
            f"{source.zero_dir}: the gathered ZeRO weights do not match the adapter in {cfg_dir}/adapter_config.json: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.load_state_dict(sd, strict=False)
    return model.eval()


def _check_adapter_loaded(peft_model, adapter_file: Path) -> None:
    from peft import get_peft_model_state_dict

    want = set(tensor_shapes(adapter_file))
    have = set(get_peft_model_state_dict(peft_model).keys())
    if want != have:
        raise MergeError(f"{adapter_file}: adapter tensors do not match the model: in the file only "
                         f"{sorted(want - have)[:5]}, in the model only {sorted(have - want)[:5]}.")


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------

def _verify_batch(tokenizer, vocab_size: int):
    import torch

    if tokenizer is not None:
        # One sentence at a time, padded here: the tokenizer (saved later) is not changed, even without a pad token.
        rows = [tokenizer(s, truncation=True, max_length=VERIFY_MAX_TOKENS)["input_ids"] for s in VERIFY_SENTENCES]
        rows = [r for r in rows if r]
        if rows:
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r).clamp(0, vocab_size - 1)
                mask[i, : len(r)] = 1
            return {"input_ids": ids, "attention_mask": mask}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (len(VERIFY_SENTENCES), 32), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def verify_folder(folder: Path, *, reference_logits, saved_logits, batch, expected_params: int, expect_tied: bool,
                  dtype: str) -> dict:
    """Check the written folder; raise MergeError listing every failed check."""
    failures, result = [], {}
    files = _weight_files(folder)
    if not files:
        failures.append("no weight files were written")
    index = folder / "model.safetensors.index.json"
    if len(files) > 1 or index.exists():
        data = _read_json(index) or {}
        listed = set((data.get("weight_map") or {}).values())
        on_disk = {p.name for p in folder.glob("model-*-of-*.safetensors")}
        if not listed or listed != on_disk:
            failures.append(f"the shard index does not match the shards on disk: index {sorted(listed)}, "
                            f"disk {sorted(on_disk)}")
    empty = empty_tensors(files) if files else []
    if empty:
        failures.append(f"size-0 tensors: {', '.join(empty[:5])}")
    result["tensors"] = sum(len(tensor_shapes(f)) for f in files)
    model = _load_causal_lm(str(folder), "the written folder")
    params = _count_params(model)
    result["params"] = params
    if params != expected_params:
        failures.append(f"parameter count {params:,} != base model's {expected_params:,}")
    tied = _tied(model)
    result["tied_embeddings"] = tied
    if expect_tied and not tied:
        failures.append("input and output embeddings are not tied after reload (lm_head.weight is not embed_tokens.weight)")
    got = _logits(model, batch)
    mask = batch["attention_mask"].bool()

    def compare(ref, atol, rtol, what):
        if got.shape != ref.shape:
            failures.append(f"logits shape {tuple(got.shape)} != {what} {tuple(ref.shape)}")
            return float("inf"), 0.0
        diff = float((got - ref).abs()[mask].max())
        tol = atol + rtol * float(ref[mask].abs().max())
        if not diff <= tol:  # also catches NaN
            failures.append(f"logits differ from the {what} by {diff:.3g} > tolerance {tol:.3g}")
        return diff, tol

    atol, rtol = TOLERANCES[dtype]
    diff, tol = compare(reference_logits, atol, rtol, "reference")
    rt_diff, rt_tol = compare(saved_logits, *ROUNDTRIP_TOLERANCE, "in-memory model it was saved from")
    result.update(max_logit_diff=diff, tolerance=tol, tolerance_rule=f"{atol:g} + {rtol:g} * max|reference logit| ({dtype})",
                  roundtrip_max_logit_diff=rt_diff, roundtrip_tolerance=rt_tol)
    del model
    if failures:
        raise MergeError("verification failed: " + "; ".join(failures) + ". Nothing was written to the output.")
    return result


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(report: dict, metrics: Optional[dict]) -> str:
    from dpo_dist.util.logs import redact

    lines = ["---", "library_name: transformers", "tags:", "- dpo", "- trl", "- dpo-dist"]
    base = report.get("base_model")
    if base and not _is_path_like(base) and base.count("/") == 1:
        lines.append(f"base_model: {base}")
    lines += ["---", "", "# DPO fine-tuned model (merged by dpo-dist)", ""]
    lines.append(f"Merged with `python -m dpo_dist.merge` from a **{report['kind']}** input. Weights: "
                 f"{report['dtype']}, {report['params']:,} parameters, {report['tensors']} tensors.")
    if base:
        lines.append(f"Base model: `{base}`.")
    if report.get("zero_checkpoint"):
        lines.append(f"Weights gathered from the DeepSpeed ZeRO checkpoint `{report['zero_checkpoint']}` with "
                     "DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`.")
    lines.append(f"Merged on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}.")
    lines += ["", "## Verification", ""]
    v = report.get("verification")
    if v:
        lines.append(f"Reloaded with `AutoModelForCausalLM.from_pretrained`; fp32 logits on a fixed batch differ from "
                     f"the {report['reference']} by at most {v['max_logit_diff']:.3g} "
                     f"(tolerance {v['tolerance']:.3g} = {v['tolerance_rule']}). No size-0 tensors; parameter count "
                     f"equals the base model's; tied embeddings: {v['tied_embeddings']}.")
    else:
        lines.append("Verification was skipped (--no_verify).")
    lines += ["", "## Training metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        for k in CARD_METRICS:
            if k in metrics and isinstance(metrics[k], (int, float, str, bool)) and metrics[k] is not None:
                lines.append(f"| {k} | {_fmt(metrics[k])} |")
    else:
        lines.append(f"No {METRICS_FILE} was found next to the checkpoint.")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "```", ""]
    return redact("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------------

def _validate(checkpoint, output, dtype, max_shard_size) -> tuple[Path, Path]:
    from transformers.utils.hub import convert_file_size_to_int

    if not checkpoint:
        raise MergeArgumentError("--checkpoint is required.")
    if not output:
        raise MergeArgumentError("--output is required.")
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists():
        raise MergeArgumentError(f"--checkpoint {checkpoint}: no such folder.")
    if not ckpt.is_dir():
        raise MergeArgumentError(f"--checkpoint {checkpoint}: not a folder.")
    if dtype not in DTYPES:
        raise MergeArgumentError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise MergeArgumentError(f"--max_shard_size {max_shard_size!r}: expected a size such as 500MB, 2GB or 5GB.") from None
    out = Path(output).expanduser()
    ckpt_r, out_r = ckpt.resolve(), out.resolve()
    if out_r == ckpt_r or out_r in ckpt_r.parents:
        raise MergeArgumentError(f"--output {output}: it is, or contains, --checkpoint {checkpoint}; choose another folder.")
    if out.exists() and not out.is_dir():
        raise MergeArgumentError(f"--output {output}: exists and is not a folder.")
    parent = out_r.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeArgumentError(f"--output {output}: {parent} is not writable.")
    return ckpt, out_r


def merge_model(checkpoint, output, *, base_model: Optional[str] = None, dtype: str = "fp32", verify: bool = True,
                overwrite: bool = False, max_shard_size: str = "2GB") -> dict:
    """Merge a training output into a verified Hugging Face folder at `output` (see the module doc).

    Returns a report: kind, checkpoint, output, base_model, dtype, params, tensors, max_logit_diff, tolerance,
    seconds (and per-stage timings, notes). Raises MergeArgumentError (bad arguments) or MergeError."""
    t_start = time.perf_counter()
    ckpt, out = _validate(checkpoint, output, dtype, max_shard_size)
    cleaned = clean_stale(out)
    if _output_nonempty(out) and not overwrite:
        raise MergeArgumentError(f"--output {output}: exists and is not empty. Nothing was changed. Pass --overwrite "
                                 "to replace it, or choose another folder.")
    timings: dict = {}
    source = detect_source(ckpt)
    logger.info("input: %s (%s)%s", ckpt, source.kind,
                f", ZeRO checkpoint {source.zero_dir}/{source.zero_tag}" if source.zero_dir else "")
    base, base_from = _resolve_base(base_model, source)

    import torch

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    lock = _lock_dir(tmp)
    old, old_lock = None, None
    try:
        # 1. Gather / load.
        sd = None
        if source.zero_dir is not None:
            with _stage("gathering ZeRO shards", timings):
                check_zero_files(source.zero_dir, source.zero_tag)
                sd = gather_zero(source.zero_dir, source.zero_tag)
                logger.info("gathered %d tensors from %s/%s", len(sd), source.zero_dir, source.zero_tag)
        with _stage("loading", timings):
            if source.kind in ("adapter", "zero+adapter"):
                base_lm = _load_causal_lm(base, "base model")
                expected_params = _count_params(base_lm)
                expect_tied = _tied(base_lm)
                if source.kind == "adapter":
                    from peft import PeftModel

                    try:
                        model = PeftModel.from_pretrained(base_lm, str(source.folder), is_trainable=False)
                    except Exception as e:
                        raise MergeError(f"{source.folder}: PEFT cannot load the adapter onto {base} "
                                         f"({type(e).__name__}: {e}).") from e
                    _check_adapter_loaded(model, _adapter_weight_file(source.folder))
                else:
                    model = _peft_from_gathered(source, sd, base_lm)
                base_lm = None  # the PEFT model holds it; merge_and_unload returns it merged (no second copy)
                reference = "unmerged PEFT model (base + adapter, adapter enabled)"
            elif source.kind == "zero":
                model = _load_gathered_full(source, sd, base)
                reference = "in-memory model gathered from the ZeRO checkpoint"
            else:
                model = _load_causal_lm(str(source.folder), "--checkpoint")
                reference = "in-memory model loaded from the checkpoint"
            sd = None
            if source.kind in ("zero", "model"):
                expect_tied = _tied(model)
                if base:
                    from transformers import AutoConfig

                    expected_params = _count_params_from_config(AutoConfig.from_pretrained(base))
                else:
                    expected_params = _count_params(model)
            tokenizer = None
            for cand in [source.folder, source.zero_dir, source.folder.parent if source.zero_dir == source.folder else None,
                         Path(base) if base and os.path.isdir(base) else base]:
                if cand is None:
                    continue
                if isinstance(cand, Path) and not _has_tokenizer(cand):
                    continue
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(cand))
                    tokenizer_from = str(cand)
                    break
                except Exception as e:  # a hub id that is not reachable
                    logger.warning("tokenizer from %s: %s", cand, e)
            if tokenizer is None:
                tokenizer_from = None
                logger.warning("no tokenizer found in the checkpoint or the base model; the output has none, and "
                               "verification uses fixed random token ids")
            vocab = model.get_input_embeddings().weight.shape[0]
            batch = _verify_batch(tokenizer, vocab)
            ref_logits = _logits(model, batch) if verify else None

        # 2. Merge.
        if source.kind in ("adapter", "zero+adapter"):
            with _stage("merging LoRA (merge_and_unload)", timings):
                model = model.merge_and_unload()
                model.eval()
        # 3. Write.
        with _stage("writing", timings):
            target = torch.bfloat16 if dtype == "bf16" else torch.float32
            _cast_params(model, target)
            model.config.torch_dtype = target
            # bf16 -> fp32 -> bf16 is lossless: the fp32 logits of exactly the weights being written.
            saved_logits = None
            if verify:
                _cast_params(model, torch.float32)
                saved_logits = _logits(model, batch)
                _cast_params(model, target)
            bad = [n for n, p in model.state_dict().items() if p.numel() == 0]
            if bad:
                raise MergeError(f"the merged model has size-0 tensors: {', '.join(bad[:5])}")
            gen_src = next((p for p in (source.folder, source.zero_dir) if p and (p / "generation_config.json").exists()), None)
            if gen_src is None and base:
                gen_src = base
            if gen_src is not None:
                from transformers import GenerationConfig

                with contextlib.suppress(Exception):
                    model.generation_config = GenerationConfig.from_pretrained(str(gen_src))
            model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            del model
        report = {
            "kind": source.kind, "checkpoint": str(ckpt), "output": str(out), "base_model": base,
            "base_model_from": base_from, "zero_checkpoint": f"{source.zero_dir}/{source.zero_tag}" if source.zero_dir else None,
            "tokenizer_from": tokenizer_from, "dtype": dtype, "reference": reference, "notes": source.notes + cleaned,
        }
        # 4. Verify.
        if verify:
            with _stage("verifying", timings):
                v = verify_folder(tmp, reference_logits=ref_logits, saved_logits=saved_logits, batch=batch,
                                  expected_params=expected_params, expect_tied=expect_tied, dtype=dtype)
            logger.info("verified: %d params (base %d), %d tensors, tied embeddings %s, max logit diff %.3g <= %.3g",
                        v["params"], expected_params, v["tensors"], v["tied_embeddings"], v["max_logit_diff"], v["tolerance"])
            report.update(verification=v, params=v["params"], tensors=v["tensors"], max_logit_diff=v["max_logit_diff"],
                          tolerance=v["tolerance"])
        else:
            files = _weight_files(tmp)
            report.update(verification=None, params=expected_params, tensors=sum(len(tensor_shapes(f)) for f in files),
                          max_logit_diff=None, tolerance=None)
            logger.warning("verification skipped (--no_verify)")
        report["expected_params"] = expected_params
        report["timings"] = timings
        report["seconds"] = round(time.perf_counter() - t_start, 3)
        (tmp / "README.md").write_text(model_card(report, source.metrics))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _make_readable(tmp)
        _fsync_tree(tmp)

        pause = os.environ.get(PAUSE_ENV)
        if pause:
            logger.info("test hook %s: pausing %s s before the rename", PAUSE_ENV, pause)
            sys.stderr.flush()
            time.sleep(float(pause))

        # 5. Into place.
        if _output_nonempty(out) or out.exists():
            if _output_nonempty(out) and not overwrite:  # appeared while we merged
                raise MergeArgumentError(f"--output {output}: appeared while merging; nothing was changed.")
            if _output_nonempty(out):
                old = out.parent / f"{out.name}.old-{os.getpid()}"
                old_lock = _lock_dir(out)
                os.rename(out, old)
            else:
                out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None and not out.exists():
                os.rename(old, out)
                old = None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        report["seconds"] = round(time.perf_counter() - t_start, 3)
        logger.info("wrote %s (%s, %s) in %.1fs", out, source.kind, dtype, report["seconds"])
        return report
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            with contextlib.suppress(OSError):
                os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock)
        _unlock(old_lock)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> MergeArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(MergeArguments, prog="python -m dpo_dist.merge",
                              description="Gather ZeRO shards / merge LoRA, verify, and write a Hugging Face model folder atomically.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    from dpo_dist.util.logs import setup_logging

    setup_logging()
    args = parse_args(argv)  # argparse: exit 2 with usage on bad flags
    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = merge_model(args.checkpoint, args.output, base_model=args.base_model, dtype=args.dtype,
                             verify=not args.no_verify, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    except ArgumentError as e:
        print(f"dpo_dist.merge: error: {e}", file=sys.stderr)
        return 2
    except MergeError as e:
        logger.error("merge failed: %s", e)
        print(f"dpo_dist.merge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dpo_dist.merge: interrupted; no output was written.", file=sys.stderr)
        return 130
    print(json.dumps({k: report[k] for k in ("kind", "output", "params", "tensors", "max_logit_diff", "tolerance",
                                             "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
