"""Pure builders for the launch command: gaudi_spawn / DeepSpeed runner / torchrun argv,
the environment, `.deepspeed_env`, and the `command.sh` that records the exact launch.

Nothing here starts a process, touches the network or imports torch/deepspeed; `launch/spawn.py`
runs what this module builds. What each case builds (N = cards per node, P = master port,
ARGS = the rank script's arguments, M = `dpo_dist.dpo`):

- HPU, one node: `python $GAUDI_SPAWN --world_size N --use_deepspeed --master_port P dpo_dist/dpo.py ARGS`
  with `GAUDI_SPAWN` set (optimum-habana's `examples/gaudi_spawn.py`; it is not in the wheel), else
  `python -m launch.gaudi_spawn ...` (the same launcher over the class it wraps, which is in the
  wheel). gaudi_spawn then runs `deepspeed --num_nodes 1 --num_gpus N --no_local_rank --master_port P
  dpo_dist/dpo.py ARGS` through `bash` (optimum-habana `DistributedRunner`), so ARGS must be free of
  shell metacharacters: they are checked, not just quoted (see launch/command/quoting.py). A plan without
  DeepSpeed (ZeRO-0 on Gaudi: plain DDP) passes `--use_mpi` instead: `mpirun -n N ... python
  dpo_dist/dpo.py ARGS`, as optimum-habana's own DPO baseline runs.
- HPU, several nodes: `deepspeed --hostfile F --master_addr <first host> --master_port P
  [--ssh_port S] --no_local_rank --module M ARGS` (what `DistributedRunner.create_multi_node_setup`
  builds, plus `--module`), and `.deepspeed_env` with `PT_HPU_LAZY_MODE=1`,
  `PT_ENABLE_INT64_SUPPORT=1`, every `PT_HPU_*` / `HCCL_*` of the environment and the
  variables the user names. gaudi_spawn itself is not used for multi-node: its
  `DistributedRunner.process_hostfile` rejects comment lines, which our hostfiles have.
- CUDA, one node: `deepspeed --num_gpus N --master_port P --no_local_rank --module M ARGS`
  (`--include localhost:<ids>` instead of `--num_gpus` when `CUDA_VISIBLE_DEVICES` is set,
  because DeepSpeed drops that variable when `--num_gpus` is given), or
  `torchrun --nproc_per_node N --master_port P -m M ARGS`.
- CPU, one node: env `DS_ACCELERATOR=cpu OMP_NUM_THREADS=T`, then
  `deepspeed --num_accelerators N --master_port P --no_local_rank --module M ARGS` or torchrun.
- CPU, several nodes (default `no_ssh`, testable on loopback): one command per node R,
  `deepspeed --hostfile F --no_ssh --node_rank R --master_addr A --master_port P --no_local_rank
  --module M ARGS`; with `no_ssh=False` one pdsh command like the HPU one, with
  `DS_ACCELERATOR`/`OMP_NUM_THREADS` in `.deepspeed_env`.

`--no_local_rank` is passed on every DeepSpeed path (gaudi_spawn does so too): the rank reads
`LOCAL_RANK` from its environment, as under torchrun, and never gets a `--local_rank=` argument.

Secrets: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN` and any variable whose name contains TOKEN,
SECRET, PASSWORD, PASSWD, KEY or CREDENTIAL are never written to `.deepspeed_env` or
`command.sh`; naming one in `extra_env_names` is an error, and a command whose words contain the
value of such a variable is refused. On several nodes each node gets the Hugging Face token on
its own: `huggingface-cli login` (or `hf auth login`) once per node, which stores it in
`~/.cache/huggingface/token`, or `HF_TOKEN` set in that node's own environment / container
(`docker run -e HF_TOKEN`), or no token at all with the model pre-downloaded and
`HF_HUB_OFFLINE=1` forwarded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from dpo_dist.backend import HPU_ENV, twin_requested
from launch.command.hostfile import HostEntry, host_problem
from launch.command.quoting import (
    PDSH_SAFE_CHARS,
    RESHELL_SAFE_CHARS,
    check_deepspeed_env_value,
    check_env_name,
    check_no_control,
    check_reshell_safe,
    is_secret_name,
    quote,
)

__all__ = [
    "CommandError",
    "LaunchCommand",
    "build_launch_command",
    "render_command_sh",
    "render_deepspeed_env",
    "format_command",
    "HARDWARE_KINDS",
    "LAUNCHERS",
    "DEFAULT_MASTER_PORT",
]

DEFAULT_MASTER_PORT = 29500
HPU_CARDS_PER_NODE = 8
HARDWARE_KINDS = {"gaudi2": "hpu", "gaudi3": "hpu", "hpu": "hpu", "cuda": "cuda", "cpu": "cpu"}
LAUNCHERS = ("auto", "gaudi_spawn", "deepspeed", "torchrun")
# DeepSpeed's pdsh runner does not forward these to remote nodes; .deepspeed_env must.
HPU_FORWARD_PREFIXES = ("PT_HPU_", "HCCL_")
ALWAYS_SECRET = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "localhost.localdomain", "ip6-localhost"}
_VIA_GAUDI_SPAWN = "gaudi_spawn.py (optimum-habana's DistributedRunner runs the joined command with bash)"
_VIA_PDSH = "DeepSpeed's pdsh runner (it sends the command line to a shell on every node)"


def _is_loopback(host: str) -> bool:
    return host.lower() in _LOOPBACK or host.startswith("127.")


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

    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    deepspeed_env: Dict[str, str] = field(default_factory=dict)
    per_node: List[List[str]] = field(default_factory=list)
    description: str = ""
    launcher: str = ""
    hardware: str = ""
    world_size: int = 0
    num_nodes: int = 1
    master_addr: Optional[str] = None
    master_port: int = DEFAULT_MASTER_PORT
    workdir: Optional[str] = None

    @property
    def commands(self) -> List[List[str]]:
        """Every argv to run: `per_node` if set, else `[argv]`."""
        return [list(a) for a in self.per_node] if self.per_node else [list(self.argv)]


# --------------------------------------------------------------------------------------------
# small validators


def _positive_int(value, what: str, fix: str, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum is not None and value > maximum):
        rng = f"1..{maximum}" if maximum is not None else ">= 1"
        raise CommandError(f"{what} must be an integer in {rng}, got {value!r}. Fix: {fix}")
    return value


def _check_host(host: str, what: str) -> str:
    if not isinstance(host, str) or host == "":
        raise CommandError(f"{what} must be a non-empty host name, got {host!r}")
    problem = host_problem(host)
    if problem is not None:
        raise CommandError(f"{what} {host!r} is refused: {problem[1]}. Fix: {problem[2]}.")
    return host


def _secret_values(environ: Mapping[str, str]) -> Dict[str, str]:
    """name -> value of secret-named variables worth guarding (long enough, not a file path)."""
    out = {}
    for name, value in environ.items():
        if (name in ALWAYS_SECRET or is_secret_name(name)) and isinstance(value, str):
            if len(value) >= 8 and not value.startswith(("/", "~", "./")):
                out[name] = value
    return out


def _guard_secrets(cmd: LaunchCommand, environ: Mapping[str, str]) -> None:
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


def _refuse_secret_name(name: str, what: str) -> None:
    if name in ALWAYS_SECRET or is_secret_name(name):
        raise CommandError(
            f"{what} {name} looks like a secret (its name contains TOKEN/SECRET/PASSWORD/KEY/...), and "
            "secrets are never forwarded through .deepspeed_env or written to command.sh. Fix: drop it "
            "from the list; give each node its own credentials instead (for Hugging Face: run "
            "`huggingface-cli login` once per node, which stores ~/.cache/huggingface/token, or set "
            "HF_TOKEN in each node's own environment/container)."
        )


def _normalize_hosts(hosts: Sequence[HostEntry], cards_per_node: int) -> List[HostEntry]:
    out: List[HostEntry] = []
    seen = set()
    for i, h in enumerate(hosts):
        host = getattr(h, "host", None)
        slots = getattr(h, "slots", None)
        _check_host(host, f"host #{i} of the hostfile")
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


def _visible_cuda(environ: Mapping[str, str], cards: int) -> Optional[str]:
    value = environ.get("CUDA_VISIBLE_DEVICES", "")
    if value == "":
        return None
    ids = [x.strip() for x in value.split(",") if x.strip() != ""]
    if not all(x.isdigit() for x in ids):
        raise CommandError(
            f"CUDA_VISIBLE_DEVICES={value!r} is not a list of device numbers; DeepSpeed's --include needs "
            "numbers (e.g. 0,1). Fix: use indices, not GPU UUIDs, or unset it."
        )
    if len(ids) != cards:
        raise CommandError(
            f"CUDA_VISIBLE_DEVICES={value!r} makes {len(ids)} GPU(s) visible but {cards} cards were asked for. "
            f"Fix: ask for --cards {len(ids)}, or change CUDA_VISIBLE_DEVICES."
        )
    return ",".join(ids)


def _omp_threads(environ: Mapping[str, str], cpu_count: Optional[int], ranks_here: int) -> str:
    user = environ.get("OMP_NUM_THREADS")
    if user is not None and user.isdigit() and int(user) >= 1:
        return user
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return str(max(1, cores // max(1, ranks_here)))


# --------------------------------------------------------------------------------------------
# the builder


def build_launch_command(
    hardware: str,
    cards_per_node: int,
    hosts: Optional[Sequence[HostEntry]],
    script_args: Sequence[str],
    *,
    master_port: int = DEFAULT_MASTER_PORT,
    launcher: str = "auto",
    hostfile_path: Optional[str] = None,
    module: str = "dpo_dist.dpo",
    extra_env_names: Iterable[str] = (),
    environ: Optional[Mapping[str, str]] = None,
    ds_config: Optional[str] = None,
    master_addr: Optional[str] = None,
    ssh_port: Optional[int] = None,
    no_ssh: Optional[bool] = None,
    deepspeed_env_path: Optional[str] = None,
    python: str = "python",
    cpu_count: Optional[int] = None,
    workdir: Optional[str] = None,
    deepspeed: bool = True,
    plan_env: Optional[Mapping[str, str]] = None,
) -> LaunchCommand:
    """Build the launch command. Pure apart from reading `environ` (default `os.environ`),
    `os.cpu_count()` and, on the pdsh path only, `os.getcwd()` when `workdir` is None.

    hardware: "gaudi2" | "gaudi3" | "hpu" | "cuda" | "cpu".
    cards_per_node: ranks per node (HPU: at most 8).
    hosts: parsed hostfile entries (`launch.command.hostfile.parse_hostfile`), or None/[] for one node.
        Every entry's slots must equal `cards_per_node`; the first host is the master.
    script_args: arguments of the rank entry point (`dpo_dist.dpo`), one word each.
    launcher: "auto" | "gaudi_spawn" | "deepspeed" | "torchrun". auto: HPU one node ->
        gaudi_spawn when `GAUDI_SPAWN` is set else deepspeed; otherwise deepspeed.
    hostfile_path: the hostfile `hosts` came from (DeepSpeed reads it again).
    module: the rank entry module; gaudi_spawn gets the script path (`dpo_dist/dpo.py`).
    extra_env_names: variables to forward to every node through `.deepspeed_env` (multi-node
        pdsh path). Secret-like names are refused.
    ds_config: appended as `--deepspeed <path>` to the script arguments.
    master_addr: defaults to the first host of the hostfile.
    ssh_port: `--ssh_port` for DeepSpeed's pdsh/ssh path (Habana containers run sshd on 3022).
    no_ssh: multi-node with one command per node instead of pdsh; default True on CPU (loopback
        testable), False elsewhere.
    deepspeed_env_path: absolute path where the caller writes `.deepspeed_env`; sets
        `DS_ENV_FILE` for the launcher. Without it DeepSpeed reads `./.deepspeed_env` and
        `~/.deepspeed_env`.
    python: the interpreter that runs gaudi_spawn.py.
    cpu_count: cores for the OMP_NUM_THREADS default on CPU (default `os.cpu_count()`).
    workdir: directory the command runs in (rendered as `cd` in command.sh).
    deepspeed: False for a plan that runs without DeepSpeed (ZeRO-0 on Gaudi, plain DDP): gaudi_spawn then
        starts the ranks with MPI (`--use_mpi`).
    plan_env: variables the plan needs on every rank (e.g. Habana's ZeRO-3 memory flags); a value already in
        `environ` wins, so a user can tune them.
    """
    env_in: Mapping[str, str] = os.environ if environ is None else environ

    # ---- inputs
    if not isinstance(hardware, str) or hardware.lower() not in HARDWARE_KINDS:
        raise CommandError(f"unknown hardware {hardware!r}. Expected one of: {', '.join(HARDWARE_KINDS)}.")
    hw_name = hardware.lower()
    kind = HARDWARE_KINDS[hw_name]
    if kind == "hpu" and (isinstance(cards_per_node, bool) or not isinstance(cards_per_node, int)
                          or not 1 <= cards_per_node <= HPU_CARDS_PER_NODE):
        _hpu_cards_error(cards_per_node, hw_name)
    cards = _positive_int(cards_per_node, "cards per node", "ask for at least 1 card")
    port = _positive_int(master_port, "master_port", "pick a free TCP port, e.g. 29500", maximum=65535)
    if launcher not in LAUNCHERS:
        raise CommandError(f"unknown launcher {launcher!r}. Expected one of: {', '.join(LAUNCHERS)}.")
    if not isinstance(module, str) or not _MODULE_RE.match(module):
        raise CommandError(f"module {module!r} is not a dotted Python module name (e.g. dpo_dist.dpo).")
    script_path = module.replace(".", "/") + ".py"
    if isinstance(script_args, (str, bytes)):
        raise CommandError("script_args must be a list of words, not one string (it would be split into characters).")
    args = [check_no_control(a, f"script argument #{i}", CommandError) for i, a in enumerate(script_args)]
    if ds_config is not None:
        if "--deepspeed" in args or any(a.startswith("--deepspeed=") for a in args):
            raise CommandError("ds_config was given and the script arguments already have --deepspeed. Fix: give one of them.")
        args += ["--deepspeed", check_no_control(ds_config, "ds_config path", CommandError)]
    check_no_control(python, "python interpreter", CommandError)
    if workdir is not None:
        check_no_control(workdir, "workdir", CommandError)
    extra_names: List[str] = []
    if isinstance(extra_env_names, str):
        extra_env_names = [extra_env_names]
    for name in extra_env_names:
        check_env_name(name, "extra environment variable name", CommandError)
        _refuse_secret_name(name, "extra environment variable")
        if name not in extra_names:
            extra_names.append(name)
    if ssh_port is not None:
        _positive_int(ssh_port, "ssh_port", "give sshd's port on the nodes (3022 in Habana containers)", maximum=65535)

    host_list = _normalize_hosts(hosts, cards) if hosts else []
    multi = bool(host_list)
    nodes = len(host_list) if multi else 1
    world = cards * nodes
    if no_ssh is None:
        no_ssh = kind == "cpu"

    # ---- launcher choice
    notes: List[str] = []
    chosen = launcher
    if chosen == "auto":
        chosen = "gaudi_spawn" if (kind == "hpu" and not multi) else "deepspeed"
        if chosen == "gaudi_spawn" and not env_in.get("GAUDI_SPAWN"):
            notes.append("GAUDI_SPAWN is not set, so this runs `python -m launch.gaudi_spawn`, the same launcher over "
                         "optimum-habana's DistributedRunner (in the wheel); set GAUDI_SPAWN=/path/to/optimum-habana/"
                         "examples/gaudi_spawn.py to use the upstream script.")
    if kind == "hpu" and chosen == "torchrun":
        raise CommandError("launcher torchrun is not supported on HPU; use gaudi_spawn or deepspeed (the default).")
    if chosen == "gaudi_spawn":
        if kind != "hpu":
            raise CommandError(f"launcher gaudi_spawn is for Gaudi (hpu) only, not {hw_name}. Fix: use deepspeed or torchrun.")
        if multi:
            raise CommandError(
                "launcher gaudi_spawn is not used for multi-node: optimum-habana's DistributedRunner.process_hostfile "
                "rejects comment lines, and on several nodes gaudi_spawn only builds `deepspeed --hostfile F "
                "--master_addr <first host> --no_local_rank --master_port P`, which launcher=deepspeed (the default) "
                "runs directly."
            )
    if multi and chosen == "deepspeed" and not hostfile_path:
        raise CommandError("a multi-node DeepSpeed launch needs hostfile_path (DeepSpeed reads the hostfile itself).")
    if multi and hostfile_path:
        check_no_control(hostfile_path, "hostfile path", CommandError)
    addr = None
    if multi:
        addr = _check_host(master_addr if master_addr is not None else host_list[0].host, "master_addr")
        if master_addr is None and addr.lower() in ("localhost", "localhost.localdomain"):
            addr = "127.0.0.1"
            notes.append("master_addr: the first host is localhost, written as 127.0.0.1 so that it cannot resolve "
                         "to ::1 (the loopback form the one-command-per-node launches were seen to work with).")
        elif master_addr is None:
            notes.append(f"master_addr is the first host of the hostfile: {addr}.")
    elif master_addr is not None:
        _check_host(master_addr, "master_addr")
        notes.append("master_addr is ignored on one node (DeepSpeed uses 127.0.0.1).")
    pdsh = multi and chosen == "deepspeed" and not no_ssh
    if ssh_port is not None and not pdsh:
        raise CommandError("ssh_port only applies to DeepSpeed's multi-node pdsh/ssh launch; drop it for this launch.")
    if deepspeed_env_path is not None:
        check_no_control(deepspeed_env_path, "deepspeed_env_path", CommandError)
        if not os.path.isabs(deepspeed_env_path):
            raise CommandError(
                f"deepspeed_env_path {deepspeed_env_path!r} must be absolute (DeepSpeed joins DS_ENV_FILE with ~ and ., "
                "so a relative name would be looked up in those two directories)."
            )

    # ---- environment of the launcher process
    env: Dict[str, str] = {}
    ranks_here = world if (multi and all(_is_loopback(h.host) for h in host_list)) else cards
    if kind == "hpu":
        env.update(HPU_ENV)
        for name, value in (plan_env or {}).items():
            check_env_name(name, "plan environment variable", CommandError)
            env[name] = env_in.get(name, value)
        if twin_requested(env_in):  # the Gaudi twin: the HPU path on CPU ranks, threads shared as on CPU
            env["OMP_NUM_THREADS"] = _omp_threads(env_in, cpu_count, ranks_here)
            notes.append("Gaudi twin ($DPO_DIST_HPU_TWIN): optimum-habana's code on CPU ranks, a development aid.")
        if env_in.get("PT_HPU_LAZY_MODE") not in (None, "1"):
            notes.append(f"PT_HPU_LAZY_MODE was {env_in.get('PT_HPU_LAZY_MODE')!r} in the environment; set to 1 (lazy "
                         "mode is what GaudiDPOConfig(use_lazy_mode=True) expects).")
    elif kind == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = _omp_threads(env_in, cpu_count, ranks_here)

    # ---- words that cross a foreign shell
    def reshell(words: List[str], via: str, allowed) -> None:
        for i, w in enumerate(words):
            check_reshell_safe(w, f"script argument #{i}", via, allowed, CommandError)

    # ---- build
    argv: List[str] = []
    per_node: List[List[str]] = []
    ds_env: Dict[str, str] = {}
    tail = ["--no_local_rank", "--module", module] + args

    if chosen == "gaudi_spawn":
        spawn = ([check_no_control(env_in["GAUDI_SPAWN"], "GAUDI_SPAWN", CommandError)] if env_in.get("GAUDI_SPAWN")
                 else ["-m", "launch.gaudi_spawn"])
        reshell(args, _VIA_GAUDI_SPAWN, RESHELL_SAFE_CHARS)
        # One card without DeepSpeed is a plain process: no launcher flag (gaudi_spawn would ignore --use_mpi).
        mode = ["--use_deepspeed"] if deepspeed else (["--use_mpi"] if cards > 1 else [])
        argv = [python, *spawn, "--world_size", str(cards), *mode, "--master_port", str(port), script_path] + args
        if deepspeed:
            inner = (f"deepspeed --num_nodes 1 --num_gpus {cards} --no_local_rank --master_port {port}" if cards > 1
                     else f"deepspeed --num_gpus 1 --master_port {port}")
        else:
            inner = (f"mpirun -n {cards} --bind-to core --map-by socket:PE=<cores per rank> --rank-by slot "
                     f"--report-bindings --allow-run-as-root python" if cards > 1 else "python")
            notes.append("no DeepSpeed (a ZeRO-0 plan on Gaudi): plain DDP started by MPI, which keeps Habana's fused "
                         "AdamW (optimum-habana's own DPO baseline runs this way); mpirun must be "
                         "installed (Habana's images ship Open MPI).")
        notes.append(f"gaudi_spawn.py runs `{inner} {script_path} ...` with bash; the script arguments were checked "
                     "for shell metacharacters because it re-joins them into one shell line.")
        notes.append(f"{script_path} is run as a script: dpo_dist must be importable from it (installed package or "
                     "PYTHONPATH with the project root).")
        if cards == 1 and deepspeed:
            notes.append("with --world_size 1 gaudi_spawn drops --no_local_rank, so the rank also gets --local_rank=0.")
    elif chosen == "torchrun":
        if not multi:
            if kind == "cuda":
                _visible_cuda(env_in, cards)
            argv = ["torchrun", "--nproc_per_node", str(cards), "--master_port", str(port), "-m", module] + args
        else:
            for r in range(nodes):
                per_node.append(["torchrun", "--nnodes", str(nodes), "--node_rank", str(r), "--nproc_per_node", str(cards),
                                 "--master_addr", addr, "--master_port", str(port), "-m", module] + args)
            notes.append("torchrun multi-node: run the command for node R on node R (all on this machine for loopback).")
    elif not multi:
        if kind == "hpu":
            argv = ["deepspeed", "--num_nodes", "1", "--num_gpus", str(cards), "--master_port", str(port)] + tail
        elif kind == "cuda":
            visible = _visible_cuda(env_in, cards)
            if visible is not None:
                argv = ["deepspeed", "--include", f"localhost:{visible}", "--master_port", str(port)] + tail
                notes.append(f"CUDA_VISIBLE_DEVICES is set, so --include localhost:{visible} replaces --num_gpus "
                             "(DeepSpeed ignores and unsets CUDA_VISIBLE_DEVICES when --num_gpus is given).")
            else:
                argv = ["deepspeed", "--num_gpus", str(cards), "--master_port", str(port)] + tail
        else:
            argv = ["deepspeed", "--num_accelerators", str(cards), "--master_port", str(port)] + tail
    elif no_ssh:
        for r in range(nodes):
            per_node.append(["deepspeed", "--hostfile", hostfile_path, "--no_ssh", "--node_rank", str(r),
                             "--master_addr", addr, "--master_port", str(port)] + tail)
        notes.append("--no_ssh: one command per node (node R runs the command with --node_rank R); on loopback all "
                     "run on this machine. Slots come from the hostfile.")
    else:
        argv = ["deepspeed", "--hostfile", hostfile_path, "--master_addr", addr, "--master_port", str(port)]
        if ssh_port is not None:
            argv += ["--ssh_port", str(ssh_port)]
        if nodes == 1 and not _is_loopback(host_list[0].host):
            argv.append("--force_multi")
            notes.append(f"one remote host ({host_list[0].host}): --force_multi makes DeepSpeed start the ranks there "
                         "over pdsh instead of on this machine.")
        argv += tail
        reshell(args, _VIA_PDSH, PDSH_SAFE_CHARS)
        cwd = workdir if workdir is not None else os.getcwd()
        for i, ch in enumerate(cwd):
            if ch not in PDSH_SAFE_CHARS or ch == " ":
                raise CommandError(
                    f"the working directory {cwd!r} has {ch!r} at position {i + 1}; DeepSpeed's pdsh runner sends "
                    f"`cd {cwd};` unquoted to every node. Fix: run from a directory whose path has only letters, "
                    "digits and _@+=:,./- (the same path must exist on every node)."
                )
        # .deepspeed_env: what every node needs but pdsh does not carry.
        skipped = []
        if kind == "hpu":
            ds_env.update({k: v for k, v in env.items() if k != "DS_ENV_FILE"})  # HPU_ENV and the plan's variables
            for name in sorted(env_in):
                if name.startswith(HPU_FORWARD_PREFIXES) and name not in ds_env:
                    if is_secret_name(name):
                        skipped.append(name)
                        continue
                    check_env_name(name, "environment variable", CommandError)
                    ds_env[name] = env_in[name]
        elif kind == "cpu":
            ds_env.update(env)  # DS_ACCELERATOR, OMP_NUM_THREADS
        for name in extra_names:
            if name in HPU_ENV and kind == "hpu":
                continue
            if name not in env_in:
                raise CommandError(f"extra environment variable {name} is not set, so it cannot be forwarded to the nodes. "
                                   f"Fix: export {name}=... before launching, or drop it.")
            ds_env[name] = env_in[name]
        for name, value in ds_env.items():
            check_deepspeed_env_value(name, value, CommandError)
        if deepspeed_env_path is not None:
            env["DS_ENV_FILE"] = deepspeed_env_path
            notes.append(f"DS_ENV_FILE={deepspeed_env_path}: DeepSpeed reads .deepspeed_env from there (and then not "
                         "from ~/.deepspeed_env or ./.deepspeed_env).")
        else:
            notes.append("write .deepspeed_env into the directory the launcher runs from (DeepSpeed also reads "
                         "~/.deepspeed_env; check it holds no secrets).")
        if skipped:
            notes.append("not forwarded (secret-like names): " + ", ".join(skipped) + ".")
        notes.append("pdsh starts the ranks over ssh: passwordless ssh to every host, the same project path, the same "
                     "Python path (DeepSpeed runs its own sys.executable remotely) and "
                     "Python environment on every node. Script arguments were checked for shell metacharacters "
                     "because pdsh re-joins them into a remote shell line.")
        notes.append("The Hugging Face token is not forwarded: run `huggingface-cli login` once per node "
                     "(~/.cache/huggingface/token) or set HF_TOKEN in each node's own environment.")

    if multi and no_ssh and extra_names and chosen == "deepspeed":
        notes.append("no_ssh: every node runs its own command in its own environment; the extra variables ("
                     + ", ".join(extra_names) + ") must be set there.")

    hw_label = {"hpu": f"Gaudi ({hw_name})", "cuda": "CUDA", "cpu": "CPU"}[kind]
    head = (f"{hw_label}: {nodes} node(s) x {cards} card(s) = world size {world}, launcher {chosen}"
            + (f", master {addr}:{port}" if addr else f", master port {port}") + ".")
    cmd = LaunchCommand(
        argv=argv, env=env, deepspeed_env=ds_env, per_node=per_node,
        description="\n".join([head] + notes), launcher=chosen, hardware=kind, world_size=world,
        num_nodes=nodes, master_addr=addr, master_port=port, workdir=workdir,
    )
    _guard_secrets(cmd, env_in)
    return cmd


def _hpu_cards_error(value, hw_name: str):
    raise CommandError(
        f"cards per node must be 1..{HPU_CARDS_PER_NODE} on {hw_name} (a Gaudi node has {HPU_CARDS_PER_NODE} cards), "
        f"got {value!r}. Fix: use --cards {HPU_CARDS_PER_NODE} per node and a hostfile for more nodes."
    )


# --------------------------------------------------------------------------------------------
# rendering


def _check_export(name: str, value: str, what: str) -> None:
    check_env_name(name, what, CommandError)
    if name in ALWAYS_SECRET or is_secret_name(name):
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


def _comment(text: str) -> List[str]:
    out = []
    for line in text.split("\n"):
        safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
        out.append(f"# {safe}".rstrip())
    return out


def _quoted(argv: Sequence[str], node: Optional[int] = None) -> str:
    if not argv:
        raise CommandError("the command is empty")
    suffix = f" for node {node}" if node is not None else ""
    return " ".join(quote(w, f"argument #{i} of the command{suffix}", CommandError) for i, w in enumerate(argv))


def render_command_sh(cmd: LaunchCommand, node_rank: Optional[int] = None) -> str:
    """A bash script that repeats the launch exactly: shebang, `set -euo pipefail`, the exported
    environment, then the quoted command (run with `exec`). Every word is `shlex.quote`d; words
    with control characters are refused (CommandError naming the argument).

    With `per_node`: `node_rank=R` renders only node R's command; otherwise the script defines
    one function per node (each `exec`s its command), runs the node given as `$1`
    (`bash command.sh 1`, replacing the shell), or with no
    argument starts all nodes here (loopback) and exits with the first non-zero status."""
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
