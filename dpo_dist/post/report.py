"""The comparison report: pure functions from data to PNG plots and markdown.

Nothing here loads a model or reads a run folder: `compare_base_vs_dpo` gathers the figures
and hands them over. Every plot is written with `dpo_dist.util.atomic.write_atomic`, and
matplotlib runs on the Agg backend, so no display is needed.

    curves = curves_from_log_history(trainer_state["log_history"])
    plot_training_curves(curves, "report_curves.png")
    plot_accuracy(metrics, "report_accuracy.png")
    plot_lengths(base_lengths, dpo_lengths, "report_lengths.png")
    text = render_markdown(results, plots={...}, training=...)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from dpo_dist.util.atomic import write_atomic

# Series read from a Trainer log_history (trl DPOTrainer names); eval_* variants come from evaluate().
CURVE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _plt():
    import matplotlib  # deferred: matplotlib takes a second to import; only the plots need it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: as matplotlib, after choosing the backend

    return plt


def _save_png(fig, path) -> Path:
    """`fig` as a PNG at `path`, atomically; the figure is closed either way."""
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        _plt().close(fig)


# --------------------------------------------------------------------------------------
# Data shaping
# --------------------------------------------------------------------------------------

def curves_from_log_history(log_history: Sequence[Mapping]) -> dict[str, list[tuple[float, float]]]:
    """{series: [(step, value), ...]} for the train series in CURVE_KEYS and their eval_* twins.

    Train entries are the log lines with `loss` (not the final summary with `train_loss`).
    """
    curves: dict[str, list[tuple[float, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        is_eval = any(k.startswith("eval_") for k in entry)
        for key in CURVE_KEYS:
            name = f"eval_{key}" if is_eval else key
            value = entry.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curves.setdefault(name, []).append((float(step), float(value)))
    return curves


def curves_from_losses(losses: Sequence[float], logging_steps: int | None = None) -> dict[str, list[tuple[float, float]]]:
    """Fallback when only training_metrics.json's `train_losses` is known: x is the log index
    (times logging_steps when it is known)."""
    scale = logging_steps or 1
    return {"loss": [(float(i * scale), float(v)) for i, v in enumerate(losses)]}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------

def plot_training_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path, *, x_label: str = "step",
                         title: str | None = None) -> Path | None:
    """Three panels: loss, reward accuracy, rewards (margin, chosen, rejected). None when there is no data."""
    if not any(curves.get(k) for k in (*CURVE_KEYS, *(f"eval_{k}" for k in CURVE_KEYS))):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("DPO loss", [("loss", "train", "C0"), ("eval_loss", "eval", "C3")], None),
        ("reward accuracy (chosen > rejected)", [("rewards/accuracies", "train", "C0"),
                                                 ("eval_rewards/accuracies", "eval", "C3")], (-0.02, 1.02)),
        ("implicit rewards", [("rewards/margins", "margin", "C2"), ("rewards/chosen", "chosen", "C0"),
                              ("rewards/rejected", "rejected", "C1"), ("eval_rewards/margins", "eval margin", "C3")], None),
    ]
    for ax, (name, series, ylim) in zip(axes, panels):
        drawn = False
        for key, label, color in series:
            pts = curves.get(key) or []
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = dict(marker="o", markersize=3) if not key.startswith("eval_") else dict(marker="s", markersize=6, linestyle="--")
            ax.plot(xs, ys, label=label, color=color, **style)
            drawn = True
        ax.set_title(name)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_accuracy(metrics: Mapping, path) -> Path:
    """Bars: preference accuracy (sum and per-token log-prob) for Base and DPO, and DPO's reward accuracy."""
    plt = _plt()
    base, dpo, rel = metrics["Base"], metrics["DPO"], metrics["dpo_vs_base"]
    groups = [
        ("preference accuracy\n(sum log-prob)", base["preference_accuracy"], dpo["preference_accuracy"]),
        ("preference accuracy\n(per-token log-prob)", base["preference_accuracy_length_normalized"],
         dpo["preference_accuracy_length_normalized"]),
    ]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.36
    for i, (_label, b, d) in enumerate(groups):
        for off, val, color, name in ((-width / 2, b, "C7", "Base"), (width / 2, d, "C0", "DPO")):
            bar = ax.bar(i + off, val, width, color=color, label=name if i == 0 else None)
            ax.bar_label(bar, labels=[f"{val:.2f}"], fontsize=9)
    i = len(groups)
    bar = ax.bar(i, rel["reward_accuracy"], width, color="C2", label="DPO vs base (reward)")
    ax.bar_label(bar, labels=[f"{rel['reward_accuracy']:.2f}"], fontsize=9)
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(groups) + 1), [g[0] for g in groups] + ["reward accuracy\n(β·log π_DPO/π_base)"])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel(f"fraction of {rel.get('num_pairs', '')} held-out pairs".replace("of  ", "of "))
    ax.set_title("Held-out preference: chosen scored above rejected")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_lengths(base_lengths: Sequence[int], dpo_lengths: Sequence[int], path, *, max_new_tokens: int | None = None) -> Path:
    """Overlaid histograms of response lengths (new tokens before EOS), with the means marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max([*base_lengths, *dpo_lengths, max_new_tokens or 0, 1])
    bins = min(top + 1, 32)
    for lengths, name, color in ((base_lengths, "Base", "C7"), (dpo_lengths, "DPO", "C0")):
        if not lengths:
            continue
        ax.hist(lengths, bins=bins, range=(0, top + 1), alpha=0.55, color=color, label=f"{name} (mean {_mean(lengths):.1f})")
        ax.axvline(_mean(lengths), color=color, linestyle="--", linewidth=1.2)
    if max_new_tokens:
        ax.axvline(max_new_tokens, color="black", linestyle=":", linewidth=1, label=f"max_new_tokens ({max_new_tokens})")
    ax.set_xlabel("response length (new tokens before EOS)")
    ax.set_ylabel("responses")
    ax.set_title("Response lengths")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, path)


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _block(text: str) -> str:
    safe = (text or "").replace("```", "'''")
    return f"```text\n{safe}\n```"


def length_bias_note(data: Mapping | None) -> str | None:
    """When one side of the pairs is usually longer, the sum log-prob accuracy mostly measures length: say so."""
    if not data or data.get("chosen_longer_fraction") is None:
        return None
    f = data["chosen_longer_fraction"]
    if 0.25 <= f <= 0.75:
        return None
    side, frac = ("chosen", f) if f > 0.75 else ("rejected", 1 - f)
    return (f"The {side} response is the longer one in {frac:.0%} of the held-out pairs ({data['chosen_tokens_mean']:.1f} vs "
            f"{data['rejected_tokens_mean']:.1f} tokens on average, chosen vs rejected), so the sum log-prob accuracy "
            "mostly measures length; the per-token accuracy and the reward accuracy isolate the learned preference.")


def render_markdown(results: Mapping, *, plots: Mapping[str, str | None], training: Mapping | None = None,
                    json_name: str | None = None) -> str:
    """The report text. `plots` maps curves/accuracy/lengths to paths relative to the report (or None)."""
    m, cfg = results["metrics"], results.get("config", {})
    base, dpo, rel = m["Base"], m["DPO"], m["dpo_vs_base"]
    if cfg.get("greedy"):
        decoding = "greedy"
    else:
        decoding = f"sampling (temperature {cfg.get('temperature')}, top_p {cfg.get('top_p')})"
    lines = [
        "# DPO comparison: base vs fine-tuned",
        "",
        f"- Base model: `{cfg.get('base_model')}`",
        f"- DPO model: `{cfg.get('finetuned_model')}`",
        f"- Held-out data: {rel.get('num_pairs')} preference pairs from `{cfg.get('dataset_name')}` "
        f"(split `{cfg.get('dataset_test_split')}`), the split training held out",
        f"- Decoding: {decoding}, max {cfg.get('max_new_tokens')} new tokens, seed {cfg.get('seed')}",
        f"- Duration: {results.get('total_duration_sec', 0):.1f} s" + (f"; raw figures in `{json_name}`" if json_name else ""),
        "",
        "## Headline",
        "",
        "| metric | Base | DPO |",
        "|---|---:|---:|",
        f"| preference accuracy (log p(chosen) > log p(rejected)) | {_fmt(base['preference_accuracy'])} | {_fmt(dpo['preference_accuracy'])} |",
        f"| preference accuracy, per-token (length-normalised) | {_fmt(base['preference_accuracy_length_normalized'])} | "
        f"{_fmt(dpo['preference_accuracy_length_normalized'])} |",
        f"| mean log p(chosen) − log p(rejected) (nats) | {_fmt(base['logp_margin_mean'], 2)} | {_fmt(dpo['logp_margin_mean'], 2)} |",
        f"| mean response length (tokens, {base.get('num_generations')} prompts) | {_fmt(base['mean_response_length'], 1)} | "
        f"{_fmt(dpo['mean_response_length'], 1)} |",
        f"| reward accuracy (β·log π_DPO/π_base: chosen > rejected) | — | {_fmt(rel['reward_accuracy'])} |",
        f"| mean reward margin (β = {rel.get('beta')}) | — | {_fmt(rel['reward_margin_mean'])} |",
        f"| KL(DPO ‖ base), nats per response | — | {_fmt(rel['kl_estimate'], 2)} ± {_fmt(rel.get('kl_estimate_stderr'), 2)} "
        f"({rel.get('kl_num_samples')} samples; {_fmt(rel.get('kl_per_token'), 3)} per token) |",
        "",
    ]
    note = length_bias_note(m.get("data"))
    if note:
        lines += [f"> {note}", ""]
    if plots.get("accuracy"):
        lines += [f"![accuracy base vs DPO]({plots['accuracy']})", ""]
    lines += ["## Training curves", ""]
    if training and training.get("source"):
        lines.append(f"From `{training['source']}`" + (f" ({training['kind']})" if training.get("kind") else "") + ".")
        summary = []
        for key, label in (("steps", "steps"), ("first_loss", "first loss"), ("last_loss", "last loss"),
                           ("eval_reward_accuracy", "eval reward accuracy at the end of training")):
            if training.get(key) is not None:
                summary.append(f"{label} {_fmt(training[key])}")
        if summary:
            lines.append("Training: " + ", ".join(summary) + ".")
        lines.append("")
        if plots.get("curves"):
            lines += [f"![training curves]({plots['curves']})", ""]
    else:
        lines += ["No trainer state was found (pass `--training_dir` with the DPO run's output_dir), so there are no curves.", ""]
    if plots.get("lengths"):
        lines += ["## Response lengths", "", f"![response lengths]({plots['lengths']})", ""]
    lines += ["## Example generations", ""]
    for i, comp in enumerate(results.get("comparisons", []), 1):
        lines += [f"### Prompt {i}", "", _block(comp["prompt"].strip()), ""]
        for name in ("Base", "DPO"):
            r = comp["results"][name]
            lines += [f"**{name}** ({r.get('num_tokens')} tokens)", "", _block(r["response"]), ""]
    lines += [
        "## How these figures are computed",
        "",
        "- Log-probabilities are sums over the response tokens (EOS included) given the prompt, in fp32, for the "
        "held-out pairs, tokenised and truncated as the DPO trainer does (prompt left-truncated to "
        f"{cfg.get('max_prompt_length')} tokens, responses to {cfg.get('max_completion_length')}).",
        "- Preference accuracy: the fraction of pairs where the model gives the chosen response the higher "
        "log-probability; the per-token variant divides by the response length first. Ties count as misses.",
        "- Reward accuracy: the fraction of pairs where the implicit DPO reward β·(log π_DPO − log π_base) is higher "
        "for the chosen response; the margin is the mean of chosen minus rejected reward.",
        "- KL: a Monte-Carlo estimate of KL(π_DPO ‖ π_base) per response: responses sampled from the DPO model "
        "(temperature 1, no top-p/top-k, at most max_new_tokens) on the held-out prompts, and the mean over samples of "
        "Σ_t [log π_DPO(y_t) − log π_base(y_t)]. It is an estimate with the standard error shown, and can be "
        "slightly negative by chance.",
        "- Response lengths: new tokens before EOS in each model's generations with the decoding above.",
        "",
    ]
    return "\n".join(lines)
