"""Resuming a checkpoint on another number of ranks: ZeRO shards through DeepSpeed's universal checkpoint, and
the global batch kept.

A ZeRO checkpoint holds one optimizer (and, at stage 3, parameter) partition per rank, cut for the number of
ranks that saved it; DeepSpeed reads it back only on that many. Its universal checkpoint holds every
parameter and optimizer state whole, one folder per parameter, and any number of ranks loads it (the
DeepSpeed config's ``"checkpoint": {"load_universal": true}``). DeepSpeed does the conversion
(``deepspeed.checkpoint.ds_to_universal``, which supports ZeRO 1, 2 and 3) and the loading; this module decides
whether a resume needs it, refuses what cannot continue the run, and runs the conversion once.

The flow, on every rank, from the rank entries (``dpo_dist.train.dpo``, ``dpo_dist.train.sft``):

1. ``prepare_reshard(checkpoint, train_args)`` (before the trainer config and any model): compares the ranks
   that saved the checkpoint with this run's, reads the saved DeepSpeed config from rank 0's model-state file
   (memory-mapped: no tensor is read), refuses what cannot continue (below), and sets this run's
   ``--gradient_accumulation_steps`` and DeepSpeed config (``load_universal``).
2. ``finish_reshard(reshard, training_args)`` (once the process group is up, before any model loads): global
   rank 0 converts ``<checkpoint>/<tag>`` into ``<checkpoint>/<tag>_universal`` and writes
   ``<checkpoint>/latest_universal`` (the file DeepSpeed's ``load_checkpoint`` reads), while the other ranks wait;
   then every rank checks that the conversion is complete. A complete conversion already there is reused. The
   conversion is built in a staging folder and renamed into place, and ``latest_universal`` is written after
   that, so a half-written conversion is never named. It must finish within ``--dist_timeout`` (the waiting
   ranks' barrier).
3. ``watch_reshard(reshard, trainer)``: at ZeRO-3, repairs one thing DeepSpeed's universal load gets wrong (it
   shares one Adam step counter between the optimizer's sub-groups; ``unshare_step_counters``) once the
   checkpoint is loaded, before the first step.
4. The trainer resumes as usual: ``trainer_state.json`` gives the global step and the log history,
   ``scheduler.pt`` the LR schedule, DeepSpeed the weights and the Adam moments and step from the universal
   folder, and the data position is skipped to by the Trainer (global step × accumulation micro-batches per rank).

The loss continues the curve only if each optimizer step sees the same pairs as before, so the global batch is
kept: the micro-batch (``--per_device_train_batch_size``) must stay the saved one, and the accumulation is scaled
by saved ranks / this run's ranks. The pairs of a global step are then the same for any number of ranks, with
both samplers this project uses: the trainer's (accelerate's seeded random sampler, cut into micro-batches of
one shuffled list, rank r taking micro-batches r, r+W, ...) and the length-bucket and packed samplers
(``dpo_dist.data.bucketing``: one batch list per epoch, rank r taking r::W). Optimizer step s takes, on rank r
at micro-step m, list entry (s·A + m)·W + r, so over all ranks and micro-steps entries s·A·W to (s+1)·A·W − 1:
the same micro-batches whenever A·W is the same. Only the order in which their losses and gradients are summed
changes. (At an epoch's end, where the batches do not divide by W, each sampler pads with repeats of its first
batches or pairs; those few pads differ between rank counts.)

What cannot be carried over: the per-rank RNG streams (rng_state_R.pth; one rank's stream cannot be split or
merged), so anything random in a step (dropout, which trl's DPO trainer turns off by default) differs after a
reshard. Without DeepSpeed (DDP) and at ZeRO-0 nothing is partitioned: there is no conversion, the optimizer state
loads whole on any number of ranks, and only the global batch is kept (the saved micro-batch and accumulation
come from the checkpoint's training_args.bin, or its DeepSpeed config).

Refused, each with its reason: a changed micro-batch; an accumulation that does not divide; NVMe offload
(DeepSpeed restores NVMe-offloaded optimizer state from per-rank swap files that ds_to_universal does not read, and
its stage-3 universal load writes into in-memory parameter buffers that NVMe parameter offload does not keep);
and, at stage 3, optimizer parameter groups that differ in a hyperparameter (DeepSpeed's stage-3 universal load
gives every group the first group's, e.g. weight decay to the no-decay group).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.backend import world_size as launched_world_size
from dpo_dist.train.deepspeed import read_ds_config
from dpo_dist.util.atomic import write_atomic
from dpo_dist.util.checkpoint import deepspeed_tag, saved_world_size
from dpo_dist.util.errors import ArgumentError, UserError

logger = logging.getLogger("dpo_dist")

UNIVERSAL_SUFFIX = "_universal"  # ds_to_universal's and DeepSpeed's naming: <tag>_universal, latest_universal
LATEST_UNIVERSAL = "latest_universal"
_STAGING = ".universal-partial"  # inside the checkpoint folder; ds_to_universal also writes latest_universal here
_OPTIMIZER_KEYS_IGNORED = {"params", "lr", "initial_lr"}  # lr: the LR schedule sets it on every group each step


@dataclass(frozen=True)
class Reshard:
    """A resume on another number of ranks than the checkpoint's."""

    checkpoint: Path
    tag: str | None  # the DeepSpeed tag, global_stepN (None: saved without DeepSpeed)
    saved_world_size: int
    world_size: int
    zero_stage: int  # -1: saved without DeepSpeed
    micro_batch: int  # pairs per rank and micro-step (kept)
    saved_accumulation: int
    accumulation: int  # this run's: saved_accumulation * saved_world_size / world_size

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.saved_accumulation * self.saved_world_size

    @property
    def universal_tag(self) -> str | None:
        """Where the universal checkpoint goes (None without DeepSpeed or at stage 0: nothing is partitioned, the
        optimizer state is loaded whole)."""
        return self.tag + UNIVERSAL_SUFFIX if self.tag and self.zero_stage >= 1 else None


