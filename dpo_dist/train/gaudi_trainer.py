"""HPU half of the trainer adapter: the project's one argument set → optimum-habana 1.21.2.

optimum-habana 1.21.2 ships ``optimum.habana.trl.GaudiDPOTrainer(DPOTrainer, GaudiTrainer)``, a port
of **trl 0.9.6**'s ``DPOTrainer`` (old keyword style: ``beta=``, ``tokenizer=``, ``max_length=``,
``gaudi_config=``), and its config ``optimum.habana.trl.GaudiDPOConfig``, a dataclass that subclasses
``optimum.habana.GaudiTrainingArguments`` (itself transformers' ``TrainingArguments``) and adds trl
0.9.6's ``DPOConfig`` fields. Every DPO keyword goes through the config (one record of the run, saved
in ``training_args.bin``); the trainer gets objects only.

What the trainer does, and what the engine does instead
-------------------------------------------------------
``GaudiDPOTrainer`` runs the loop: ``GaudiTrainer``'s training step (lazy-mode ``mark_step``, fused AdamW
and clip-norm without DeepSpeed), DDP or DeepSpeed, checkpoints. HPU graphs stay off (see
``gaudi_training_args_kwargs``). The DPO step
itself comes from dpo-dist's engine (``engine.py``) through three seams of trl 0.9.6's class:

- ``tokenize_row`` → ``engine.tokenize_pair`` (trl 0.22's row layout; trl 0.9.6 builds labels instead);
- ``data_collator`` → ``engine.EngineCollator`` (bucket lengths or packed totals: a few fixed shapes,
  so a few HPU graph compilations, instead of padding every pair to ``max_length``);
- ``get_batch_loss_metrics`` → the engine's forward (static-shape chunked log-probs, packed rows with a
  block-diagonal mask, ``use_flash_attention=True`` so Gaudi attention takes FusedSDPA) and loss
  (every loss type of ``losses.py``, metrics averaged over ranks).

That also removes three trl 0.9.6 defects on this path: its ``concatenated_forward`` takes no
``is_ref_model`` keyword; its precompute reads the cached columns only when ``rpo_alpha`` is set
(otherwise the reference silently becomes the live policy); it refuses precompute under ZeRO-3.
``--reference precomputed`` is the engine's cache (``refcache.py``) here as on CPU/CUDA.

Nothing from ``optimum``/``habana_frameworks`` is imported at module level: ``import optimum.habana``
fails on a machine without ``habana_frameworks``, and the pure functions below are unit-tested on CPU
against the real sources with ``ast`` (tests/dpo_dist/train/test_gaudi_trainer.py). ``build_gaudi_training_args`` and
``build_gaudi_trainer`` import optimum-habana; the Gaudi twin (``backend.py``) runs them on CPU.

Order on HPU::

    training_args, gaudi_config = build_gaudi_training_args(model_args, data_args, train_args, backend, reference)
    model = AutoModelForCausalLM.from_pretrained(path, **model_load_kwargs_gaudi(train_args), ...)
    ref_model = ...  (only for --reference sharded / replicated)
    trainer = build_gaudi_trainer(training_args=training_args, gaudi_config=gaudi_config, ...)

Mapping (project argument → Gaudi keyword; C = ``GaudiDPOConfig`` field, G = ``GaudiConfig`` key,
L = ``from_pretrained`` keyword, T = ``GaudiDPOTrainer.__init__`` keyword)

================================  =============================================================
project argument                  optimum-habana 1.21.2 / trl 0.9.6
================================  =============================================================
--output_dir                      C output_dir
--overwrite_output_dir            C overwrite_output_dir
--per_device_train_batch_size     C per_device_train_batch_size
--per_device_eval_batch_size      C per_device_eval_batch_size
--gradient_accumulation_steps     C gradient_accumulation_steps
--learning_rate                   C learning_rate
--lr_scheduler_type               C lr_scheduler_type
--warmup_steps                    C warmup_steps
--weight_decay                    C weight_decay
--max_grad_norm                   C max_grad_norm (G use_fused_clip_norm=True: Habana FusedClipNorm)
--optim                           C optim; replaced by Habana FusedAdamW when G use_fused_adam
--num_train_epochs / --max_steps  C num_train_epochs / max_steps
--logging_steps                   C logging_steps
--save_steps / --save_total_limit C save_steps / save_total_limit
--eval_steps                      C eval_strategy="steps" + eval_steps (else eval_strategy="no")
--bf16                            C bf16, G use_torch_autocast, L torch_dtype=torch.bfloat16
--seed                            C seed (+ optimum.habana.utils.set_seed before the model loads)
--gradient_checkpointing          C gradient_checkpointing + {"use_reentrant": False}
--deepspeed                       C deepspeed (only for ZeRO stage >= 1: a stage-0 plan runs DDP,
                                  which keeps FusedAdamW); G use_fused_adam=False;
                                  L low_cpu_mem_usage=False under ZeRO-3
--throughput_warmup_steps         C throughput_warmup_steps (at most max_steps - 1)
--report_to / --dist_timeout      C report_to / ddp_timeout
--dataloader_num_workers          C dataloader_num_workers
--gaudi_config_name               GaudiConfig.from_pretrained(name) (else the built-in one below)
(always)                          C use_habana=True, use_lazy_mode=True, remove_unused_columns=False,
                                  distribution_strategy="ddp", use_hpu_graphs_for_training/inference=False
                                  (the engine reads hidden states with a hook; graph replays run none);
                                  twin: use_habana=False, use_lazy_mode=False, use_cpu=True
--beta / --loss_type              C beta / loss_type (the engine computes every loss type)
--label_smoothing                 C label_smoothing
--max_length / --max_prompt_length C max_length / max_prompt_length
--max_target_length               C max_target_length (the engine cuts completions at it)
(prompt kept left-truncated)      C truncation_mode="keep_end"
--reference sharded/replicated    T ref_model=<model>; C force_use_ref_model=True with --use_peft
--reference adapter (--use_peft)  T ref_model=None (adapter-disabled policy is the reference)
--reference precomputed           T ref_model=None; the engine's cache (never C precompute_ref_log_probs)
--use_peft + --lora_*             T peft_config=peft.LoraConfig(...)
tokenizer                         T tokenizer (passed on as processing_class)
(the engine)                      T data_collator=EngineCollator
================================  =============================================================
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dpo_dist.args import DataArguments, ModelArguments, TrainArguments
from dpo_dist.train.deepspeed import zero_stage_of
from dpo_dist.train.engine import tokenize_pair
from dpo_dist.util.errors import ArgumentError

logger = logging.getLogger(__name__)

# `--optim` values that Habana's FusedAdamW replaces without changing the algorithm.
_FUSED_ADAM_REPLACES = ("adamw_torch", "adamw_torch_fused", "adamw_hf")

GAUDI_TRAINER_CLASS_NAME = "DpoDistGaudiDPOTrainer"


# --------------------------------------------------------------------------------------------
# Pure helpers (no optimum/habana import; torch only inside model_load_kwargs_gaudi): CPU-tested.
# --------------------------------------------------------------------------------------------


def uses_deepspeed(train_args: TrainArguments) -> bool:
    """DeepSpeed only for ZeRO stage >= 1. A stage-0 config is plain data parallelism, which DDP does without
    giving up what DeepSpeed turns off on HPU (FusedAdamW): optimum-habana's own DPO baseline
    runs that way (``gaudi_spawn.py --use_mpi``)."""
    return bool(train_args.deepspeed) and zero_stage_of(train_args.deepspeed) >= 1


def gaudi_trainer_kwargs(model_args: ModelArguments, train_args: TrainArguments, reference: str) -> dict:
    """The DPO keywords of trl 0.9.6 / GaudiDPOTrainer, with their real names (``GaudiDPOConfig`` fields)."""
    separate = reference in ("sharded", "replicated")
    return {
        "beta": float(train_args.beta),
        "loss_type": train_args.loss_type,
        "label_smoothing": float(train_args.label_smoothing),
        "max_length": int(train_args.max_length),
        "max_prompt_length": int(train_args.max_prompt_length),
        "max_target_length": int(train_args.max_completion_length),
        "truncation_mode": "keep_end",  # prompt left-truncated, as on CPU/CUDA
        "precompute_ref_log_probs": False,  # --reference precomputed is the engine's cache
        "force_use_ref_model": bool(separate and model_args.use_peft),
        "generate_during_eval": False,  # True needs wandb in trl 0.9.6
        "disable_dropout": True,
    }


def _report_to(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _warmup_steps(train_args: TrainArguments) -> int:
    w = int(train_args.throughput_warmup_steps)
    return min(w, max(0, int(train_args.max_steps) - 1)) if train_args.max_steps and train_args.max_steps > 0 else w


def gaudi_training_args_kwargs(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments,
                               *, reference: str, twin: bool = False) -> dict:
    """Keywords for ``optimum.habana.trl.GaudiDPOConfig(**kw)`` (GaudiTrainingArguments + DPO fields).

    ``twin``: the same run on CPU (``use_habana=False``, ``use_lazy_mode=False``, ``use_cpu=True``);
    optimum-habana allows HPU graphs and a ``gaudi_config_name`` only with ``use_habana``."""
    use_ds = uses_deepspeed(train_args)
    habana = not twin
    kw: dict[str, Any] = {
        "output_dir": train_args.output_dir,
        "overwrite_output_dir": bool(train_args.overwrite_output_dir),
        "per_device_train_batch_size": int(train_args.per_device_train_batch_size),
        "per_device_eval_batch_size": int(train_args.per_device_eval_batch_size),
        "gradient_accumulation_steps": int(train_args.gradient_accumulation_steps),
        "learning_rate": float(train_args.learning_rate),
        "lr_scheduler_type": train_args.lr_scheduler_type,
        "warmup_steps": int(train_args.warmup_steps),
        "weight_decay": float(train_args.weight_decay),
        "max_grad_norm": float(train_args.max_grad_norm),
        "optim": train_args.optim,
        "num_train_epochs": float(train_args.num_train_epochs),
        "max_steps": int(train_args.max_steps),
        "logging_steps": train_args.logging_steps,
        "logging_first_step": True,
        "save_steps": train_args.save_steps,
        "save_total_limit": train_args.save_total_limit,
        "bf16": bool(train_args.bf16),
        "seed": int(train_args.seed),
        "data_seed": int(train_args.seed),
        "gradient_checkpointing": bool(train_args.gradient_checkpointing),
        "report_to": _report_to(train_args.report_to),
        "remove_unused_columns": False,  # the collator needs the token-id columns
        "dataloader_num_workers": int(train_args.dataloader_num_workers),
        "ddp_timeout": int(train_args.dist_timeout),
        "throughput_warmup_steps": _warmup_steps(train_args),
        # Gaudi
        "use_habana": habana,
        "use_lazy_mode": habana,  # PT_HPU_LAZY_MODE=1 must also be set before Python starts (backend.env)
        "distribution_strategy": "ddp",
        # HPU graphs off: a graph replays the recorded forward of the whole (DDP-wrapped) model and runs no Python
        # code inside it, so the forward hook through which the engine reads the final hidden states (its chunked
        # log-probs never compute the full logits) would not run. The ranks run in lazy mode instead, as optimum-habana
        # itself does under DeepSpeed or gradient checkpointing. (A separate reference outside DeepSpeed, which
        # GaudiDPOTrainer wraps in an inference graph, is read through its backbone: logprobs.final_hidden_states.)
        "use_hpu_graphs_for_training": False,
        "use_hpu_graphs_for_inference": False,
    }
    if twin:
        kw["use_cpu"] = True
    if train_args.eval_steps:
        kw["eval_strategy"] = "steps"
        kw["eval_steps"] = train_args.eval_steps
    else:
        kw["eval_strategy"] = "no"  # dpo_dist evaluates the held-out split once at the end
    if train_args.gradient_checkpointing:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if use_ds:
        kw["deepspeed"] = train_args.deepspeed
    if train_args.gaudi_config_name and habana:
        kw["gaudi_config_name"] = train_args.gaudi_config_name
    kw.update(gaudi_trainer_kwargs(model_args, train_args, reference))
    return kw


def gaudi_config_kwargs(train_args: TrainArguments) -> dict:
    """Keywords for the built-in ``optimum.habana.GaudiConfig(**kw)`` (used without --gaudi_config_name).

    FusedAdamW is off under DeepSpeed (DeepSpeed builds its own optimizer) and when --optim is not an AdamW
    variant (FusedAdamW would silently replace it). GaudiTrainer itself also turns use_torch_autocast off under
    DeepSpeed (DeepSpeed manages bf16).
    """
    return {
        "use_fused_adam": (not uses_deepspeed(train_args)) and train_args.optim in _FUSED_ADAM_REPLACES,
        "use_fused_clip_norm": True,
        "use_torch_autocast": bool(train_args.bf16),
    }


def model_load_kwargs_gaudi(train_args: TrainArguments) -> dict:
    """``from_pretrained`` keywords on HPU, for the policy and a separate reference alike.

    low_cpu_mem_usage=False under ZeRO-3 (from_pretrained then runs under deepspeed.zero.Init, which needs the
    training args built first); True otherwise, as in optimum-habana's examples/trl/dpo.py.
    """
    kw: dict[str, Any] = {"low_cpu_mem_usage": not (uses_deepspeed(train_args)
                                                    and zero_stage_of(train_args.deepspeed) == 3)}
    if train_args.bf16:
        import torch

        kw["torch_dtype"] = torch.bfloat16
    return kw


def gaudi_model_config_overrides(is_reference: bool = False) -> dict:
    """``model.config`` attributes set before training, as optimum-habana's examples/trl/dpo.py (v1.21) does."""
    if is_reference:
        return {"use_cache": False}
    return {"use_cache": False, "use_fused_rope": False}


