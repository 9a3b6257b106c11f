"""Readable plan table (rich), for ``python -m launch plan``."""

from __future__ import annotations

import io

from launch.plan.hardware import HARDWARE
from launch.plan.types import Plan

_MEMORY_ROWS = ("params", "grads", "optimizer", "reference", "activations", "logits", "buffers", "overhead")


def padding_text(plan: Plan) -> str:
    if plan.packing:
        shapes = f", padded to <= {plan.length_buckets} bucket totals" if plan.length_buckets else " (no padding)"
        return "micro-batch packed into one row" + shapes
    if plan.length_buckets:
        return f"rows padded to <= {plan.length_buckets} bucket lengths (<= {plan.length_buckets} shapes)"
    return "to the longest row in the data (one shape)" if plan.static_shapes else "to the longest row"


def engine_text(plan: Plan) -> str:
    """The engine features this plan runs with (dpo_dist/train/engine.py), in words."""
    parts = ["chunked log-probs" if plan.chunked_logps else "full logits"]
    if plan.packing:
        parts.append("packed rows (" + ("block-diagonal mask" if plan.packing_attention == "block_mask"
                                        else "per-row attention") + ", shared prompts)")
    if plan.length_buckets:
        parts.append(f"{plan.length_buckets} bucket {'totals' if plan.packing else 'lengths'}")
    if plan.reference == "precomputed":
        parts.append("reference log-prob cache")
    if plan.static_shapes:
        parts.append("static shapes")
    if plan.bf16:
        hw = HARDWARE.get(plan.hardware)
        parts.append("bf16 autocast" if hw is not None and hw.backend.bf16_autocast else "bf16")
    return ", ".join(parts)


def format_count(n: float) -> str:
    """A count in readable units: 205k, 26.4M, 70.55B (and 950 below a thousand)."""
    n = float(n)
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f}B"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.0f}k"
    return f"{n:.0f}"


def throughput_text(plan: Plan) -> str:
    """The estimated tokens/s and pairs/s, and which tokens they count: real (the data's, measured) or padded."""
    head = f"{plan.est_tokens_per_s:,.0f} tokens/s, {plan.est_pairs_per_s:,.2f} pairs/s"
    if plan.est_tokens_basis == "real":
        return f"{head} (real tokens: {plan.est_tokens_per_pair:,.0f} per pair, the data's: measured, or --pair_tokens)"
    per_pair = plan.est_tokens_per_pair or 2 * plan.max_length
    return (f"{head} (padded tokens: {per_pair:,.0f} per pair, 2 x max_length; the data's were not measured: name "
            "local data after `--`, or pass --pair_tokens)")


def launch_text(plan: Plan) -> str:
    return f"DeepSpeed ZeRO-{plan.zero_stage}" if plan.uses_deepspeed else "DDP (no DeepSpeed)"


def render_plan_table(plan: Plan, width: int = 100) -> str:
    """The plan as plain text: settings, per-card memory breakdown vs card memory, notes."""
    from rich.console import Console
    from rich.table import Table

    status = "FITS" if plan.fits else "DOES NOT FIT"
    settings = Table(title=f"DPO plan: {status}", show_header=False, title_justify="left")
    settings.add_column("setting", style="bold")
    settings.add_column("value")
    rows = [
        ("model", f"{plan.model} ({format_count(plan.model_params)} parameters)" if plan.model_params else plan.model),
        ("hardware", plan.hardware),
        ("cards", f"{plan.world_size} ({plan.nodes} node(s) x {plan.cards_per_node})"),
        ("ZeRO stage", str(plan.zero_stage)),
        ("offload", plan.offload),
        ("fine-tune", "LoRA" if plan.use_peft else "full"),
        ("reference", plan.reference),
        ("micro-batch (pairs/card)", str(plan.micro_batch_size)),
        ("gradient accumulation", str(plan.gradient_accumulation_steps)),
        ("global batch (pairs)", str(plan.global_batch_size)),
        ("gradient checkpointing", "on" if plan.gradient_checkpointing else "off"),
        ("max_length / max_prompt_length", f"{plan.max_length} / {plan.max_prompt_length}"),
        ("padding", padding_text(plan)),
        ("engine", engine_text(plan)),
        ("launch", launch_text(plan)),
        ("est. step time", f"{plan.est_step_time_s:.2f} s"),
        ("est. throughput", throughput_text(plan)),
    ]
    for k, v in rows:
        settings.add_row(k, v)

    mem = plan.memory_gib
    memory = Table(title="Memory per card (GiB)", title_justify="left")
    memory.add_column("component")
    memory.add_column("GiB", justify="right")
    for name in _MEMORY_ROWS:
        memory.add_row(name, f"{getattr(mem, name):.2f}")
    memory.add_section()
    memory.add_row("total", f"{mem.total:.2f}", style="bold")
    memory.add_row("card memory", f"{plan.card_memory_gib:.2f}")
    headroom = plan.card_memory_gib - mem.total
    memory.add_row("headroom", f"{headroom:.2f} ({headroom / plan.card_memory_gib:.0%})",
                   style="green" if plan.fits else "red")

    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(settings)
    console.print(memory)
    if plan.notes:
        console.print("Notes:")
        for note in plan.notes:
            console.print(f"  - {note}", markup=False)
    if plan.suggestion is not None:
        console.print(f"Suggestion: {plan.suggestion.text}", markup=False)
    return console.export_text()
