"""`make bench-planner`: the CPU memory planner against measured peak RSS, and the fit of its CPU constants.

Each point is one real run of ``python -m launch train --hardware cpu --cards 2`` (2 CPU ranks, gloo, one thread
each, max_length 256 / max_prompt_length 128, the bench's long-tailed hh-rlhf data), on a random-init model built
here from the real ``transformers`` config classes (``ensure_planner_models``):

===========  ==========================================================  ===========  =======
name         config                                                      parameters   vocab
===========  ==========================================================  ===========  =======
llama-10m    LlamaConfig, hidden 320, 8 layers, MLP 864                  10,573,120   1024
llama-26m    the bench Llama (``dpo_dist.tiny.ensure_bench_assets``)     26,354,176   1024
llama-100m   LlamaConfig, hidden 768, 14 layers, MLP 2048                100,685,568  1024
gemma3-270m  Gemma3TextConfig with google/gemma-3-270m's values          268,098,176  262144
===========  ==========================================================  ===========  =======

All share the bench tokenizer (1024 ids): a model whose vocabulary is larger (Gemma 3's 262,144) just never sees the
ids above 1023, which changes no shape. The plan is the launcher's own for the configuration (``--full`` or LoRA,
``--zero_stage``; micro-batch, reference, packing and checkpointing are the planner's choice), written to
``plan.json``. Measured = ``peak_memory_gib_per_rank_max`` in ``training_metrics.json`` (peak RSS, ``ru_maxrss``, max
over the 2 ranks), the largest over ``--repeats`` runs (2: the same configuration's peak moves by up to ~15% from run
to run on a shared machine, and a plan must hold the worst). ``--gradient_accumulation_steps 1`` keeps the runs short
(accumulation does not change the per-rank peak: the gradient buffers exist either way).

The fit (``fit``): the planner's CPU total (launch/plan/memory.py) is ``(1 + overhead)·formulas + runtime_gib +
runtime_bytes_per_param·loaded + (runtime_bytes_per_trainable + runtime_bytes_per_trainable_zero3 under ZeRO-3)·
trainable``, linear in the five constants, so they are fitted by least squares on the relative error (each residual
divided by its measured peak, so a 1.7 GiB point counts as much as a 6.6 GiB one) over the points marked
``in_fit``, every constant >= 0 (non-negative least squares by enumerating the subsets of constants). One model size
(``HELD_OUT_MODEL``) and one configuration (``HELD_OUT_CONFIG``) stay out of the fit and are checked against it. The
constants are rounded (``ROUND``) as launch/plan/hardware.py holds them.

``python -m bench.planner`` runs every missing run, fits and writes bench/results/planner.{json,md,png};
``--from-results`` re-fits the saved points without running anything. The fitted constants go into
launch/plan/hardware.py by hand; tests/launch/plan/test_cpu_calibration.py checks that they are the fitted ones and
that every point is within ``TOLERANCE`` of the plan.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
VERSION = "planner-v1"  # the model cache folder: bump when a model below changes
TOLERANCE = 0.15  # every point within ±15% of the plan's total
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128
CARDS = 2
# Rounding of the fitted constants, as launch/plan/hardware.py holds them.
ROUND = {"overhead": 2, "runtime_gib": 2, "runtime_bytes_per_param": 1, "runtime_bytes_per_trainable": 1,
         "runtime_bytes_per_trainable_zero3": 1}
CONSTANTS = tuple(ROUND)

# name -> how it is built. "bench": the bench Llama as ensure_bench_assets builds it.
MODELS = {
    "llama-10m": dict(family="llama", hidden_size=320, num_hidden_layers=8, num_attention_heads=5,
                      num_key_value_heads=5, head_dim=64, intermediate_size=864),
    "llama-26m": dict(family="bench"),
    "llama-100m": dict(family="llama", hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                       num_key_value_heads=12, head_dim=64, intermediate_size=2048),
    # google/gemma-3-270m's config.json (text-only, tied embeddings).
    "gemma3-270m": dict(family="gemma3", vocab_size=262144, hidden_size=640, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                        max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6),
}

# The points: (model, full fine-tuning, ZeRO stage or None for the planner's, training pairs, steps). The pairs bound
# the planner's micro-batch (no micro-batch beyond a rank's share): 48 lets it pick 16, 16 caps it at 8, 8 at 4 (the
# 270M model: its full fine-tune at micro-batch 8 would need ~2 x 9 GiB on the shared 23 GiB machine).
POINTS = [
    ("llama-10m", True, 0, 48, 6), ("llama-10m", True, 3, 48, 6), ("llama-10m", False, 0, 48, 6),
    ("llama-10m", False, 1, 48, 6),
    ("llama-26m", True, 0, 48, 6), ("llama-26m", True, 1, 48, 6), ("llama-26m", True, 3, 48, 6),
    ("llama-26m", False, 0, 48, 6), ("llama-26m", False, 3, 48, 6),
    ("llama-100m", True, 0, 16, 4), ("llama-100m", True, 3, 16, 4), ("llama-100m", False, 1, 16, 4),
    ("gemma3-270m", True, None, 8, 3), ("gemma3-270m", False, None, 8, 3), ("gemma3-270m", False, 3, 8, 3),
    ("gemma3-270m", False, 1, 8, 3),
]
HELD_OUT_MODEL = "llama-100m"  # a whole size out of the fit
HELD_OUT_CONFIG = (False, 1)  # LoRA under ZeRO-1, on every size: out of the fit


def point_key(model: str, full: bool, stage, pairs: int) -> str:
    return f"{model}/{'full' if full else 'lora'}/z{'auto' if stage is None else stage}/{pairs}"


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #

def _build_model(name: str, how: dict, tokenizer, out: Path) -> None:
    import torch
    import transformers

    how = dict(how)
    family = how.pop("family")
    common = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, attention_bias=False,
                  attention_dropout=0.0, use_cache=True, torch_dtype="float32")
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_act="silu", rope_theta=500000.0,
                                          rope_scaling=None, tie_word_embeddings=False, mlp_bias=False,
                                          rms_norm_eps=1e-6, max_position_embeddings=2048, **common, **how)
        cls = transformers.LlamaForCausalLM
    else:
        n = how["num_hidden_layers"]
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
        config = transformers.Gemma3TextConfig(hidden_activation="gelu_pytorch_tanh", rope_scaling=None,
                                               layer_types=layer_types, final_logit_softcapping=None,
                                               attn_logit_softcapping=None, tie_word_embeddings=True,
                                               attn_implementation="eager", **common, **how)
        cls = transformers.Gemma3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config).to(torch.float32)
    if family == "gemma3":
        model.config._attn_implementation = "eager"
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_planner_models(names=tuple(MODELS)) -> tuple[dict[str, Path], Path]:
    """({name: model folder}, data folder): the bench assets, plus the other sizes built once into
    ``<cache>/planner-v1/<name>`` (random init, seed 0, the bench tokenizer)."""
    from dpo_dist.tiny import default_cache_dir, ensure_bench_assets

    bench = ensure_bench_assets()
    root = default_cache_dir() / VERSION
    out = {}
    tokenizer = None
    for name in names:
        how = MODELS[name]
        if how["family"] == "bench":
            out[name] = bench.llama_dir
            continue
        folder = root / name
        if not (folder / "config.json").is_file():
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(bench.llama_dir))
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
            try:
                _build_model(name, how, tokenizer, tmp)
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        out[name] = folder
    return out, bench.data_dir


# --------------------------------------------------------------------------- #
# Runs
# --------------------------------------------------------------------------- #

def run_point(model_dir: Path, data_dir: Path, full: bool, stage, pairs: int, work: Path, *, steps: int,
              card_memory_gib: float, timeout: int) -> dict:
    """One `launch train` run; returns its plan and measured peak."""
    from bench.run import run
    from dpo_dist.util.layout import METRICS_FILE
    from tests.support.testing_utils import free_port

    run_dir = work / "run"
    port = free_port()
    argv = [PY, "-m", "launch", "train", "--model", str(model_dir), "--hardware", "cpu", "--cards", str(CARDS),
            *(["--full"] if full else []), *([] if stage is None else ["--zero_stage", str(stage)]),
            "--max_length", str(MAX_LENGTH), "--max_prompt_length", str(MAX_PROMPT_LENGTH),
            "--card_memory_gib", str(card_memory_gib), "--run_dir", str(run_dir), "--master_port", str(port), "--",
            "--dataset_name", str(data_dir), "--max_train_samples", str(pairs), "--max_eval_samples", "8",
            "--no_merge", "--max_steps", str(steps), "--gradient_accumulation_steps", "1",
            "--ref_cache_dir", str(work / "refcache"), "--learning_rate", "1e-6", "--logging_steps", "1",
            "--save_steps", "100000", "--overwrite_output_dir"]
    t0 = time.perf_counter()
    run(argv, timeout, work / "run.log")  # bench.run's: the shared-memory buffers of the port are removed after
    metrics = json.loads((run_dir / "output" / METRICS_FILE).read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    return dict(plan=plan, measured_gib=metrics["peak_memory_gib_per_rank_max"],
                rss_before_model_gib=metrics.get("rss_before_model_gib_max"), steps=steps,
                wall_s=round(time.perf_counter() - t0, 1))


def _pair_tokens(model_dir: Path, data_dir: Path, pairs: int):
    """The data shape the launcher measures for the plan (the same function, the same arguments)."""
    from launch.plan.datastats import measure_pair_tokens

    shape, _ = measure_pair_tokens(str(model_dir), ["--dataset_name", str(data_dir), "--max_train_samples", str(pairs)],
                                   max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    return list(shape.pair_tokens), shape.train_pairs


def measure(keys=None, *, repeats: int = 2, rerun: bool = False, out: Path = RESULTS, card_memory_gib: float = 64.0,
            timeout: int = 3600) -> dict:
    """Run the points, one at a time, until each has ``repeats`` runs (``rerun``: start over), saving after each run.
    A point's measured peak is the largest of its runs: the plan has to hold the worst of them (the same
    configuration's peak RSS varies by up to ~15% from run to run on this shared machine)."""
    path = out / "planner.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    runs = {p["key"]: dict(p, measured_runs_gib=p.get("measured_runs_gib", [p["measured_gib"]]))
            for p in saved.get("points", [])}
    configs = saved.get("configs", {})
    models, data_dir = ensure_planner_models()
    for model, full, stage, pairs, steps in POINTS:
        key = point_key(model, full, stage, pairs)
        if keys and key not in keys:
            continue
        if rerun:
            runs.pop(key, None)
        while len(runs.get(key, {}).get("measured_runs_gib", [])) < repeats:
            configs[model] = json.loads((models[model] / "config.json").read_text())
            pair_tokens, train_pairs = _pair_tokens(models[model], data_dir, pairs)
            with tempfile.TemporaryDirectory(prefix="dpo-planner-") as tmp:
                print(f"{key}: running ...", flush=True)
                r = run_point(models[model], data_dir, full, stage, pairs, Path(tmp), steps=steps,
                              card_memory_gib=card_memory_gib, timeout=timeout)
            plan = r["plan"]
            done = runs.get(key, {}).get("measured_runs_gib", [])
            runs[key] = dict(
                key=key, model=model, full=full, zero_stage_asked=stage, pairs=pairs, pair_tokens=pair_tokens,
                train_pairs=train_pairs, zero_stage=plan["zero_stage"], micro_batch_size=plan["micro_batch_size"],
                gradient_checkpointing=plan["gradient_checkpointing"], reference=plan["reference"],
                offload=plan["offload"], packing=plan["packing"], plan_total_at_run_gib=plan["memory_gib"]["total"],
                measured_runs_gib=[*done, round(r["measured_gib"], 4)],
                measured_gib=max([*done, round(r["measured_gib"], 4)]),
                rss_before_model_gib=round(r["rss_before_model_gib"], 4), steps=steps, wall_s=r["wall_s"],
                measured_on=time.strftime("%Y-%m-%d"))
            print(f"{key}: plan {plan['memory_gib']['total']:.2f} GiB (ZeRO-{plan['zero_stage']}, mb "
                  f"{plan['micro_batch_size']}, {plan['reference']}), measured {r['measured_gib']:.2f} GiB, "
                  f"{r['wall_s']:.0f}s", flush=True)
            saved.update(configs=configs, points=[runs[k] for k in sorted(runs, key=_order)])
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1) + "\n")
    return saved