def gaudi_trainer_call_kwargs(*, training_args: Any, gaudi_config: Any, model: Any, ref_model: Any, tokenizer: Any,
                              train_dataset: Any, eval_dataset: Any, peft_config: Any, callbacks: list | None,
                              data_collator: Any, model_args: ModelArguments, reference: str) -> dict:
    """The keywords ``build_gaudi_trainer`` gives ``GaudiDPOTrainer(...)``; checks the reference wiring."""
    if model_args.use_peft and peft_config is None:
        raise ValueError("--use_peft: build_gaudi_trainer needs a peft_config (peft.LoraConfig).")
    if not model_args.use_peft and peft_config is not None:
        raise ValueError("A peft_config was given without --use_peft.")
    separate = reference in ("sharded", "replicated")
    if separate and ref_model is None:
        raise ValueError(
            f"--reference {reference}: load the reference model (AutoModelForCausalLM.from_pretrained with "
            "model_load_kwargs_gaudi) and pass it as ref_model; without it GaudiDPOTrainer would "
            + ("silently use the adapter-disabled policy." if model_args.use_peft else "deep-copy the policy.")
        )
    if not separate and ref_model is not None:
        raise ValueError(
            f"--reference {reference}: do not load a separate reference model "
            + ("(the adapter-disabled policy is the reference)." if reference == "adapter"
               else "(the engine's cache holds its log-probs).")
        )
    kw = {
        "model": model,
        "ref_model": ref_model,
        "args": training_args,
        "gaudi_config": gaudi_config,
        "data_collator": data_collator,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "tokenizer": tokenizer,
        "peft_config": peft_config,
    }
    if callbacks:
        kw["callbacks"] = list(callbacks)
    return kw


