"""`python -m launch` / `dpo-launch`: plan, train, doctor, selfcheck.

    python -m launch plan  --model meta-llama/Llama-3-70B --hardware gaudi2 --cards 8
    python -m launch plan  --model M --hardware cpu --cards 2 -- --dataset_name DATA   (sized by DATA's lengths)
    python -m launch train --model M --hardware gaudi2 --cards 8 [--hostfile F] [--dry-run] [-- dpo.py args]
    python -m launch train ... --nodes 2 --emit slurm|k8s   (run_dir/launch.sbatch or mpijob.yaml; not launched)
    python -m launch doctor [--hardware gaudi2] [--hostfile F]
    python -m launch selfcheck [--hardware gaudi2] [--cards N] [--out_dir D]   (a new node: doctor, short runs, report)
    python -m launch recipes [--write | --check]   (recipes/<hardware>/<model>-<lora|full>.yaml from the planner)
    python -m launch train --model M --recipe recipes/gaudi2/llama-3-8b-lora.yaml [-- dpo.py args that win]

Data flows one way: model config + hardware + options → Plan → DeepSpeed config + command →
spawn. Everything before `spawn` is pure and importable without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from dpo_dist.backend import cleanup_shm_buffers
from dpo_dist.train.reference import REFERENCE_CHOICES
from dpo_dist.util.atomic import write_atomic, write_json_atomic
from dpo_dist.util.checkpoint import check_output_dir
from dpo_dist.util.disk import is_no_space, no_space_message
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.hfargs import hf_argument_parser
from dpo_dist.util.lock import folder_is_busy, release_folder
from launch.cards import available_cards, hl_smi_count
from launch.cluster import (
    MPIJOB_FILE,
    SBATCH_FILE,
    check_cluster_options,
    cluster_command_overrides,
    render_cluster_files,
)
from launch.command.builder import (
    CommandError,
    build_launch_command,
    format_command,
    render_command_sh,
    render_deepspeed_env,
)
from launch.command.common import DEVICE_LAUNCH, check_cards
from launch.command.hostfile import HostfileError, is_loopback, parse_hostfile
from launch.doctor import run_doctor
from launch.dsconfig import build_ds_config, write_ds_config
from launch.flags import rank_flag
from launch.masterport import master_port_problem_for
from launch.plan import HARDWARE, PlanOptions, SpecError, load_spec, make_plan, plan_to_dict
from launch.plan.datastats import DataShape, measure_pair_tokens, parse_pair_tokens
from launch.plan.report import render_plan_table
from launch.recipes import RecipesArguments, apply_recipe, run_recipes
from launch.rundir import RunDirError, check_run_dir, claim_run_dir, remove_made
from launch.runmetrics import record_plan_in_metrics
from launch.runmetrics import summary_lines as planned_vs_measured_lines
from launch.spawn import spawn
from launch.supervise import (
    DEFAULT_DIST_TIMEOUT_S,
    HANG_MARGIN_S,
    RESTARTS_FILE,
    record_restarts_in_metrics,
    supervise,
)
from launch.tracking import check_rank_trackers

EXIT_USAGE = 2
EXIT_NO_FIT = 3


class LaunchError(ValueError):
    """Bad launcher input; the message names the argument and the fix."""


@dataclass
class PlanArguments:
    model: str | None = field(default=None, metadata={"help": "Hub id or local folder (required: no default models)."})
    hardware: str = field(default="gaudi2", metadata={"help": "gaudi2, gaudi3, cuda or cpu.", "choices": ["gaudi2", "gaudi3", "cuda", "cpu"]})
    card_memory_gib: float | None = field(default=None, metadata={"help": "Override the usable memory per card."})
    cards: int = field(default=8, metadata={"help": "Cards per node."})
    nodes: int = field(default=1, metadata={"help": "Nodes (or give --hostfile)."})
    hostfile: str | None = field(default=None, metadata={"help": "DeepSpeed hostfile: one 'host slots=N' per node."})
    max_length: int = field(default=1024, metadata={"help": "Max tokens of prompt + response."})
    max_prompt_length: int = field(default=512, metadata={"help": "Max prompt tokens."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (default)."})
    full: bool = field(default=False, metadata={"help": "Full fine-tuning instead of LoRA."})
    zero_stage: int | None = field(default=None, metadata={"help": "Force a ZeRO stage (0-3) instead of the planner's choice."})
    reference: str = field(default="auto", metadata={"help": "auto, adapter, sharded, replicated or precomputed.",
                                                      "choices": list(REFERENCE_CHOICES)})
    pair_tokens: str | None = field(default=None, metadata={
        "help": "MEAN,MAX tokens per pair (chosen + rejected rows) of the training data, to size packed micro-batches "
                "(cpu/cuda). Default: measured on the data named after `--` when it and the tokenizer are local."})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 matmuls. Default: the hardware's (gaudi2, gaudi3, cuda: bf16; cpu: fp32). On cpu, --bf16 true "
                "runs DeepSpeed's torch_autocast over fp32 weights (fast on CPUs with AMX)."})
    json: bool = field(default=False, metadata={"help": "Print the plan as one JSON object."})


@dataclass
class TrainArguments(PlanArguments):
    run_dir: str | None = field(default=None, metadata={
        "help": "Where plan.json, ds_config.json, command.sh and the output go: a new or empty folder, or an earlier "
                "run's with --overwrite_run_dir (default: a new runs/<model>-<time>)."})
    overwrite_run_dir: bool = field(default=False, metadata={
        "help": "Replace the plan and command of an earlier run in --run_dir (its output/ is kept)."})
    dry_run: bool = field(default=False, metadata={"help": "Write the run dir and print the command; do not launch."})
    max_restarts: int = field(default=0, metadata={
        "help": "When a rank dies or the job hangs past --dist_timeout, stop every rank and relaunch from the newest "
                "complete checkpoint, at most this many times (0: stop at the first failure)."})
    master_port: int = field(default=29500, metadata={"help": "Rendezvous port on the first node."})
    task: str = field(default="dpo", metadata={"help": "dpo or sft (the rank module to run).", "choices": ["dpo", "sft"]})
    recipe: str | None = field(default=None, metadata={
        "help": "A generated recipe (recipes/<hardware>/<model>-<lora|full>.yaml): its planner choices for this "
                "launch (where not given here) and its rank flags (--config; flags after `--` win)."})
    launcher: str = field(default="auto", metadata={"help": "auto, deepspeed, torchrun or gaudi_spawn."})
    env: str | None = field(default=None, metadata={"help": "Comma-separated extra env var names for every node (.deepspeed_env)."})
    ssh: bool = field(default=False, metadata={"help": "CPU multi-node: start the nodes over ssh with DeepSpeed's pdsh runner "
                                                       "(the Gaudi/CUDA default) instead of one local command per node (--no_ssh)."})
    ssh_port: int | None = field(default=None, metadata={"help": "sshd port on the nodes for the pdsh/ssh launch "
                                                                    "(Habana containers use 3022)."})
    # Cluster jobs from the same plan (launch/cluster/): written into the run dir, not launched.
    emit: str | None = field(default=None, metadata={
        "help": "Write a cluster job instead of launching: slurm (run_dir/launch.sbatch, then `sbatch` it) or k8s "
                "(run_dir/mpijob.yaml, a Kubeflow MPIJob, then `kubectl apply -f` it). --nodes N needs no hostfile.",
        "choices": ["slurm", "k8s"]})
    gres: str | None = field(default=None, metadata={
        "help": "slurm: the cards' GRES as the site names it, name[:type] (default gpu:hpu on Gaudi, gpu on CUDA, "
                "none on CPU); the count is --cards. `none`: no --gres line."})
    time: str | None = field(default=None, metadata={"help": "slurm: the job's time limit (default 24:00:00)."})
    partition: str | None = field(default=None, metadata={"help": "slurm: the partition (default: the site's)."})
    image: str | None = field(default=None, metadata={
        "help": "k8s (required): the image built from this repository's Dockerfile, as the cluster pulls it."})
    pvc: str | None = field(default=None, metadata={
        "help": "k8s (required): a ReadWriteMany PersistentVolumeClaim every pod mounts at the run dir."})
    hf_token_secret: str | None = field(default=None, metadata={
        "help": "k8s: the Secret NAME[:KEY] that holds the Hugging Face token (default hf-token:token), read by "
                "reference, never written into the manifest."})


@dataclass
class DoctorArguments:
    hardware: str | None = field(default=None, metadata={"help": "Expected hardware (gaudi2, gaudi3, cuda, cpu); detected if omitted.",
                                                            "choices": ["gaudi2", "gaudi3", "cuda", "cpu"]})
    hostfile: str | None = field(default=None, metadata={"help": "Check this hostfile's hosts are reachable."})
    cards: int | None = field(default=None, metadata={"help": "Cards per node you intend to use."})
    ssh_port: int = field(default=22, metadata={"help": "ssh port probed on every hostfile host (Habana containers run sshd on 3022)."})


def _parse(dc, argv):
    parser = hf_argument_parser()(dc)
    (args, remaining) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise LaunchError(f"unknown arguments {remaining}. Arguments for dpo_dist.dpo go after a lone `--`.")
    return args


def check_cards_available(a: PlanArguments, hosts, environ=None, cpu_count=None, hl_smi=hl_smi_count) -> None:
    """More cards per node than this node has: a LaunchError naming --cards and what the node has. Checked only
    when the count is known and this node is one of the nodes (no hostfile, or every host is loopback), so a
    plan for other machines still works on a laptop."""
    if hosts and not all(is_loopback(h.host) for h in hosts):
        return
    have, source = available_cards(a.hardware, environ, cpu_count, hl_smi)
    if have is None or a.cards <= have:
        return
    unit = "CPU ranks (one per core at most)" if a.hardware == "cpu" else f"{a.hardware} cards"
    raise LaunchError(
        f"--cards {a.cards} asks for more {unit} per node than this node has: {source}. Fix: pass --cards {have} "
        "or fewer per node, and add nodes with --hostfile for more."
    )


def lora_options(extra: list[str]) -> dict:
    """PlanOptions for the LoRA the ranks will train: --lora_r and --lora_target_modules given after `--` (else the
    ranks' defaults, which PlanOptions has too), so the plan sizes and prints what is trained."""
    out = {}
    r = rank_flag(extra, "--lora_r")
    if r is not None:
        try:
            out["lora_r"] = int(r)
        except ValueError:
            raise LaunchError(f"--lora_r {r!r} (after `--`): expected a positive integer.") from None
        if out["lora_r"] < 1:
            raise LaunchError(f"--lora_r must be a positive integer (got {out['lora_r']}).")
    targets = rank_flag(extra, "--lora_target_modules")
    if targets is not None:
        names = tuple(x.strip() for x in targets.split(",") if x.strip())
        if not names:
            raise LaunchError("--lora_target_modules (after `--`) is empty: give comma-separated module names, "
                              "e.g. q_proj,v_proj, or leave it out for the family's default.")
        out["lora_target_modules"] = names
    return out


def build_plan(a: PlanArguments, data=None, extra: list[str] = ()):
    """Pure: arguments (+ the data's DataShape, see data_shape_for, and the rank arguments after `--`) →
    (spec, hosts, plan)."""
    if not a.model:
        raise LaunchError("--model is required: there are no default models (e.g. --model google/gemma-3-270m).")
    use_peft = a.use_peft and not a.full
    if a.cards < 1:
        raise LaunchError(f"--cards must be a positive integer (got {a.cards}).")
    # The launch command's own rule for cards per node (a Gaudi node has 8), so plan and train refuse alike.
    check_cards(DEVICE_LAUNCH[HARDWARE[a.hardware].device], a.hardware, a.cards)
    if a.nodes < 1:
        raise LaunchError(f"--nodes must be a positive integer (got {a.nodes}).")
    hosts = None
    nodes = a.nodes
    if a.hostfile:
        hosts = parse_hostfile(a.hostfile, expected_slots=a.cards)
        nodes = len(hosts)
        if a.nodes not in (1, nodes):
            raise LaunchError(f"--nodes {a.nodes} but the hostfile {a.hostfile} lists {nodes} node(s). Fix: leave "
                              "--nodes out with --hostfile (its hosts are the nodes), or list that many hosts.")
    elif a.nodes > 1 and isinstance(a, TrainArguments) and not a.emit:  # --emit: the scheduler gives the hosts
        raise LaunchError(f"--nodes {a.nodes} without --hostfile: train starts the nodes a hostfile names, and would "
                          f"start only this one. Fix: pass --hostfile with {a.nodes} hosts (`host slots={a.cards}` "
                          "lines); --nodes alone is for `plan`.")
    spec = load_spec(a.model)
    hw = HARDWARE[a.hardware]
    options = PlanOptions(
        cards=a.cards * nodes, nodes=nodes, max_length=a.max_length, max_prompt_length=a.max_prompt_length,
        use_peft=use_peft, card_memory_gib=a.card_memory_gib, reference=a.reference, zero_stage=a.zero_stage,
        pair_tokens=data.pair_tokens if data else None, train_pairs=data.train_pairs if data else None,
        packing=False if getattr(a, "task", "dpo") == "sft" else None,  # sft.py does not pack
        bf16=a.bf16, **lora_options(list(extra)),
    )
    try:
        return spec, hosts, make_plan(spec, hw, options)
    except ValueError as e:  # a LoRA target the model does not have, named by the spec
        raise LaunchError(str(e)) from None


def data_shape_for(a: PlanArguments, extra: list[str]):
    """(DataShape or None, note or None): --pair_tokens, else measured on local data (launch/plan/datastats.py,
    I/O): packed micro-batches are sized by the data's tokens per pair."""
    if a.pair_tokens:
        try:
            return DataShape(parse_pair_tokens(a.pair_tokens)), f"data: --pair_tokens {a.pair_tokens}"
        except ValueError as e:
            raise LaunchError(str(e)) from None
    if not a.model:
        return None, None
    return measure_pair_tokens(a.model, extra, max_length=a.max_length, max_prompt_length=a.max_prompt_length)


def _plan_with_data(a: PlanArguments, extra: list[str]):
    """build_plan with the data's token lengths, and a note on where they come from."""
    data, note = data_shape_for(a, extra)
    spec, hosts, plan = build_plan(a, data, extra)
    if note and plan.packing:
        plan = dataclasses.replace(plan, notes=(*plan.notes, note))
    return spec, hosts, plan


def _split_rank_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, dpo_dist arguments after a lone `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def cmd_plan(argv) -> int:
    argv, extra = _split_rank_args(argv)
    a = _parse(PlanArguments, argv)
    _, hosts, plan = _plan_with_data(a, extra)
    if a.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        print(render_plan_table(plan))
    # The plan is shown, and the verdict is train's: more cards than this node has (when it is one of the nodes and
    # its count is known) is refused here too, before the fit.
    check_cards_available(a, hosts)
    return 0 if plan.fits else EXIT_NO_FIT


def dpo_args_for(plan, a: TrainArguments, ds_config_path: Path, output_dir: Path, extra: list[str]) -> list[str]:
    """Pure: the dpo_dist.dpo arguments that carry out the plan. Flags in `extra` win."""
    given = {x.split("=", 1)[0] for x in extra if x.startswith("--")}
    args: list[str] = []

    def put(flag, *vals):
        if flag not in given:
            args.extend([flag, *map(str, vals)])

    hw = HARDWARE[a.hardware]
    put("--model_name_or_path", a.model)
    put("--output_dir", output_dir)
    if plan.uses_deepspeed:
        put("--deepspeed", ds_config_path)
    put("--per_device_train_batch_size", plan.micro_batch_size)
    put("--gradient_accumulation_steps", plan.gradient_accumulation_steps)
    put("--max_length", plan.max_length)
    if a.task == "dpo":  # DPO-only options: dpo_dist.sft refuses them (dpo_dist.args.DPO_ONLY_OPTIONS)
        put("--max_prompt_length", plan.max_prompt_length)
        put("--reference", plan.reference)
    put("--device", hw.device)
    if plan.use_peft and "--use_peft" not in given:
        args.append("--use_peft")
    if plan.gradient_checkpointing and "--gradient_checkpointing" not in given:
        args.append("--gradient_checkpointing")
    if plan.bf16 and "--bf16" not in given:
        args.append("--bf16")
    if a.task == "dpo":  # batch shaping of the DPO trainer (sft.py has its own)
        if plan.length_buckets:
            put("--length_buckets", plan.length_buckets)
        if plan.packing and not given & {"--packing", "--attn_implementation"}:
            args.append("--packing")
    return args + list(extra)


BATCH_FLAGS = {"--per_device_train_batch_size": "micro_batch_size", "--gradient_accumulation_steps": "gradient_accumulation_steps"}


def apply_batch_overrides(plan, extra: list[str]):
    """Pure: batch flags the user passes after `--` win over the plan, and the DeepSpeed config follows them
    (DeepSpeed refuses a config whose batch sizes differ from the trainer's)."""
    changes = {}
    for i, word in enumerate(extra):
        flag, _, value = word.partition("=")
        if flag in BATCH_FLAGS:
            value = value or (extra[i + 1] if i + 1 < len(extra) else "")
            try:
                n = int(value)
            except ValueError:
                raise LaunchError(f"{flag} {value!r}: expected a positive integer.") from None
            if n < 1:
                raise LaunchError(f"{flag} must be a positive integer (got {n}).")
            changes[BATCH_FLAGS[flag]] = n
    if not changes:
        return plan
    notes = (*plan.notes, f"batch set by the user after `--`: {changes} (the memory estimate is for the plan's)")
    return dataclasses.replace(plan, notes=notes, **changes)


@dataclass
class PreparedRun:
    """A planned run whose run dir is written and held by this process: what cmd_train launches (and relaunches)."""

    plan: object
    cmd: object  # the LaunchCommand of the first launch
    run_dir: Path
    output_dir: Path
    command_with: Callable  # rank arguments to add (a relaunch's --resume_from_checkpoint) -> LaunchCommand


def _output_dir_for(run_dir: Path, extra: list[str]) -> Path:
    given = rank_flag(extra, "--output_dir")
    return Path(given) if given else run_dir / "output"


def check_output_dir_for_launch(output_dir: Path, extra: list[str]) -> None:
    """The ranks' own output-dir rule (util.checkpoint), applied before the run dir is written, and the folder is
    not held by a run that is going on now (util.lock)."""
    if folder_is_busy(output_dir):
        raise LaunchError(f"the output dir {output_dir} is in use by another run that is going on now. Nothing was "
                          "written. Wait for it to end, or give a new --run_dir (or --output_dir after `--`).")
    flags = {w.split("=", 1)[0] for w in extra}
    rank_view = SimpleNamespace(output_dir=str(output_dir), overwrite_output_dir="--overwrite_output_dir" in flags,
                                resume_from_checkpoint=rank_flag(extra, "--resume_from_checkpoint"),
                                no_merge="--no_merge" in flags)
    try:
        check_output_dir(rank_view)
    except ArgumentError as e:
        raise LaunchError(f"{e} (flags for the ranks go after `--`)") from None


def prepare_run(a: TrainArguments, extra: list[str], environ=None) -> PreparedRun:
    """Plan, then claim and write the run dir (plan.json, ds_config.json, command.sh, .deepspeed_env).
    Everything that can refuse runs before anything is written; a refusal leaves no run dir behind."""
    try:  # a --report_to tracker this Python lacks: refused before the plan, the run dir and the ranks
        check_rank_trackers(extra)
    except ArgumentError as e:
        raise LaunchError(str(e)) from None
    spec, hosts, plan = _plan_with_data(a, extra)
    plan = apply_batch_overrides(plan, extra)
    cluster = check_cluster_options(a, a.cards)
    if cluster is None:  # with --emit the nodes are the cluster's, not this one
        check_cards_available(a, hosts, environ)
    if a.max_restarts < 0:
        raise LaunchError(f"--max_restarts must be 0 or more (got {a.max_restarts}).")
    print(render_plan_table(plan))
    if not plan.fits:
        raise NoFit(plan)
    if a.run_dir and (problem := check_run_dir(Path(a.run_dir), a.overwrite_run_dir)):
        raise LaunchError(problem)
    if a.run_dir:
        check_output_dir_for_launch(_output_dir_for(Path(a.run_dir), extra), extra)
    ds_config = build_ds_config(plan, spec) if plan.uses_deepspeed else None
    try:
        run_dir, made = claim_run_dir(Path(a.run_dir) if a.run_dir else None, a.model, a.overwrite_run_dir)
    except RunDirError as e:
        raise LaunchError(str(e)) from None
    written: list[Path] = []
    try:
        ds_path = run_dir / "ds_config.json"
        output_dir = _output_dir_for(run_dir, extra)
        hostfile_path = str(Path(a.hostfile).resolve()) if hosts else None
        # DeepSpeed reads only ./.deepspeed_env, ~/.deepspeed_env or $DS_ENV_FILE: the command sets DS_ENV_FILE.
        ds_env_path = str((run_dir / ".deepspeed_env").resolve())
        script_args = dpo_args_for(plan, a, ds_path, run_dir / "output", extra)

        extra_env_names = tuple(n for n in (a.env or "").split(",") if n)
        # --emit on several nodes: DeepSpeed's command per node, whose hosts the cluster file fills in.
        cluster_keywords = cluster_command_overrides(plan.nodes, a.cards, a.launcher) if cluster else {}

        def command_with(more: list[str] = ()):
            keywords = dict(
                hosts=hosts, master_port=a.master_port, launcher=a.launcher, module=f"dpo_dist.{a.task}",
                hostfile_path=hostfile_path, deepspeed_env_path=ds_env_path, extra_env_names=extra_env_names,
                environ=environ, no_ssh=False if a.ssh else None, ssh_port=a.ssh_port, deepspeed=plan.uses_deepspeed,
                plan_env=plan_env(plan))
            keywords.update(cluster_keywords)
            return build_launch_command(a.hardware, a.cards, script_args=[*script_args, *more], **keywords)

        cmd = command_with()
        if cluster_keywords:
            cmd = dataclasses.replace(cmd, description=cmd.description + f"\n--emit {a.emit}: the cluster file runs "
                                      "this per-node command with the hostfile, node rank and master address of the "
                                      "allocation in place of the placeholders.")
        # Everything that can refuse the launch (secrets, quoting) runs before the files are written.
        command_sh = render_command_sh(cmd)
        deepspeed_env = render_deepspeed_env(cmd.deepspeed_env) if cmd.deepspeed_env else None
        cluster_files = render_cluster_files(
            cluster, cmd, plan, run_dir, workdir=os.getcwd(), environ=os.environ if environ is None else environ,
            extra_env_names=extra_env_names) if cluster else {}
        if not a.run_dir:
            check_output_dir_for_launch(output_dir, extra)
        if ds_config is not None:
            written.append(write_ds_config(ds_config, ds_path))
        written.append(write_json_atomic(run_dir / "plan.json", plan_to_dict(plan)))
        written.append(write_atomic(run_dir / "command.sh", command_sh, mode=0o755))
        if deepspeed_env is not None:
            written.append(write_atomic(run_dir / ".deepspeed_env", deepspeed_env, mode=0o644))
        for name, (text, mode) in cluster_files.items():
            written.append(write_atomic(run_dir / name, text, mode=mode))
    except BaseException as e:
        if made:  # nothing of a refused launch stays behind: the files this call wrote, then the folder it made
            for f in written:
                f.unlink(missing_ok=True)
            remove_made(run_dir)
        if isinstance(e, OSError):
            raise LaunchError(no_space_message(run_dir) if is_no_space(e) else
                              f"cannot write the run dir {run_dir} ({e.strerror or e}). Choose a --run_dir you can "
                              "write to.") from None
        raise
    return PreparedRun(plan, cmd, run_dir, output_dir, command_with)


def plan_env(plan) -> dict:
    """Variables the plan needs on every rank (pure): Habana's ZeRO-3 memory flags for Gaudi ZeRO-3 plans."""
    return dict(HARDWARE[plan.hardware].backend.zero3_env) if plan.zero_stage == 3 else {}


class NoFit(Exception):
    def __init__(self, plan):
        self.plan = plan


def cmd_train(argv) -> int:
    argv, extra = _split_rank_args(argv)
    a = _parse(TrainArguments, argv)
    if a.recipe:  # the recipe's planner choices where the command line sets none; its rank flags before `--`'s
        try:
            extra = apply_recipe(a, argv, extra)
        except ArgumentError as e:
            raise LaunchError(str(e)) from None
    if not (a.dry_run or a.emit) and (busy := master_port_problem_for(a.master_port, a.hostfile)):
        raise LaunchError(busy)
    run = prepare_run(a, extra)
    try:
        return _launch(a, extra, run)
    finally:
        release_folder(run.run_dir)  # held since prepare_run (also released by the kernel when this process ends)


def _launch(a: TrainArguments, extra: list[str], run: PreparedRun) -> int:
    print(f"run dir: {run.run_dir}")
    print(format_command(run.cmd))
    if a.emit:
        name = SBATCH_FILE if a.emit == "slurm" else MPIJOB_FILE
        how = "sbatch" if a.emit == "slurm" else "kubectl apply -f"
        print(f"--emit {a.emit}: wrote {run.run_dir / name}; not launched. Submit with: {how} {run.run_dir / name}")
        return 0
    if a.dry_run:
        print("dry run: not launched.")
        return 0
    env = dict(os.environ)
    env.update(run.cmd.env)
    # The launcher binaries (deepspeed, torchrun) of this Python's environment come first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    dist_timeout = rank_flag(extra, "--dist_timeout")
    idle_s = (float(dist_timeout) if dist_timeout and dist_timeout.isdigit() else DEFAULT_DIST_TIMEOUT_S) + HANG_MARGIN_S

    def launch_once(more: list[str]):
        cmd = run.command_with(more) if more else run.cmd
        result = spawn(cmd.commands, env, log_path=run.run_dir / "launch.log",
                       idle_timeout_s=idle_s if a.max_restarts else None,
                       expected_ranks=None if a.hostfile else a.cards)  # one node: all its ranks are ours to see
        if a.hardware == "cpu":  # ranks that were killed could not remove their shared-memory buffers
            cleanup_shm_buffers(a.master_port)
        return result

    result, restarts = supervise(
        launch_once, output_dir=run.output_dir, world_size=run.plan.world_size, deepspeed=run.plan.uses_deepspeed,
        max_restarts=a.max_restarts, record=run.run_dir / RESTARTS_FILE,
        disk_paths=(run.run_dir, run.output_dir))
    if result.returncode != 0:
        print(f"launch: training failed: {result.failed or 'exit ' + str(result.returncode)}. "
              f"Log: {run.run_dir / 'launch.log'}", file=sys.stderr)
        return result.returncode
    if a.max_restarts:
        record_restarts_in_metrics(run.output_dir, restarts)
    if a.task == "dpo" and (block := record_plan_in_metrics(run.output_dir, plan_to_dict(run.plan),
                                                            str(run.run_dir / "plan.json"))):
        print("\n".join(planned_vs_measured_lines(block)))
    print(f"launch: done{f' after {len(restarts)} restart(s)' if restarts else ''}. Model and metrics in "
          f"{run.output_dir}")
    return 0


def cmd_doctor(argv) -> int:
    a = _parse(DoctorArguments, argv)
    return run_doctor(hardware=a.hardware, hostfile=a.hostfile, cards=a.cards, ssh_port=a.ssh_port)


def cmd_selfcheck(argv) -> int:
    from launch.selfcheck import SelfcheckArguments, run_selfcheck  # deferred: selfcheck runs this module's commands

    a = _parse(SelfcheckArguments, argv)
    try:
        return run_selfcheck(a)
    except ValueError as e:
        raise LaunchError(str(e)) from None


def cmd_recipes(argv) -> int:
    return run_recipes(_parse(RecipesArguments, argv))


COMMANDS = {"plan": cmd_plan, "train": cmd_train, "doctor": cmd_doctor, "selfcheck": cmd_selfcheck,
            "recipes": cmd_recipes}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nlaunch: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
            return EXIT_USAGE
        return 0 if argv else EXIT_USAGE
    try:
        return COMMANDS[argv[0]](argv[1:])
    except NoFit as e:
        hint = e.plan.suggestion.text if e.plan.suggestion else ""
        print(f"launch: error: the plan does not fit in {e.plan.card_memory_gib:.1f} GiB per card. {hint}".rstrip(),
              file=sys.stderr)
        return EXIT_NO_FIT
    except (LaunchError, SpecError, HostfileError, CommandError) as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
