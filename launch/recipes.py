"""Checked-in recipes per model size, generated from the planner: `python -m launch recipes --write`.

    python -m launch recipes            # what would be written (a list), and which checked-in files differ
    python -m launch recipes --write    # (re)write recipes/<hardware>/<model>-<lora|full>[-<N>card(s)].yaml
    python -m launch recipes --check    # exit 1 when a checked-in recipe differs from the planner's now

For every model of the built-in spec table listed in ``RECIPE_MODELS`` (Gemma 3 270m/1b/4b/12b/27b, Llama-2
7b/13b/70b, Llama-3/3.1 8B/70B), on gaudi2 and gaudi3, LoRA and full fine-tuning:

- ``<model>-<mode>.yaml``: one node of 8 cards (`make train-8x`), when the plan fits there;
- ``<model>-<mode>-<N>card(s).yaml``: the smallest world size that fits (1, 2, 4, 8, then whole nodes of 8), when it
  is not 8 cards (8 is the file above).

A recipe is a YAML file of dpo_dist.dpo flags (`python -m dpo_dist.dpo --config FILE` reads it; flags given on the
command line win) plus a ``launch:`` block the ranks ignore: the planner's choices `python -m launch train --recipe
FILE` (`make train-8x RECIPE=FILE`) plans with. Its header comment says what the planner planned: memory per card,
headroom, the estimate's basis and what is measured and what is assumed. tests/launch/test_recipes.py fails when a
checked-in recipe differs from what this module writes now: after a planner change, run `--write` and commit.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.util.atomic import write_atomic
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.paths import REPO_ROOT
from launch.plan import HARDWARE, PlanOptions, make_plan
from launch.plan.hardware import CALIBRATION_POINT, PUBLISHED_DPO_BASELINES
from launch.plan.report import format_count, throughput_text
from launch.plan.specs import BUILTIN

RECIPES_DIR = REPO_ROOT / "recipes"
RECIPE_HARDWARE = ("gaudi2", "gaudi3")
RECIPE_MODELS = ("gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b",
                 "llama2-7b", "llama2-13b", "llama2-70b",
                 "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b")
MODES = ("lora", "full")
NODE_CARDS = 8
MAX_NODES = 64
LAUNCH_KEY = "launch"  # the block the launcher reads and the ranks ignore (dpo_dist.args.parse_args)
# The launcher options a recipe's launch block may set (python -m launch train flags), in the order written.
LAUNCH_FIELDS = ("hardware", "cards", "nodes", "full", "zero_stage", "reference", "max_length", "max_prompt_length")
# Rank flags that shape the batch: the launcher passes them as if given after `--`, so the plan and the
# DeepSpeed config follow the recipe (launch.cli.apply_batch_overrides) and flags after `--` still win.
BATCH_FLAGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")

# DPO hyper-parameters to start from (the DPO paper and TRL / Zephyr practice): beta 0.1 with the sigmoid loss; a
# learning rate of 5e-7 for full fine-tuning and 5e-6 for LoRA adapters (r 16, alpha 32), cosine decay after a short
# warm-up; one epoch.
HYPER = {
    "lora": dict(learning_rate=5.0e-6, lora_r=16, lora_alpha=32, lora_dropout=0.05),
    "full": dict(learning_rate=5.0e-7),
}
COMMON = dict(beta=0.1, loss_type="sigmoid", lr_scheduler_type="cosine", warmup_steps=10, num_train_epochs=1.0,
              max_grad_norm=1.0, logging_steps=10, save_steps=200, save_total_limit=2, eval_steps=200,
              report_to="tensorboard", seed=42)


def recipe_model_name(key: str) -> str:
    """The file name part of a BUILTIN key: gemma3-270m -> gemma-3-270m, llama3.1-70b -> llama-3.1-70b."""
    return re.sub(r"^([a-z]+)(\d)", r"\1-\2", key)


def _sizes() -> list[int]:
    return [1, 2, 4, NODE_CARDS] + [NODE_CARDS * n for n in range(2, MAX_NODES + 1)]


def plan_for(key: str, hardware: str, mode: str, cards: int):
    spec = dataclasses.replace(BUILTIN[key], source="builtin")
    return spec, make_plan(spec, HARDWARE[hardware], PlanOptions(cards=cards, use_peft=mode == "lora"))


def smallest_fit(key: str, hardware: str, mode: str):
    """(cards, spec, plan) of the smallest world size that fits, or None up to MAX_NODES nodes."""
    for n in _sizes():
        spec, plan = plan_for(key, hardware, mode, n)
        if plan.fits:
            return n, spec, plan
    return None


def _yaml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = f"{v:.1e}" if v and (abs(v) < 1e-3) else repr(v)
        return text.replace("e-0", "e-")
    if v is None:
        return "null"
    return str(v)


def _comment(lines: list[str], width: int = 118) -> list[str]:
    out = []
    for line in lines:
        if not line:
            out.append("#")
            continue
        indent = len(line) - len(line.lstrip())
        for part in textwrap.wrap(line.strip(), width - 2 - indent, subsequent_indent="  ",
                                  break_on_hyphens=False) or [""]:
            out.append("# " + " " * indent + part)
    return out


def measured_vs_assumed(hardware: str, spec, plan) -> list[str]:
    """What the plan's figures rest on, measured or assumed, for this hardware and model."""
    hw = HARDWARE[hardware]
    base = PUBLISHED_DPO_BASELINES.get(hardware)
    point = CALIBRATION_POINT
    lines = [
        f"measured: the {point['hardware']} DPO point the HPU memory overhead is calibrated on ({point['model']}, "
        f"LoRA r{point['lora_r']}, max_length {point['max_length']}, micro-batch {point['micro_batch_size']}: "
        f"{point['measured_gib']:g} GiB per card); overhead here: {hw.overhead:.0%} of the formula total"
        + (f" + {hw.runtime_gib:g} GiB per card (that fixed part assumed)" if hw.runtime_gib else ""),
    ]
    if base:
        lines.append(f"measured: optimum-habana's published DPO baseline on {hardware} ({base['pairs_per_s']} pairs/s "
                     f"on {base['cards']} cards, 7B LoRA, padded pairs), which the speed model's MFU "
                     f"({hw.mfu:.2f}) is calibrated on")
    if hardware == "gaudi2":
        lines.append(f"measured: usable memory per card, {hw.card_memory_gib:g} GiB")
    else:
        lines.append(f"assumed: usable memory per card, {hw.card_memory_gib:g} GiB (128 GB scaled by Gaudi2's "
                     "measured usable ratio); the overhead equal to Gaudi2's (same software stack)")
    lines.append(f"assumed: this model's memory and speed on {hardware} were not measured: the formulas of "
                 "launch/plan/memory.py and speed.py with the calibration above")
    if plan.est_tokens_basis != "real":
        lines.append("assumed: every pair padded to 2 x max_length for the throughput (no data given); a run measures "
                     "real tokens, and `launch train -- --dataset_name LOCAL_DATA` plans with the data's")
    return lines


