"""`make bench`: plain TRL (A) vs dpo-dist (B), side by side, alternating, on this machine.

Both sides: the bench Llama (~26M parameters, ``dpo_dist.tiny.ensure_bench_assets``), the same
first N long-tailed hh-rlhf-like pairs, full fine-tuning, 2 CPU ranks (gloo, 1 thread each)
under DeepSpeed ZeRO-3, max_length 512 / max_prompt_length 256 (given to both; TRL's defaults
1024 / 512 need > 3 GiB per rank for A, which the shared 23 GiB machine OOM-killed), 1 epoch.

(A) ``bench/trl_baseline.py``: TRL DPOTrainer with defaults (reference = a second model,
    sharded by ZeRO-3, run every step; each batch padded to its longest row; batch 8).
(B) ``python -m launch train --hardware cpu --cards 2 --full --zero_stage 3 --card_memory_gib 3``:
    everything else is the plan's: micro-batch / accumulation / checkpointing, the reference
    (the log-prob cache: "precomputed"), packing with K=8 bucket totals (sized by the data's
    measured token lengths), chunked log-probs. The cache is emptied before every B run, so B
    pays the reference pass every time (a cache hit would be faster): B's time = reference
    pass + training loop. A's time = training loop (its reference runs inside it).

Per run: pairs/s = N / time; real tokens/s (prompt counted in both rows, no padding);
padding fraction = 1 − real / fed tokens; peak RSS per rank (max over ranks; also minus the RSS
the rank had before loading any model); MFU = model FLOPs / time / peak, where model FLOPs =
``launch.plan.speed.dpo_step_flops`` on the real tokens (policy forward + backward on chosen and
rejected, plus one reference forward, on both sides; attention term at the mean row length)
and peak = 2 ranks × the fp32 GEMM FLOP/s of ONE thread, measured with a torch matmul in this
run (shapes like the model's MLP). Medians over ``--runs`` alternating pairs (A B, B A, ...).

Outputs: ``bench/results/latest.json`` / ``latest.md`` / ``latest.png`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpo_dist.backend import cleanup_shm_buffers
from dpo_dist.tiny import ensure_bench_assets, ensure_tiny_assets
from dpo_dist.util.layout import METRICS_FILE
from launch.plan import dpo_step_flops, load_spec
from tests.support.testing_utils import cpu_env, free_port

ROOT = Path(__file__).resolve().parent.parent
PLANNER_NOTE = ("measured = median over runs of the max over ranks of peak RSS (ru_maxrss); predicted = the plan's "
                "memory total per rank: the formulas (model states, activations of the largest packed micro-batch, "
                "logits chunk, buffers) + 30% + a runtime reserve of 0.53 GiB + 28 bytes per parameter "
                "(launch/plan/hardware.py, CPU calibration).")
PY = sys.executable


def gemm_flops_one_thread(seconds: float = 1.0) -> float:
    """fp32 matmul FLOP/s of one thread: [2048, 512] @ [512, 1376] (the bench model's MLP shape)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(2048, 512), torch.randn(512, 1376)
        for _ in range(3):
            a @ b
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * 2048 * 512 * 1376 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(old)


def run(argv, timeout, log: Path) -> None:
    port = int(argv[argv.index("--master_port") + 1])
    try:
        _run(argv, timeout, log)
    finally:
        cleanup_shm_buffers(port)


def _run(argv, timeout, log: Path) -> None:
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=cpu_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise RuntimeError(f"timed out after {timeout}s: see {log}") from None
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(map(str, argv))}\n{log.read_text()[-3000:]}")


def run_a(cfg, work: Path) -> dict:
    out = work / "a.json"
    argv = [PY, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port", str(free_port()),
            "--module", "bench.trl_baseline", "--model", cfg["model"], "--data", cfg["data"], "--pairs",
            str(cfg["pairs"]), "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--out", str(out),
            "--output_dir", str(work / "a-out")]
    argv += ["--max_length", str(cfg["max_length"]), "--max_prompt_length", str(cfg["max_prompt_length"])]
    run(argv, cfg["timeout"], work / "a.log")
    return json.loads(out.read_text())


def run_b(cfg, work: Path) -> dict:
    run_dir, cache = work / "b-run", work / "b-refcache"
    shutil.rmtree(cache, ignore_errors=True)  # a cold cache every run: B pays the reference pass
    ml = cfg["max_length"]
    # Only what the issue fixes for both sides (full fine-tuning, ZeRO-3, 2 ranks, lengths, memory): the
    # reference, micro-batch, buckets and packing are the plan's own choices.
    argv = [PY, "-m", "launch", "train", "--model", cfg["model"], "--hardware", "cpu", "--cards", "2", "--full",
            "--zero_stage", "3", "--max_length", str(ml),
            "--max_prompt_length", str(cfg["max_prompt_length"]), "--card_memory_gib", str(cfg["card_memory_gib"]),
            "--run_dir", str(run_dir), "--master_port", str(free_port()), *cfg["b_flags"], "--",
            "--dataset_name", cfg["data"], "--max_train_samples", str(cfg["pairs"]), "--max_eval_samples", "8",
            "--no_merge", "--num_train_epochs", "1",
            "--learning_rate", "1e-6", "--ref_cache_dir", str(cache), "--logging_steps", "1",
            "--save_steps", "100000", "--overwrite_output_dir", *cfg.get("b_rank", [])]
    run(argv, cfg["timeout"], work / "b.log")
    m = json.loads((run_dir / "output" / METRICS_FILE).read_text())
    m["plan"] = json.loads((run_dir / "plan.json").read_text())
    m["side"] = "B"
    return m