# --------------------------------------------------------------------------------------------
# HPU-only builders: these import optimum.habana (needs habana_frameworks, or the twin's stand-in).
# --------------------------------------------------------------------------------------------


def build_gaudi_training_args(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments,
                              backend, reference: str):
    """Build ``(GaudiDPOConfig, GaudiConfig)``. MUST be called BEFORE any model is loaded.

    Why first: ``adapt_transformers_to_gaudi()`` replaces transformers' modeling classes (LlamaForCausalLM →
    GaudiLlamaForCausalLM, Gemma3ForCausalLM → GaudiGemma3ForCausalLM, ...), so a model loaded earlier is the
    unpatched class; and under ZeRO-3 the args object registers the DeepSpeed config (a weak reference) that
    makes ``from_pretrained`` shard weights with ``deepspeed.zero.Init``: keep the returned args alive while
    loading models. GaudiTrainingArguments calls ``adapt_transformers_to_gaudi()`` itself only with
    ``use_habana=True``; it is called here explicitly first (it is idempotent), so the twin gets the Gaudi
    classes too. Also seeds python/numpy/torch/HPU RNGs (``optimum.habana.utils.set_seed``) so that the LoRA
    init is reproducible.
    """
    if backend.twin and uses_deepspeed(train_args):
        raise ArgumentError(
            "--deepspeed with ZeRO stage >= 1 cannot run in the Gaudi twin: optimum-habana refuses any DeepSpeed that "
            "is not Habana's fork on a non-HPU device ('This version of DeepSpeed must be run on HPUs'). Use a "
            "stage-0 plan in the twin; ZeRO itself is covered by the CPU path."
        )
    if not backend.twin:
        lazy = os.environ.get("PT_HPU_LAZY_MODE")
        if lazy is None and "habana_frameworks.torch" not in sys.modules:
            os.environ["PT_HPU_LAZY_MODE"] = lazy = "1"  # still in time: habana_frameworks reads it at import
        if lazy != "1":
            raise RuntimeError(
                f"PT_HPU_LAZY_MODE={lazy!r}, but the HPU trainer runs in lazy mode (use_lazy_mode=True) and "
                "SynapseAI >= 1.21 defaults to eager. Set PT_HPU_LAZY_MODE=1 before Python starts (the dpo_dist "
                "launcher does; backend.Backend.env lists the variables)."
            )
    from optimum.habana import GaudiConfig  # deferred: HPU only
    from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi  # deferred: HPU only
    from optimum.habana.trl import GaudiDPOConfig  # deferred: HPU only
    from optimum.habana.utils import set_seed  # deferred: HPU only

    adapt_transformers_to_gaudi()
    training_args = GaudiDPOConfig(**gaudi_training_args_kwargs(model_args, data_args, train_args, reference=reference,
                                                                twin=backend.twin))
    set_seed(training_args.seed)

    if train_args.gaudi_config_name:
        gaudi_config = GaudiConfig.from_pretrained(train_args.gaudi_config_name)
        if uses_deepspeed(train_args) and getattr(gaudi_config, "use_fused_adam", False):
            logger.warning("--gaudi_config_name %s sets use_fused_adam=true; turning it off under DeepSpeed, which "
                           "builds its own optimizer.", train_args.gaudi_config_name)
            gaudi_config.use_fused_adam = False
    else:
        gaudi_config = GaudiConfig(**gaudi_config_kwargs(train_args))
    return training_args, gaudi_config


