"""`python -m launch selfcheck` (`make gaudi-selfcheck`): the first thing to run on a new Gaudi node.

    python -m launch selfcheck [--hardware gaudi2] [--cards N] [--out_dir D] [--steps 20]

It runs, in order, and writes ``selfcheck.md`` (a report to paste into a bug report) into the out dir:

1. ``doctor`` (versions against the pins, lazy mode, visible cards);
2. short DPO runs through ``launch train``, the path every user takes (plan, command, spawn, ranks, merge),
   on the built-in tiny models: Llama with LoRA on one card and full fine-tuning on all cards, Gemma 3 with LoRA
   on all cards and full fine-tuning on one card. Together they cover both families, both fine-tuning modes (the
   adapter reference and the reference cache), one card and all cards;
3. a short LoRA run of ``google/gemma-3-270m`` on all cards when the hub is reachable (or the model is cached);
4. per run: the loss first → last, held-out reward accuracy, pairs/s and tokens/s (steady state: after the
   warm-up, without the steps that compiled a new shape), compared with optimum-habana's published DPO
   baseline scaled by model size (``launch.plan.hardware.PUBLISHED_DPO_BASELINES``). The tiny models are far too small
   for that ratio to mean much (start-up and host work dominate); the gemma-3-270m run is the comparable one.

A run passes when it exits 0, its loss falls, its held-out reward accuracy is above 0.8 and the merge post-step
wrote a verified model folder. The exit status is 0 only when doctor and every run pass. In the Gaudi twin
(``DPO_DIST_HPU_TWIN=1``, CPU ranks) the same steps run end to end; the figures are then CPU figures.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.backend import twin_requested
from dpo_dist.model.loader import hub_offline
from dpo_dist.util.atomic import write_atomic
from dpo_dist.util.layout import METRICS_FILE
from launch.cards import available_cards
from launch.command.quoting import check_no_control
from launch.doctor import collect_checks, render_checks
from launch.plan import PUBLISHED_DPO_BASELINES, load_spec

REPORT = "selfcheck.md"
TINY_STEPS = 20
HUB_MODEL = "google/gemma-3-270m"
RUN_TIMEOUT_S = 900
PASS_ACCURACY = 0.8
VERSIONS = ("optimum-habana", "habana-torch-plugin", "torch", "transformers", "accelerate", "trl", "peft", "datasets",
            "deepspeed", "numpy", "pyarrow")


@dataclass
class SelfcheckArguments:
    hardware: str = field(default="gaudi2", metadata={"help": "gaudi2 or gaudi3.", "choices": ["gaudi2", "gaudi3"]})
    cards: int | None = field(default=None, metadata={
        "help": "Cards for the all-cards runs (default: every visible card; in the Gaudi twin, 2)."})
    out_dir: str | None = field(default=None, metadata={"help": "Where runs and selfcheck.md go (a new folder)."})
    steps: int = field(default=TINY_STEPS, metadata={"help": "Optimizer steps per tiny-model run."})
    hub_model: str = field(default=HUB_MODEL, metadata={"help": "The real model of the last run (skipped offline)."})
    skip_hub: bool = field(default=False, metadata={"help": "Do not try the hub model."})
    master_port: int = field(default=29530, metadata={"help": "First rendezvous port (each run takes the next)."})


@dataclass(frozen=True)
class Run:
    name: str
    model: str  # a local folder or a hub id
    full: bool
    cards: int
    steps: int
    learning_rate: float


def tiny_runs(assets: dict, cards: int, steps: int) -> list[Run]:
    """The four tiny-model runs (pure): each family with LoRA and full fine-tuning, on one card and on all."""
    n = max(1, cards)
    return [
        Run("llama-lora-1card", assets["llama"], False, 1, steps, 2e-3),
        Run(f"llama-full-{n}cards", assets["llama"], True, n, steps, 5e-4),
        Run(f"gemma3-lora-{n}cards", assets["gemma3"], False, n, steps, 2e-3),
        Run("gemma3-full-1card", assets["gemma3"], True, 1, steps, 2e-4),
    ]


def train_argv(run: Run, a: SelfcheckArguments, data: str, run_dir: Path, port: int) -> list[str]:
    """The `launch train` command of one run (pure)."""
    argv = [sys.executable, "-m", "launch", "train", "--model", run.model, "--hardware", a.hardware,
            "--cards", str(run.cards), "--run_dir", str(run_dir), "--master_port", str(port),
            "--max_length", "256", "--max_prompt_length", "128"]
    if run.full:
        argv.append("--full")
    # Pairs: what the steps draw (8 per card per step), so that tokenising and the reference pass stay short.
    pairs = 8 * run.cards * run.steps
    return argv + ["--", "--dataset_name", data, "--max_steps", str(run.steps), "--learning_rate", str(run.learning_rate),
                   "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--logging_steps", "5",
                   "--max_train_samples", str(pairs), "--max_eval_samples", "64", "--throughput_warmup_steps", "3",
                   "--save_steps", "100000"]


def expected_tokens_per_s_per_card(hardware: str, params: int) -> float | None:
    """optimum-habana's published DPO throughput, per card, scaled to a model of ``params`` parameters (the same
    work per token: FLOPs per token grow with the parameter count)."""
    b = PUBLISHED_DPO_BASELINES.get(hardware)
    if b is None or params <= 0:
        return None
    return b["pairs_per_s"] * b["tokens_per_pair"] / b["cards"] * b["params"] / params


def judge(rc: int, metrics: dict | None, merged: bool) -> list[str]:
    """Why a run did not pass (empty: it passed)."""
    problems = []
    if rc != 0:
        problems.append(f"exit {rc}")
    if not metrics:
        return problems + [f"no {METRICS_FILE}"]
    first, last, acc = metrics.get("first_train_loss"), metrics.get("last_train_loss"), metrics.get("eval_reward_accuracy")
    if first is None or last is None or not last < first:
        problems.append(f"loss did not fall ({first} -> {last})")
    if acc is None or not acc > PASS_ACCURACY:
        problems.append(f"held-out reward accuracy {acc} is not above {PASS_ACCURACY}")
    if not merged:
        problems.append("no verified merged model")
    return problems


def _hub_reachable(model: str) -> tuple[bool, str]:
    if hub_offline():
        return False, "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set"
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model, timeout=10)
        return True, "the hub answers"
    except Exception as e:  # no network, no token for a gated model, unknown id
        return False, f"the hub did not answer ({type(e).__name__})"


def _versions() -> dict:
    import importlib.metadata

    out = {}
    for dist in VERSIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _default_cards(hardware: str) -> int:
    if twin_requested():
        return 2
    n, _ = available_cards(hardware)
    return n or 1


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run_one(run: Run, a: SelfcheckArguments, data: str, out: Path, port: int) -> dict:
    run_dir = out / "runs" / run.name
    log = out / "runs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(train_argv(run, a, data, run_dir, port), stdout=fh, stderr=subprocess.STDOUT,
                                timeout=RUN_TIMEOUT_S, start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    metrics_path = run_dir / "output" / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else None
    merged = (run_dir / "output_merged" / "config.json").is_file() and "verified:" in log.read_text(errors="replace")
    params = load_spec(run.model).num_params if metrics else 0
    res = {"run": run, "rc": rc, "wall_s": wall, "metrics": metrics, "plan": plan, "merged": merged, "log": log,
           "params": params, "problems": judge(rc, metrics, merged)}
    if metrics:
        steady = metrics.get("tokens_per_s_steady") or metrics.get("tokens_per_s")
        expected = expected_tokens_per_s_per_card(a.hardware, params)
        res["tokens_per_s_per_card"] = steady / max(1, metrics.get("world_size") or run.cards) if steady else None
        res["vs_baseline"] = (res["tokens_per_s_per_card"] / expected) if (expected and res["tokens_per_s_per_card"]) else None
    return res


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(x) -> str:
    """A measured/expected ratio: three significant digits, so a tiny model's 7e-05 does not print as 0.00%."""
    return "n/a" if x is None else f"{x:.3g}×"


