"""What a rank records while it trains, and the metrics it writes at the end (`training_metrics.json`):
losses, held-out reward accuracy, throughput (all steps, and steady state without warm-up and new shapes),
padding, peak memory, and the plan the run carried out. Reduced over ranks."""

from __future__ import annotations

import logging
import os
import time

from dpo_dist.backend import peak_memory_bytes
from dpo_dist.train.runtime import process_group_timeout_s

logger = logging.getLogger("dpo_dist")


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
        self.steady_steps = 0
        self._step = None
        self.diag: dict = {}
        self.loss_total: float | None = None
        self.loss_step = 0
        self.first_step = 0  # global step at train begin (a resumed run starts past 0)
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
                recorder.first_step = state.global_step

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
            self.steady_steps += 1
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


def collect_metrics(*, trainer, setup, backend, model_args, train_args, eval_metrics, recorder, wall_start) -> dict:
    device = trainer.accelerator.device
    pairs, tokens, fed, unpadded, steady_pairs, steady_tokens = _dist_reduce(
        [float(trainer.pairs_seen), float(trainer.real_tokens_seen), float(trainer.fed_tokens_seen),
         float(trainer.unpadded_tokens_seen), float(recorder.steady_pairs), float(recorder.steady_tokens)], "sum",
        device)
    (steady_secs,) = _dist_reduce([float(recorder.steady_seconds)], "max", device)
    (peak,) = _dist_reduce([float(peak_memory_bytes(backend))], "max", device)
    losses = train_losses(trainer.state.log_history)
    secs = max(recorder.train_seconds, 1e-9)
    steps_run = trainer.state.global_step - (recorder.first_step or 0)  # a resumed run: the steps this process ran
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
        # The policy forwards' tokens without padding: real_tokens, less each shared prompt's second copy.
        "unpadded_tokens": int(unpadded),
        "padding_fraction": (1.0 - unpadded / fed) if fed else None,
        # Steady state: after --throughput_warmup_steps, without the steps that met a new batch shape (a graph
        # compile on HPU). None when no step qualifies.
        "pairs_per_s_steady": steady_pairs / steady_secs if steady_secs > 0 else None,
        "tokens_per_s_steady": steady_tokens / steady_secs if steady_secs > 0 else None,
        "throughput_warmup_steps": recorder.warmup_steps,
        # Seconds per optimizer step: over the whole run (this process's steps), and in steady state.
        "step_time_s": recorder.train_seconds / steps_run if steps_run else None,
        "step_time_s_steady": steady_secs / recorder.steady_steps if recorder.steady_steps and steady_secs > 0 else None,
        "global_batch_pairs": (trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
                               * trainer.args.world_size),
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
