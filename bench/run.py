"""`make bench`: TRL with its defaults (A), TRL tuned with its own options (A-tuned) and dpo-dist (B), side by side.

Every side: the bench Llama (~26M parameters, ``dpo_dist.tiny.ensure_bench_assets``), the same first N long-tailed
hh-rlhf-like pairs, full fine-tuning, 2 CPU ranks (gloo, 1 thread each) under DeepSpeed ZeRO-3, max_length 512 /
max_prompt_length 256 (TRL's defaults 1024 / 512 need > 3 GiB per rank for A, which the shared 23 GiB machine
OOM-killed), 1 epoch.

(A) ``bench/trl_baseline.py``: TRL's DPOTrainer with its defaults (reference = a second model, sharded by ZeRO-3, run
    every step; each batch padded to its longest row; batch 8; gradient checkpointing on).
(A-tuned) the same script with the best configuration TRL itself offers that runs here (``TUNED_TRL_OPTIONS``:
    padding_free, no gradient checkpointing, dpo-dist's micro-batch 8 and accumulation 4). Every other option tried
    is in ``TRL_OPTION_TRIALS``; the bench runs each once and records its pairs/s or its exact error.
(B) ``python -m launch train --hardware cpu --cards 2 --full --zero_stage 3 --bf16 true`` with
    ``--card_memory_gib`` = the larger of A's and A-tuned's measured peak (first round), so B gets no more memory.
    Everything else is the plan's: micro-batch / accumulation / checkpointing, the reference (the log-prob cache,
    "precomputed"), packing with shared prompts and K=8 bucket totals, chunked log-probs. The cache is emptied before
    every B run, so B pays the reference pass every time: B's time = reference pass + training loop. A's time =
    training loop (its reference runs inside it). ``--bf16 true`` on CPU is DeepSpeed's torch_autocast (bf16
    matmuls on AMX, fp32 weights); TRL cannot run bf16 on CPU ranks under DeepSpeed (see the trials).
(B-fp32) B once without --bf16: what bf16 changes (speed, loss curve, reference log-probs, held-out accuracy).

Per run: pairs/s = N / time; real tokens/s (prompt counted in both rows, no padding); padding fraction = 1 − unpadded
/ fed tokens; peak RSS per rank (max over ranks; also minus the RSS the rank had before loading any model); MFU =
executed model FLOPs / time / peak, where executed model FLOPs = ``launch.plan.dpo_step_flops`` on the tokens the
forwards really ran without padding (a shared prompt once), policy forward + backward plus one reference forward,
and peak = 2 ranks × the GEMM FLOP/s of ONE thread in the dtype the side's matmuls run in (fp32, or bf16 for B),
measured with a torch matmul in this run (the model's MLP shape). Medians over ``--runs`` rounds, the order
rotating (A A-tuned B, B A-tuned A, ...).

Also: padding of packed micro-batches on the first 1000 bench pairs at micro-batch 2 / 4 / 8 (the sampler and the
bucket choice the ranks use), and a quality check (``--quality``: B-fp32 vs B, a learning rate that learns, held-out
reward accuracy).

Outputs: ``bench/results/latest.json`` / ``latest.md`` / ``latest.png`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
PY = sys.executable
SIDES = ("A", "A_tuned", "B")
LABELS = {"A": "A: TRL defaults", "A_tuned": "A-tuned: TRL tuned", "B": "B: dpo-dist", "B_fp32": "B-fp32"}

# The strongest configuration TRL 0.22.2 offers that runs here (2 CPU ranks, ZeRO-3): no padding, no recompute,
# dpo-dist's micro-batch and accumulation.
TUNED_TRL_OPTIONS = {"padding_free": True, "gradient_checkpointing": False, "per_device_train_batch_size": 8,
                     "gradient_accumulation_steps": 4}
# Every TRL option tried for A-tuned, each run once on --trial_pairs pairs (on top of TUNED_TRL_OPTIONS where the
# name says "tuned +"): pairs/s, or the exact error.
TRL_OPTION_TRIALS = [
    ("defaults", {}),
    ("gradient_checkpointing=False", {"gradient_checkpointing": False}),
    ("padding_free=True", {"padding_free": True}),
    ("tuned", TUNED_TRL_OPTIONS),
    ("tuned + use_logits_to_keep=True", {**TUNED_TRL_OPTIONS, "use_logits_to_keep": True}),
    ("tuned - padding_free + use_logits_to_keep=True",
     {**TUNED_TRL_OPTIONS, "padding_free": False, "use_logits_to_keep": True}),
    ("tuned + precompute_ref_log_probs=True", {**TUNED_TRL_OPTIONS, "precompute_ref_log_probs": True}),
    ("tuned + bf16=True", {**TUNED_TRL_OPTIONS, "bf16": True}),
    ("tuned + bf16=True, use_cpu=True", {**TUNED_TRL_OPTIONS, "bf16": True, "use_cpu": True}),
    ("tuned + torch_compile=True", {**TUNED_TRL_OPTIONS, "torch_compile": True}),
]
ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+)?(?:Error|Exception)\b.*)$")


def gemm_flops_one_thread(dtype: str = "fp32", seconds: float = 1.0) -> float:
    """Matmul FLOP/s of one thread in ``dtype``: [2048, 512] @ [512, 1376] (the bench model's MLP shape)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(2048, 512, dtype=dt), torch.randn(512, 1376, dtype=dt)
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


def first_error(log_text: str) -> str:
    """The first exception line a rank printed (its type and message), without the rank prefix."""
    for line in log_text.splitlines():
        m = ERROR_LINE.match(line.strip())
        if m and not line.strip().startswith("Traceback"):
            return m.group(1).strip()
    return log_text.strip().splitlines()[-1] if log_text.strip() else "(no output)"


def trl_argv(cfg, work: Path, options: dict, pairs: int) -> tuple[list[str], Path]:
    out = work / "a.json"
    argv = [PY, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port", str(free_port()),
            "--module", "bench.trl_baseline", "--model", cfg["model"], "--data", cfg["data"], "--pairs",
            str(pairs), "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--out", str(out),
            "--output_dir", str(work / "a-out"), "--max_length", str(cfg["max_length"]),
            "--max_prompt_length", str(cfg["max_prompt_length"]), "--options", json.dumps(options)]
    return argv, out


def run_a(cfg, work: Path, options: dict) -> dict:
    argv, out = trl_argv(cfg, work, options, cfg["pairs"])
    run(argv, cfg["timeout"], work / "a.log")
    return json.loads(out.read_text())


def run_trials(cfg, work: Path) -> list[dict]:
    """Each of TRL_OPTION_TRIALS once: pairs/s (training loop) or the exact error."""
    rows = []
    for name, options in TRL_OPTION_TRIALS:
        w = work / f"trial-{len(rows)}"
        w.mkdir()
        argv, out = trl_argv(cfg, w, options, cfg["trial_pairs"])
        try:
            run(argv, cfg["timeout"], w / "a.log")
            raw = json.loads(out.read_text())
            rows.append({"name": name, "options": options, "ok": True, "pairs": cfg["trial_pairs"],
                         "pairs_per_s": cfg["trial_pairs"] / raw["train_seconds"],
                         "peak_memory_gib_per_rank": raw["peak_rss_gib_per_rank_max"]})
        except RuntimeError:
            rows.append({"name": name, "options": options, "ok": False,
                         "error": first_error((w / "a.log").read_text(errors="replace"))})
        print(f"trial {name}: {'ok' if rows[-1]['ok'] else rows[-1]['error'][:160]}", flush=True)
    return rows


def run_b(cfg, work: Path, *, bf16: bool, card_memory_gib: float, pairs: int | None = None,
          rank_flags: tuple = ()) -> dict:
    run_dir, cache = work / "b-run", work / "b-refcache"
    shutil.rmtree(cache, ignore_errors=True)  # a cold cache every run: B pays the reference pass
    # Only what the bench fixes for every side (full fine-tuning, ZeRO-3, 2 ranks, lengths, memory) and bf16: the
    # reference, micro-batch, buckets and packing are the plan's own choices.
    argv = [PY, "-m", "launch", "train", "--model", cfg["model"], "--hardware", "cpu", "--cards", "2", "--full",
            "--zero_stage", "3", "--max_length", str(cfg["max_length"]), "--bf16", str(bf16).lower(),
            "--max_prompt_length", str(cfg["max_prompt_length"]), "--card_memory_gib", f"{card_memory_gib:.2f}",
            "--run_dir", str(run_dir), "--master_port", str(free_port()), *cfg["b_flags"], "--",
            "--dataset_name", cfg["data"], "--max_train_samples", str(pairs or cfg["pairs"]), "--max_eval_samples", "8",
            "--no_merge", "--num_train_epochs", "1", "--learning_rate", "1e-6", "--ref_cache_dir", str(cache),
            "--logging_steps", "1", "--save_steps", "100000", "--overwrite_output_dir", *rank_flags]
    run(argv, cfg["timeout"], work / "b.log")
    m = json.loads((run_dir / "output" / METRICS_FILE).read_text())
    m["plan"] = json.loads((run_dir / "plan.json").read_text())
    m["bf16"] = bf16
    return m


def summarise(raw: dict, side: str, cfg: dict, spec, peaks: dict) -> dict:
    if side.startswith("A"):
        secs, peak, base = raw["train_seconds"], raw["peak_rss_gib_per_rank_max"], raw["rss_before_model_gib_max"]
        ref_s, unpadded = 0.0, raw.get("unpadded_tokens") or raw["real_tokens"]
    else:
        ref_s = float((raw.get("reference_cache") or {}).get("seconds", 0.0))
        secs, peak, base = raw["train_seconds"] + ref_s, raw["peak_memory_gib_per_rank_max"], raw["rss_before_model_gib_max"]
        unpadded = raw.get("unpadded_tokens") or raw["real_tokens"]
    real, fed = raw["real_tokens"], raw["fed_tokens"]
    pairs_trained = raw["pairs_trained"]
    dtype = "bf16" if raw.get("bf16") else "fp32"
    flops = dpo_step_flops(spec, unpadded, use_peft=False, reference="sharded",
                           seq_len=int(real / max(1, 2 * pairs_trained)))
    return {
        "seconds": secs, "reference_pass_seconds": ref_s, "pairs_per_s": cfg["pairs"] / secs,
        "pairs_per_s_train_loop": cfg["pairs"] / (secs - ref_s), "real_tokens_per_s": real / secs,
        "padding_fraction": 1 - unpadded / fed if fed else None, "peak_memory_gib_per_rank": peak,
        "peak_memory_above_baseline_gib": peak - base, "mfu": flops / secs / peaks[dtype], "matmul_dtype": dtype,
        "executed_tokens": unpadded, "pairs_trained": pairs_trained, "first_train_loss": raw.get("first_train_loss"),
        "train_losses": raw.get("train_losses"),
    }


def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def padding_report(assets, cfg, micro_batches=(2, 4, 8), n_pairs: int = 1000, k: int = 8) -> list[dict]:
    """Padding of packed micro-batches on the first ``n_pairs`` bench pairs: the ranks' own tokenisation,
    ``PackedBatchSampler`` (2 ranks, one epoch) and bucket choice (K totals), with and without shared prompts."""
    from transformers import AutoTokenizer

    from dpo_dist.data.bucketing import PackedBatchSampler, choose_buckets, packed_pair_length, padding_fraction
    from dpo_dist.data.preference import split_hh_transcript
    from dpo_dist.train.engine import tokenize_pair

    tok = AutoTokenizer.from_pretrained(cfg["model"])
    lines = (Path(cfg["data"]) / "train.jsonl").read_text().splitlines()[:n_pairs]
    lens = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        p, c, r = split_hh_transcript(row["chosen"], row["rejected"], i)
        t = tokenize_pair({"prompt": tok.bos_token + p, "chosen": c, "rejected": r}, tok, cfg["max_prompt_length"], None)
        lens.append(tuple(len(t[f"{x}_input_ids"]) for x in ("prompt", "chosen", "rejected")))
    out = []
    for share in (True, False):
        pair_lengths = [packed_pair_length(p, c, r, cfg["max_length"], share) for p, c, r in lens]
        for mb in micro_batches:
            totals = PackedBatchSampler(pair_lengths, mb, num_replicas=2, seed=0).totals(1)
            buckets = choose_buckets(totals, k)
            out.append({"pairs": len(lens), "share_prompt": share, "micro_batch": mb, "shapes": len(buckets),
                        "padding_fraction": padding_fraction(totals, buckets), "tokens": sum(pair_lengths)})
    return out


def quality_check(cfg, work: Path, card_memory_gib: float) -> dict:
    """B-fp32 and B (bf16) trained alike with a learning rate that learns: loss curves and held-out accuracy."""
    flags = ("--learning_rate", "5e-5", "--num_train_epochs", "2", "--max_eval_samples", "64")
    res = {}
    for bf16 in (False, True):
        w = work / f"quality-{'bf16' if bf16 else 'fp32'}"
        w.mkdir()
        m = run_b(cfg, w, bf16=bf16, card_memory_gib=card_memory_gib, pairs=cfg["quality_pairs"], rank_flags=flags)
        res["bf16" if bf16 else "fp32"] = {k: m.get(k) for k in ("train_losses", "eval_reward_accuracy",
                                                                 "eval_reward_margin", "eval_loss")}
    a, b = res["fp32"]["train_losses"] or [], res["bf16"]["train_losses"] or []
    res["max_abs_train_loss_difference"] = max((abs(x - y) for x, y in zip(a, b)), default=None)
    res["settings"] = dict(pairs=cfg["quality_pairs"], epochs=2, learning_rate=5e-5, eval_pairs=64)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--trial_pairs", type=int, default=32, help="pairs per TRL option trial")
    ap.add_argument("--quality_pairs", type=int, default=128, help="pairs for the bf16 quality check")
    ap.add_argument("--no_trials", action="store_true", help="skip the TRL option trials")
    ap.add_argument("--no_quality", action="store_true", help="skip the bf16 quality check")
    ap.add_argument("--b_launch_flags", default="",
                    help="extra `launch train` flags for B, e.g. '--reference sharded' (what-if runs; default: none)")
    ap.add_argument("--max_length", type=int, default=512,
                    help="every side (TRL's default 1024 needs > 3 GiB per rank for A: OOM on a shared 23 GiB box)")
    ap.add_argument("--max_prompt_length", type=int, default=256, help="every side")
    ap.add_argument("--card_memory_gib", type=float, default=None,
                    help="B's memory per rank (default: the larger of A's and A-tuned's measured peak; --smoke: 2, "
                         "since the tiny model's peaks are the runtime alone)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 16 pairs, max_length 256, 1 run each")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for latest.json/.md/.png")
    ap.add_argument("--timeout", type=int, default=1800)
    a = ap.parse_args(argv)

    assets = ensure_tiny_assets() if a.smoke else ensure_bench_assets()
    cfg = dict(model=str(assets.llama_dir), data=str(assets.data_dir), pairs=16 if a.smoke else a.pairs,
               trial_pairs=a.trial_pairs, quality_pairs=a.quality_pairs, b_flags=shlex.split(a.b_launch_flags),
               timeout=a.timeout, max_length=256 if a.smoke else a.max_length,
               max_prompt_length=128 if a.smoke else a.max_prompt_length)
    runs = 1 if a.smoke else a.runs
    spec = load_spec(cfg["model"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    raws = {s: [] for s in (*SIDES, "B_fp32")}
    peak_runs = {"fp32": [], "bf16": []}
    card_memory = a.card_memory_gib or (2.0 if a.smoke else None)
    trials, quality = None, None
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        if not (a.smoke or a.no_trials):
            trials = run_trials(cfg, Path(tmp))
        for i in range(runs):
            order = SIDES if i % 2 == 0 else tuple(reversed(SIDES))
            for dtype in peak_runs:
                peak_runs[dtype].append(2 * gemm_flops_one_thread(dtype))
            for side in order:
                work = Path(tmp) / f"{side}{i}"
                work.mkdir()
                t = time.perf_counter()
                if side == "B":
                    if card_memory is None:  # the larger of A's and A-tuned's peak, from the first round
                        card_memory = max(r["peak_rss_gib_per_rank_max"] for s in ("A", "A_tuned") for r in raws[s])
                    raw = run_b(cfg, work, bf16=True, card_memory_gib=card_memory)
                else:
                    raw = run_a(cfg, work, TUNED_TRL_OPTIONS if side == "A_tuned" else {})
                raws[side].append(raw)
                print(f"run {i} {side}: {time.perf_counter() - t:.0f}s wall", flush=True)
        if not a.smoke:
            work = Path(tmp) / "B_fp32"
            work.mkdir()
            raws["B_fp32"].append(run_b(cfg, work, bf16=False, card_memory_gib=card_memory))
            if not a.no_quality:
                quality = quality_check(cfg, Path(tmp), card_memory)
    peaks = {d: statistics.median(v) for d, v in peak_runs.items()}
    rows = {s: [summarise(r, s, cfg, spec, peaks) for r in raws[s]] for s in raws}
    result = build_result(a, cfg, spec, rows, raws, peaks, load, card_memory, trials, quality,
                          padding_report(assets, cfg) if not a.smoke else None)
    (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "latest.md").write_text(render_md(result))
    plot(result, out / "latest.png")
    print(render_md(result))
    return 0


KEYS = ("pairs_per_s", "pairs_per_s_train_loop", "real_tokens_per_s", "padding_fraction", "peak_memory_gib_per_rank",
        "peak_memory_above_baseline_gib", "mfu", "seconds", "reference_pass_seconds")


def build_result(a, cfg, spec, rows, raws, peaks, load, card_memory, trials, quality, padding) -> dict:
    medians = {s: {k: med(rows[s], k) for k in KEYS} for s in rows if rows[s]}
    m = lambda s, k: medians[s][k]  # noqa: E731
    planB = raws["B"][-1]["plan"]
    predicted, measured = planB["memory_gib"]["total"], m("B", "peak_memory_gib_per_rank")
    bf16_effect = None
    if rows["B_fp32"]:
        fp32, bf = rows["B_fp32"][0], rows["B"][0]
        bf16_effect = {
            "pairs_per_s_fp32": fp32["pairs_per_s"], "pairs_per_s_bf16_median": m("B", "pairs_per_s"),
            "speedup": m("B", "pairs_per_s") / fp32["pairs_per_s"], "mfu_fp32": fp32["mfu"],
            "train_losses_fp32": fp32["train_losses"], "train_losses_bf16": bf["train_losses"],
            "reference_cache_fp32": raws["B_fp32"][0].get("reference_cache"),
            "reference_cache_bf16": raws["B"][0].get("reference_cache"),
            "quality": quality,
        }
    return {
        "n_runs": len(rows["B"]), "pairs": cfg["pairs"], "model": cfg["model"], "model_params": spec.num_params,
        "smoke": a.smoke, "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
        "peak_flops_definition": "2 ranks x torch matmul FLOP/s of one thread ([2048,512]@[512,1376]) in the side's "
                                 "matmul dtype, best of ~1 s, median over rounds",
        "peak_flops": peaks["fp32"], "peak_flops_bf16": peaks["bf16"],
        "card_memory_gib_b": card_memory,
        "pairs_per_s_ratio": m("B", "pairs_per_s") / m("A", "pairs_per_s"),
        "pairs_per_s_ratio_train_loop": m("B", "pairs_per_s_train_loop") / m("A", "pairs_per_s"),
        "tokens_per_s_ratio": m("B", "real_tokens_per_s") / m("A", "real_tokens_per_s"),
        "peak_memory_ratio": m("B", "peak_memory_gib_per_rank") / m("A", "peak_memory_gib_per_rank"),
        "peak_memory_above_baseline_ratio": (m("B", "peak_memory_above_baseline_gib")
                                             / m("A", "peak_memory_above_baseline_gib")),
        "tuned_trl": {
            "pairs_per_s_ratio": m("B", "pairs_per_s") / m("A_tuned", "pairs_per_s"),
            "peak_memory_ratio": m("B", "peak_memory_gib_per_rank") / m("A_tuned", "peak_memory_gib_per_rank"),
            "pairs_per_s_a_tuned": m("A_tuned", "pairs_per_s"), "options": TUNED_TRL_OPTIONS,
            "trials": trials if trials is not None else "skipped",
        },
        "padding_fraction_a": m("A", "padding_fraction"), "padding_fraction_a_tuned": m("A_tuned", "padding_fraction"),
        "padding_fraction_b": m("B", "padding_fraction"),
        "mfu_a": m("A", "mfu"), "mfu_a_tuned": m("A_tuned", "mfu"), "mfu_b": m("B", "mfu"),
        "mfu_b_fp32": bf16_effect["mfu_fp32"] if bf16_effect else None,
        "buckets_b": raws["B"][-1].get("length_buckets"),
        "plan_b": {k: planB.get(k) for k in ("zero_stage", "micro_batch_size", "gradient_accumulation_steps",
                                             "gradient_checkpointing", "reference", "length_buckets", "packing",
                                             "bf16")},
        "b_launch_flags": a.b_launch_flags,
        "planner_predicted_peak_gib_b": predicted,
        "measured_peak_gib_b": measured,
        "measured_peak_above_baseline_gib_b": m("B", "peak_memory_above_baseline_gib"),
        "planner_error_b": (predicted - measured) / measured if measured else None,
        "padding_1000_pairs": padding,
        "bf16_effect": bf16_effect,
        "medians": medians, "runs": rows,
        "first_train_loss": {s: [r["first_train_loss"] for r in rows[s]] for s in rows},
    }


def render_md(r: dict) -> str:
    m = r["medians"]
    f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    t = r["tuned_trl"]
    lines = [
        f"# dpo-dist bench: {r['pairs']} pairs, {r['n_runs']} rotating rounds, 2 CPU ranks, ZeRO-3",
        "",
        f"load average at start {r['loadavg_at_start'][0]:.2f}, at end {r['loadavg_at_end'][0]:.2f} (this machine: "
        f"2 cores, shared). Peaks: fp32 {r['peak_flops'] / 1e9:.1f}, bf16 {r['peak_flops_bf16'] / 1e9:.1f} GFLOP/s "
        f"({r['peak_flops_definition']}). B's --card_memory_gib {f(r['card_memory_gib_b'], 2)}.",
        "",
        "| median | A: TRL defaults | A-tuned: TRL tuned | B: dpo-dist | B/A | B/A-tuned |",
        "|---|---|---|---|---|---|",
    ]
    for k, label, p in (("pairs_per_s", "pairs/s (B incl. reference pass)", 3),
                        ("pairs_per_s_train_loop", "pairs/s, training loop only", 3),
                        ("real_tokens_per_s", "real tokens/s", 1), ("padding_fraction", "padding fraction", 3),
                        ("peak_memory_gib_per_rank", "peak RSS per rank (GiB)", 3),
                        ("peak_memory_above_baseline_gib", "peak RSS above pre-model baseline (GiB)", 3),
                        ("mfu", "MFU (executed FLOPs / peak of the matmul dtype)", 4), ("seconds", "seconds", 1)):
        a, at, b = m["A"][k], m["A_tuned"][k], m["B"][k]
        ra = f(b / a, 2) if a and b is not None else "-"
        rt = f(b / at, 2) if at and b is not None else "-"
        lines.append(f"| {label} | {f(a, p)} | {f(at, p)} | {f(b, p)} | {ra} | {rt} |")
    lines += [
        "",
        f"- **B / A-tuned: {t['pairs_per_s_ratio']:.2f}x pairs/s** (target >= 2.0) at peak memory ratio "
        f"**{t['peak_memory_ratio']:.2f}** (target <= 1.0). B / A: {r['pairs_per_s_ratio']:.2f}x at "
        f"{r['peak_memory_ratio']:.2f}.",
        f"- A-tuned = TRL 0.22.2 with {t['options']} (B's matmuls run in bf16, A's and A-tuned's in fp32).",
        f"- MFU: A {f(r['mfu_a'], 3)}, A-tuned {f(r['mfu_a_tuned'], 3)} (fp32 peak); B {f(r['mfu_b'], 3)} (bf16 peak); "
        f"B-fp32 {f(r['mfu_b_fp32'], 3)} (fp32 peak).",
        f"- B's plan: {r['plan_b']}; B pads {f(r['padding_fraction_b'])} with {len(r['buckets_b'] or [])} shapes "
        f"{r['buckets_b']}; planner predicted {r['planner_predicted_peak_gib_b']:.3f} GiB per rank, measured "
        f"{f(r['measured_peak_gib_b'])} GiB (error "
        f"{f(100 * r['planner_error_b'] if r['planner_error_b'] is not None else None, 1)}%).",
    ]
    if isinstance(t["trials"], list):
        lines += ["", "## TRL options tried (one run each on the first pairs)", "",
                  "| options | result |", "|---|---|"]
        for row in t["trials"]:
            res = (f"{row['pairs_per_s']:.3f} pairs/s, {row['peak_memory_gib_per_rank']:.2f} GiB" if row["ok"]
                   else "fails: `" + row["error"].replace("|", "/")[:300] + "`")
            lines.append(f"| {row['name']} | {res} |")
    if r.get("padding_1000_pairs"):
        lines += ["", "## Padding of packed micro-batches, first 1000 bench pairs (2 ranks, 1 epoch)", "",
                  "| shared prompt | micro-batch | shapes | padding |", "|---|---|---|---|"]
        for row in r["padding_1000_pairs"]:
            lines.append(f"| {'yes' if row['share_prompt'] else 'no'} | {row['micro_batch']} | {row['shapes']} | "
                         f"{100 * row['padding_fraction']:.1f}% |")
    e = r.get("bf16_effect")
    if e:
        lines += ["", "## What bf16 changes (B-fp32 vs B)", "",
                  f"- speed: {e['pairs_per_s_fp32']:.3f} -> {e['pairs_per_s_bf16_median']:.3f} pairs/s "
                  f"({e['speedup']:.2f}x); MFU B-fp32 {f(e['mfu_fp32'])} of the fp32 peak.",
                  f"- train loss per step, fp32: {[round(x, 4) for x in e['train_losses_fp32'] or []]}; bf16: "
                  f"{[round(x, 4) for x in e['train_losses_bf16'] or []]}."]
        q = e.get("quality")
        if q:
            s = q["settings"]
            lines.append(
                f"- quality check ({s['pairs']} pairs, {s['epochs']} epochs, lr {s['learning_rate']}, {s['eval_pairs']} "
                f"held-out pairs): held-out reward accuracy fp32 {f(q['fp32']['eval_reward_accuracy'])}, bf16 "
                f"{f(q['bf16']['eval_reward_accuracy'])}; margin fp32 {f(q['fp32']['eval_reward_margin'])}, bf16 "
                f"{f(q['bf16']['eval_reward_margin'])}; max |train loss difference| per step "
                f"{f(q['max_abs_train_loss_difference'], 4)}.")
    lines.append("")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("pairs_per_s", "pairs/s"), ("real_tokens_per_s", "real tokens/s"), ("padding_fraction", "padding"),
            ("peak_memory_gib_per_rank", "peak RSS GiB/rank"), ("mfu", "MFU")]
    sides = (("A", "#999999"), ("A_tuned", "#ff7f0e"), ("B", "#1f77b4"))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.4))
    for ax, (k, label) in zip(axes, keys):
        for x, (side, color) in enumerate(sides):
            vals = [row[k] for row in r["runs"][side] if row.get(k) is not None]
            ax.bar(x, statistics.median(vals) if vals else 0, color=color)
            ax.scatter([x] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(sides)), ["A: TRL", "A-tuned", "B: dpo-dist"], fontsize=8)
        ax.set_title(label)
    fig.suptitle(f"dpo-dist vs TRL defaults and TRL tuned ({r['pairs']} pairs, {r['n_runs']} rounds, 2 CPU ranks, "
                 "ZeRO-3)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
