"""What every launcher builder shares: the launch facts of each device, the validated request, the checks
(ports, hosts, secrets, OMP threads, visible devices, what `.deepspeed_env` forwards) and the renderers of
`command.sh`, `.deepspeed_env` and the `--dry-run` line.

Nothing here starts a process, touches the network or imports torch/deepspeed.

`--no_local_rank` is passed on every DeepSpeed path (gaudi_spawn does so too): the rank reads
`LOCAL_RANK` from its environment, as under torchrun, and never gets a `--local_rank=` argument.

Secrets: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN` and any variable whose name `dpo_dist.util.logs.is_secret_name`
calls a secret (a word TOKEN, SECRET, PASSWORD, PASSWD, KEY or CREDENTIAL) are never written to
`.deepspeed_env` or `command.sh`; naming one in `extra_env_names` is an error, and a command whose words
contain the value of such a variable is refused. On several nodes each node gets the Hugging Face token on
its own: `huggingface-cli login` (or `hf auth login`) once per node, which stores it in
`~/.cache/huggingface/token`, or `HF_TOKEN` set in that node's own environment / container
(`docker run -e HF_TOKEN`), or no token at all with the model pre-downloaded and `HF_HUB_OFFLINE=1`
forwarded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dpo_dist.backend import BACKENDS, DEVICES, HPU_ENV, twin_requested
from dpo_dist.util.logs import is_secret_name
from launch.command.hostfile import HostEntry, host_problem
from launch.command.quoting import check_deepspeed_env_value, check_env_name, check_reshell_safe, quote
from launch.plan.hardware import GAUDI_NODE_CARDS

__all__ = [
    "CommandError",
    "LaunchCommand",
    "LaunchRequest",
    "Built",
    "Builder",
    "DeviceLaunch",
    "DEVICE_LAUNCH",
    "HARDWARE_KINDS",
    "LAUNCHERS",
    "DEFAULT_MASTER_PORT",
    "render_command_sh",
    "render_deepspeed_env",
    "format_command",
]

DEFAULT_MASTER_PORT = 29500
# The `hardware` names the builder takes, and the device each one runs on.
HARDWARE_KINDS = {"gaudi2": "hpu", "gaudi3": "hpu", "hpu": "hpu", "cuda": "cuda", "cpu": "cpu"}
LAUNCHERS = ("auto", "gaudi_spawn", "deepspeed", "torchrun")
# auto on several nodes, whatever the device: only DeepSpeed's runner reads a hostfile.
MULTI_NODE_LAUNCHER = "deepspeed"


@dataclass(frozen=True)
class DeviceLaunch:
    """How ranks of one device are started. `DEVICE_LAUNCH` has one row per device of dpo_dist.backend."""

    family: str  # what a node of it is called in messages
    label: str  # head of the description; {name} is the hardware name asked for
    launchers: tuple[str, ...]  # launchers that can start its ranks; the first is auto's choice on one node
    max_cards: int | None = None  # cards in one node, when the device has a fixed number
    # Set before Python starts on every rank, always forwarded to every node: naming one in extra_env_names is a
    # no-op (the device's value wins).
    rank_env: Mapping[str, str] = field(default_factory=dict)
    # Why a rank_env value replaces the user's: a note when the environment had another value.
    rank_env_reasons: Mapping[str, str] = field(default_factory=dict)
    # Where DeepSpeed would not detect the device itself: DS_ACCELERATOR, for the launcher and the ranks.
    accelerator_env: Mapping[str, str] = field(default_factory=dict)
    plan_env: bool = False  # the plan's per-rank variables (plan_env) apply on it
    shares_cores: bool = False  # ranks compute on the host's cores: OMP_NUM_THREADS = cores / ranks here
    twin: bool = False  # $DPO_DIST_HPU_TWIN runs it on CPU ranks, which then share the cores too
    no_ssh_default: bool = False  # several nodes: one command per node (no_ssh) instead of pdsh over ssh
    # Variables of the environment that DeepSpeed's pdsh runner does not carry to the other nodes: forwarded
    # through .deepspeed_env.
    forward_prefixes: tuple[str, ...] = ()
    deepspeed_cards: tuple[str, ...] = ("--num_gpus",)  # DeepSpeed runner flags before the one-node card count
    visible_devices: str | None = None  # variable that restricts which cards this node's ranks see


DEVICE_LAUNCH: dict[str, DeviceLaunch] = {
    "hpu": DeviceLaunch(
        family="Gaudi", label="Gaudi ({name})", launchers=("gaudi_spawn", "deepspeed"), max_cards=GAUDI_NODE_CARDS,
        rank_env=HPU_ENV,
        rank_env_reasons={"PT_HPU_LAZY_MODE": "lazy mode is what GaudiDPOConfig(use_lazy_mode=True) expects"},
        plan_env=True, twin=True, forward_prefixes=("PT_HPU_", "HCCL_"),
        # what optimum-habana's DistributedRunner runs on one node
        deepspeed_cards=("--num_nodes", "1", "--num_gpus"),
    ),
    "cuda": DeviceLaunch(family="CUDA", label="CUDA", launchers=("deepspeed", "torchrun"),
                         visible_devices=BACKENDS["cuda"].visible_devices_env),
    "cpu": DeviceLaunch(family="CPU", label="CPU", launchers=("deepspeed", "torchrun"),
                        accelerator_env=BACKENDS["cpu"].env, shares_cores=True, no_ssh_default=True,
                        deepspeed_cards=("--num_accelerators",)),
}
assert tuple(DEVICE_LAUNCH) == DEVICES and set(HARDWARE_KINDS.values()) == set(DEVICES)


class CommandError(ValueError):
    """The launch command cannot be built safely; the message names the input and the fix."""


@dataclass
class LaunchCommand:
    """What to run.

    argv: the one command to run (empty when `per_node` is used).
    env: variables to set on top of the inherited environment of the launcher process.
    deepspeed_env: contents for `.deepspeed_env` (write with `render_deepspeed_env`; empty when
        no file is needed). When `env` has `DS_ENV_FILE`, write it exactly there.
    per_node: one argv per node, element R to be run on node R (CPU/no_ssh multi-node, torchrun
        multi-node). On loopback all of them run on this machine. Empty otherwise.
    description: human-readable notes on what was chosen and why.
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    deepspeed_env: dict[str, str] = field(default_factory=dict)
    per_node: list[list[str]] = field(default_factory=list)
    description: str = ""
    launcher: str = ""
    hardware: str = ""
    world_size: int = 0
    num_nodes: int = 1
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT
    workdir: str | None = None

    @property
    def commands(self) -> list[list[str]]:
        """Every argv to run: `per_node` if set, else `[argv]`."""
        return [list(a) for a in self.per_node] if self.per_node else [list(self.argv)]