def _arg(value) -> str:
    return f"--resume_from_checkpoint {value}"


def _saved_engine_state(tag_dir: Path) -> dict:
    """Rank 0's DeepSpeed model-state file, memory-mapped (its tensors are not read): ds_config, dp_world_size."""
    import torch  # deferred: torch (ranks only)

    names = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt")
    path = next((tag_dir / n for n in names if (tag_dir / n).is_file()), None)
    if path is None:
        raise UserError(f"{tag_dir}: no rank-0 model-state file ({' or '.join(names)}); the checkpoint is incomplete.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: DeepSpeed's model state cannot be read ({type(e).__name__}: {e}); the checkpoint "
                        "is damaged. Resume from another checkpoint-* folder.") from e


def _optimizer_group_differences(tag_dir: Path) -> list[str]:
    """Hyperparameters (other than the scheduled LR) in which the saved optimizer's parameter groups differ."""
    import torch  # deferred: torch (ranks only)

    files = sorted(tag_dir.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    if not files:
        return []
    sd = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    groups = sd.get("optimizer_state_dict", {}).get("optimizer_state_dict", {}).get("param_groups", [])
    if len(groups) < 2:
        return []
    keys = sorted({k for g in groups for k in g} - _OPTIMIZER_KEYS_IGNORED)
    return [f"{k} ({', '.join(repr(g.get(k)) for g in groups)})" for k in keys
            if any(g.get(k) != groups[0].get(k) for g in groups[1:])]


def _nvme(cfg: dict | None) -> list[str]:
    zero = (cfg or {}).get("zero_optimization", {}) or {}
    return [f"zero_optimization.{k}.device=nvme" for k in ("offload_optimizer", "offload_param")
            if str((zero.get(k) or {}).get("device", "")).lower() == "nvme"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _saved_trainer_batch(ckpt: Path) -> tuple[object, object]:
    """(per_device_train_batch_size, gradient_accumulation_steps) of the run that saved `ckpt`, from the training
    arguments the trainer pickles into every checkpoint (training_args.bin); (None, None) when absent."""
    import torch  # deferred: torch (ranks only)

    path = ckpt / "training_args.bin"
    if not path.is_file():
        return None, None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: the saved training arguments cannot be read ({type(e).__name__}: {e}). Resume "
                        "from another checkpoint-* folder.") from e
    return getattr(saved, "per_device_train_batch_size", None), getattr(saved, "gradient_accumulation_steps", None)


def plan_reshard(checkpoint, train_args, world_size: int | None = None) -> Reshard | None:
    """None when `checkpoint` resumes as saved (no checkpoint, or saved by this run's number of ranks); else the
    reshard, or an ArgumentError naming what cannot continue the run and the fix. Reads names, rank 0's DeepSpeed
    state (memory-mapped) or, without DeepSpeed, the saved training arguments; writes nothing."""
    if not checkpoint:
        return None
    ckpt = Path(checkpoint)
    value = train_args.resume_from_checkpoint
    world_size = int(world_size or launched_world_size())
    saved = saved_world_size(ckpt)
    tag = deepspeed_tag(ckpt)
    if tag is None:
        # Saved without DeepSpeed (DDP, one process): every rank holds the whole optimizer state (optimizer.pt), so
        # the trainer loads it on any number of ranks; only the global batch needs keeping.
        if saved is None or saved == world_size:
            return None
        where = f"{ckpt} (saved by {saved} ranks without DeepSpeed; this run has {world_size})"
        if read_ds_config(train_args.deepspeed) is not None:
            raise ArgumentError(f"--deepspeed: {where}: it holds no DeepSpeed engine state to load. Nothing was "
                                "changed. Resume it without --deepspeed, as it was trained.")
        micro, accum = _saved_trainer_batch(ckpt)
        return _keep_global_batch(ckpt, None, -1, saved, world_size, micro, accum, train_args, where)

    state = _saved_engine_state(ckpt / tag)
    dp_saved = int(state.get("dp_world_size") or saved or 1)
    if saved is not None and saved != dp_saved:
        raise ArgumentError(
            f"{_arg(value)}: {ckpt / tag} was saved by {dp_saved} ranks (dp_world_size in its rank-0 model state), "
            f"but only the files of {saved} are there; the checkpoint is incomplete. Nothing was changed. Resume "
            "from another checkpoint-* folder."
        )
    if dp_saved == world_size:
        return None

    where = f"{ckpt} (saved by {dp_saved} ranks; this run has {world_size})"
    saved_cfg = state.get("ds_config") or {}
    cfg = read_ds_config(train_args.deepspeed)
    if cfg is None:
        raise ArgumentError(f"{_arg(value)}: {where} is a DeepSpeed checkpoint and this run has no --deepspeed. "
                            "Nothing was changed. Pass the --deepspeed config the checkpoint was trained with.")
    stage = int((saved_cfg.get("zero_optimization") or {}).get("stage", 0))
    nvme = sorted(set(_nvme(saved_cfg) + _nvme(cfg)))
    if nvme and stage >= 1:
        raise ArgumentError(
            f"{_arg(value)}: {where}: DeepSpeed cannot reshard with NVMe offload ({', '.join(nvme)}). It restores "
            "NVMe-offloaded optimizer state from each rank's swap files (offloaded_tensors/rankNN), which "
            "ds_to_universal does not read, and its stage-3 universal load writes into in-memory parameter "
            "partitions that NVMe parameter offload does not keep. Nothing was changed. Launch with "
            f"{dp_saved} ranks to resume it, or train from a checkpoint saved with offload to cpu or none."
        )
    if stage == 3 and (differ := _optimizer_group_differences(ckpt / tag)):
        raise ArgumentError(
            f"{_arg(value)}: {where}: the optimizer's parameter groups differ in {'; '.join(differ)}, and "
            "DeepSpeed's ZeRO-3 universal load gives every group the first group's hyperparameters, so the "
            f"reshard would change them. Nothing was changed. Launch with {dp_saved} ranks to resume it (or resume "
            "at stage 1 or 2, whose universal load keeps each group's own)."
        )
    micro, accum = saved_cfg.get("train_micro_batch_size_per_gpu"), saved_cfg.get("gradient_accumulation_steps")
    return _keep_global_batch(ckpt, tag, stage, dp_saved, world_size, micro, accum, train_args, where)


def _keep_global_batch(ckpt, tag, stage, saved, world_size, micro, accum, train_args, where) -> Reshard:
    """The reshard that keeps the saved global batch (same micro-batch, accumulation scaled), or the refusal."""
    value = train_args.resume_from_checkpoint
    if not isinstance(micro, int) or not isinstance(accum, int):
        raise ArgumentError(
            f"{_arg(value)}: {where}: the checkpoint does not record its micro-batch and accumulation "
            f"(per rank: {micro!r}, accumulation steps: {accum!r}), so the global batch cannot be kept. Nothing was "
            f"changed. Launch with {saved} ranks to resume it."
        )
    if int(train_args.per_device_train_batch_size) != micro:
        raise ArgumentError(
            f"--per_device_train_batch_size {train_args.per_device_train_batch_size}: {where} was trained with "
            f"{micro} pairs per rank and micro-step; a reshard keeps the micro-batch (and scales the accumulation) "
            f"so that every step sees the pairs it would have seen. Nothing was changed. Pass "
            f"--per_device_train_batch_size {micro}."
        )
    global_batch = micro * accum * saved
    if (accum * saved) % world_size:
        ranks = ", ".join(map(str, _divisors(accum * saved)))
        raise ArgumentError(
            f"{_arg(value)}: {where}: its global batch is {global_batch} pairs ({saved} ranks x {micro} pairs x "
            f"{accum} accumulation steps), and {world_size} ranks x {micro} pairs do not divide it, so no "
            "--gradient_accumulation_steps keeps it (and with it the pairs of each step and the LR schedule). "
            f"Nothing was changed. Launch with a number of ranks that divides {accum * saved} ({ranks})."
        )
    new_accum = accum * saved // world_size
    asked = int(train_args.gradient_accumulation_steps)
    if asked not in (accum, new_accum):
        raise ArgumentError(
            f"--gradient_accumulation_steps {asked}: {where}: its global batch is {global_batch} pairs; on "
            f"{world_size} ranks x {micro} pairs that takes {new_accum} accumulation steps, and {asked} would "
            "change the pairs of every step. Nothing was changed. Pass --gradient_accumulation_steps "
            f"{new_accum} (or {accum}, the saved value, which is scaled)."
        )
    return Reshard(checkpoint=ckpt, tag=tag, saved_world_size=saved, world_size=world_size, zero_stage=stage,
                   micro_batch=micro, saved_accumulation=accum, accumulation=new_accum)


def universal_config(ds_config) -> dict:
    """The --deepspeed config with DeepSpeed's universal-checkpoint load turned on."""
    cfg = dict(read_ds_config(ds_config) or {})
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "load_universal": True}
    return cfg


