"""The one argument set of dpo-dist's rank entry (`python -m dpo_dist.dpo`).

Three dataclasses parsed with `transformers.HfArgumentParser`, in the style of TRL's
`trl/scripts/dpo.py`. The names keep the contract of the seed scripts this project grew from
(`dpo.py --model_name_or_path ... --beta ... --use_peft`); the trainer adapter (`dpo_dist.train.trl_trainer`)
maps them onto trl 0.22's `DPOConfig` on CPU/CUDA and onto optimum-habana's `GaudiDPOConfig`
(trl 0.9.6 style) on HPU.

Options can also come from a YAML recipe: `--config recipes/llama3-8b.yaml`; values given
on the command line win over the recipe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields

from dpo_dist.train.losses import LOSS_TYPES  # every loss type, on every backend (the engine computes the loss)
from dpo_dist.train.reference import REFERENCE_CHOICES  # the planner's words for where the reference lives
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.hfargs import hf_argument_parser
from dpo_dist.util.tracking import check_report_to


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of the model to align (required: there are no default models)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer hub id or folder; defaults to the model's."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template for conversational data (and saved with the trained model): a .jinja file, a "
                  "tokenizer_config.json / tokenizer folder, one of the tokenizer's named templates, or a built-in "
                  "name (llama3, gemma3, qwen2, hh). Default: the tokenizer's own."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention implementation; default per family (eager for Gemma 3, sdpa otherwise)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the hub."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters; the reference is the adapter-disabled model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names for LoRA; default per family (all attention and MLP projections)."},
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="Anthropic/hh-rlhf",
        metadata={"help": "Hub dataset name, or a local .json/.jsonl/.parquet file or folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration / data_dir on the hub."})
    dataset_columns: str | None = field(
        default=None,
        metadata={"help": "Map the dataset's columns onto the canonical ones, e.g. "
                  "prompt=question,chosen=response_j,rejected=response_k[,system=system]. Default: detected "
                  "(prompt/chosen/rejected, hh-rlhf, conversational, Intel/orca_dpo_pairs, "
                  "lvwerra/stack-exchange-paired, HuggingFaceH4/ultrafeedback_binarized)."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split; carved from train when absent."})
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Held-out fraction carved (seeded) from train when the dataset has no test split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training pairs."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "Keep at most this many held-out pairs."})
    overlong: str = field(
        default="truncate",
        metadata={"help": "Rows over the length limits: 'truncate' (as TRL: the prompt keeps its last max_prompt_length "
                  "tokens, then the responses are cut at their end) or 'drop' (every row the trainer would cut).",
                  "choices": ["truncate", "drop"]},
    )


@dataclass
class TrainArguments:
    output_dir: str = field(default="dpo_output", metadata={"help": "Where checkpoints, the model and metrics go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."}
    )
    device: str = field(default="auto", metadata={"help": "auto, hpu, cuda or cpu.", "choices": ["auto", "hpu", "cuda", "cpu"]})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (see ds_configs/)."})
    reference: str = field(
        default="auto",
        metadata={
            "help": "Where the reference model lives: adapter (LoRA, adapter off), sharded/replicated (a second "
            "model), precomputed (log-probs computed once before training). auto picks adapter with --use_peft, "
            "otherwise a second model.",
            "choices": list(REFERENCE_CHOICES),
        },
    )
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Pairs per card per micro-step."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Pairs per card for evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "HF scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    optim: str = field(default="adamw_torch", metadata={"help": "HF optimizer name."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training pairs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (overrides epochs)."})
    max_length: int = field(default=512, metadata={"help": "Max tokens of prompt + response."})
    max_prompt_length: int = field(default=128, metadata={"help": "Max prompt tokens (left-truncated)."})
    max_target_length: int | None = field(
        default=None, metadata={"help": "Max response tokens; default max_length - max_prompt_length."}
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta (strength of the KL penalty)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO loss: " + ", ".join(LOSS_TYPES)})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing (cDPO / robust)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 (default on HPU recipes)."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, LoRA init and dropout."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: only at the end)."})
    report_to: str = field(default="none", metadata={
        "help": "Experiment trackers, comma-separated: none, tensorboard (event files under <output_dir>/runs/; "
                "`make tensorboard RUN_DIR=...`), mlflow, wandb, comet_ml, ... A tracker that is not installed is "
                "refused before anything loads."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader workers per rank."})
    dist_timeout: int = field(
        default=1800,
        metadata={"help": "Seconds a collective may wait (e.g. for a rank that hangs or died) before the run fails: "
                  "the process group's timeout (ddp_timeout)."},
    )
    no_merge: bool = field(default=False, metadata={"help": "Skip the post-step merge into <output_dir>_merged."})
    diagnostics: bool = field(
        default=False,
        metadata={"help": "Also write diagnostics.json (reference log-probs before/after, shard sizes) for verification."},
    )
    chunked_logps: bool = field(
        default=True,
        metadata={"help": "Compute log-probs from the last hidden states in chunks, never materialising the full "
                  "[2b, s, V] logits (trl path; falls back to TRL's forward where unsupported). --no_chunked_logps: off."},
    )
    length_buckets: int = field(
        default=0,
        metadata={"help": "Pad rows to at most K bucket lengths chosen from the data to minimise padding (static "
                  "shapes); 0 = off (TRL pads each batch to its longest row). 8 is a good value."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Run the chosen and rejected rows of a micro-batch as ONE packed row (position ids restart "
                  "per row, attention stays inside each row), padded once to one of --length_buckets totals "
                  "(cpu/cuda; like TRL's padding_free without flash-attention 2, and with static shapes)."},
    )
    share_prompt: bool = field(
        default=True,
        metadata={"help": "With --packing: a pair whose two rows keep their whole prompt runs it once in the packed "
                  "row (prompt + chosen + rejected; the rejected part attends to the prompt, never to the chosen "
                  "part), for the same log-probs with less work. --no_share_prompt: each row carries its prompt."},
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where --reference precomputed keeps reference log-probs (default "
                  "$DPO_DIST_CACHE/refcache or .cache/dpo-dist/refcache)."},
    )
    throughput_warmup_steps: int = field(
        default=3,
        metadata={"help": "Optimizer steps left out of the steady-state pairs/s and tokens/s (as optimum-habana's "
                  "flag of the same name); steps that meet a new batch shape on a graph-compiling device are "
                  "left out too."},
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; leave it alone."})
    gaudi_config_name: str | None = field(
        default=None, metadata={"help": "HPU only: GaudiConfig hub id or file (default: built in)."}
    )

    @property
    def max_completion_length(self) -> int:
        return self.max_target_length or (self.max_length - self.max_prompt_length)


ARG_DATACLASSES = (ModelArguments, DataArguments, TrainArguments)

# The options only the DPO entry reads: the SFT entry (dpo_dist.train.sft) shares the argument set and refuses
# these by name instead of ignoring them (parse_args(task="sft")), and skips their checks in validate.
DPO_ONLY_OPTIONS = (
    "beta", "loss_type", "label_smoothing", "reference", "max_prompt_length", "max_target_length", "overlong",
    "chunked_logps", "length_buckets", "packing", "share_prompt", "ref_cache_dir", "diagnostics",
)
TASKS = ("dpo", "sft")


def validate(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments, *,
             task: str = "dpo") -> None:
    """Checks that need no I/O. Raises ArgumentError naming the argument and the fix. ``task`` 'sft' skips the
    checks of DPO_ONLY_OPTIONS (SFT does not read them)."""
    if not model_args.model_name_or_path:
        raise ArgumentError(
            "--model_name_or_path is required: there are no default models. Pass a hub id "
            "(e.g. google/gemma-3-270m) or a local model folder (e.g. the tiny default from "
            "`python -m dpo_dist.tiny`)."
        )
    if not train_args.learning_rate > 0:
        raise ArgumentError(f"--learning_rate must be > 0 (got {train_args.learning_rate}).")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(train_args, name) < 1:
            raise ArgumentError(f"--{name} must be a positive integer (got {getattr(train_args, name)}).")
    if train_args.max_length < 1:
        raise ArgumentError(f"--max_length must be a positive number of tokens (got {train_args.max_length}).")
    if not 0 < data_args.eval_fraction < 1:
        raise ArgumentError(f"--eval_fraction must be in (0, 1) (got {data_args.eval_fraction}).")
    for name in ("max_train_samples", "max_eval_samples"):
        v = getattr(data_args, name)
        if v is not None and v < 1:
            raise ArgumentError(f"--{name} must be positive (got {v}).")
    if train_args.dist_timeout < 1:
        raise ArgumentError(
            f"--dist_timeout must be a positive number of seconds (got {train_args.dist_timeout}); it bounds how long "
            "a collective waits for a rank that is gone (default 1800)."
        )
    check_report_to(train_args.report_to)  # a tracker that is not installed: refused here, not after the data loads
    if train_args.throughput_warmup_steps < 0:
        raise ArgumentError(f"--throughput_warmup_steps must be 0 or more (got {train_args.throughput_warmup_steps}).")
    if model_args.lora_r < 1 or model_args.lora_alpha < 1:
        raise ArgumentError("--lora_r and --lora_alpha must be positive integers.")
    if task == "dpo":
        _validate_dpo(model_args, train_args)


def _validate_dpo(model_args: ModelArguments, train_args: TrainArguments) -> None:
    """The checks of DPO_ONLY_OPTIONS."""
    if train_args.loss_type not in LOSS_TYPES:
        raise ArgumentError(
            f"--loss_type {train_args.loss_type!r} is not a known DPO loss. Choose one of: {', '.join(LOSS_TYPES)}."
        )
    if not train_args.beta > 0:
        raise ArgumentError(f"--beta must be > 0 (got {train_args.beta}); typical values are 0.05-0.5.")
    if train_args.max_prompt_length < 1:
        # prompt_ids[-0:] would keep the whole prompt: 0 cannot mean "no prompt"
        raise ArgumentError(f"--max_prompt_length must be a positive number of tokens (got {train_args.max_prompt_length}).")
    if train_args.max_prompt_length >= train_args.max_length:
        raise ArgumentError(
            f"--max_prompt_length ({train_args.max_prompt_length}) must be smaller than --max_length "
            f"({train_args.max_length}), to leave room for the response."
        )
    if train_args.max_target_length is not None and train_args.max_target_length < 1:
        raise ArgumentError(f"--max_target_length must be positive (got {train_args.max_target_length}).")
    if train_args.reference == "adapter" and not model_args.use_peft:
        raise ArgumentError("--reference adapter needs --use_peft (the reference is the adapter-disabled model).")
    if train_args.packing and not train_args.chunked_logps:
        raise ArgumentError("--packing needs --chunked_logps (on by default): drop --no_chunked_logps or --packing.")
    if train_args.packing and model_args.attn_implementation not in (None, "sdpa", "eager"):
        raise ArgumentError(f"--packing runs on sdpa or eager attention, not --attn_implementation "
                            f"{model_args.attn_implementation}: drop one of the two flags.")
    if train_args.length_buckets < 0:
        raise ArgumentError(f"--length_buckets must be 0 (off) or a positive number of shapes (got "
                            f"{train_args.length_buckets}); 8 is a good value.")


_UNSET = object()
# A recipe's block for `python -m launch train --recipe` (launch/recipes.py: the planner's choices); the ranks skip it.
RECIPE_LAUNCH_KEY = "launch"


def _refuse_dpo_only(parser, argv: list[str], recipe: dict, config_path: str | None) -> None:
    """SFT: a DPO-only option given on the command line (any spelling argparse accepts: `--beta=1`, `--no_packing`,
    an abbreviation) or in the recipe is an ArgumentError naming it. Found by parsing once more with those options
    defaulting to a marker, so that a flag given with its default value is caught too."""
    named = [k for k in DPO_ONLY_OPTIONS if k in recipe]
    if named:
        raise ArgumentError(
            f"--config {config_path}: {named[0]!r} is a DPO option; the SFT step does not use it. Fix: remove it from "
            "the SFT recipe (it belongs in the DPO one)."
        )
    parser.set_defaults(**dict.fromkeys(DPO_ONLY_OPTIONS, _UNSET))
    ns, _ = parser.parse_known_args(args=argv)
    given = [k for k in DPO_ONLY_OPTIONS if getattr(ns, k, _UNSET) is not _UNSET]
    if given:
        k = given[0]
        flag = next((w.split("=", 1)[0] for w in argv if w.split("=", 1)[0] in (f"--{k}", f"--no_{k}")), f"--{k}")
        raise ArgumentError(
            f"{flag} is a DPO option; the SFT step (python -m dpo_dist.sft) does not use it. Fix: drop {flag} from "
            "the SFT command (pass it to the DPO step, python -m dpo_dist.dpo)."
        )


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise ArgumentError("--config needs a YAML file path.")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if a.startswith("--config="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def parse_args(argv: list[str] | None = None, dataclass_types=ARG_DATACLASSES, *, task: str = "dpo"):
    """Parse argv (default sys.argv[1:]) into the argument dataclasses.

    A YAML recipe given with `--config` supplies defaults; explicit flags win.
    Unknown flags and unknown recipe keys are errors that name them; with ``task`` 'sft', so are DPO_ONLY_OPTIONS.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config_flag(argv)
    parser = hf_argument_parser()(dataclass_types)
    recipe: dict = {}
    if config_path:
        try:
            with open(config_path) as fh:
                recipe = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ArgumentError(f"--config {config_path}: cannot read the recipe ({e.strerror}).") from e
        except yaml.YAMLError as e:
            raise ArgumentError(f"--config {config_path}: not valid YAML ({e}).") from e
        if not isinstance(recipe, dict):
            raise ArgumentError(f"--config {config_path}: expected a mapping of argument names to values.")
        recipe.pop(RECIPE_LAUNCH_KEY, None)  # the launcher's block of a generated recipe (launch/recipes.py)
        known = {f.name for dc in dataclass_types for f in fields(dc)}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ArgumentError(f"--config {config_path}: unknown keys {unknown}. Known keys are the dpo.py flags.")
        parser.set_defaults(**recipe)
    if task == "sft":
        _refuse_dpo_only(hf_argument_parser()(dataclass_types), argv, recipe, config_path)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise ArgumentError(f"unknown arguments {remaining}; run `python -m dpo_dist.dpo --help` for the list.")
    return tuple(parsed)