@dataclass
class LaunchRequest:
    """The checked inputs of one launch, as every builder sees them (see `build_launch_command`).

    `launcher`, `master_addr`, `env` and `notes` are filled in by `build_launch_command` before a
    builder's `build` runs: the launcher chosen, the master of several nodes, the environment of the
    launcher process, and the notes so far."""

    device: DeviceLaunch
    hw_name: str  # the hardware name asked for, lower case (gaudi2, cuda, ...)
    kind: str  # its device: hpu | cuda | cpu
    cards: int
    master_port: int
    module: str
    script_args: list[str]  # the rank's arguments, `--deepspeed <ds_config>` included
    python: str
    workdir: str | None
    extra_env_names: list[str]
    hosts: list[HostEntry]  # empty for one node
    hostfile_path: str | None
    ssh_port: int | None
    no_ssh: bool
    deepspeed_env_path: str | None
    deepspeed: bool
    environ: Mapping[str, str]
    launcher: str = ""
    master_addr: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def multi(self) -> bool:
        return bool(self.hosts)

    @property
    def nodes(self) -> int:
        return len(self.hosts) if self.hosts else 1

    @property
    def world(self) -> int:
        return self.cards * self.nodes

    @property
    def script_path(self) -> str:
        """The rank entry module as a script path (`dpo_dist/dpo.py`), for launchers that run files."""
        return self.module.replace(".", "/") + ".py"

    @property
    def deepspeed_tail(self) -> list[str]:
        """The end of every DeepSpeed runner command: the rank module and its arguments."""
        return ["--no_local_rank", "--module", self.module] + self.script_args


@dataclass
class Built:
    """What a builder adds to the launch: the command(s), `.deepspeed_env`, launcher variables, notes."""

    argv: list[str] = field(default_factory=list)
    per_node: list[list[str]] = field(default_factory=list)
    deepspeed_env: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # added after the launch environment
    notes: list[str] = field(default_factory=list)


class Builder:
    """One launcher: which launches it refuses, whether it starts nodes over ssh, and what it runs.
    `build_launch_command` asks, in this order: `unsupported` (when the device does not list the
    launcher), `check`, `uses_ssh`, then `build`."""

    name = ""

    def unsupported(self, req: LaunchRequest) -> str:
        """The refusal when `req.device` does not list this launcher."""
        return f"launcher {self.name} is not supported on {req.hw_name}."

    def auto_notes(self, req: LaunchRequest) -> list[str]:
        """Notes when `auto` chose this launcher."""
        return []

    def check(self, req: LaunchRequest) -> None:
        """Refuse (CommandError) a launch this launcher cannot do; runs before the master address is resolved."""

    def uses_ssh(self, req: LaunchRequest) -> bool:
        """Whether this launch starts the other nodes over ssh (only then does ssh_port apply)."""
        return False

    def build(self, req: LaunchRequest) -> Built:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# checks