def prepare_reshard(checkpoint, train_args) -> Reshard | None:
    """Step 1 (every rank, before the trainer config and any model): plan, and set this run's accumulation and
    DeepSpeed config. None when the checkpoint resumes as saved."""
    reshard = plan_reshard(checkpoint, train_args)
    if reshard is None:
        return None
    train_args.gradient_accumulation_steps = reshard.accumulation
    if reshard.universal_tag:
        train_args.deepspeed = universal_config(train_args.deepspeed)
    kind = f"ZeRO-{reshard.zero_stage}" if reshard.tag else "no DeepSpeed"
    logger.info(
        "resharding %s from %d to %d ranks (%s): gradient_accumulation_steps %d -> %d keeps the global batch at %d "
        "pairs (%d per rank and micro-step)%s", reshard.checkpoint, reshard.saved_world_size, reshard.world_size,
        kind, reshard.saved_accumulation, reshard.accumulation, reshard.global_batch, reshard.micro_batch,
        "" if reshard.universal_tag else "; nothing is partitioned, the optimizer state is loaded whole")
    return reshard


def universal_problems(ckpt: Path, tag: str) -> list[str]:
    """What is missing from the universal checkpoint of `tag` in `ckpt` (empty: complete and named)."""
    utag = tag + UNIVERSAL_SUFFIX
    latest = ckpt / LATEST_UNIVERSAL
    problems = []
    if not latest.is_file() or latest.read_text().strip() != utag:
        problems.append(f"{LATEST_UNIVERSAL} does not name {utag}")
    udir = ckpt / utag
    if not (udir / "zero" / "optimizer_state.pt").is_file():
        problems.append(f"{utag}/zero/optimizer_state.pt is missing")
    if not any(udir.glob("*model_states.pt")):
        problems.append(f"{utag}/ holds no *_model_states.pt")
    return problems