def render_recipe(key: str, hardware: str, mode: str, cards: int, *, smallest: bool, also_smallest: bool = False):
    """(file name, text) of one recipe, or None when the plan does not fit at ``cards``."""
    spec, plan = plan_for(key, hardware, mode, cards)
    if not plan.fits:
        return None
    name = recipe_model_name(key)
    suffix = "" if not smallest else f"-{cards}card{'s' if cards > 1 else ''}"
    fname = f"{name}-{mode}{suffix}.yaml"
    nodes = plan.nodes
    where = f"{nodes} node(s) x {plan.cards_per_node} cards" if nodes > 1 else f"1 node, {cards} card(s)"
    mem = plan.memory_gib
    head = plan.card_memory_gib - mem.total
    budget = plan.card_memory_gib * PlanOptions().safety_margin
    target = "train-8x" if (cards == NODE_CARDS and nodes == 1) else (
        "train-1x" if cards == 1 else ("train-multinode HOSTFILE=hostfiles/... " if nodes > 1 else None))
    if target:
        use = f"make {target} MODEL={spec.name} HARDWARE={hardware} RECIPE=recipes/{hardware}/{fname}"
    else:
        use = (f"python -m launch train --model {spec.name} --hardware {hardware} --cards {cards} --recipe "
               f"recipes/{hardware}/{fname}")
    lines = [
        f"dpo-dist recipe: {spec.name} ({format_count(spec.num_params)} parameters), "
        f"{'LoRA' if mode == 'lora' else 'full fine-tuning'}, {hardware}, {where}"
        + (" (the smallest fit)" if smallest or also_smallest else "") + ".",
        "Generated by `python -m launch recipes --write` from the planner; do not edit by hand "
        "(tests/launch/test_recipes.py fails when this file differs from what the planner writes now).",
        f"Use: {use}",
        "(flags after `--`, or in ARGS=, still win; `python -m dpo_dist.dpo --config FILE` reads the same keys).",
        "",
        f"Plan: ZeRO-{plan.zero_stage}, offload {plan.offload}, reference {plan.reference}, micro-batch "
        f"{plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps} x {plan.world_size} card(s) = "
        f"{plan.global_batch_size} pairs per step, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}"
        f", {'packed rows' if plan.packing else 'rows'} padded to <= {plan.length_buckets} bucket "
        f"{'totals' if plan.packing else 'lengths'}, max_length {plan.max_length} / prompt {plan.max_prompt_length}"
        f", {'DeepSpeed' if plan.uses_deepspeed else 'DDP (no DeepSpeed)'}.",
        f"Memory per card (planned): {mem.total:.2f} GiB of {plan.card_memory_gib:.2f} GiB; headroom {head:.2f} GiB "
        f"({head / plan.card_memory_gib:.0%}); the plan's budget is {budget:.2f} GiB (90%).",
        f"  params {mem.params:.2f}, grads {mem.grads:.2f}, optimizer {mem.optimizer:.2f}, reference "
        f"{mem.reference:.2f}, activations {mem.activations:.2f}, logits {mem.logits:.2f}, buffers {mem.buffers:.2f}, "
        f"overhead {mem.overhead:.2f} GiB.",
        f"Estimated: {plan.est_step_time_s:.2f} s per step, {throughput_text(plan)}.",
        "Measured vs assumed:",
        *(f"  - {x}" for x in measured_vs_assumed(hardware, spec, plan)),
        "Plan notes:",
        *(f"  - {n}" for n in plan.notes),
    ]
    launch = {"hardware": hardware, "cards": plan.cards_per_node, "nodes": nodes, "full": mode == "full",
              "zero_stage": plan.zero_stage, "reference": plan.reference, "max_length": plan.max_length,
              "max_prompt_length": plan.max_prompt_length}
    ranks = {
        "per_device_train_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "reference": plan.reference,
        "length_buckets": plan.length_buckets,
        "packing": plan.packing,
        "bf16": plan.bf16,
        "max_length": plan.max_length,
        "max_prompt_length": plan.max_prompt_length,
        "use_peft": mode == "lora",
        **HYPER[mode],
        **COMMON,
    }
    out = _comment(lines)
    out += ["", "# The planner's choices: `python -m launch train --recipe FILE` plans with them; the ranks ignore "
                "this block.", f"{LAUNCH_KEY}:"]
    out += [f"  {k}: {_yaml_value(launch[k])}" for k in LAUNCH_FIELDS]
    out += ["# The ranks' flags (python -m dpo_dist.dpo): the plan's batch shape, then DPO hyper-parameters to start "
            "from."]
    out += [f"{k}: {_yaml_value(v)}" for k, v in ranks.items()]
    return fname, "\n".join(out) + "\n"