def positive_int(value, what: str, fix: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum is not None and value > maximum):
        rng = f"1..{maximum}" if maximum is not None else ">= 1"
        raise CommandError(f"{what} must be an integer in {rng}, got {value!r}. Fix: {fix}")
    return value


def check_cards(device: DeviceLaunch, hw_name: str, value) -> int:
    """Cards per node: a positive int, and at most the cards of one node where the device has a fixed number."""
    top = device.max_cards
    if top is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top):
        raise CommandError(
            f"cards per node must be 1..{top} on {hw_name} (a {device.family} node has {top} cards), "
            f"got {value!r}. Fix: use --cards {top} per node and a hostfile for more nodes."
        )
    return positive_int(value, "cards per node", "ask for at least 1 card")


def check_host(host: str, what: str) -> str:
    if not isinstance(host, str) or host == "":
        raise CommandError(f"{what} must be a non-empty host name, got {host!r}")
    problem = host_problem(host)
    if problem is not None:
        raise CommandError(f"{what} {host!r} is refused: {problem[1]}. Fix: {problem[2]}.")
    return host


def normalize_hosts(hosts: Sequence[HostEntry], cards_per_node: int) -> list[HostEntry]:
    """Every host valid and listed once, every node with `cards_per_node` slots; as `HostEntry`s."""
    out: list[HostEntry] = []
    seen = set()
    for i, h in enumerate(hosts):
        host = getattr(h, "host", None)
        slots = getattr(h, "slots", None)
        check_host(host, f"host #{i} of the hostfile")
        if slots != cards_per_node:
            raise CommandError(
                f"host {host!r} has slots={slots} but {cards_per_node} cards per node were asked for. "
                f"Fix: set slots={cards_per_node} on every hostfile line, or ask for --cards {slots}."
            )
        if host.lower() in seen:
            raise CommandError(f"host {host!r} is listed twice. Fix: list every node once.")
        seen.add(host.lower())
        out.append(h if isinstance(h, HostEntry) else HostEntry(host=host, slots=slots, line=getattr(h, "line", i + 1)))
    return out


def refuse_secret_name(name: str, what: str) -> None:
    if is_secret_name(name):
        raise CommandError(
            f"{what} {name} looks like a secret (its name contains TOKEN/SECRET/PASSWORD/KEY/...), and "
            "secrets are never forwarded through .deepspeed_env or written to command.sh. Fix: drop it "
            "from the list; give each node its own credentials instead (for Hugging Face: run "
            "`huggingface-cli login` once per node, which stores ~/.cache/huggingface/token, or set "
            "HF_TOKEN in each node's own environment/container)."
        )


def check_extra_env_names(names: Iterable[str] | str) -> list[str]:
    """`extra_env_names` as a list without repeats; a name that is invalid or secret-like is refused."""
    out: list[str] = []
    for name in [names] if isinstance(names, str) else names:
        check_env_name(name, "extra environment variable name", CommandError)
        refuse_secret_name(name, "extra environment variable")
        if name not in out:
            out.append(name)
    return out


def check_reshell_args(words: Sequence[str], via: str, allowed: Iterable[str]) -> None:
    """Script arguments that `via` re-joins into one shell line: only characters that mean nothing there."""
    for i, w in enumerate(words):
        check_reshell_safe(w, f"script argument #{i}", via, allowed, CommandError)


def visible_devices(req: LaunchRequest) -> str | None:
    """The card numbers this node's ranks may see (`CUDA_VISIBLE_DEVICES`), comma-joined, or None when the
    device has no such variable or it is unset. Refused unless it names exactly `req.cards` numbered cards."""
    var = req.device.visible_devices
    value = req.environ.get(var, "") if var else ""
    if value == "":
        return None
    ids = [x.strip() for x in value.split(",") if x.strip() != ""]
    if not all(x.isdigit() for x in ids):
        raise CommandError(
            f"{var}={value!r} is not a list of device numbers; DeepSpeed's --include needs "
            "numbers (e.g. 0,1). Fix: use indices, not GPU UUIDs, or unset it."
        )
    if len(ids) != req.cards:
        raise CommandError(
            f"{var}={value!r} makes {len(ids)} GPU(s) visible but {req.cards} cards were asked for. "
            f"Fix: ask for --cards {len(ids)}, or change {var}."
        )
    return ",".join(ids)


