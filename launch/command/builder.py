"""The launch command: `build_launch_command` checks the inputs every launcher shares, picks the launcher
and hands the launch to that launcher's builder; the rendering of `command.sh` and `.deepspeed_env`
lives in launch/command/common.py and is re-exported here, the one public entry point.

Nothing here starts a process, touches the network or imports torch/deepspeed; `launch/spawn.py`
runs what this builds. Which builder runs (auto, by device and node count):

- HPU, one node: gaudi_spawn (launch/command/gaudi.py), DeepSpeed or MPI/DDP.
- HPU, several nodes; CUDA and CPU, one node or several: DeepSpeed's runner
  (launch/command/deepspeed.py): pdsh over ssh, or one command per node (`no_ssh`, the CPU default).
- torchrun (launch/command/torchrun.py) on CUDA or CPU when asked for.

The device differences are rows of `DEVICE_LAUNCH` (launch/command/common.py); what ranks need on each
device comes from dpo_dist.backend.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

from launch.command.common import (
    DEFAULT_MASTER_PORT,
    DEVICE_LAUNCH,
    HARDWARE_KINDS,
    LAUNCHERS,
    MULTI_NODE_LAUNCHER,
    Builder,
    CommandError,
    LaunchCommand,
    LaunchRequest,
    check_cards,
    check_extra_env_names,
    check_host,
    format_command,
    guard_secrets,
    launch_env,
    normalize_hosts,
    positive_int,
    render_command_sh,
    render_deepspeed_env,
)
from launch.command.deepspeed import DeepSpeedRunner
from launch.command.gaudi import GaudiSpawn
from launch.command.hostfile import HostEntry, is_loopback
from launch.command.quoting import check_no_control
from launch.command.torchrun import Torchrun

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
    "BUILDERS",
]

BUILDERS: dict[str, Builder] = {b.name: b for b in (GaudiSpawn(), DeepSpeedRunner(), Torchrun())}
assert set(BUILDERS) == set(LAUNCHERS) - {"auto"}

_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def build_launch_command(
    hardware: str,
    cards_per_node: int,
    hosts: Sequence[HostEntry] | None,
    script_args: Sequence[str],
    *,
    master_port: int = DEFAULT_MASTER_PORT,
    launcher: str = "auto",
    hostfile_path: str | None = None,
    module: str = "dpo_dist.dpo",
    extra_env_names: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    ds_config: str | None = None,
    master_addr: str | None = None,
    ssh_port: int | None = None,
    no_ssh: bool | None = None,
    deepspeed_env_path: str | None = None,
    python: str = "python",
    cpu_count: int | None = None,
    workdir: str | None = None,
    deepspeed: bool = True,
    plan_env: Mapping[str, str] | None = None,
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

    # ---- inputs every launcher shares
    if not isinstance(hardware, str) or hardware.lower() not in HARDWARE_KINDS:
        raise CommandError(f"unknown hardware {hardware!r}. Expected one of: {', '.join(HARDWARE_KINDS)}.")
    hw_name = hardware.lower()
    kind = HARDWARE_KINDS[hw_name]
    device = DEVICE_LAUNCH[kind]
    cards = check_cards(device, hw_name, cards_per_node)
    port = positive_int(master_port, "master_port", "pick a free TCP port, e.g. 29500", maximum=65535)
    if launcher not in LAUNCHERS:
        raise CommandError(f"unknown launcher {launcher!r}. Expected one of: {', '.join(LAUNCHERS)}.")
    if not isinstance(module, str) or not _MODULE_RE.match(module):
        raise CommandError(f"module {module!r} is not a dotted Python module name (e.g. dpo_dist.dpo).")
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
    extra_names = check_extra_env_names(extra_env_names)
    if ssh_port is not None:
        positive_int(ssh_port, "ssh_port", "give sshd's port on the nodes (3022 in Habana containers)", maximum=65535)
    host_list = normalize_hosts(hosts, cards) if hosts else []
    req = LaunchRequest(
        device=device, hw_name=hw_name, kind=kind, cards=cards, master_port=port, module=module, script_args=args,
        python=python, workdir=workdir, extra_env_names=extra_names, hosts=host_list, hostfile_path=hostfile_path,
        ssh_port=ssh_port, no_ssh=device.no_ssh_default if no_ssh is None else no_ssh,
        deepspeed_env_path=deepspeed_env_path, deepspeed=deepspeed, environ=env_in,
    )

    # ---- the launcher: auto picks by device and node count
    notes = req.notes
    if launcher == "auto":
        req.launcher = MULTI_NODE_LAUNCHER if req.multi else device.launchers[0]
        notes += BUILDERS[req.launcher].auto_notes(req)
    else:
        req.launcher = launcher
    builder = BUILDERS[req.launcher]
    if req.launcher not in device.launchers:
        raise CommandError(builder.unsupported(req))
    builder.check(req)

    # ---- hosts, master, ssh
    if req.multi and hostfile_path:
        check_no_control(hostfile_path, "hostfile path", CommandError)
    if req.multi:
        addr = check_host(master_addr if master_addr is not None else host_list[0].host, "master_addr")
        if master_addr is None and addr.lower() in ("localhost", "localhost.localdomain"):
            addr = "127.0.0.1"
            notes.append("master_addr: the first host is localhost, written as 127.0.0.1 so that it cannot resolve "
                         "to ::1 (the loopback form the one-command-per-node launches were seen to work with).")
        elif master_addr is None:
            notes.append(f"master_addr is the first host of the hostfile: {addr}.")
        req.master_addr = addr
    elif master_addr is not None:
        check_host(master_addr, "master_addr")
        notes.append("master_addr is ignored on one node (DeepSpeed uses 127.0.0.1).")
    if ssh_port is not None and not builder.uses_ssh(req):
        raise CommandError("ssh_port only applies to DeepSpeed's multi-node pdsh/ssh launch; drop it for this launch.")
    if deepspeed_env_path is not None:
        check_no_control(deepspeed_env_path, "deepspeed_env_path", CommandError)
        if not os.path.isabs(deepspeed_env_path):
            raise CommandError(
                f"deepspeed_env_path {deepspeed_env_path!r} must be absolute (DeepSpeed joins DS_ENV_FILE with ~ and ., "
                "so a relative name would be looked up in those two directories)."
            )

    # ---- environment of the launcher process: every loopback host is this machine
    ranks_here = req.world if (req.multi and all(is_loopback(h.host) for h in host_list)) else cards
    req.env, env_notes = launch_env(req, plan_env, cpu_count, ranks_here)
    notes += env_notes

    # ---- the launcher's own command
    built = builder.build(req)
    head = (f"{device.label.format(name=hw_name)}: {req.nodes} node(s) x {cards} card(s) = world size {req.world}, "
            f"launcher {req.launcher}" + (f", master {req.master_addr}:{port}" if req.master_addr else f", master port {port}")
            + ".")
    cmd = LaunchCommand(
        argv=built.argv, env={**req.env, **built.env}, deepspeed_env=built.deepspeed_env, per_node=built.per_node,
        description="\n".join([head] + notes + built.notes), launcher=req.launcher, hardware=kind, world_size=req.world,
        num_nodes=req.nodes, master_addr=req.master_addr, master_port=port, workdir=workdir,
    )
    guard_secrets(cmd, env_in)
    return cmd