def convert_to_universal(ckpt: Path, tag: str) -> float:
    """Run DeepSpeed's ds_to_universal on ckpt/tag into ckpt/<tag>_universal, then name it in ckpt/latest_universal.
    Built in a staging folder and renamed into place; returns the seconds it took. It takes about the disk space
    of the ZeRO optimizer shards again (fp32 weights and both Adam moments, whole)."""
    t0 = time.perf_counter()
    utag = tag + UNIVERSAL_SUFFIX
    staging = ckpt / _STAGING
    shutil.rmtree(staging, ignore_errors=True)  # what a killed conversion left
    try:
        staging.mkdir()
    except OSError as e:
        raise UserError(
            f"--resume_from_checkpoint {ckpt}: the universal checkpoint is written into the checkpoint folder, and "
            f"{staging} cannot be created ({e.strerror or e}). Nothing was changed. Copy the checkpoint folder to "
            "storage that every rank can write to and resume from the copy."
        ) from e
    cpus = os.cpu_count() or 1
    # In its own process: ds_to_universal's worker pools fork, which is not safe in a rank with a process group.
    argv = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
            "--output_folder", str(staging / utag), "--num_extract_workers", str(min(4, cpus)),
            "--num_merge_workers", str(min(2, cpus)),
            # Stage 1/2 checkpoints that HF's trainer saves carry no universal_checkpoint_info (Megatron-DeepSpeed
            # writes it); DeepSpeed's own flag adds the default one.
            "--inject_missing_state"]
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if res.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(
            f"--resume_from_checkpoint {ckpt}: DeepSpeed's ds_to_universal failed (exit {res.returncode}) on {tag}; "
            f"nothing was changed in the checkpoint. Its output ends:\n{res.stdout[-3000:]}"
        )
    shutil.rmtree(ckpt / utag, ignore_errors=True)  # an incomplete earlier one (a complete one is reused)
    os.rename(staging / utag, ckpt / utag)
    write_atomic(ckpt / LATEST_UNIVERSAL, utag)  # last: only a complete conversion is ever named
    shutil.rmtree(staging, ignore_errors=True)
    return time.perf_counter() - t0


