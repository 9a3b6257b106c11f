"""Base vs DPO: held-out preference metrics and side-by-side generations → JSON + report with plots.

    python -m dpo_dist.compare_base_vs_dpo --base_model runs/demo/sft_dpo_init_merged \
        --finetuned_model runs/demo/dpo_sanity_merged --seed 42 --greedy \
        --output_json runs/demo/dpo_comparison_results.json

The seed's flags (`--base_model --finetuned_model --seed --greedy --output_json`) and its JSON keys
(`comparisons[*].prompt`, `results.Base.response`, `results.DPO.response`, `total_duration_sec`) are
kept; the metrics go beside them under `metrics`, the arguments under `config`.

What is measured, on the held-out pairs of the same data and split training used
(`dpo_dist.data.preference.load_preference_splits` + `with_bos`: the same schema mapping and chat template),
both models in fp32 under no_grad:

* per model: `preference_accuracy` (log p(chosen | prompt) > log p(rejected | prompt)), its per-token
  (length-normalised) variant, the mean log-prob margin, and `mean_response_length` of its generations;
* DPO against base: `reward_accuracy` and `reward_margin_mean` of the implicit DPO reward
  β·(log π_DPO − log π_base), and `kl_estimate`, a Monte-Carlo estimate of KL(π_DPO ‖ π_base) **per
  response** (responses sampled from the DPO model at temperature 1; mean of Σ_t log π_DPO − log π_base).

Only one model is in memory at a time (DPO first, then base).

Exit codes: 0 ok, 2 bad arguments (nothing is written), 1 any other failure.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpo_dist.args import DataArguments
from dpo_dist.data.chat_templates import apply_chat_template_arg
from dpo_dist.data.preference import load_preference_splits, with_bos
from dpo_dist.model.loader import load_eval_model, load_tokenizer_from
from dpo_dist.post.generate import (
    check_model_source,
    check_tokenizer_fits,
    check_tokenizer_source,
    encode_prompt,
    generate_responses,
    resolve_device,
    validate_sampling,
)
from dpo_dist.post.report import (
    curves_from_log_history,
    curves_from_losses,
    length_bias_note,
    plot_accuracy,
    plot_lengths,
    plot_training_curves,
    render_markdown,
)
from dpo_dist.util.atomic import write_atomic, write_json_atomic
from dpo_dist.util.errors import ArgumentError, UserError
from dpo_dist.util.hfargs import parse_dataclasses
from dpo_dist.util.layout import METRICS_FILE, TRAINER_STATE
from dpo_dist.util.logs import setup_logging
from dpo_dist.util.tracking import check_report_to, flat_scalars, log_comparison, tracker_names

logger = logging.getLogger("dpo_dist.compare")

PROG = "python -m dpo_dist.compare_base_vs_dpo"


@dataclass
class CompareArguments:
    base_model: str | None = field(default=None, metadata={"help": "Base (reference) model: hub id or local folder (required)."})
    finetuned_model: str | None = field(default=None, metadata={"help": "DPO model: hub id or local folder (required)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer for both models; defaults to the base model's."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for sampled generations and the KL samples."})
    greedy: bool = field(default=False, metadata={"help": "Greedy decoding for the side-by-side generations (deterministic)."})
    dataset_name: str = field(
        default="Anthropic/hh-rlhf", metadata={"help": "Preference data, as for training: hub name, local file or folder."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration / data_dir on the hub."})
    dataset_columns: str | None = field(
        default=None, metadata={"help": "Column mapping, as in training (e.g. prompt=question,chosen=response_j,rejected=response_k)."}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat template for conversational data, as in training; default: the tokenizer's own."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split (a test split is carved from it when absent)."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out fraction when there is no test split (as in training)."})
    data_seed: int = field(
        default=42, metadata={"help": "Seed of the held-out carve when there is no test split: the training --seed."}
    )
    max_eval_samples: int = field(default=200, metadata={"help": "Held-out pairs to score."})
    num_prompts: int = field(default=5, metadata={"help": "Prompts shown side by side (the first of the generation prompts)."})
    num_gen_prompts: int = field(
        default=32, metadata={"help": "Held-out prompts each model generates for (response lengths) and the KL samples use."}
    )
    max_length: int = field(default=512, metadata={"help": "Max tokens of prompt + response (as in training)."})
    max_prompt_length: int = field(default=128, metadata={"help": "Max prompt tokens, left-truncated (as in training)."})
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per generation at most."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature for the side-by-side generations."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus mass for the side-by-side generations."})
    beta: float | None = field(
        default=None, metadata={"help": "DPO beta for the implicit reward; default: the training run's (training_metrics.json), else 0.1."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward / generate call."})
    output_json: str = field(default="dpo_comparison_results.json", metadata={"help": "Results file."})
    report: str | None = field(
        default=None, metadata={"help": "Markdown report; default dpo_comparison_report.md next to --output_json. Plots go beside it."}
    )
    no_report: bool = field(default=False, metadata={"help": "Write only the JSON."})
    training_dir: str | None = field(
        default=None,
        metadata={"help": "The DPO run's output_dir, for the loss/reward curves (newest checkpoint-*/trainer_state.json, "
                          "else training_metrics.json). Default: --finetuned_model, then its name without _merged."},
    )
    device: str = field(default="auto", metadata={"help": "auto, hpu, cuda or cpu.", "choices": ["auto", "hpu", "cuda", "cpu"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the hub."})
    report_to: str = field(
        default="none",
        metadata={"help": "Trackers for the metrics and plots, as training's --report_to: none, tensorboard, mlflow, "
                          "wandb (comma-separated). A tracker that is not installed is refused before anything loads."},
    )
    logging_dir: str | None = field(
        default=None, metadata={"help": "TensorBoard event folder; default runs/compare beside --output_json."}
    )

    @property
    def max_completion_length(self) -> int:
        return self.max_length - self.max_prompt_length

    def report_path(self) -> Path:
        if self.report:
            return Path(self.report).expanduser()
        return Path(self.output_json).expanduser().parent / "dpo_comparison_report.md"


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------

def _check_writable_file(path: Path, flag: str) -> None:
    if path.exists() and path.is_dir():
        raise ArgumentError(f"{flag} {path}: is a folder; give a file path.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(f"{flag} {path}: {parent} is not a writable folder; choose another path.")


def validate(a: CompareArguments) -> None:
    """Checks with no side effects; raises ArgumentError naming the flag and the fix."""
    if not a.base_model:
        raise ArgumentError("--base_model is required: the model DPO started from (hub id or local folder).")
    if not a.finetuned_model:
        raise ArgumentError("--finetuned_model is required: the DPO-trained model folder (e.g. <output_dir>_merged).")
    check_model_source(a.base_model, "--base_model")
    check_model_source(a.finetuned_model, "--finetuned_model")
    if a.tokenizer_name_or_path:
        check_tokenizer_source(a.tokenizer_name_or_path, "--tokenizer_name_or_path")
    name = a.dataset_name
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise ArgumentError(f"--dataset_name {name}: no such file or folder. Check the path.")
    if a.training_dir and not os.path.isdir(os.path.expanduser(a.training_dir)):
        raise ArgumentError(f"--training_dir {a.training_dir}: no such folder; pass the DPO run's --output_dir.")
    validate_sampling(a.max_new_tokens, a.temperature, a.top_p, a.greedy)
    for flag in ("max_eval_samples", "num_gen_prompts", "batch_size", "max_length", "max_prompt_length"):
        if getattr(a, flag) < 1:
            raise ArgumentError(f"--{flag} must be a positive integer (got {getattr(a, flag)}).")
    if a.num_prompts < 0:
        raise ArgumentError(f"--num_prompts must be >= 0 (got {a.num_prompts}).")
    if a.max_prompt_length >= a.max_length:
        raise ArgumentError(f"--max_prompt_length ({a.max_prompt_length}) must be smaller than --max_length ({a.max_length}).")
    if a.beta is not None and not a.beta > 0:
        raise ArgumentError(f"--beta must be > 0 (got {a.beta}).")
    if not 0 < a.eval_fraction < 1:
        raise ArgumentError(f"--eval_fraction must be in (0, 1) (got {a.eval_fraction}).")
    check_report_to(a.report_to)
    _check_writable_file(Path(a.output_json).expanduser(), "--output_json")
    if not a.no_report:
        _check_writable_file(a.report_path(), "--report")


# --------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------

def encode_pairs(rows, tokenizer, *, max_prompt_length: int, max_completion_length: int):
    """Token ids as trl's DPOTrainer builds them: prompt (BOS text already in front, no specials) left-truncated,
    responses + EOS right-truncated. Returns (prompt_ids, chosen_ids, rejected_ids) lists."""
    eos = tokenizer.eos_token_id
    prompts, chosen, rejected = [], [], []
    for r in rows:
        prompts.append(encode_prompt(tokenizer, r["prompt"])[-max_prompt_length:])
        chosen.append((tokenizer(r["chosen"], add_special_tokens=False)["input_ids"] + [eos])[:max_completion_length])
        rejected.append((tokenizer(r["rejected"], add_special_tokens=False)["input_ids"] + [eos])[:max_completion_length])
    return prompts, chosen, rejected


def sequence_logps(model, items: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int, batch_size: int = 8) -> list[float]:
    """Σ log p(response_t | prompt, response_<t) for each (prompt_ids, response_ids), fp32, no grad.

    Batches are formed from length-sorted items (less padding) and right-padded; the result keeps
    the input order. Empty responses score 0.
    """
    import torch  # deferred: torch takes seconds to import; argument errors do not need it

    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    out = [0.0] * len(items)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [list(items[i][0]) + list(items[i][1]) for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        resp = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, (i, s) in enumerate(zip(idx, seqs)):
            ids[row, :len(s)] = torch.tensor(s)
            attn[row, :len(s)] = 1
            resp[row, len(items[i][0]):len(s)] = True
        ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:]
            tok_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            sums = (tok_logp * resp[:, 1:]).sum(-1).double().cpu().tolist()
        del logits
        for i, v in zip(idx, sums):
            out[i] = v
    return out


# --------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------

def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _stderr(xs: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def preference_metrics(chosen: Sequence[float], rejected: Sequence[float], chosen_len: Sequence[int],
                       rejected_len: Sequence[int]) -> dict:
    """One model's view of the pairs: how often it puts chosen above rejected (ties are misses)."""
    n = len(chosen)
    norm_c = [c / max(n_tok, 1) for c, n_tok in zip(chosen, chosen_len)]
    norm_r = [r / max(n_tok, 1) for r, n_tok in zip(rejected, rejected_len)]
    return {
        "num_pairs": n,
        "preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "preference_accuracy_length_normalized": sum(c > r for c, r in zip(norm_c, norm_r)) / n,
        "logp_chosen_mean": _mean(chosen),
        "logp_rejected_mean": _mean(rejected),
        "logp_margin_mean": _mean([c - r for c, r in zip(chosen, rejected)]),
        "logp_per_token_chosen_mean": _mean(norm_c),
        "logp_per_token_rejected_mean": _mean(norm_r),
    }