def omp_threads(environ: Mapping[str, str], cpu_count: int | None, ranks_here: int) -> str:
    """OMP_NUM_THREADS for ranks that share this machine's cores: the user's value, else cores / ranks here."""
    user = environ.get("OMP_NUM_THREADS")
    if user is not None and user.isdigit() and int(user) >= 1:
        return user
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return str(max(1, cores // max(1, ranks_here)))


def launch_env(req: LaunchRequest, plan_env: Mapping[str, str] | None, cpu_count: int | None,
               ranks_here: int) -> tuple[dict[str, str], list[str]]:
    """The variables of the launcher process (which every rank of this node inherits), and notes on them."""
    device, environ = req.device, req.environ
    env: dict[str, str] = {**device.rank_env, **device.accelerator_env}
    notes: list[str] = []
    if device.plan_env:
        for name, value in (plan_env or {}).items():
            check_env_name(name, "plan environment variable", CommandError)
            env[name] = environ.get(name, value)
    twin = device.twin and twin_requested(environ)
    if device.shares_cores or twin:
        env["OMP_NUM_THREADS"] = omp_threads(environ, cpu_count, ranks_here)
    if twin:
        notes.append("Gaudi twin ($DPO_DIST_HPU_TWIN): optimum-habana's code on CPU ranks, a development aid.")
    for name, why in device.rank_env_reasons.items():
        if environ.get(name) not in (None, device.rank_env[name]):
            notes.append(f"{name} was {environ.get(name)!r} in the environment; set to {device.rank_env[name]} ({why}).")
    return env, notes


def forwarded_env(req: LaunchRequest) -> tuple[dict[str, str], list[str]]:
    """`.deepspeed_env` for a pdsh launch: what every node needs but pdsh does not carry. The launch
    environment, the device's `forward_prefixes` variables of this environment (secret-like names skipped;
    they are returned second) and the `extra_env_names` (each must be set here)."""
    ds_env = dict(req.env)
    skipped = []
    for name in sorted(req.environ):
        if name.startswith(req.device.forward_prefixes) and name not in ds_env:
            if is_secret_name(name):
                skipped.append(name)
                continue
            check_env_name(name, "environment variable", CommandError)
            ds_env[name] = req.environ[name]
    for name in req.extra_env_names:
        if name in req.device.rank_env:
            continue
        if name not in req.environ:
            raise CommandError(f"extra environment variable {name} is not set, so it cannot be forwarded to the nodes. "
                               f"Fix: export {name}=... before launching, or drop it.")
        ds_env[name] = req.environ[name]
    for name, value in ds_env.items():
        check_deepspeed_env_value(name, value, CommandError)
    return ds_env, skipped


def _secret_values(environ: Mapping[str, str]) -> dict[str, str]:
    """name -> value of secret-named variables worth guarding. Stricter than dpo_dist.util.logs.secret_values,
    which masks every value of 6 characters or more in log lines: a match here refuses the launch, so only
    values of 8 characters or more count, and never a file path (SSL_KEY_FILE=/etc/ssl/key.pem may be an argument)."""
    out = {}
    for name, value in environ.items():
        if is_secret_name(name) and isinstance(value, str):
            if len(value) >= 8 and not value.startswith(("/", "~", "./")):
                out[name] = value
    return out


def guard_secrets(cmd: LaunchCommand, environ: Mapping[str, str]) -> None:
    """Refuse a command whose words, environment or .deepspeed_env contain the value of a secret."""
    secrets = _secret_values(environ)
    if not secrets:
        return
    places = []
    for r, argv in enumerate(cmd.commands):
        for i, word in enumerate(argv):
            places.append((f"argument #{i} of the command" + (f" for node {r}" if cmd.per_node else ""), word))
    places += [(f"environment variable {k}", v) for k, v in cmd.env.items()]
    places += [(f".deepspeed_env variable {k}", v) for k, v in cmd.deepspeed_env.items()]
    for where, text in places:
        for name, value in secrets.items():
            if value in text:
                raise CommandError(
                    f"{where} contains the value of {name}. Secrets must not be written to command.sh, "
                    ".deepspeed_env or logs. Fix: remove it from the arguments; the ranks read the token "
                    "from their own environment or ~/.cache/huggingface/token (huggingface-cli login on each node)."
                )


# --------------------------------------------------------------------------------------------
# rendering


def _check_export(name: str, value: str, what: str) -> None:
    check_env_name(name, what, CommandError)
    if is_secret_name(name):
        raise CommandError(f"{what} {name} looks like a secret and is never written to command.sh or .deepspeed_env.")


def render_deepspeed_env(env: Mapping[str, str]) -> str:
    """`.deepspeed_env` text: `NAME=value`, one per line, no quotes, no comments, no blank lines.

    That is what DeepSpeed's runner reads: for each line `key, val = line.split('=', 1)`, then
    `val.strip()`, double-quoted when it has characters outside `[\\w@%+=:,./-]`, and sent to
    every node as `export key=val;` (so a comment or blank line would crash it, and `$`/backticks
    would be expanded remotely). Values are checked with `check_deepspeed_env_value`."""
    lines = []
    for name, value in env.items():
        _check_export(name, value, ".deepspeed_env variable")
        check_deepspeed_env_value(name, value, CommandError)
        lines.append(f"{name}={value}\n")
    return "".join(lines)


def _comment(text: str) -> list[str]:
    out = []
    for line in text.split("\n"):
        safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
        out.append(f"# {safe}".rstrip())
    return out


def _quoted(argv: Sequence[str], node: int | None = None) -> str:
    if not argv:
        raise CommandError("the command is empty")
    suffix = f" for node {node}" if node is not None else ""
    return " ".join(quote(w, f"argument #{i} of the command{suffix}", CommandError) for i, w in enumerate(argv))


def render_command_sh(cmd: LaunchCommand, node_rank: int | None = None) -> str:
    """A bash script that repeats the launch exactly: shebang, `set -euo pipefail`, the exported
    environment, then the quoted command (run with `exec`). Every word is `shlex.quote`d; words
    with control characters are refused (CommandError naming the argument).

    With `per_node`: `node_rank=R` renders only node R's command; otherwise the script defines
    one function per node (each `exec`s its command), runs the node given as `$1`
    (`bash command.sh 1`, replacing the shell), or with no
    argument starts all nodes here (loopback) and exits with the first non-zero status."""
    # The header names builder.py, home of the public entry point build_launch_command.
    lines = ["#!/usr/bin/env bash", "# Generated by dpo-dist (launch/command/builder.py); re-run to repeat this launch."]
    lines += _comment(cmd.description) if cmd.description else []
    lines.append("set -euo pipefail")
    if cmd.workdir:
        lines.append(f"cd -- {quote(cmd.workdir, 'workdir', CommandError)}")
    for name, value in cmd.env.items():
        _check_export(name, value, "environment variable")
        lines.append(f"export {name}={quote(value, f'the value of {name}', CommandError)}")
    if not cmd.per_node:
        if node_rank not in (None, 0):
            raise CommandError(f"node_rank {node_rank} given but this launch has a single command")
        lines.append("exec " + _quoted(cmd.argv))
        return "\n".join(lines) + "\n"
    n = len(cmd.per_node)
    if node_rank is not None:
        if isinstance(node_rank, bool) or not isinstance(node_rank, int) or not 0 <= node_rank < n:
            raise CommandError(f"node_rank must be 0..{n - 1}, got {node_rank!r}")
        lines.append("exec " + _quoted(cmd.per_node[node_rank], node_rank))
        return "\n".join(lines) + "\n"
    for r, argv in enumerate(cmd.per_node):
        lines.append(f"node_{r}() {{ exec {_quoted(argv, r)}; }}")
    lines += [
        'if [ "$#" -gt 0 ]; then',
        '  case "$1" in',
        *[f"    {r}) node_{r} ;;" for r in range(n)],
        f'    *) echo "usage: $0 [NODE_RANK in 0..{n - 1}]" >&2; exit 2 ;;',
        "  esac",
        "fi",
        "# No node rank given: start every node on this machine (loopback).",
        "pids=()",
        "trap 'kill \"${pids[@]}\" 2>/dev/null || true' INT TERM",
        *[f'node_{r} & pids+=("$!")' for r in range(n)],
        "rc=0",
        'for pid in "${pids[@]}"; do wait "$pid" || { s=$?; [ "$rc" -ne 0 ] || rc=$s; }; done',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def format_command(cmd: LaunchCommand) -> str:
    """One line per command, `NAME=value ... word word`, quoted: for --dry-run output."""
    prefix = " ".join(f"{k}={quote(v, f'the value of {k}', CommandError)}" for k, v in cmd.env.items())
    out = []
    for r, argv in enumerate(cmd.commands):
        line = _quoted(argv, r if cmd.per_node else None)
        label = f"# node {r}: " if cmd.per_node else ""
        out.append(label + (prefix + " " if prefix else "") + line)
    return "\n".join(out)
