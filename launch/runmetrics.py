"""After a run: the plan's figures beside the measured ones, in `training_metrics.json` under `planned_vs_measured`.

The ranks write training_metrics.json (dpo_dist/train/recorder.py); the launcher, which made the plan (run_dir/
plan.json), adds the block once the ranks are done, as it adds `restarts` (launch/supervise.py):

- step time: the plan's estimate vs seconds per optimizer step (all steps, and steady state: after the warm-up and
  without steps that met a new shape);
- tokens/s: the plan's estimate (real tokens when the data's were measured, else padded 2 x max_length per pair:
  the plan says which) vs the real tokens/s measured;
- pairs/s, and memory per card: the plan's total vs the measured peak (device memory; peak RSS on CPU ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_dist.util.atomic import write_json_atomic
from dpo_dist.util.layout import METRICS_FILE

KEY = "planned_vs_measured"


def _ratio(measured, planned):
    return round(measured / planned, 3) if measured is not None and planned else None


def planned_vs_measured(plan: dict, metrics: dict, plan_path: str | None = None) -> dict:
    """Pure: the block from plan.json's dict and training_metrics.json's."""
    steps = metrics.get("steps") or 0
    secs = metrics.get("train_seconds")
    step_all = metrics.get("step_time_s") or (secs / steps if secs and steps else None)
    pairs_planned = plan.get("est_pairs_per_s") or (
        plan["micro_batch_size"] * plan["gradient_accumulation_steps"] * plan["world_size"] / plan["est_step_time_s"]
        if plan.get("est_step_time_s") else None)
    mem = plan.get("memory_gib") or {}
    per_pair = plan.get("est_tokens_per_pair")
    basis = plan.get("est_tokens_basis", "padded")
    basis_text = (f"real: {per_pair:.0f} tokens per pair, measured on the data" if basis == "real" and per_pair else
                  f"padded: {per_pair or 2 * plan.get('max_length', 0):.0f} tokens per pair (2 x max_length; the data's "
                  "tokens were not measured)")
    block = {
        "plan": plan_path,
        "step_time_s": {"planned": plan.get("est_step_time_s"), "measured": step_all,
                        "measured_steady": metrics.get("step_time_s_steady")},
        "tokens_per_s": {"planned": plan.get("est_tokens_per_s"), "planned_basis": basis_text,
                         "measured": metrics.get("tokens_per_s"), "measured_steady": metrics.get("tokens_per_s_steady")},
        "pairs_per_s": {"planned": round(pairs_planned, 3) if pairs_planned else None,
                        "measured": metrics.get("pairs_per_s"), "measured_steady": metrics.get("pairs_per_s_steady")},
        "memory_gib_per_card": {"planned": mem.get("total"), "measured": metrics.get("peak_memory_gib_per_rank_max"),
                                "card": plan.get("card_memory_gib"),
                                "measured_what": "peak RSS per rank" if metrics.get("backend") == "cpu" else
                                "peak device memory per rank"},
    }
    for row in ("step_time_s", "tokens_per_s", "pairs_per_s", "memory_gib_per_card"):
        r = block[row]
        r["measured_over_planned"] = _ratio(r.get("measured_steady") or r["measured"], r["planned"])
    batch = plan["micro_batch_size"] * plan["gradient_accumulation_steps"] * plan["world_size"]
    if metrics.get("global_batch_pairs") not in (None, batch):
        block["note"] = (f"the run's global batch ({metrics['global_batch_pairs']} pairs) is not the plan's ({batch}): "
                         "step time and memory compare different batches")
    return block


def summary_lines(block: dict) -> list[str]:
    """The block in words, one line per figure (the launcher prints them)."""
    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    s, t, p, m = (block[k] for k in ("step_time_s", "tokens_per_s", "pairs_per_s", "memory_gib_per_card"))
    steady = lambda r, spec: f"; steady {f(r['measured_steady'], spec)}" if r.get("measured_steady") else ""  # noqa: E731
    return [
        "launch: planned vs measured (training_metrics.json, planned_vs_measured):",
        f"  step time   planned {f(s['planned'], '.3f')} s, measured {f(s['measured'], '.3f')} s{steady(s, '.3f')}",
        f"  tokens/s    planned {f(t['planned'], ',.0f')} ({t['planned_basis']}), measured {f(t['measured'], ',.0f')} "
        f"real{steady(t, ',.0f')}",
        f"  pairs/s     planned {f(p['planned'], '.2f')}, measured {f(p['measured'], '.2f')}{steady(p, '.2f')}",
        f"  memory      planned {f(m['planned'], '.2f')} GiB per card, measured {f(m['measured'], '.2f')} GiB "
        f"({m['measured_what']}; card {f(m['card'], '.2f')} GiB)",
    ] + ([f"  note: {block['note']}"] if block.get("note") else [])


def record_plan_in_metrics(output_dir: Path, plan: dict, plan_path: str | None = None) -> dict | None:
    """Add the block to output_dir/training_metrics.json (written by rank 0); returns it, or None when there is no
    metrics file to add it to (an SFT run writes its own, smaller one: the block goes in too)."""
    path = Path(output_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    block = planned_vs_measured(plan, metrics, plan_path)
    metrics[KEY] = block
    write_json_atomic(path, metrics)
    return block