def reward_metrics(ft_chosen, ft_rejected, base_chosen, base_rejected, beta: float) -> dict:
    """Implicit DPO reward r = β·(log π_ft − log π_base), as the trainer's rewards/* logs."""
    rc = [beta * (f - b) for f, b in zip(ft_chosen, base_chosen)]
    rr = [beta * (f - b) for f, b in zip(ft_rejected, base_rejected)]
    margins = [c - r for c, r in zip(rc, rr)]
    return {
        "num_pairs": len(margins),
        "beta": beta,
        "reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin_mean": _mean(margins),
        "reward_chosen_mean": _mean(rc),
        "reward_rejected_mean": _mean(rr),
    }


def kl_metrics(ft_logps: Sequence[float], base_logps: Sequence[float], lengths: Sequence[int]) -> dict:
    """Monte-Carlo KL(π_ft ‖ π_base) from responses y ~ π_ft: mean over y of Σ_t log π_ft − log π_base."""
    diffs = [f - b for f, b in zip(ft_logps, base_logps)]
    tokens = sum(lengths)
    return {
        "kl_estimate": _mean(diffs),
        "kl_estimate_stderr": _stderr(diffs),
        "kl_per_token": (sum(diffs) / tokens) if tokens else None,
        "kl_num_samples": len(diffs),
        "kl_estimate_unit": "nats per response",
        "kl_note": "Monte-Carlo estimate of KL(DPO || base) per response: responses sampled from the DPO model "
                   "(temperature 1, no top-p/top-k, at most max_new_tokens, EOS counted) on held-out prompts; "
                   "mean over samples of sum_t [log p_DPO(y_t) - log p_base(y_t)].",
    }


