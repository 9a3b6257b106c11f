"""HPU half of the trainer adapter: the project's one argument set → optimum-habana 1.21.2.

optimum-habana 1.21.2 ships `optimum.habana.trl.GaudiDPOTrainer(DPOTrainer, GaudiTrainer)`, a
port of **trl 0.9.6**'s `DPOTrainer` (old keyword style: `beta=`, `tokenizer=`, `max_length=`,
`gaudi_config=`), and its config class `optimum.habana.trl.GaudiDPOConfig`
(`optimum/habana/trl/trainer/dpo_config.py`), a dataclass that subclasses
`optimum.habana.GaudiTrainingArguments` (which subclasses transformers' `TrainingArguments`) and
adds trl 0.9.6's `DPOConfig` fields. Both the config and `GaudiDPOTrainer.__init__` accept the DPO
keywords (`beta`, `loss_type`, `max_length`, ...): a keyword given to the trainer overrides the
config's value with a warning. This adapter routes every DPO keyword through the config (one
record of the run, saved in `training_args.bin`, no override warnings) and hands the trainer only
objects (model, datasets, tokenizer, `gaudi_config`, `peft_config`, callbacks).

Nothing from `optimum`/`habana_frameworks` is imported at module level: `import optimum.habana`
fails on a machine without `habana_frameworks` (`check_synapse_version()`), and the pure
functions below must be unit-testable on CPU (`tests/test_hpu_adapter.py` checks every keyword
they produce against the real sources with `ast`). Only `build_gaudi_training_args` and
`build_gaudi_trainer` import optimum-habana.

Order on HPU (DESIGN.md §3)::

    training_args, gaudi_config = build_gaudi_training_args(model_args, data_args, train_args)
    model = AutoModelForCausalLM.from_pretrained(path, **model_load_kwargs_gaudi(train_args), ...)
    ref_model = ... (only when gaudi_reference_plan(...)["needs_ref_model"])
    trainer = build_gaudi_trainer(training_args=training_args, gaudi_config=gaudi_config, ...)

Mapping (project argument → Gaudi keyword; C = `GaudiDPOConfig` field, G = `GaudiConfig` key,
L = `from_pretrained` keyword, T = `GaudiDPOTrainer.__init__` keyword)

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
--optim                           C optim; ignored when G use_fused_adam (Habana FusedAdamW)
--num_train_epochs / --max_steps  C num_train_epochs / max_steps
--logging_steps                   C logging_steps
--save_steps / --save_total_limit C save_steps / save_total_limit
--eval_steps                      C eval_strategy="steps" + eval_steps (else eval_strategy="no");
                                  transformers 4.55 has `eval_strategy`, not `evaluation_strategy`
--bf16                            C bf16 (hpu_amp autocast without DeepSpeed), G use_torch_autocast,
                                  L torch_dtype=torch.bfloat16
--seed                            C seed (+ optimum.habana.utils.set_seed before model load)
--gradient_checkpointing          C gradient_checkpointing + gradient_checkpointing_kwargs
                                  {"use_reentrant": False}; turns HPU graphs for training off
--deepspeed                       C deepspeed; G use_fused_adam=False; HPU graphs off;
                                  L low_cpu_mem_usage=False under ZeRO-3
--report_to                       C report_to
--dataloader_num_workers          C dataloader_num_workers
--dist_timeout                    C ddp_timeout
--gaudi_config_name               C gaudi_config_name; GaudiConfig.from_pretrained(name)
(always)                          C use_habana=True, use_lazy_mode=True, remove_unused_columns=False,
                                  distribution_strategy="ddp"
--beta                            C beta
--loss_type                       C loss_type (checked against LOSS_TYPES_GAUDI)
--label_smoothing                 C label_smoothing
--max_length                      C max_length (GaudiDPOTrainer pads every pair to it, unless
                                  --length_buckets: then GaudiBucketPadding pads to a bucket)
--length_buckets K                GaudiBucketPadding (here): K bucket lengths chosen from the
                                  tokenised rows; concatenated_inputs pads to the batch's bucket
--max_prompt_length               C max_prompt_length
--max_target_length               C max_target_length (trl 0.9.6 reads it only for
                                  encoder-decoder models; decoder-only responses are cut at
                                  max_length - max_prompt_length, and dpo_dist's data step
                                  applies max_target_length before the trainer sees the rows)
(prompt kept left-truncated)      C truncation_mode="keep_end"
--reference precomputed           C precompute_ref_log_probs=True (not with ZeRO-3: error)
--reference sharded/replicated    C force_use_ref_model=True with --use_peft; T ref_model=<model>
--reference adapter (--use_peft)  T ref_model=None (adapter-disabled policy is the reference)
--use_peft + --lora_*             T peft_config=peft.LoraConfig(...)
tokenizer                         T tokenizer (0.9.6 name; passed on as processing_class)
================================  =============================================================
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

from .args import ArgumentError, DataArguments, ModelArguments, TrainArguments

logger = logging.getLogger(__name__)

# DPO losses that trl 0.9.6's `DPOTrainer.dpo_loss` implements (GaudiDPOTrainer does not override
# dpo_loss), verified in trl-0.9.6/trl/trainer/dpo_trainer.py and equal to the `loss_type`
# Literal of optimum-habana 1.21.2's GaudiDPOConfig. "kto_pair" is NOT supported: both
# DPOConfig.__post_init__ and DPOTrainer.__init__ raise "Support for kto_pair has been removed".
LOSS_TYPES_GAUDI = (
    "sigmoid", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair", "robust", "aot", "aot_pair", "exo_pair",
)

# `--optim` values that Habana's FusedAdamW replaces without changing the algorithm.
_FUSED_ADAM_REPLACES = ("adamw_torch", "adamw_torch_fused", "adamw_hf")

GAUDI_TRAINER_CLASS_NAME = "DpoDistGaudiDPOTrainer"


# --------------------------------------------------------------------------------------------
# Pure helpers (no optimum/habana import; torch only inside model_load_kwargs_gaudi): CPU-tested.
# --------------------------------------------------------------------------------------------


def check_loss_type_gaudi(loss_type: str) -> None:
    """Raise ArgumentError (a ValueError) when trl 0.9.6 / GaudiDPOTrainer has no such loss."""
    if loss_type not in LOSS_TYPES_GAUDI:
        extra = (
            " (trl 0.9.6 removed kto_pair from DPOTrainer; use KTO instead)" if loss_type == "kto_pair" else ""
        )
        raise ArgumentError(
            f"--loss_type {loss_type!r} is not supported on HPU: optimum-habana 1.21.2's GaudiDPOTrainer "
            f"(trl 0.9.6) supports {', '.join(LOSS_TYPES_GAUDI)}{extra}."
        )


def load_deepspeed_config(deepspeed: Any) -> Optional[dict]:
    """The DeepSpeed config given as --deepspeed: a JSON file path, a JSON string or a dict (validated)."""
    from dpo_dist.trainers import read_ds_config

    return read_ds_config(deepspeed)


def deepspeed_zero_stage(deepspeed: Any) -> Optional[int]:
    """ZeRO stage of the --deepspeed config (0 when it has no zero_optimization), None without DeepSpeed."""
    from dpo_dist.trainers import zero_stage_of

    return None if load_deepspeed_config(deepspeed) is None else zero_stage_of(deepspeed)


def gaudi_reference_plan(model_args: ModelArguments, train_args: TrainArguments) -> dict:
    """Where the reference lives on HPU, resolved from --reference, --use_peft and the ZeRO stage.

    Returns {"strategy", "needs_ref_model", "force_use_ref_model", "precompute_ref_log_probs"}.
    `strategy` is one of adapter | sharded | replicated | precomputed. `needs_ref_model` says the
    caller must load a second model and pass it as `ref_model`.

    GaudiDPOTrainer facts (optimum-habana 1.21.2): a separate reference goes through
    `_prepare_deepspeed` under DeepSpeed (sharded under ZeRO-3, stage-0 full copy per card under
    stage 0/1/2) or is wrapped in an HPU graph without DeepSpeed (a full copy per card); with a
    PEFT model and no `ref_model` the adapter-disabled policy is the reference (no memory); a
    separate reference together with a `peft_config` needs `force_use_ref_model=True`;
    `precompute_ref_log_probs` with ZeRO-3 raises.
    """
    stage = deepspeed_zero_stage(train_args.deepspeed)
    zero3 = stage == 3
    strategy = train_args.reference
    if strategy == "auto":
        strategy = "adapter" if model_args.use_peft else ("sharded" if zero3 else "replicated")
    if strategy == "adapter" and not model_args.use_peft:
        raise ArgumentError("--reference adapter needs --use_peft (the reference is the adapter-disabled model).")
    if strategy == "precomputed" and zero3:
        raise ArgumentError(
            "--reference precomputed cannot be used with a ZeRO-3 --deepspeed config on HPU: GaudiDPOTrainer "
            "(trl 0.9.6) raises for precompute_ref_log_probs under ZeRO-3. Use --reference sharded, or a "
            "ZeRO-0/1/2 config."
        )
    if strategy in ("sharded", "replicated"):
        effective = "sharded" if zero3 else "replicated"
        if effective != strategy:
            logger.warning(
                "--reference %s: with %s the separate reference is %s on HPU (GaudiDPOTrainer follows the "
                "ZeRO stage); using %s.",
                strategy,
                "a ZeRO-3 config" if zero3 else "no ZeRO-3 config",
                effective,
                effective,
            )
            strategy = effective
    separate = strategy in ("sharded", "replicated")
    return {
        "strategy": strategy,
        "needs_ref_model": separate,
        "force_use_ref_model": bool(separate and model_args.use_peft),
        "precompute_ref_log_probs": strategy == "precomputed",
    }


def gaudi_trainer_kwargs(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> dict:
    """The DPO keywords of trl 0.9.6 / GaudiDPOTrainer, with their real names.

    Every key exists both as a `GaudiDPOConfig` field and as a `GaudiDPOTrainer.__init__`
    parameter. `gaudi_training_args_kwargs` puts them into the config (the route this adapter
    uses); passing them to the trainer instead would override the config with a warning each.
    """
    check_loss_type_gaudi(train_args.loss_type)
    plan = gaudi_reference_plan(model_args, train_args)
    return {
        "beta": float(train_args.beta),
        "loss_type": train_args.loss_type,
        "label_smoothing": float(train_args.label_smoothing),
        "max_length": int(train_args.max_length),
        "max_prompt_length": int(train_args.max_prompt_length),
        "max_target_length": int(train_args.max_completion_length),
        "truncation_mode": "keep_end",  # prompt left-truncated, as on CPU/CUDA
        "precompute_ref_log_probs": plan["precompute_ref_log_probs"],
        "force_use_ref_model": plan["force_use_ref_model"],
        "generate_during_eval": False,  # True needs wandb in trl 0.9.6
        "disable_dropout": True,
    }


def _report_to(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def gaudi_training_args_kwargs(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments
) -> dict:
    """Keywords for `optimum.habana.trl.GaudiDPOConfig(**kw)` (GaudiTrainingArguments + DPO fields)."""
    stage = deepspeed_zero_stage(train_args.deepspeed)
    use_ds = stage is not None
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
        "save_steps": train_args.save_steps,
        "save_total_limit": train_args.save_total_limit,
        "bf16": bool(train_args.bf16),
        "seed": int(train_args.seed),
        "gradient_checkpointing": bool(train_args.gradient_checkpointing),
        "report_to": _report_to(train_args.report_to),
        "remove_unused_columns": False,  # the DPO collator needs prompt/chosen/rejected columns
        "dataloader_num_workers": int(train_args.dataloader_num_workers),
        "ddp_timeout": int(train_args.dist_timeout),
        # Gaudi
        "use_habana": True,
        "use_lazy_mode": True,  # PT_HPU_LAZY_MODE=1 must also be set before Python starts (backend.env)
        "distribution_strategy": "ddp",
        # HPU graphs for training only work without DeepSpeed and without gradient checkpointing
        # (DESIGN §3; examples/trl/dpo.py). Inference graphs: off under DeepSpeed (same example).
        "use_hpu_graphs_for_training": not use_ds and not train_args.gradient_checkpointing,
        "use_hpu_graphs_for_inference": not use_ds,
    }
    if train_args.eval_steps:
        kw["eval_strategy"] = "steps"
        kw["eval_steps"] = train_args.eval_steps
    else:
        kw["eval_strategy"] = "no"  # dpo_dist evaluates the held-out split once at the end
    if train_args.gradient_checkpointing:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if use_ds:
        kw["deepspeed"] = train_args.deepspeed
    if train_args.gaudi_config_name:
        kw["gaudi_config_name"] = train_args.gaudi_config_name
    kw.update(gaudi_trainer_kwargs(model_args, data_args, train_args))
    return kw


def gaudi_config_kwargs(train_args: TrainArguments) -> dict:
    """Keywords for the built-in `optimum.habana.GaudiConfig(**kw)` (used without --gaudi_config_name).

    FusedAdamW is off under DeepSpeed (DeepSpeed builds its own optimizer; DESIGN §3) and when
    --optim is not an AdamW variant (FusedAdamW would silently replace it). GaudiTrainer itself
    also turns use_torch_autocast off under DeepSpeed (DeepSpeed manages bf16).
    """
    use_ds = deepspeed_zero_stage(train_args.deepspeed) is not None
    return {
        "use_fused_adam": (not use_ds) and train_args.optim in _FUSED_ADAM_REPLACES,
        "use_fused_clip_norm": True,
        "use_torch_autocast": bool(train_args.bf16),
    }


def model_load_kwargs_gaudi(train_args: TrainArguments) -> dict:
    """`from_pretrained` keywords on HPU, for the policy and a separate reference alike.

    low_cpu_mem_usage=False under ZeRO-3 (from_pretrained then runs under deepspeed.zero.Init,
    which needs the training args built first); True otherwise, as in examples/trl/dpo.py.
    """
    kw: dict[str, Any] = {"low_cpu_mem_usage": deepspeed_zero_stage(train_args.deepspeed) != 3}
    if train_args.bf16:
        import torch

        kw["torch_dtype"] = torch.bfloat16
    return kw


def gaudi_model_config_overrides(is_reference: bool = False) -> dict:
    """`model.config` attributes set before training, as examples/trl/dpo.py (v1.21) does."""
    if is_reference:
        return {"use_cache": False}
    return {"use_cache": False, "use_fused_rope": False}


def gaudi_trainer_call_kwargs(
    *,
    training_args: Any,
    gaudi_config: Any,
    model: Any,
    ref_model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any,
    peft_config: Any,
    callbacks: Optional[list],
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainArguments,
) -> dict:
    """The keywords `build_gaudi_trainer` gives `GaudiDPOTrainer(...)`; checks the reference wiring."""
    plan = gaudi_reference_plan(model_args, train_args)
    zero3 = deepspeed_zero_stage(train_args.deepspeed) == 3
    if model_args.use_peft and peft_config is None:
        raise ValueError("--use_peft: build_gaudi_trainer needs a peft_config (peft.LoraConfig).")
    if not model_args.use_peft and peft_config is not None:
        raise ValueError("A peft_config was given without --use_peft.")
    if plan["needs_ref_model"]:
        if ref_model is None and (model_args.use_peft or zero3):
            raise ValueError(
                f"--reference {plan['strategy']}: load the reference model (AutoModelForCausalLM.from_pretrained "
                "with model_load_kwargs_gaudi) and pass it as ref_model; "
                + (
                    "without it GaudiDPOTrainer would silently use the adapter-disabled policy."
                    if model_args.use_peft
                    else "trl 0.9.6's create_reference_model() refuses ZeRO-3."
                )
            )
    elif ref_model is not None:
        raise ValueError(
            f"--reference {plan['strategy']}: do not load a separate reference model "
            + (
                "(the adapter-disabled policy is the reference)."
                if plan["strategy"] == "adapter"
                else "(the policy's own log-probs before training are precomputed)."
            )
        )
    kw = {
        "model": model,
        "ref_model": ref_model,
        "args": training_args,
        "gaudi_config": gaudi_config,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "tokenizer": tokenizer,
        "peft_config": peft_config,
    }
    if callbacks:
        kw["callbacks"] = list(callbacks)
    return kw


def count_real_tokens_gaudi(batch: dict) -> int:
    """Real (unpadded) tokens a trl-0.9.6-style DPO batch puts through the policy.

    In trl 0.9.6 `tokenize_row` builds `chosen_attention_mask = prompt_attention_mask +
    response_attention_mask` (same for rejected), so the prompt is counted once in each of the two
    sequences, which is what the model computes. The collator pads masks with 0 and
    GaudiDPOTrainer pads to max_length with 0 too, so padding is never counted.
    `prompt_attention_mask` is not added (it duplicates the prompt part).
    """
    total = 0
    for key in ("chosen_attention_mask", "rejected_attention_mask"):
        if key not in batch:
            raise KeyError(f"count_real_tokens_gaudi: batch has no {key!r} (keys: {sorted(batch)}).")
        total += _mask_sum(batch[key])
    return total


def _mask_sum(mask: Any) -> int:
    if isinstance(mask, (list, tuple)):
        return sum(_mask_sum(m) for m in mask)
    if hasattr(mask, "sum"):  # torch tensor / numpy array
        s = mask.sum()
        return int(s.item() if hasattr(s, "item") else s)
    return int(mask)


# --------------------------------------------------------------------------------------------
# HPU-only builders: these import optimum.habana (needs habana_frameworks).
# --------------------------------------------------------------------------------------------


def build_gaudi_training_args(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments):
    """Build `(GaudiDPOConfig, GaudiConfig)`. MUST be called BEFORE any model is loaded.

    Why first (DESIGN.md §3): `adapt_transformers_to_gaudi()` replaces transformers' modeling
    classes (LlamaForCausalLM → GaudiLlamaForCausalLM, Gemma3ForCausalLM → GaudiGemma3ForCausalLM,
    ...), so a model loaded earlier is the unpatched class; and under ZeRO-3 the args object
    registers the DeepSpeed config (a weak reference) that makes `from_pretrained` shard weights
    with `deepspeed.zero.Init` — keep the returned args alive while loading models.
    GaudiTrainingArguments calls `adapt_transformers_to_gaudi()` itself when `use_habana=True`
    (in `_setup_devices`); it is also called here explicitly first (it is idempotent).
    Also seeds python/numpy/torch/HPU RNGs (`optimum.habana.utils.set_seed`) so LoRA init is
    reproducible (DESIGN §6 trap).
    """
    check_loss_type_gaudi(train_args.loss_type)
    lazy = os.environ.get("PT_HPU_LAZY_MODE")
    if lazy is None and "habana_frameworks.torch" not in sys.modules:
        os.environ["PT_HPU_LAZY_MODE"] = lazy = "1"  # still in time: habana_frameworks reads it at import
    if lazy != "1":
        raise RuntimeError(
            f"PT_HPU_LAZY_MODE={lazy!r}, but the HPU trainer runs in lazy mode (use_lazy_mode=True) and "
            "SynapseAI >= 1.21 defaults to eager. Set PT_HPU_LAZY_MODE=1 before Python starts (the dpo_dist "
            "launcher does; backend.Backend.env lists the variables)."
        )
    from optimum.habana import GaudiConfig  # noqa: PLC0415 (HPU only)
    from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi  # noqa: PLC0415
    from optimum.habana.trl import GaudiDPOConfig  # noqa: PLC0415
    from optimum.habana.utils import set_seed  # noqa: PLC0415

    adapt_transformers_to_gaudi()
    training_args = GaudiDPOConfig(**gaudi_training_args_kwargs(model_args, data_args, train_args))
    set_seed(training_args.seed)

    if train_args.gaudi_config_name:
        gaudi_config = GaudiConfig.from_pretrained(train_args.gaudi_config_name)
        if train_args.deepspeed and getattr(gaudi_config, "use_fused_adam", False):
            logger.warning(
                "--gaudi_config_name %s sets use_fused_adam=true; turning it off under DeepSpeed (DESIGN §3).",
                train_args.gaudi_config_name,
            )
            gaudi_config.use_fused_adam = False
    else:
        gaudi_config = GaudiConfig(**gaudi_config_kwargs(train_args))
    return training_args, gaudi_config


def build_gaudi_trainer(
    *,
    training_args,
    gaudi_config,
    model,
    ref_model,
    tokenizer,
    train_dataset,
    eval_dataset,
    peft_config,
    callbacks=None,
    trainer_cls_mixin=None,
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainArguments,
):
    """Construct `optimum.habana.trl.GaudiDPOTrainer` (or a subclass mixing in `trainer_cls_mixin`).

    `training_args`/`gaudi_config` come from `build_gaudi_training_args` (called before the models
    were loaded). The DPO keywords are already in `training_args`; the trainer gets objects only.
    `train_dataset`/`eval_dataset` are `datasets.Dataset`s with string columns prompt / chosen /
    rejected (GaudiDPOTrainer tokenizes them with trl 0.9.6's `tokenize_row`).
    Note: GaudiTrainer sets `training_args.bf16 = False` in place when it takes over autocast
    (bf16 without DeepSpeed): read bf16 from train_args, not from training_args, afterwards.
    """
    from optimum.habana.trl import GaudiDPOTrainer  # noqa: PLC0415 (HPU only)

    kw = gaudi_trainer_call_kwargs(
        training_args=training_args,
        gaudi_config=gaudi_config,
        model=model,
        ref_model=ref_model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        callbacks=callbacks,
        model_args=model_args,
        data_args=data_args,
        train_args=train_args,
    )
    for m, is_ref in ((model, False), (ref_model, True)):
        if m is not None and getattr(m, "config", None) is not None:
            for key, value in gaudi_model_config_overrides(is_ref).items():
                setattr(m.config, key, value)
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        logger.info("Tokenizer has no pad token; using eos as pad (DPO collator needs one).")
        tokenizer.pad_token = tokenizer.eos_token

    bases = (GaudiBucketPadding, GaudiDPOTrainer)
    if trainer_cls_mixin is not None:
        bases = (trainer_cls_mixin, *bases)
    # trl 0.9.6 batches: chosen/rejected masks already include the prompt.
    cls = type(GAUDI_TRAINER_CLASS_NAME, bases, {"token_counter": staticmethod(count_real_tokens_gaudi),
                                                 "dpodist_fed_tokens": gaudi_fed_tokens})
    trainer = cls(**kw)
    k = int(getattr(train_args, "length_buckets", 0) or 0)
    if k > 0:  # GaudiDPOTrainer tokenised the rows in __init__ (trl 0.9.6 tokenize_row: prompt + response)
        trainer.dpodist_pad_lengths, frac = gaudi_pad_lengths(trainer.train_dataset, k, trainer.max_length)
        logger.info("length buckets (%d, HPU): %s; padding %.1f%% (rows padded to their bucket; max_length %d "
                    "would pad %.1f%%)", len(trainer.dpodist_pad_lengths), trainer.dpodist_pad_lengths, 100 * frac,
                    trainer.max_length, 100 * max_length_padding(trainer.train_dataset, trainer.max_length))
    return trainer


def _gaudi_row_lengths(dataset) -> list[int]:
    return [len(x) for x in dataset["chosen_input_ids"]] + [len(x) for x in dataset["rejected_input_ids"]]


def gaudi_pad_lengths(dataset, k: int, max_length: int) -> tuple[list[int], float]:
    """(at most k bucket lengths, the padding they give) for a trl-0.9.6-tokenised dataset (full rows)."""
    from dpo_dist.bucketing import choose_buckets, padding_fraction

    lengths = [min(x, max_length) for x in _gaudi_row_lengths(dataset)]
    buckets = choose_buckets(lengths, k)
    return buckets, padding_fraction(lengths, buckets)


def max_length_padding(dataset, max_length: int) -> float:
    from dpo_dist.bucketing import padding_fraction

    return padding_fraction([min(x, max_length) for x in _gaudi_row_lengths(dataset)], [max_length])


class GaudiBucketPadding:
    """Mixed in front of `GaudiDPOTrainer`: pad each batch to the smallest bucket length that holds its
    longest row, instead of to `max_length`.

    Hand-written override of one call: optimum-habana 1.21.2's `GaudiDPOTrainer.concatenated_forward`
    calls `self.concatenated_inputs(batch, ..., padded_max_length=self.max_length)` and pads chosen and
    rejected rows to that width (static shapes: one graph, but on long-tailed data mostly padding).
    With K buckets (`gaudi_pad_lengths`) there are at most K shapes, so at most K graph compilations,
    and far less padding. Without buckets it is the upstream call, unchanged.
    """

    dpodist_pad_lengths: Optional[list] = None

    def concatenated_inputs(self, batch, **kwargs):
        if self.dpodist_pad_lengths and kwargs.get("padded_max_length"):
            kwargs["padded_max_length"] = bucket_pad_length(batch, self.dpodist_pad_lengths)
        return super().concatenated_inputs(batch, **kwargs)


def gaudi_fed_tokens(trainer, batch) -> int:
    """Real + padding tokens of one trl-0.9.6 batch as GaudiDPOTrainer runs it: 2b rows of the padded width."""
    width = bucket_pad_length(batch, trainer.dpodist_pad_lengths) if trainer.dpodist_pad_lengths else trainer.max_length
    return 2 * int(batch["chosen_input_ids"].shape[0]) * width


def bucket_pad_length(batch, buckets) -> int:
    """Width a trl-0.9.6 batch is padded to: the bucket of its longest chosen/rejected row (never narrower)."""
    from dpo_dist.bucketing import bucket_of

    longest = max(int(batch["chosen_input_ids"].shape[1]), int(batch["rejected_input_ids"].shape[1]))
    return max(longest, bucket_of(longest, buckets))