def summarise(raw: dict, side: str, cfg: dict, spec, peak_flops: float) -> dict:
    if side == "A":
        secs, peak, base = raw["train_seconds"], raw["peak_rss_gib_per_rank_max"], raw["rss_before_model_gib_max"]
        ref_s = 0.0
    else:
        ref_s = float((raw.get("reference_cache") or {}).get("seconds", 0.0))
        secs, peak, base = raw["train_seconds"] + ref_s, raw["peak_memory_gib_per_rank_max"], raw["rss_before_model_gib_max"]
    real, fed = raw["real_tokens"], raw["fed_tokens"]
    pairs_trained = raw["pairs_trained"]
    mean_row = real / max(1, 2 * pairs_trained)
    flops = dpo_step_flops(spec, real, use_peft=False, reference="sharded", seq_len=int(mean_row))
    return {
        "seconds": secs, "reference_pass_seconds": ref_s, "pairs_per_s": cfg["pairs"] / secs,
        "pairs_per_s_train_loop": cfg["pairs"] / (secs - ref_s), "real_tokens_per_s": real / secs,
        "padding_fraction": 1 - real / fed if fed else None, "peak_memory_gib_per_rank": peak,
        "peak_memory_above_baseline_gib": peak - base, "mfu": flops / secs / peak_flops,
        "pairs_trained": pairs_trained, "first_train_loss": raw.get("first_train_loss"),
    }