# --------------------------------------------------------------------------------------
# Training history (for the curves)
# --------------------------------------------------------------------------------------

def _checkpoint_step(p: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("cannot read %s (%s); skipping it", path, e)
        return None


def find_training_history(candidates: Sequence[Path]) -> dict | None:
    """The training log for the curves. First choice, in any candidate folder: the newest
    checkpoint-*/trainer_state.json (or a trainer_state.json at the top); second: training_metrics.json's
    train_losses. Returns {source, kind, log_history | losses, logging_steps, metrics} or None."""
    dirs = [d for d in candidates if d.is_dir()]
    for d in dirs:
        states = sorted((c for c in d.glob("checkpoint-*") if (c / TRAINER_STATE).is_file()), key=_checkpoint_step)
        files = [states[-1] / TRAINER_STATE] if states else []
        files += [d / TRAINER_STATE] if (d / TRAINER_STATE).is_file() else []
        for state_file in files:
            state = _read_json(state_file)
            if state and state.get("log_history"):
                near = [d] + [x for x in dirs if x != d]  # the run's own metrics first
                metrics = next((_read_json(x / METRICS_FILE) for x in near if (x / METRICS_FILE).is_file()), None)
                return {"source": str(state_file), "kind": f"{TRAINER_STATE} log_history",
                        "log_history": state["log_history"], "logging_steps": state.get("logging_steps"),
                        "metrics": metrics}
    for d in dirs:
        if (d / METRICS_FILE).is_file():
            metrics = _read_json(d / METRICS_FILE)
            if metrics and metrics.get("train_losses"):
                return {"source": str(d / METRICS_FILE), "kind": f"{METRICS_FILE} train_losses",
                        "losses": metrics["train_losses"], "metrics": metrics}
    return None


def training_candidates(a: CompareArguments) -> list[Path]:
    if a.training_dir:
        return [Path(a.training_dir).expanduser()]
    ft = Path(os.path.expanduser(a.finetuned_model))
    out = [ft]
    if ft.name.endswith("_merged"):
        out.append(ft.with_name(ft.name[: -len("_merged")]))
    return out


def training_summary(history: dict | None) -> dict | None:
    if not history:
        return None
    metrics = history.get("metrics") or {}
    if "log_history" in history:
        losses = [v for _, v in curves_from_log_history(history["log_history"]).get("loss", [])]
        steps = max((h.get("step", 0) for h in history["log_history"]), default=None)
    else:
        losses, steps = history["losses"], metrics.get("steps")
    return {
        "source": history["source"],
        "kind": history["kind"],
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_reward_accuracy": metrics.get("eval_reward_accuracy"),
        "beta": metrics.get("beta"),
    }


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

def _strip_bos(text: str, tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def score_model(name: str, flag: str, *, args: CompareArguments, device, tokenizer, pairs, gen_prompts,
                kl_samples=None) -> dict:
    """Load one model; score the pairs, generate for the prompts, and (DPO) draw the KL samples or (base)
    score them. The model is freed before returning."""
    t0 = time.perf_counter()
    model = load_eval_model(name, flag, device=device, trust_remote_code=args.trust_remote_code)
    check_tokenizer_fits(tokenizer, model, flag, name)
    prompts_ids, chosen_ids, rejected_ids = pairs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {
        "chosen": sequence_logps(model, list(zip(prompts_ids, chosen_ids)), pad_id=pad, batch_size=args.batch_size),
        "rejected": sequence_logps(model, list(zip(prompts_ids, rejected_ids)), pad_id=pad, batch_size=args.batch_size),
    }
    gens = generate_responses(
        model, tokenizer, gen_prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, greedy=args.greedy, seed=args.seed, batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
    )
    out["generations"] = [g[0] for g in gens]
    if kl_samples is None:  # the DPO model draws the KL samples: pure sampling, temperature 1
        samples = generate_responses(
            model, tokenizer, gen_prompts, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
            greedy=False, seed=args.seed + 1, batch_size=args.batch_size, max_prompt_length=args.max_prompt_length,
        )
        out["kl_samples"] = [s[0] for s in samples]
        kl_items = [(s["prompt_ids"], s["token_ids"]) for s in out["kl_samples"]]
    else:
        kl_items = [(s["prompt_ids"], s["token_ids"]) for s in kl_samples]
    out["kl_logps"] = sequence_logps(model, kl_items, pad_id=pad, batch_size=args.batch_size)
    del model
    gc.collect()
    logger.info("%s scored in %.1fs", flag.lstrip("-"), time.perf_counter() - t0)
    return out


def run(a: CompareArguments, t_start: float) -> dict:
    import datasets  # deferred: datasets, like transformers, takes seconds to import; argument errors do not need it
    from transformers.utils import logging as hf_logging  # deferred: transformers takes seconds to import

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    device = resolve_device(a.device)
    tok_name = a.tokenizer_name_or_path or a.base_model
    tok_flag = "--tokenizer_name_or_path" if a.tokenizer_name_or_path else "--base_model"
    tokenizer = apply_chat_template_arg(load_tokenizer_from(tok_name, tok_flag, a.trust_remote_code, need_eos=True),
                                        a.chat_template)

    data_args = DataArguments(
        dataset_name=a.dataset_name, dataset_config=a.dataset_config, dataset_columns=a.dataset_columns,
        dataset_train_split=a.dataset_train_split,
        dataset_test_split=a.dataset_test_split, eval_fraction=a.eval_fraction, max_train_samples=1,
        max_eval_samples=a.max_eval_samples,
    )
    _, held_out = load_preference_splits(data_args, a.data_seed, tokenizer)
    held_out = with_bos(held_out, tokenizer)
    rows = list(held_out)
    pairs = encode_pairs(rows, tokenizer, max_prompt_length=a.max_prompt_length, max_completion_length=a.max_completion_length)
    gen_prompts = [r["prompt"] for r in rows[: max(a.num_gen_prompts, a.num_prompts)]]
    logger.info("%d held-out pairs, %d generation prompts, device %s", len(rows), len(gen_prompts), device)

    history = find_training_history(training_candidates(a))
    training = training_summary(history)
    beta, beta_source = a.beta, "--beta"
    if beta is None:
        beta, beta_source = (training["beta"], METRICS_FILE) if training and training.get("beta") else (0.1, "default")

    dpo = score_model(a.finetuned_model, "--finetuned_model", args=a, device=device, tokenizer=tokenizer, pairs=pairs,
                      gen_prompts=gen_prompts)
    base = score_model(a.base_model, "--base_model", args=a, device=device, tokenizer=tokenizer, pairs=pairs,
                       gen_prompts=gen_prompts, kl_samples=dpo["kl_samples"])

    len_c = [len(c) for c in pairs[1]]
    len_r = [len(r) for r in pairs[2]]
    metrics = {}
    for name, scored in (("Base", base), ("DPO", dpo)):
        lengths = [g["num_tokens"] for g in scored["generations"]]
        m = preference_metrics(scored["chosen"], scored["rejected"], len_c, len_r)
        m.update(mean_response_length=_mean(lengths), num_generations=len(lengths),
                 ended_with_eos_fraction=_mean([1.0 if g["ended_with_eos"] else 0.0 for g in scored["generations"]]),
                 response_lengths=lengths)
        metrics[name] = m
    rel = reward_metrics(dpo["chosen"], dpo["rejected"], base["chosen"], base["rejected"], beta)
    rel.update(kl_metrics(dpo["kl_logps"], base["kl_logps"], [len(s["token_ids"]) for s in dpo["kl_samples"]]))
    rel["beta_source"] = beta_source
    rel["preference_accuracy_delta"] = metrics["DPO"]["preference_accuracy"] - metrics["Base"]["preference_accuracy"]
    rel["mean_response_length_delta"] = metrics["DPO"]["mean_response_length"] - metrics["Base"]["mean_response_length"]
    metrics["dpo_vs_base"] = rel
    metrics["data"] = {
        "num_pairs": len(rows),
        "chosen_tokens_mean": _mean(len_c),
        "rejected_tokens_mean": _mean(len_r),
        "chosen_longer_fraction": sum(c > r for c, r in zip(len_c, len_r)) / len(rows),
    }

    comparisons = [
        {
            "prompt": _strip_bos(gen_prompts[i], tokenizer),
            "results": {
                "Base": {"response": base["generations"][i]["response"], "num_tokens": base["generations"][i]["num_tokens"]},
                "DPO": {"response": dpo["generations"][i]["response"], "num_tokens": dpo["generations"][i]["num_tokens"]},
            },
        }
        for i in range(min(a.num_prompts, len(gen_prompts)))
    ]
    import torch  # deferred: torch (loaded by now) is only needed for its version here
    import transformers  # deferred: as torch

    config = asdict(a)
    config.update(beta=beta, max_completion_length=a.max_completion_length, device=str(device),
                  report=None if a.no_report else str(a.report_path()),
                  versions={"torch": torch.__version__, "transformers": transformers.__version__})
    results = {
        "comparisons": comparisons,
        "total_duration_sec": None,
        "metrics": metrics,
        "training": training,
        "config": config,
    }

    out_json = Path(a.output_json).expanduser()
    plots: dict[str, str | None] = {}
    if not a.no_report:
        plots = write_plots(results, a, history)
        results["report"] = {"markdown": str(a.report_path()), "plots": {k: v for k, v in plots.items() if v}}
    results["total_duration_sec"] = time.perf_counter() - t_start
    if tracker_names(a.report_to):
        results["tracking"] = log_to_trackers(results, a, plots)
    if not a.no_report:
        _write_markdown(results, a, plots, out_json)
    write_json_atomic(out_json, results)
    return results


def logging_dir_for(a: CompareArguments) -> Path:
    return Path(a.logging_dir).expanduser() if a.logging_dir else Path(a.output_json).expanduser().parent / "runs" / "compare"


def log_to_trackers(results: dict, a: CompareArguments, plots: dict[str, str | None]) -> dict:
    """The metrics (every number under `metrics`, as compare/<model>/<metric>) and the plots (compare/<plot>) to the
    trackers of --report_to, at the training run's last step when it is known."""
    scalars = flat_scalars(results["metrics"], "compare/")
    images = {f"compare/{k}": v for k, v in plots.items() if v}
    step = int((results.get("training") or {}).get("steps") or 0)
    logging_dir = logging_dir_for(a)
    done = log_comparison(a.report_to, logging_dir=logging_dir, scalars=scalars, images=images, step=step)
    logger.info("logged %d metrics and %d plots to %s", len(scalars), len(images), ", ".join(done) or "no tracker")
    return {"report_to": done, "logging_dir": str(logging_dir) if "tensorboard" in done else None,
            "scalars": len(scalars), "images": sorted(images), "step": step}


def _write_markdown(results, a: CompareArguments, plots, out_json: Path) -> None:
    report = a.report_path()
    rel = {k: (os.path.relpath(v, report.parent) if v else None) for k, v in plots.items()}
    try:
        json_name = os.path.relpath(out_json, report.parent)
    except ValueError:
        json_name = str(out_json)
    write_atomic(report, render_markdown(results, plots=rel, training=results.get("training"), json_name=json_name))


def write_plots(results, a: CompareArguments, history: dict | None) -> dict[str, str | None]:
    """The report's PNGs, beside it: <report stem>_accuracy.png, _lengths.png, _training_curves.png."""
    report = a.report_path()
    stem = report.with_suffix("")
    plots: dict[str, str | None] = {"accuracy": None, "curves": None, "lengths": None}
    m = results["metrics"]
    plots["accuracy"] = str(plot_accuracy(m, f"{stem}_accuracy.png"))
    plots["lengths"] = str(plot_lengths(m["Base"]["response_lengths"], m["DPO"]["response_lengths"], f"{stem}_lengths.png",
                                        max_new_tokens=a.max_new_tokens))
    if history:
        if "log_history" in history:
            curves, x_label = curves_from_log_history(history["log_history"]), "step"
        else:
            steps = history.get("metrics", {}).get("steps")
            n = len(history["losses"])
            scale = None
            x_label = "log entry"
            if steps and n > 1:
                scale, x_label = max(1, round(steps / (n - 1))), "step (approx.)"
            curves = curves_from_losses(history["losses"], scale)
        path = plot_training_curves(curves, f"{stem}_training_curves.png", x_label=x_label,
                                    title=f"DPO training ({Path(history['source']).name})")
        plots["curves"] = str(path) if path else None
    return plots


def summary_lines(results: dict, out_json: Path) -> list[str]:
    m = results["metrics"]
    b, d, r = m["Base"], m["DPO"], m["dpo_vs_base"]
    se = r.get("kl_estimate_stderr")
    lines = [
        f"DPO vs base on {r['num_pairs']} held-out pairs ({results['total_duration_sec']:.1f}s):",
        f"  preference accuracy            base {b['preference_accuracy']:.3f} -> DPO {d['preference_accuracy']:.3f}",
        f"  preference accuracy (per-token) base {b['preference_accuracy_length_normalized']:.3f} -> DPO "
        f"{d['preference_accuracy_length_normalized']:.3f}",
        f"  reward accuracy (DPO vs base)  {r['reward_accuracy']:.3f}, mean margin {r['reward_margin_mean']:.3f} (beta {r['beta']})",
        f"  KL(DPO || base)                {r['kl_estimate']:.3f} nats per response"
        + (f" (+/- {se:.3f}, {r['kl_num_samples']} samples)" if se is not None else ""),
        f"  mean response length           base {b['mean_response_length']:.1f} -> DPO {d['mean_response_length']:.1f} tokens",
    ]
    note = length_bias_note(m.get("data"))
    if note:
        lines.append(f"  note: {note}")
    lines.append(f"  results: {out_json}")
    if results.get("report"):
        lines.append(f"  report:  {results['report']['markdown']} (+{len(results['report']['plots'])} plots)")
    return lines


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    setup_logging()
    try:
        (a,) = parse_dataclasses(CompareArguments, argv, prog=PROG)
        validate(a)
    except ArgumentError as e:
        print(f"dpo_dist.compare_base_vs_dpo: error: {e}", file=sys.stderr)
        return 2
    try:
        results = run(a, t_start)
    except ArgumentError as e:
        print(f"dpo_dist.compare_base_vs_dpo: error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"dpo_dist.compare_base_vs_dpo: error: {e}", file=sys.stderr)
        return 1
    for line in summary_lines(results, Path(a.output_json).expanduser()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