def _order(key: str) -> int:
    keys = [point_key(*p[:4]) for p in POINTS]
    return keys.index(key) if key in keys else len(keys)


# --------------------------------------------------------------------------- #
# Prediction and fit (pure: no torch, no runs)
# --------------------------------------------------------------------------- #

def plan_inputs(point: dict, config: dict):
    """(spec, PlanOptions) as the launcher built them for this point (launch/cli.py build_plan)."""
    from launch.plan.specs import spec_from_config
    from launch.plan.types import PlanOptions

    spec = spec_from_config(config, point["model"])
    opts = PlanOptions(cards=CARDS, nodes=1, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                       use_peft=not point["full"], zero_stage=point["zero_stage_asked"],
                       pair_tokens=tuple(point["pair_tokens"]), train_pairs=point["train_pairs"])
    return spec, opts


def predict(point: dict, config: dict, hw=None):
    """The planner's per-rank Memory (GiB) for the point's configuration on ``hw`` (default: the cpu row now)."""
    from launch.plan.hardware import HARDWARE
    from launch.plan.memory import card_memory

    spec, opts = plan_inputs(point, config)
    return card_memory(spec, hw or HARDWARE["cpu"], opts, point["zero_stage"], point["offload"],
                       point["micro_batch_size"], point["gradient_checkpointing"], point["reference"])