class GaudiEngineSeams:
    """Mixed in front of ``GaudiDPOTrainer``: trl 0.9.6's tokenisation gives way to the engine's.

    ``GaudiDPOTrainer.__init__`` maps ``self.tokenize_row`` over the datasets; here that is
    ``engine.tokenize_pair`` (prompt ids, completion ids + EOS), the rows the engine's collator and forward
    take. The trainer's own checks then accept the engine's collator as its DPO collator.
    """

    dpodist_engine = None

    def tokenize_row(self, feature, model=None):
        e = self.dpodist_engine
        return tokenize_pair(feature, self.tokenizer, e.max_prompt_length, e.max_completion_length)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # trl 0.9.6 warns on every step unless its own collator is used; the engine's collator replaces it.
        self.use_dpo_data_collator = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Averages the loss over gradient accumulation, which optimum-habana 1.21.2 forgets.

        ``GaudiTrainer.training_step`` divides the loss by the accumulation steps only inside ``if use_lazy_mode
        and pipelining_fwd_bwd`` (transformers 4.55 does it for every run), and the accelerator is built without
        gradient accumulation, so nothing else divides: every Gaudi run with ``gradient_accumulation_steps > 1``
        would step on the sum of its micro-batches' gradients (and clip that sum at --max_grad_norm) and log the
        loss multiplied by the accumulation steps. Divided here, under exactly the condition upstream skips it.
        """
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training or (self.args.use_lazy_mode and self.args.pipelining_fwd_bwd):
            return out
        steps = getattr(self, "current_gradient_accumulation_steps", 1) or 1
        if return_outputs:
            return out[0] / steps, out[1]
        return out / steps


def build_gaudi_trainer(*, training_args, gaudi_config, model, ref_model, tokenizer, train_dataset, eval_dataset,
                        peft_config, callbacks, data_collator, mixin, attrs: dict, model_args: ModelArguments,
                        train_args: TrainArguments, reference: str):
    """Construct ``optimum.habana.trl.GaudiDPOTrainer`` with the engine mixed in (``mixin`` in front, with
    ``attrs`` as class attributes). ``training_args``/``gaudi_config`` come from ``build_gaudi_training_args``
    (called before the models were loaded). ``train_dataset``/``eval_dataset`` have string columns
    prompt / chosen / rejected. Note: GaudiTrainer sets ``training_args.bf16 = False`` in place when it takes
    over autocast (bf16 without DeepSpeed): read bf16 from train_args, not from training_args, afterwards.
    """
    from optimum.habana.trl import GaudiDPOTrainer  # deferred: HPU only

    kw = gaudi_trainer_call_kwargs(
        training_args=training_args, gaudi_config=gaudi_config, model=model, ref_model=ref_model,
        tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config,
        callbacks=callbacks, data_collator=data_collator, model_args=model_args, reference=reference,
    )
    for m, is_ref in ((model, False), (ref_model, True)):
        if m is not None and getattr(m, "config", None) is not None:
            for key, value in gaudi_model_config_overrides(is_ref).items():
                setattr(m.config, key, value)
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        logger.info("Tokenizer has no pad token; using eos as pad (DPO collator needs one).")
        tokenizer.pad_token = tokenizer.eos_token
    cls = type(GAUDI_TRAINER_CLASS_NAME, (mixin, GaudiEngineSeams, GaudiDPOTrainer), dict(attrs))
    return cls(**kw)
