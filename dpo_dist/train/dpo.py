"""Rank entry: arguments → data → models → trainer → train → save → metrics.

Run one process per card under `deepspeed`, `torchrun`, optimum-habana's `gaudi_spawn.py`,
or plain `python -m dpo_dist.dpo` for one process. The launcher (`python -m launch train`)
builds that command for you.

    deepspeed --num_accelerators 2 --module dpo_dist.dpo \
        --model_name_or_path .cache/dpo-dist/tiny-v1/llama --dataset_name .cache/dpo-dist/tiny-v1/data \
        --deepspeed ds_configs/zero3.json --output_dir runs/x
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

from dpo_dist.args import ARG_DATACLASSES, ArgumentError, UserError, parse_args, validate
from dpo_dist.util.logs import setup_logging

logger = logging.getLogger("dpo_dist")

METRICS_FILE = "training_metrics.json"
DIAGNOSTICS_FILE = "diagnostics.json"


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
    import tempfile

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


def _file_problem(path: Path) -> Optional[str]:
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


def _deepspeed_state_problems(tag_dir: Path, world_size: int) -> list[str]:
    names = sorted(os.listdir(tag_dir))
    zero3_model = {int(m[1]) for n in names if (m := _DS_ZERO3_MODEL.match(n))}
    zero_optim = {int(m[1]) for n in names if (m := _DS_ZERO_OPTIM.match(n))}
    plain_model = [n for n in names if _DS_MODEL.match(n)]
    rel = tag_dir.name
    if not zero3_model and not plain_model:
        return [f"{rel}/ holds no *_model_states.pt (the DeepSpeed engine state was not saved)"]
    problems = []
    saved = max(zero3_model | zero_optim) + 1 if (zero3_model or zero_optim) else 1
    if saved > world_size:
        problems.append(
            f"{rel}/ was saved by {saved} ranks but this run has {world_size}; a ZeRO checkpoint resumes only at the "
            "same number of ranks (launch with that many, or convert it with DeepSpeed's ds_to_universal)"
        )
    expected = range(max(saved, world_size))
    if zero3_model or (zero_optim and not plain_model):
        problems += [f"{rel}/zero_pp_rank_{r}_mp_rank_00_model_states.pt is missing" for r in expected if r not in zero3_model]
    if zero_optim or zero3_model:
        problems += [f"{rel}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt is missing" for r in expected if r not in zero_optim]
    for n in names:
        if n.endswith(".pt") and (p := _file_problem(tag_dir / n)):
            problems.append(f"{rel}/{p}")
    return problems


def checkpoint_problems(ckpt, world_size: int = 1, deepspeed: bool = False) -> list[str]:
    """What stops an exact resume from `ckpt` (empty list: looks complete). Reads only names, sizes, the JSON
    state and zip directories, so it is cheap even for 70B checkpoints and needs no model or process group."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return [f"{ckpt} is not a folder"]
    problems = []
    state_path = ckpt / "trainer_state.json"
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
    ds_dirs = sorted(p.name for p in ckpt.glob("global_step*") if p.is_dir())
    if deepspeed or latest.exists() or ds_dirs:
        tag = latest.read_text().strip() if latest.is_file() else (ds_dirs[0] if len(ds_dirs) == 1 else None)
        if not tag:
            problems.append("the DeepSpeed engine state is missing (no 'latest' file naming a global_step*/ folder)")
        elif not (ckpt / tag).is_dir():
            problems.append(f"{tag}/ (named by the 'latest' file) is missing")
        else:
            problems += _deepspeed_state_problems(ckpt / tag, world_size)
    else:
        if not any((ckpt / n).is_file() for n in _HF_WEIGHTS):
            problems.append("no model weights (model.safetensors, adapter_model.safetensors, ...)")
        if not (ckpt / "optimizer.pt").is_file():
            problems.append("optimizer.pt is missing")
    if not (ckpt / "scheduler.pt").is_file():
        problems.append("scheduler.pt is missing")
    rng = [f"rng_state_{i}.pth" for i in range(world_size)] if world_size > 1 else ["rng_state.pth"]
    problems += [f"{n} is missing (the RNG state of that rank)" for n in rng if not (ckpt / n).is_file()]
    for p in sorted(ckpt.iterdir()):
        if p.is_file() and p.suffix in (".pt", ".pth") and (msg := _file_problem(p)):
            problems.append(msg)
    return problems