def finish_reshard(reshard: Reshard | None, training_args) -> None:
    """Step 2 (every rank, process group up, before any model loads): global rank 0 converts the checkpoint to
    DeepSpeed's universal checkpoint (or reuses a complete one) while the others wait; then every rank checks it."""
    if reshard is None or reshard.universal_tag is None:
        return
    ckpt, tag = reshard.checkpoint, reshard.tag
    with training_args.main_process_first(local=False, desc="reshard"):
        if training_args.process_index == 0:
            if universal_problems(ckpt, tag):
                seconds = convert_to_universal(ckpt, tag)
                logger.info("converted %s/%s (saved by %d ranks) to DeepSpeed's universal checkpoint %s in %.1f s; "
                            "resuming on %d ranks", ckpt, tag, reshard.saved_world_size, reshard.universal_tag,
                            seconds, reshard.world_size)
            else:
                logger.info("reusing DeepSpeed's universal checkpoint %s/%s (converted from %d ranks); resuming on %d "
                            "ranks", ckpt, reshard.universal_tag, reshard.saved_world_size, reshard.world_size)
        elif problems := universal_problems(ckpt, tag):
            raise UserError(
                f"--resume_from_checkpoint {ckpt}: rank {training_args.process_index} does not see the universal "
                f"checkpoint rank 0 was to write ({'; '.join(problems)}). Rank 0 failed (see its log), or the "
                "checkpoint folder is not on storage that every rank sees. Nothing else was changed."
            )


def _base_optimizer(optimizer):
    """The torch optimizer under the trainer's and DeepSpeed's wrappers (each keeps the next as `.optimizer`)."""
    while hasattr(getattr(optimizer, "optimizer", None), "param_groups"):
        optimizer = optimizer.optimizer
    return optimizer


def unshare_step_counters(optimizer) -> int:
    """Give every optimizer state its own `step` tensor; returns how many were shared.

    DeepSpeed's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3) puts one
    and the same step tensor into the state of every parameter sub-group. torch's Adam increments its step in
    place, once per sub-group in every optimizer step, so a shared counter would run ahead (by the number of
    sub-groups per step, e.g. two with the decay and no-decay groups of full fine-tuning) and change Adam's bias
    correction for the rest of the run."""
    import torch  # deferred: torch (ranks only)

    seen, shared = set(), 0
    for state in _base_optimizer(optimizer).state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
                shared += 1
            seen.add(id(step))
    return shared


def watch_reshard(reshard: Reshard | None, trainer) -> None:
    """Step 3 (once the trainer exists): after DeepSpeed has loaded the universal checkpoint (the trainer's
    on_train_begin comes after the checkpoint load and before the first step), repair what its ZeRO-3 universal
    load shares (unshare_step_counters)."""
    if reshard is None or reshard.zero_stage != 3:
        return
    from transformers import TrainerCallback  # heavy: transformers loads torch

    class _Unshare(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            if optimizer is not None and (n := unshare_step_counters(optimizer)):
                logger.info("gave %d optimizer sub-group(s) their own Adam step counter (DeepSpeed's ZeRO-3 "
                            "universal load shares one)", n)

    trainer.add_callback(_Unshare())