def render_all() -> dict[str, str]:
    """{'<hardware>/<file>': text} of every recipe the planner produces now."""
    out = {}
    for hardware in RECIPE_HARDWARE:
        for key in RECIPE_MODELS:
            for mode in MODES:
                small = smallest_fit(key, hardware, mode)
                eight = render_recipe(key, hardware, mode, NODE_CARDS, smallest=False,
                                      also_smallest=small is not None and small[0] == NODE_CARDS)
                if eight:
                    out[f"{hardware}/{eight[0]}"] = eight[1]
                if small and small[0] != NODE_CARDS:
                    fname, text = render_recipe(key, hardware, mode, small[0], smallest=True)
                    out[f"{hardware}/{fname}"] = text
    return out


def differences(root: Path = RECIPES_DIR, rendered: dict[str, str] | None = None) -> list[str]:
    """The recipe files under root/<hardware>/ that differ from the planner's now, are missing or are extra."""
    rendered = render_all() if rendered is None else rendered
    problems = []
    for rel, text in sorted(rendered.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"missing: {path}")
        elif path.read_text() != text:
            problems.append(f"differs: {path}")
    for hardware in RECIPE_HARDWARE:
        for path in sorted((root / hardware).glob("*.yaml")):
            if f"{hardware}/{path.name}" not in rendered:
                problems.append(f"extra (the planner no longer writes it): {path}")
    return problems