def _checkpoints_newest_first(output_dir) -> list[Path]:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    rx = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(m[1]), p) for p in Path(output_dir).iterdir() if p.is_dir() and (m := rx.match(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def resolve_checkpoint(train_args) -> Optional[str]:
    """'latest' or a path → a checkpoint folder that is complete for this world size; otherwise an error naming
    the checkpoint and what is missing. Runs before any model loads and writes nothing."""
    value = train_args.resume_from_checkpoint
    if not value:
        return None
    from dpo_dist.backend import world_size as launched_world_size

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


def _dist_reduce(values: list[float], op: str, device) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _gather_objects(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_report(module, world_size: int) -> dict:
    """What this rank holds of each parameter. Under ZeRO-3 a parameter's local partition is `ds_tensor`
    and `param.data` is empty between forwards unless it is below the persistence threshold."""
    rows = []
    for name, p in module.named_parameters():
        full = int(getattr(p, "ds_numel", p.numel()))
        part = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else full
        rows.append({"name": name, "full": full, "partition": part, "materialized": int(p.data.numel())})
    return {"world_size": world_size, "params": rows}


# Test hook: stop (after saving a checkpoint) once this optimizer step is done, without changing max_steps and
# so without changing the LR schedule. The resume tests use it to cut a run in two.
STOP_AFTER_STEP_ENV = "DPO_DIST_STOP_AFTER_STEP"


class RunRecorder:
    """Trainer callback: timing; the unrounded train loss of every log (HF rounds `loss` to 4 decimals), kept in
    the log history as `loss_unrounded` so that it is saved in checkpoints and survives a resume; the test-only
    stop hook ($DPO_DIST_STOP_AFTER_STEP); and (with --diagnostics) reference log-probs before/after and shard sizes."""

    def __init__(self, diagnostics: bool):
        from transformers import TrainerCallback

        self.diagnostics = diagnostics
        self.trainer = None
        self.t_train = None
        self.train_seconds = 0.0
        # Steady-state throughput: optimizer steps after the warm-up that met no new batch shape (on a
        # graph-compiling device a new shape is a compile, which is not training speed).
        self.warmup_steps = 0
        self.steady_seconds = 0.0
        self.steady_pairs = 0
        self.steady_tokens = 0
        self._step = None
        self.diag: dict = {}
        self.loss_total: Optional[float] = None
        self.loss_step = 0
        stop = os.environ.get(STOP_AFTER_STEP_ENV, "").strip()
        self.stop_after_step = int(stop) if stop else None
        recorder = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if recorder.diagnostics:
                    recorder.diag["reference_logps_before"] = recorder.reference_logps()
                recorder.t_train = time.perf_counter()
                # Trainer zeroes _total_loss_scalar right before on_train_begin (also on resume).
                recorder.loss_total = getattr(recorder.trainer, "_total_loss_scalar", None)
                recorder.loss_step = state.global_step

            def on_step_begin(self, args, state, control, **kw):
                t = recorder.trainer
                recorder._step = (time.perf_counter(), t.pairs_seen, t.real_tokens_seen, t.new_shape_steps)

            def on_step_end(self, args, state, control, **kw):
                recorder.end_step(state.global_step)
                if recorder.diagnostics and "shards" not in recorder.diag:
                    recorder.diag["shards"] = recorder.shards()
                if recorder.stop_after_step is not None and state.global_step >= recorder.stop_after_step:
                    control.should_save = True  # saved in this step's _maybe_log_save_evaluate, then the loop ends
                    control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):
                recorder.record_loss(state, logs)

            def on_train_end(self, args, state, control, **kw):
                recorder.train_seconds = time.perf_counter() - recorder.t_train
                if recorder.diagnostics:
                    recorder.diag["reference_logps_after"] = recorder.reference_logps()

        self.callback = _CB()

    def end_step(self, step: int) -> None:
        if self._step is None:
            return
        t0, pairs, tokens, new_shapes = self._step
        t = self.trainer
        if step > self.warmup_steps and t.new_shape_steps == new_shapes:
            self.steady_seconds += time.perf_counter() - t0
            self.steady_pairs += t.pairs_seen - pairs
            self.steady_tokens += t.real_tokens_seen - tokens
        self._step = None

    def record_loss(self, state, logs) -> None:
        """The Trainer logs round(sum / steps, 4), where sum (all-gathered mean over ranks) was just added to
        `_total_loss_scalar`: the difference since the previous log is that sum, unrounded."""
        total = getattr(self.trainer, "_total_loss_scalar", None)
        if not logs or "loss" not in logs or total is None or self.loss_total is None:
            return
        steps = state.global_step - self.loss_step
        entry = state.log_history[-1] if state.log_history else {}
        if steps > 0 and entry.get("step") == state.global_step and "loss" in entry:
            entry["loss_unrounded"] = (total - self.loss_total) / steps
        self.loss_total, self.loss_step = total, state.global_step

    def reference_logps(self) -> dict:
        trainer = self.trainer
        batch = next(iter(trainer.get_eval_dataloader()))
        batch = trainer._prepare_inputs(batch)
        if trainer.dpodist_engine is not None:  # the cache, the adapter-off policy or the reference model
            chosen, rejected = trainer.dpodist_reference_logps(batch)
        else:
            chosen, rejected = trainer.compute_ref_log_probs(batch)  # trl 0.22's own forward
        return {"chosen": chosen.float().cpu().tolist(), "rejected": rejected.float().cpu().tolist()}

    def shards(self) -> dict:
        trainer = self.trainer
        world = trainer.args.world_size
        policy = _gather_objects(shard_report(trainer.model, world))
        ref = trainer.ref_model
        ref = getattr(ref, "module", ref)
        reference = _gather_objects(shard_report(ref, world)) if ref is not None else None
        return {"policy": policy, "reference": reference}


def train_losses(log_history: list[dict]) -> list[float]:
    return [h["loss"] for h in log_history if "loss" in h and "eval_loss" not in h]


def train_loss_by_step(log_history: list[dict]) -> dict[str, float]:
    """{step: unrounded train loss (mean over ranks, and over the steps since the previous log)}; a resumed run's
    history includes the steps before the checkpoint."""
    return {str(h["step"]): h["loss_unrounded"] for h in log_history if "loss_unrounded" in h}


def process_group_timeout_s(device) -> Optional[float]:
    """The collective timeout the default process group really has (what --dist_timeout became), or None."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        backend = dist.distributed_c10d._get_default_group()._get_backend(device)
        return float(backend.options._timeout.total_seconds())
    except Exception:  # private API: report nothing rather than guess
        return None


def collect_metrics(*, trainer, setup, backend, model_args, train_args, eval_metrics, recorder, wall_start) -> dict:
    from dpo_dist.backend import peak_memory_bytes

    device = trainer.accelerator.device
    pairs, tokens, fed, steady_pairs, steady_tokens = _dist_reduce(
        [float(trainer.pairs_seen), float(trainer.real_tokens_seen), float(trainer.fed_tokens_seen),
         float(recorder.steady_pairs), float(recorder.steady_tokens)], "sum", device)
    (steady_secs,) = _dist_reduce([float(recorder.steady_seconds)], "max", device)
    (peak,) = _dist_reduce([float(peak_memory_bytes(backend))], "max", device)
    losses = train_losses(trainer.state.log_history)
    secs = max(recorder.train_seconds, 1e-9)
    return {
        "backend": backend.device,
        "dist_backend": backend.dist_backend,
        "trainer_api": setup.api,
        "world_size": trainer.args.world_size,
        "dist_timeout_s": process_group_timeout_s(device),
        "zero_stage": setup.zero_stage,
        "reference": setup.reference,
        "use_peft": model_args.use_peft,
        "model": model_args.model_name_or_path,
        "loss_type": train_args.loss_type,
        "beta": train_args.beta,
        "steps": trainer.state.global_step,
        "pairs_trained": int(pairs),
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "train_losses": losses,
        "train_loss_by_step": train_loss_by_step(trainer.state.log_history),
        "eval_reward_accuracy": eval_metrics.get("eval_rewards/accuracies"),
        "eval_reward_margin": eval_metrics.get("eval_rewards/margins"),
        "eval_loss": eval_metrics.get("eval_loss"),
        "pairs_per_s": pairs / secs,
        "tokens_per_s": tokens / secs,
        "real_tokens": int(tokens),
        "fed_tokens": int(fed),  # real + padding tokens of the policy forwards
        "padding_fraction": (1.0 - tokens / fed) if fed else None,
        # Steady state: after --throughput_warmup_steps, without the steps that met a new batch shape (a graph
        # compile on HPU). None when no step qualifies.
        "pairs_per_s_steady": steady_pairs / steady_secs if steady_secs > 0 else None,
        "tokens_per_s_steady": steady_tokens / steady_secs if steady_secs > 0 else None,
        "throughput_warmup_steps": recorder.warmup_steps,
        "batch_shapes": len(trainer.shapes_seen) if trainer.shapes_seen is not None else None,
        "length_buckets": list(trainer.dpodist_buckets or []),
        "chunked_logps": trainer.dpodist_engine is not None and trainer.dpodist_engine.chunked,
        "packing": trainer.dpodist_engine is not None and trainer.dpodist_engine.packing,
        "packing_attention": trainer.dpodist_engine.packing_attention if trainer.dpodist_engine else None,
        "static_shapes": backend.static_shapes,
        "hpu_twin": backend.twin,
        "reference_cache": getattr(trainer, "dpodist_ref_cache", None),
        "peak_memory_gib_per_rank_max": peak / 2**30,
        "train_seconds": recorder.train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
    }


def current_rss_bytes() -> int:
    """Resident set of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run(model_args, data_args, train_args) -> dict:
    wall_start = time.perf_counter()
    from transformers import set_seed

    from dpo_dist.backend import apply_env, get_backend
    from dpo_dist.data.preference import apply_length_policy, load_preference_splits, with_bos
    from dpo_dist.model.loader import load_model, load_tokenizer, lora_config
    from dpo_dist.train.trl_trainer import build_trainer, build_training_setup

    backend = get_backend(train_args.device)
    apply_env(backend)
    checkpoint = resolve_checkpoint(train_args)
    # The trainer config comes first: under ZeRO-3 (and on Gaudi) it hooks from_pretrained.
    setup = build_training_setup(backend, model_args, data_args, train_args)
    logger.info("backend=%s world_size=%d zero_stage=%d reference=%s", backend.device, setup.args.world_size,
                setup.zero_stage, setup.reference)

    tokenizer = load_tokenizer(model_args)
    with setup.args.main_process_first(desc="dataset"):
        train, held_out = load_preference_splits(data_args, train_args.seed)
        train, held_out = with_bos(train, tokenizer), with_bos(held_out, tokenizer)
        train, _ = apply_length_policy(train, tokenizer, max_length=train_args.max_length, mode=data_args.overlong, split_name="train")
        held_out, _ = apply_length_policy(held_out, tokenizer, max_length=train_args.max_length, mode=data_args.overlong, split_name="test")
    logger.info("data: %d training pairs, %d held-out pairs", len(train), len(held_out))

    set_seed(train_args.seed)
    rss_before_model = current_rss_bytes()  # the process before any model: baseline for the planner check
    varlen = train_args.packing and backend.packing_attention == "varlen"
    load = lambda: load_model(model_args, device=backend.device, bf16=train_args.bf16,  # noqa: E731
                              extra_kwargs=setup.model_load_kwargs, packing=varlen)
    model, family = load()
    ref_model = None
    if setup.reference in ("sharded", "replicated"):
        ref_model, _ = load()
    peft_config = lora_config(model_args, family) if model_args.use_peft else None
    if train_args.gradient_checkpointing:
        model.config.use_cache = False

    recorder = RunRecorder(train_args.diagnostics)
    recorder.warmup_steps = train_args.throughput_warmup_steps
    set_seed(train_args.seed)  # PEFT creates the adapter inside the trainer: seed right before it
    trainer = build_trainer(
        setup, backend=backend, model_args=model_args, data_args=data_args, train_args=train_args, model=model, ref_model=ref_model,
        tokenizer=tokenizer, train_dataset=train, eval_dataset=held_out, peft_config=peft_config,
        callbacks=[recorder.callback],
        load_reference=lambda: load()[0],
    )
    recorder.trainer = trainer

    trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    trainer.save_model(train_args.output_dir)
    metrics = collect_metrics(
        trainer=trainer, setup=setup, backend=backend, model_args=model_args, train_args=train_args,
        eval_metrics=eval_metrics, recorder=recorder, wall_start=wall_start,
    )
    (metrics["rss_before_model_gib_max"],) = [x / 2**30 for x in _dist_reduce(
        [float(rss_before_model)], "max", trainer.accelerator.device)]
    if trainer.is_world_process_zero():
        out = Path(train_args.output_dir)
        write_json_atomic(out / METRICS_FILE, metrics)
        if train_args.diagnostics:
            write_json_atomic(out / DIAGNOSTICS_FILE, recorder.diag)
        logger.info(
            "done: %d steps, loss %.4f -> %.4f, held-out reward accuracy %.3f, %.2f pairs/s, metrics in %s",
            metrics["steps"], metrics["first_train_loss"] or float("nan"), metrics["last_train_loss"] or float("nan"),
            metrics["eval_reward_accuracy"] or float("nan"), metrics["pairs_per_s"], out / METRICS_FILE,
        )
    trainer.accelerator.wait_for_everyone()
    return metrics


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group: a rank that exits with live gloo threads can abort
    (`terminate called without an active exception`, rc -6) and make torchrun's exit barrier wait 300 s."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # best effort at exit
        pass
    if os.environ.get("DS_ACCELERATOR") == "cpu" and os.environ.get("MASTER_PORT"):
        from dpo_dist.backend import cleanup_shm_buffers

        cleanup_shm_buffers(os.environ["MASTER_PORT"], os.environ.get("LOCAL_RANK", "0"))


def post_step(model_args, train_args) -> int:
    """Merge into `<output_dir>_merged` on global rank 0, after the process group is gone.

    Why here and not in the launcher: it then runs the same under every launcher (deepspeed,
    torchrun, gaudi_spawn, plain python), on the node that holds rank 0's output. Why after the
    process group is torn down: a long merge (70B) cannot trip a collective timeout on the ranks
    that already finished. It runs as a fresh process so no DeepSpeed/ZeRO state of training
    (zero.Init hooks, device memory) leaks into loading and verifying the merged model.
    """
    from dpo_dist.backend import global_rank

    if train_args.no_merge or global_rank() != 0:
        return 0
    import subprocess

    out = str(train_args.output_dir).rstrip("/")
    argv = [sys.executable, "-m", "dpo_dist.merge", "--checkpoint", out, "--output", out + "_merged",
            "--base_model", model_args.model_name_or_path, "--dtype", "bf16" if train_args.bf16 else "fp32"]
    if train_args.overwrite_output_dir:
        argv.append("--overwrite")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "CROSS_RANK", "CROSS_SIZE") and not k.startswith(("OMPI_", "PMI_", "PMIX_"))}
    logger.info("post-step: merging %s into %s_merged", out, out)
    rc = subprocess.call(argv, env=env)
    if rc != 0:
        print(f"dpo_dist: merge failed (exit {rc}); the training output in {out} is intact. Re-run: "
              f"python -m dpo_dist.merge --checkpoint {out} --output {out}_merged", file=sys.stderr)
    return rc


def rank_main(prog: str, argv, dataclass_types, run_fn) -> int:
    """The rank entry shared by dpo and sft: parse and check (exit 2, nothing created), run (exit 1 on a
    user error; 2 for a bad argument found late), tear the process group down, then the merge post-step."""
    setup_logging()
    try:
        parsed = parse_args(argv, dataclass_types)
        model_args, data_args, train_args = parsed[:3]
        validate(model_args, data_args, train_args)
        check_output_dir(train_args)
    except ArgumentError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        run_fn(*parsed)
    except UserError as e:
        logger.error("%s", e)
        print(f"{prog}: error: {e}", file=sys.stderr)
        shutdown_distributed()
        return 2 if isinstance(e, ArgumentError) else 1
    shutdown_distributed()
    return post_step(model_args, train_args)


def main(argv: Optional[list[str]] = None) -> int:
    return rank_main("dpo_dist.dpo", argv, ARG_DATACLASSES, run)


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown, once everything is written and the process group is destroyed.
    Teardown can still abort a rank (SIGABRT, "terminate called without an active exception") when it frees gloo
    objects that other modules keep referenced: measured here once in about a dozen 2-rank runs,
    after a successful run; DeepSpeed's launcher then fails the whole job."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