def render_report(a: SelfcheckArguments, cards: int, twin: bool, versions: dict, doctor: tuple, results: list,
                  hub_note: str) -> str:
    """selfcheck.md (pure)."""
    doctor_rc, doctor_text = doctor
    lines = [f"# dpo-dist selfcheck: {'PASS' if doctor_rc == 0 and all(not r['problems'] for r in results) else 'FAIL'}",
             "", f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"- host: {platform.node()} ({platform.machine()})",
             f"- hardware: {a.hardware}, {cards} card(s) for the all-cards runs"
             + (" — **Gaudi twin: optimum-habana's code on CPU ranks; the figures are CPU figures**" if twin else ""),
             f"- python: {platform.python_version()} ({sys.executable})", "", "## Versions", "",
             "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in versions.items()]
    lines += ["", f"## doctor: {'pass' if doctor_rc == 0 else f'exit {doctor_rc}'}", "", "```", doctor_text.strip(), "```",
              "", "## Runs", "",
              "| run | cards | result | steps | loss first → last | held-out acc | pairs/s | tokens/s (steady) | "
              "tokens/s per card vs baseline | shapes | wall |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"] or {}
        run = r["run"]
        result = "pass" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(
            f"| {run.name} | {run.cards} | {result} | {m.get('steps', 'n/a')} | {_fmt(m.get('first_train_loss'), '.4f')} → "
            f"{_fmt(m.get('last_train_loss'), '.4f')} | {_fmt(m.get('eval_reward_accuracy'))} | "
            f"{_fmt(m.get('pairs_per_s_steady') or m.get('pairs_per_s'), '.1f')} | "
            f"{_fmt(m.get('tokens_per_s_steady') or m.get('tokens_per_s'), ',.0f')} | {_ratio(r.get('vs_baseline'))} | "
            f"{m.get('batch_shapes', 'n/a')} | {r['wall_s']:.0f} s |")
    lines += ["", f"Hub model ({a.hub_model}): {hub_note}", "",
              "Baseline: optimum-habana's published DPO throughput (llama-7b LoRA r8, max_length 1024, 8 cards, DDP: "
              "13.5 pairs/s on Gaudi2, 15.1 on Gaudi3), per card, scaled by model size. Tiny models are dominated by "
              "start-up and host work, so their ratio is not a speed verdict.", "", "## Plans", ""]
    for r in results:
        p = r["plan"]
        if p:
            lines.append(f"- {r['run'].name}: ZeRO-{p['zero_stage']}, {'LoRA' if p['use_peft'] else 'full'}, reference "
                         f"{p['reference']}, micro-batch {p['micro_batch_size']}, packing {p['packing']} "
                         f"({p['packing_attention']}), {p['length_buckets']} buckets, "
                         f"{'DeepSpeed' if p['uses_deepspeed'] else 'DDP'}, planned {p['memory_gib']['total']:.2f} GiB/card")
    failed = [r for r in results if r["problems"]]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            lines += [f"### {r['run'].name}: {'; '.join(r['problems'])}", "", f"log: {r['log']}", "", "```",
                      _tail(Path(r["log"])), "```", ""]
    return "\n".join(lines) + "\n"


def run_selfcheck(a: SelfcheckArguments) -> int:
    out = Path(a.out_dir or f"runs/selfcheck-{time.strftime('%Y%m%d-%H%M%S')}")
    check_no_control(str(out), "--out_dir", ValueError)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out_dir {out}: exists and is not empty; choose a new folder (nothing was changed).")
    out.mkdir(parents=True, exist_ok=True)
    twin = twin_requested()
    cards = a.cards or _default_cards(a.hardware)
    checks = collect_checks(hardware=a.hardware, cards=cards)
    doctor = (1 if any(c.failed for c in checks) else 0, render_checks(checks))
    print(doctor[1])
    assets = json.loads(subprocess.run([sys.executable, "-m", "dpo_dist.tiny"], capture_output=True, text=True,
                                       check=True).stdout)["tiny"]
    data = assets["data_dir"]
    runs = tiny_runs({"llama": assets["llama_dir"], "gemma3": assets["gemma3_dir"]}, cards, a.steps)
    hub_note = "skipped (--skip_hub)"
    if not a.skip_hub:
        ok, why = _hub_reachable(a.hub_model)
        hub_note = f"run ({why})" if ok else f"skipped: {why}"
        if ok:
            runs.append(Run(f"{a.hub_model.split('/')[-1]}-lora-{cards}cards", a.hub_model, False, cards, 10, 1e-4))
    results = []
    for i, run in enumerate(runs):
        print(f"selfcheck: {run.name} ...", flush=True)
        r = _run_one(run, a, data, out, a.master_port + i)
        print(f"selfcheck: {run.name}: {'pass' if not r['problems'] else '; '.join(r['problems'])} "
              f"({r['wall_s']:.0f} s, log {r['log']})", flush=True)
        results.append(r)
    report = render_report(a, cards, twin, _versions(), doctor, results, hub_note)
    write_atomic(out / REPORT, report)
    print(f"selfcheck: report in {out / REPORT}")
    return 0 if doctor[0] == 0 and all(not r["problems"] for r in results) else 1