def features(point: dict, config: dict) -> tuple[float, float, float, float]:
    """(formulas, loaded parameters, trainable parameters, trainable parameters under ZeRO-3) of a point, parameters
    in Gi: the planner's CPU total is (1 + overhead)·formulas + runtime_gib + bytes_per_param·loaded +
    bytes_per_trainable·trainable + bytes_per_trainable_zero3·(trainable under ZeRO-3)."""
    from launch.plan.hardware import HARDWARE
    from launch.plan.types import GIB

    bare = replace(HARDWARE["cpu"], **dict.fromkeys(CONSTANTS, 0.0))
    spec, opts = plan_inputs(point, config)
    trainable = opts.trainable_params(spec) / GIB
    return (predict(point, config, bare).total, spec.num_params / GIB, trainable,
            trainable if point["zero_stage"] == 3 else 0.0)


def in_fit(point: dict) -> bool:
    return point["model"] != HELD_OUT_MODEL and (point["full"], point["zero_stage"]) != HELD_OUT_CONFIG


def fit(points: list[dict], configs: dict) -> dict:
    """The CPU constants that minimise the squared relative error over the ``in_fit`` points, all >= 0, rounded.

    measured - formulas = overhead·formulas + runtime_gib + bytes_per_param·loaded + bytes_per_trainable·trainable +
    bytes_per_trainable_zero3·(trainable under ZeRO-3) is linear in the five constants: ordinary least squares on every
    subset of them (the others held at 0), keeping the best solution with no negative constant (non-negative least
    squares by enumeration: 32 small solves)."""
    import itertools

    import numpy as np

    rows = [p for p in points if in_fit(p)]
    X = np.array([features(p, configs[p["model"]]) for p in rows])
    m = np.array([p["measured_gib"] for p in rows])
    A = np.column_stack([X[:, 0], np.ones(len(rows)), X[:, 1], X[:, 2], X[:, 3]]) / m[:, None]
    y = (m - X[:, 0]) / m
    best = None
    for k in range(len(CONSTANTS) + 1):
        for cols in itertools.combinations(range(len(CONSTANTS)), k):
            coef = np.zeros(len(CONSTANTS))
            if cols:
                coef[list(cols)] = np.linalg.lstsq(A[:, cols], y, rcond=None)[0]
            if (coef < 0).any():
                continue
            err = float(((A @ coef - y) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, coef)
    return {name: round(float(v), ROUND[name]) + 0.0 for name, v in zip(CONSTANTS, best[1])}


def evaluate(saved: dict, hw=None) -> list[dict]:
    """Every point with the prediction of ``hw`` (default: the cpu row now), its error and its role."""
    out = []
    for p in saved["points"]:
        config = saved["configs"][p["model"]]
        spec, opts = plan_inputs(p, config)
        total = predict(p, config, hw).total
        out.append(dict(p, params=spec.num_params, vocab=spec.vocab_size, trainable_params=opts.trainable_params(spec),
                        predicted_gib=round(total, 4), error=round(p["measured_gib"] / total - 1, 4),
                        in_fit=in_fit(p), held_out=[why for why, out_ in (
                            ("size", p["model"] == HELD_OUT_MODEL),
                            ("config", (p["full"], p["zero_stage"]) == HELD_OUT_CONFIG)) if out_]))
    return out


# --------------------------------------------------------------------------- #
# Outputs
# --------------------------------------------------------------------------- #

def report(saved: dict) -> dict:
    """planner.json's content: the fitted constants, the cpu row's now, and every point evaluated with the cpu row."""
    from launch.plan.hardware import HARDWARE

    cpu = HARDWARE["cpu"]
    fitted = fit(saved["points"], saved["configs"])
    now = {k: getattr(cpu, k) for k in CONSTANTS}
    points = evaluate(saved)
    # Points' worst errors, with the constants of the cpu row (fitted ones once they are in hardware.py).
    worst = {role: max((abs(p["error"]) for p in points if sel(p)), default=None) for role, sel in (
        ("fit", lambda p: p["in_fit"]), ("held_out", lambda p: not p["in_fit"]), ("all", lambda p: True))}
    return dict(
        description=("CPU memory planner vs measured peak RSS (max over 2 ranks), `python -m bench.planner`: "
                     "measured = training_metrics.json peak_memory_gib_per_rank_max; predicted = the planner's "
                     "per-rank total for the run's plan (launch/plan/memory.py) with the cpu row's constants; "
                     "error = measured / predicted - 1."),
        tolerance=TOLERANCE, cards=CARDS, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
        held_out_model=HELD_OUT_MODEL,
        held_out_config=f"{'full' if HELD_OUT_CONFIG[0] else 'LoRA'} ZeRO-{HELD_OUT_CONFIG[1]}",
        fitted_constants=fitted, cpu_constants=now, constants_match=fitted == now, max_abs_error=worst,
        configs=saved["configs"], points=points)


def markdown(r: dict) -> str:
    c = r["cpu_constants"]
    lines = [
        "# CPU memory planner vs measured peak RSS",
        "",
        f"2 CPU ranks, max_length {r['max_length']} / max_prompt_length {r['max_prompt_length']}, the planner's "
        "micro-batch, reference and packing for each configuration (`python -m bench.planner`). Measured: peak RSS, "
        "max over ranks, the largest of the runs. Predicted: the plan's per-rank total. Error = measured / predicted - 1 "
        "(target within "
        f"±{r['tolerance']:.0%}).",
        "",
        f"Constants (launch/plan/hardware.py, cpu row): overhead {c['overhead']:.2f} × formulas + runtime_gib "
        f"{c['runtime_gib']:.2f} GiB + {c['runtime_bytes_per_param']:g} bytes per loaded parameter + "
        f"{c['runtime_bytes_per_trainable']:g} bytes per trainable parameter (+ "
        f"{c['runtime_bytes_per_trainable_zero3']:g} under ZeRO-3)"
        + ("" if r["constants_match"] else f" (the fit finds {r['fitted_constants']}: NOT what hardware.py holds)")
        + ".",
        f"Held out of the fit: the {r['held_out_model']} model (every configuration) and {r['held_out_config']} "
        "(every size).",
        "",
        "| model | params | vocab | tuning | ZeRO | micro-batch | reference | predicted GiB | measured GiB | runs GiB "
        "| error | role |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for p in r["points"]:
        role = "fit" if p["in_fit"] else "held out (" + ", ".join(p["held_out"]) + ")"
        lines.append(f"| {p['model']} | {p['params'] / 1e6:.1f}M | {p['vocab']:,} | {'full' if p['full'] else 'LoRA'} "
                     f"| {p['zero_stage']}{'' if p['zero_stage_asked'] is not None else ' (planner)'} "
                     f"| {p['micro_batch_size']} | {p['reference']} | {p['predicted_gib']:.2f} | "
                     f"{p['measured_gib']:.2f} | {' / '.join(f'{x:.2f}' for x in p.get('measured_runs_gib', []))} | "
                     f"{100 * p['error']:+.1f}% | {role} |")
    w = r["max_abs_error"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines += ["", f"Largest |error|: fit {pct(w['fit'])}, held out {pct(w['held_out'])}, all {pct(w['all'])}.", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    pts = r["points"]
    hi = 1.1 * max(max(p["predicted_gib"], p["measured_gib"]) for p in pts)
    xs = [0, hi]
    ax.plot(xs, xs, color="k", lw=1, label="measured = predicted")
    ax.fill_between(xs, [x * (1 - r["tolerance"]) for x in xs], [x * (1 + r["tolerance"]) for x in xs],
                    color="#1f77b4", alpha=0.12, label=f"±{r['tolerance']:.0%}")
    for sel, label, marker in ((lambda p: p["in_fit"], "fit", "o"), (lambda p: not p["in_fit"], "held out", "s")):
        for full, color in ((True, "#d62728"), (False, "#2ca02c")):
            group = [p for p in pts if sel(p) and p["full"] == full]
            if group:
                ax.scatter([p["predicted_gib"] for p in group], [p["measured_gib"] for p in group], marker=marker,
                           color=color, facecolors=color if label == "fit" else "none", s=40,
                           label=f"{label}, {'full' if full else 'LoRA'}")
    for p in pts:
        ax.annotate(f"{p['model'].split('-')[-1]} z{p['zero_stage']}", (p["predicted_gib"], p["measured_gib"]),
                    fontsize=6, xytext=(3, -3), textcoords="offset points")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("predicted per-rank total (GiB)")
    ax.set_ylabel("measured peak RSS, max over ranks (GiB)")
    ax.set_title("CPU planner: predicted vs measured (2 ranks)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(saved: dict, out: Path = RESULTS) -> dict:
    r = report(saved)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planner.json").write_text(json.dumps(r, indent=1) + "\n")
    (out / "planner.md").write_text(markdown(r))
    plot(r, out / "planner.png")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-results", dest="from_results", action="store_true",
                    help="re-fit the points saved in planner.json; run nothing")
    ap.add_argument("--repeats", type=int, default=2, help="runs per point (measured: the largest peak)")
    ap.add_argument("--rerun", action="store_true", help="run every point again (default: only missing runs)")
    ap.add_argument("--point", action="append", default=[], help="run only this point key (repeatable), e.g. "
                    + point_key(*POINTS[0][:4]))
    ap.add_argument("--card_memory_gib", type=float, default=64.0,
                    help="the plans' per-rank budget: large, so the planner's choice is never memory-bound")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--timeout", type=int, default=3600, help="per run, seconds")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.from_results:
        saved = json.loads((out / "planner.json").read_text())
    else:
        saved = measure(set(a.point) or None, repeats=a.repeats, rerun=a.rerun, out=out, card_memory_gib=a.card_memory_gib,
                        timeout=a.timeout)
    r = write(saved, out)
    print(markdown(r))
    if not r["constants_match"]:
        print(f"the fit finds {r['fitted_constants']}; launch/plan/hardware.py's cpu row holds "
              f"{r['cpu_constants']}: put the fitted ones there", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