def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--b_launch_flags", default="",
                    help="extra `launch train` flags for B, e.g. '--reference sharded' (what-if runs; default: none)")
    ap.add_argument("--card_memory_gib", type=float, default=3.0,
                    help="per-rank memory the planner may use: about what A's ranks peak at, so B gets no more")
    ap.add_argument("--max_length", type=int, default=512,
                    help="both sides (TRL's default 1024 needs > 3 GiB per rank for A: OOM on a shared 23 GiB box)")
    ap.add_argument("--max_prompt_length", type=int, default=256, help="both sides")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 16 pairs, max_length 256, 1 run each")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for latest.json/.md/.png")
    ap.add_argument("--timeout", type=int, default=1800)
    a = ap.parse_args(argv)

    assets = ensure_tiny_assets() if a.smoke else ensure_bench_assets()
    cfg = dict(model=str(assets.llama_dir), data=str(assets.data_dir), pairs=16 if a.smoke else a.pairs,
               b_flags=shlex.split(a.b_launch_flags), card_memory_gib=a.card_memory_gib, timeout=a.timeout,
               max_length=256 if a.smoke else a.max_length,
               max_prompt_length=128 if a.smoke else a.max_prompt_length)
    runs = 1 if a.smoke else a.runs
    spec = load_spec(cfg["model"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    rows = {"A": [], "B": []}
    peaks, raws = [], {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        for i in range(runs):
            order = ("A", "B") if i % 2 == 0 else ("B", "A")
            peaks.append(2 * gemm_flops_one_thread())
            for side in order:
                work = Path(tmp) / f"{side}{i}"
                work.mkdir()
                t = time.perf_counter()
                raw = run_a(cfg, work) if side == "A" else run_b(cfg, work)
                raws[side].append(raw)
                print(f"run {i} {side}: {time.perf_counter() - t:.0f}s wall", flush=True)
        peak_flops = statistics.median(peaks)
        for side in ("A", "B"):
            rows[side] = [summarise(r, side, cfg, spec, peak_flops) for r in raws[side]]

    keys = ("pairs_per_s", "pairs_per_s_train_loop", "real_tokens_per_s", "padding_fraction",
            "peak_memory_gib_per_rank", "peak_memory_above_baseline_gib", "mfu", "seconds", "reference_pass_seconds")
    medians = {s: {k: med(rows[s], k) for k in keys} for s in ("A", "B")}
    planB = raws["B"][-1]["plan"]
    predicted = planB["memory_gib"]["total"]
    measured = medians["B"]["peak_memory_gib_per_rank"]
    result = {
        "n_runs": runs, "pairs": cfg["pairs"], "model": cfg["model"], "model_params": spec.num_params,
        "smoke": a.smoke, "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
        "peak_flops_definition": "2 ranks x fp32 torch matmul FLOP/s of one thread ([2048,512]@[512,1376]), "
                                 "best of ~1 s, median over runs",
        "peak_flops": peak_flops,
        "pairs_per_s_ratio": medians["B"]["pairs_per_s"] / medians["A"]["pairs_per_s"],
        "pairs_per_s_ratio_train_loop": medians["B"]["pairs_per_s_train_loop"] / medians["A"]["pairs_per_s"],
        "tokens_per_s_ratio": medians["B"]["real_tokens_per_s"] / medians["A"]["real_tokens_per_s"],
        "peak_memory_ratio": medians["B"]["peak_memory_gib_per_rank"] / medians["A"]["peak_memory_gib_per_rank"],
        "peak_memory_above_baseline_ratio": (medians["B"]["peak_memory_above_baseline_gib"]
                                             / medians["A"]["peak_memory_above_baseline_gib"]),
        "padding_fraction_a": medians["A"]["padding_fraction"], "padding_fraction_b": medians["B"]["padding_fraction"],
        "mfu_a": medians["A"]["mfu"], "mfu_b": medians["B"]["mfu"],
        "buckets_b": raws["B"][-1].get("length_buckets"),
        "plan_b": {k: planB[k] for k in ("zero_stage", "micro_batch_size", "gradient_accumulation_steps",
                                          "gradient_checkpointing", "reference", "length_buckets", "packing")},
        "b_launch_flags": a.b_launch_flags,
        "planner_predicted_peak_gib_b": predicted,
        "measured_peak_gib_b": measured,
        "measured_peak_above_baseline_gib_b": medians["B"]["peak_memory_above_baseline_gib"],
        "planner_error_b": (predicted - measured) / measured if measured else None,
        "planner_note": PLANNER_NOTE,
        "medians": medians, "runs": rows,
        "first_train_loss": {s: [r["first_train_loss"] for r in rows[s]] for s in rows},
    }
    (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "latest.md").write_text(render_md(result))
    plot(result, out / "latest.png")
    print(render_md(result))
    return 0


def render_md(r: dict) -> str:
    m = r["medians"]
    f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [
        f"# dpo-dist bench: {r['pairs']} pairs, {r['n_runs']} alternating runs each, 2 CPU ranks, ZeRO-3",
        "",
        f"load average at start {r['loadavg_at_start'][0]:.2f}, at end {r['loadavg_at_end'][0]:.2f} "
        f"(this machine: 2 cores, shared). Peak = {r['peak_flops'] / 1e9:.1f} GFLOP/s ({r['peak_flops_definition']}).",
        "",
        "| median | A: TRL defaults | B: dpo-dist | B/A |",
        "|---|---|---|---|",
    ]
    for k, label, p in (("pairs_per_s", "pairs/s (B incl. reference pass)", 3),
                        ("pairs_per_s_train_loop", "pairs/s, training loop only", 3),
                        ("real_tokens_per_s", "real tokens/s", 1), ("padding_fraction", "padding fraction", 3),
                        ("peak_memory_gib_per_rank", "peak RSS per rank (GiB)", 3),
                        ("peak_memory_above_baseline_gib", "peak RSS above pre-model baseline (GiB)", 3),
                        ("mfu", "MFU (policy fwd+bwd + reference fwd)", 4), ("seconds", "seconds", 1)):
        a, b = m["A"][k], m["B"][k]
        ratio = f(b / a, 2) if a and b is not None else "-"
        lines.append(f"| {label} | {f(a, p)} | {f(b, p)} | {ratio} |")
    lines += [
        "",
        f"- pairs_per_s_ratio **{r['pairs_per_s_ratio']:.2f}** (target >= 1.5), peak_memory_ratio "
        f"**{r['peak_memory_ratio']:.2f}** (target <= 1.0), padding_fraction_b **{f(r['padding_fraction_b'])}** "
        f"with {len(r['buckets_b'] or [])} shapes {r['buckets_b']}.",
        f"- B's plan: {r['plan_b']}; planner predicted {r['planner_predicted_peak_gib_b']:.3f} GiB per rank, "
        f"measured {f(r['measured_peak_gib_b'])} GiB "
        f"(error {f(100 * r['planner_error_b'] if r['planner_error_b'] is not None else None, 1)}%, target within "
        f"±15%). {r['planner_note']}",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("pairs_per_s", "pairs/s"), ("real_tokens_per_s", "real tokens/s"), ("padding_fraction", "padding"),
            ("peak_memory_gib_per_rank", "peak RSS GiB/rank"), ("mfu", "MFU")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    for ax, (k, label) in zip(axes, keys):
        for x, side, color in ((0, "A", "#999999"), (1, "B", "#1f77b4")):
            vals = [row[k] for row in r["runs"][side] if row.get(k) is not None]
            ax.bar(x, statistics.median(vals) if vals else 0, color=color)
            ax.scatter([x] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks([0, 1], ["A: TRL", "B: dpo-dist"])
        ax.set_title(label)
    fig.suptitle(f"dpo-dist vs TRL defaults ({r['pairs']} pairs, {r['n_runs']} runs, 2 CPU ranks, ZeRO-3)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
