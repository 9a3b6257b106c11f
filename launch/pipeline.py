"""The sanity pipeline: SFT → sft_dpo_init_merged → DPO → dpo_sanity_merged → compare → generation test.

    python -m dpo_dist.pipeline --model google/gemma-3-270m --hardware gaudi2 --cards 1 --out_dir runs/sanity
    python -m dpo_dist.pipeline --demo --out_dir runs/demo      # the built-in tiny model, 2 CPU ranks, ZeRO-3

Also `make sanity MODEL=...`, `make demo`, and the seed's `./dpo_pipeline_sanity.sh`. Every step is
a separate command run through the launcher; all output goes to `<out_dir>/dpo_pipeline_sanity.log`,
and the pipeline stops at the first failing step and names it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.backend import twin_requested
from dpo_dist.tiny import ensure_tiny_assets
from dpo_dist.util.hfargs import hf_argument_parser
from dpo_dist.util.layout import METRICS_FILE
from dpo_dist.util.lock import folder_is_busy
from dpo_dist.util.logs import redact
from dpo_dist.util.paths import REPO_ROOT
from launch.plan import HARDWARE
from launch.rundir import RunDirError, check_run_dir, claim_run_dir, safe_name
from launch.runmetrics import KEY as PLANNED_VS_MEASURED
from launch.runmetrics import summary_lines as planned_vs_measured_lines

ROOT = REPO_ROOT
RECIPES = ROOT / "recipes"
LOG_NAME = "dpo_pipeline_sanity.log"
PROMPT = "\n\nHuman: How do I get better at cooking pasta?\n\nAssistant:"


@dataclass
class PipelineArguments:
    model: str | None = field(default=None, metadata={"help": "Hub id or folder of the base model (required unless --demo)."})
    dataset_name: str = field(default="Anthropic/hh-rlhf", metadata={"help": "Preference data (hub name or local files)."})
    dataset_columns: str | None = field(
        default=None, metadata={"help": "Column mapping for SFT, DPO and the comparison (e.g. prompt=question,chosen=response_j,"
                                "rejected=response_k); default: detected."})
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat template for conversational data, every step (a .jinja file, a tokenizer folder "
                                "or llama3, gemma3, qwen2, hh); default: the model's own."})
    out_dir: str | None = field(default=None, metadata={"help": "Where every step writes (default runs/sanity-<model>)."})
    hardware: str = field(default="gaudi2", metadata={"help": "gaudi2, gaudi3, cuda or cpu.", "choices": ["gaudi2", "gaudi3", "cuda", "cpu"]})
    cards: int = field(default=1, metadata={"help": "Cards on this node."})
    recipe: str = field(default="default", metadata={"help": "Folder under recipes/ with sft.yaml and dpo.yaml."})
    full: bool = field(default=False, metadata={"help": "Full fine-tuning instead of LoRA."})
    zero_stage: int | None = field(default=None, metadata={"help": "Force a ZeRO stage instead of the planner's."})
    demo: bool = field(default=False, metadata={"help": "Built-in tiny Llama + generated hh-rlhf data, 2 CPU ranks, ZeRO-3."})
    skip_hw_check: bool = field(default=False, metadata={"help": "Do not run hl-smi before starting on Gaudi."})
    report_to: str | None = field(default=None, metadata={
        "help": "Trackers for SFT, DPO and the comparison (tensorboard, mlflow, wandb, ...; none); default: the "
                "recipe's report_to."})


class StepFailed(Exception):
    def __init__(self, step: str, detail: str):
        super().__init__(f"step '{step}' failed: {detail}")
        self.step = step


class Pipeline:
    def __init__(self, out_dir: Path, env: dict):
        self.out = out_dir
        self.env = env
        self.log_path = out_dir / LOG_NAME
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        line = redact(text)
        print(line, flush=True)
        with open(self.log_path, "a") as fh:
            fh.write(line + "\n")

    def step(self, name: str, argv: list[str]) -> None:
        self.say(f"\n=== [{name}] {' '.join(map(str, argv))}")
        t0 = time.perf_counter()
        with open(self.log_path, "a") as fh:
            proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                line = redact(line)
                fh.write(line)
                fh.flush()
                if _interesting(line):
                    print(f"  {line.rstrip()}", flush=True)
            rc = proc.wait()
        self.timings[name] = time.perf_counter() - t0
        if rc != 0:
            raise StepFailed(name, f"exit code {rc}; see {self.log_path}")
        self.say(f"=== [{name}] ok in {self.timings[name]:.0f}s")


def _interesting(line: str) -> bool:
    keys = ("error", "Error", "done", "merged", "fits", "accuracy", "launch:", "rank", "Traceback")
    return any(k in line for k in keys) and "it/s]" not in line


def launch_argv(a: PipelineArguments, task: str, model: str, run_dir: Path, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "launch", "train", "--task", task, "--model", model, "--hardware", a.hardware,
            "--cards", str(a.cards), "--run_dir", str(run_dir), "--max_length", "512", "--max_prompt_length", "256"]
    if a.full:
        argv.append("--full")
    if a.zero_stage is not None:
        argv += ["--zero_stage", str(a.zero_stage)]
    return argv + ["--", *extra]


def claim_out_dir(out: Path, model: str) -> Path:
    """The pipeline's folder, under the run dir rules (launch.rundir; --out_dir): an earlier pipeline's folder is
    moved aside to <name>.prev-<time> (nothing is lost), and a folder of files dpo-dist did not write, or one a
    pipeline is using now, is refused. Returns the folder, new, empty and held by this process."""
    problem = check_run_dir(out, overwrite=True, flag="--out_dir")
    if problem:
        raise RunDirError(problem)
    if out.is_dir() and any(out.iterdir()):
        if folder_is_busy(out):
            raise RunDirError(f"--out_dir {out} is in use by a pipeline that is running now. Nothing was changed. Wait "
                              "for it to end, or choose a new --out_dir.")
        prev = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(prev)
        print(f"pipeline: moved the previous {out} to {prev}")
    return claim_run_dir(out, model, flag="--out_dir")[0].resolve()


def run_pipeline(a: PipelineArguments) -> int:
    if a.demo:
        assets = ensure_tiny_assets()
        a.model, a.dataset_name = assets.llama_dir, assets.data_dir
        a.hardware, a.cards, a.recipe, a.full, a.zero_stage = "cpu", 2, "tiny", True, 3
    if not a.model:
        print("pipeline: error: --model (MODEL=...) is required: there are no default models.", file=sys.stderr)
        return 2
    try:
        out = claim_out_dir(Path(a.out_dir) if a.out_dir else Path("runs") / f"sanity-{safe_name(a.model)}", a.model)
    except RunDirError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = Pipeline(out, env)
    recipe = RECIPES / a.recipe
    data = ["--dataset_name", a.dataset_name]
    data += ["--dataset_columns", a.dataset_columns] if a.dataset_columns else []
    data += ["--chat_template", a.chat_template] if a.chat_template else []
    tracker = a.report_to or recipe_value(recipe / "dpo.yaml", "report_to")
    track = ["--report_to", a.report_to] if a.report_to else []  # else the recipes' own
    t0 = time.perf_counter()
    try:
        if HARDWARE[a.hardware].device == "hpu" and not (a.skip_hw_check or twin_requested()):
            if shutil.which("hl-smi") is None:
                raise StepFailed("hardware check", "hl-smi not found: is this a Gaudi node with the Habana driver? "
                                 "(--skip_hw_check to skip)")
            p.step("hardware check", ["hl-smi", "-Q", "index,name,memory.total", "-f", "csv"])
        p.step("sft", launch_argv(a, "sft", a.model, out / "sft_run",
                                  ["--config", recipe / "sft.yaml", *data, *track, "--output_dir", out / "sft_dpo_init"]))
        p.step("dpo", launch_argv(a, "dpo", str(out / "sft_dpo_init_merged"), out / "dpo_run",
                                  ["--config", recipe / "dpo.yaml", *data, *track, "--output_dir", out / "dpo_sanity"]))
        shutil.copyfile(out / "dpo_sanity" / METRICS_FILE, out / METRICS_FILE)
        p.step("compare", [sys.executable, "-m", "dpo_dist.compare_base_vs_dpo",
                           "--base_model", out / "sft_dpo_init_merged", "--finetuned_model", out / "dpo_sanity_merged",
                           *data, "--output_json", out / "dpo_comparison_results.json",
                           "--training_dir", out / "dpo_sanity", "--seed", "0", "--num_prompts", "4",
                           *(["--report_to", tracker] if tracker else [])])
        p.step("generation test", [sys.executable, "-m", "dpo_dist.generate", "--model_name_or_path",
                                   out / "dpo_sanity_merged", "--prompt", PROMPT, "--raw_prompt", "--max_new_tokens", "48",
                                   "--num_return_sequences", "2", "--seed", "0"])
    except StepFailed as e:
        p.say(f"\npipeline: FAILED at step '{e.step}': {e}")
        return 1
    summary(p, out, time.perf_counter() - t0)
    return 0


def summary(p: Pipeline, out: Path, seconds: float) -> None:
    m = json.loads((out / METRICS_FILE).read_text())
    cmp_ = json.loads((out / "dpo_comparison_results.json").read_text())
    metrics = cmp_.get("metrics", {})
    base, dpo = metrics.get("Base", {}), metrics.get("DPO", {})
    rel = metrics.get("dpo_vs_base", {})
    report = next(iter(sorted(out.glob("dpo_comparison_report.*"))), None)
    lines = [
        "",
        f"pipeline: done in {seconds:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in p.timings.items())})",
        f"  SFT model (DPO init):  {out / 'sft_dpo_init_merged'}",
        f"  DPO model:             {out / 'dpo_sanity_merged'}",
        f"  training metrics:      {out / METRICS_FILE}",
        f"  comparison:            {out / 'dpo_comparison_results.json'}",
        f"  report:                {report}",
        f"  log:                   {out / LOG_NAME}",
        f"  held-out preference accuracy (per-token log-prob): base {_fmt(base.get('preference_accuracy_length_normalized'))}"
        f" -> DPO {_fmt(dpo.get('preference_accuracy_length_normalized'))}",
        f"  held-out preference accuracy (sum log-prob):       base {_fmt(base.get('preference_accuracy'))}"
        f" -> DPO {_fmt(dpo.get('preference_accuracy'))}",
        f"  implicit reward accuracy DPO vs base: {_fmt(rel.get('reward_accuracy'))}, KL(DPO||base) {_fmt(rel.get('kl_estimate'))}",
        f"  DPO reward accuracy (held-out): {_fmt(m.get('eval_reward_accuracy'))}, margin {_fmt(m.get('eval_reward_margin'))}",
        f"  DPO throughput: {m['pairs_per_s']:.2f} pairs/s, {m['tokens_per_s']:.0f} tokens/s on {m['world_size']} ranks "
        f"(ZeRO-{m['zero_stage']}, reference {m['reference']})",
    ]
    if any(out.rglob("events.out.tfevents.*")):
        lines.append(f"  TensorBoard:           make tensorboard RUN_DIR={out}   (SFT, DPO and the comparison)")
    if m.get(PLANNED_VS_MEASURED):
        lines += planned_vs_measured_lines(m[PLANNED_VS_MEASURED])
    for line in lines:
        p.say(line)


def recipe_value(path: Path, key: str):
    """One key of a recipe (YAML), or None when the file or the key is not there."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv=None) -> int:
    (a, rest) = hf_argument_parser()(PipelineArguments).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        print(f"pipeline: error: unknown arguments {rest}", file=sys.stderr)
        return 2
    return run_pipeline(a)


if __name__ == "__main__":
    sys.exit(main())