def write_all(root: Path = RECIPES_DIR) -> list[Path]:
    """Write every recipe, and remove the ones the planner no longer produces; returns the files written."""
    rendered = render_all()
    written = []
    for rel, text in sorted(rendered.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            write_atomic(path, text)
            written.append(path)
    for hardware in RECIPE_HARDWARE:
        for path in sorted((root / hardware).glob("*.yaml")):
            if f"{hardware}/{path.name}" not in rendered:
                path.unlink()
    return written


@dataclass
class RecipesArguments:
    write: bool = field(default=False, metadata={"help": "Write (or rewrite) every recipe under --out."})
    check: bool = field(default=False, metadata={"help": "Exit 1 when a checked-in recipe differs from the planner's."})
    out: str = field(default=str(RECIPES_DIR), metadata={"help": "The recipes folder (default: the repository's)."})


def run_recipes(a: RecipesArguments) -> int:
    root = Path(a.out)
    if a.write:
        written = write_all(root)
        total = len(render_all())
        print(f"recipes: {total} recipes under {root}; {len(written)} written or changed")
        for p in written:
            print(f"  {p}")
        return 0
    problems = differences(root)
    if not a.check:
        for rel in sorted(render_all()):
            print(f"{root / rel}")
    for p in problems if a.check else problems[:5]:
        print(f"recipes: {p}", file=sys.stderr)
    if problems and not a.check and len(problems) > 5:
        print(f"recipes: ... {len(problems) - 5} more", file=sys.stderr)
    if problems:
        print("recipes: the checked-in recipes differ from the planner's; regenerate with `python -m launch recipes "
              "--write`", file=sys.stderr)
        return 1
    return 0


# --- the launcher's side: `launch train --recipe FILE` ----------------------------------------------------------------


def read_recipe(path: str) -> dict:
    """The recipe as a mapping; ArgumentError naming the file when it cannot be read or is not a mapping."""
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ArgumentError(f"--recipe {path}: cannot read it ({e.strerror or e}). Fix: give a recipe file, e.g. "
                            "recipes/gaudi2/llama-3-8b-lora.yaml (python -m launch recipes lists them).") from None
    except yaml.YAMLError as e:
        raise ArgumentError(f"--recipe {path}: not valid YAML ({e}).") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--recipe {path}: expected a mapping of flags to values.")
    block = data.get(LAUNCH_KEY, {})
    if not isinstance(block, dict) or set(block) - set(LAUNCH_FIELDS):
        raise ArgumentError(f"--recipe {path}: its `{LAUNCH_KEY}:` block may hold only {', '.join(LAUNCH_FIELDS)}.")
    return data


def _given(argv: list[str], name: str) -> bool:
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(w.split("=", 1)[0] in flags for w in argv)


def apply_recipe(a, argv: list[str], extra: list[str]) -> list[str]:
    """``a`` (the parsed TrainArguments) takes the recipe's launch block where the command line did not set the
    option; hardware and cards given on the command line must be the recipe's (its choices are for them). Returns the
    rank arguments: `--config FILE` and the recipe's batch-shape flags first, so that flags after `--` still win."""
    if any(w.split("=", 1)[0] == "--config" for w in extra):
        raise ArgumentError(f"--recipe {a.recipe} and --config after `--` both name a recipe for the ranks. Fix: pass "
                            "one of them (put single flags after `--` to change a recipe's values).")
    data = read_recipe(a.recipe)
    block = data.get(LAUNCH_KEY, {})
    for name in LAUNCH_FIELDS:
        if name not in block:
            continue
        value = block[name]
        if name in ("hardware", "cards") and _given(argv, name) and getattr(a, name) != value:
            how = "HARDWARE=" if name == "hardware" else "the make target train-1x / train-8x / train-multinode for"
            raise ArgumentError(
                f"--recipe {a.recipe} is planned for --{name} {value}, but --{name} {getattr(a, name)} was given. Fix: "
                f"pass --{name} {value} ({how} {value}), or pick the recipe for your {name} (python -m launch recipes "
                "lists them).")
        if name == "nodes":
            continue  # the hostfile's hosts are the nodes (the plan checks that they agree)
        if not _given(argv, name):
            setattr(a, name, value)
    words = ["--config", str(Path(a.recipe).resolve())]  # the ranks may start elsewhere (other nodes, gaudi_spawn)
    for flag in BATCH_FLAGS:
        if flag in data:
            words += [f"--{flag}", _yaml_value(data[flag])]
    return words + list(extra)
