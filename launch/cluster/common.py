"""What the Slurm and Kubernetes emitters share: the checked cluster options, the node command and its environment,
and the rules for names and values that reach a scheduler.

The node command is the launcher's own: `build_launch_command` (launch/command/builder.py), called through the same
closure `launch train` builds command.sh with (`PreparedRun.command_with`). On one node it is command.sh's command.
On several nodes it is DeepSpeed's one-command-per-node form (`deepspeed --hostfile H --no_ssh --node_rank R
--master_addr A ...`, launch/command/deepspeed.py) built with placeholder hosts; the three words that only the
allocation knows (H, R, A) are written as shell variables that the cluster file sets from the allocation. With
`--no_ssh` DeepSpeed reads the hostfile only for the number of nodes and slots (`world_info`); no host is contacted.

Nothing here starts a process or imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dpo_dist.util.logs import is_secret_name, secret_values
from launch.command.common import DEVICE_LAUNCH, HARDWARE_KINDS, CommandError
from launch.command.hostfile import HostEntry
from launch.command.quoting import check_env_name, quote

__all__ = ["ClusterError", "ClusterOptions", "NodeLaunch", "EMIT_KINDS", "CLUSTER_FLAGS", "PLACEHOLDER_MASTER",
           "PLACEHOLDER_HOSTFILE", "placeholder_hosts", "cluster_command_overrides", "node_launch", "node_line",
           "check_cluster_options", "job_name", "refuse_secret_values"]

EMIT_KINDS = ("slurm", "k8s")
# The launch arguments that only mean something with --emit, and the kinds they apply to.
CLUSTER_FLAGS = {"gres": ("slurm",), "time": ("slurm",), "partition": ("slurm",), "image": ("k8s",),
                 "pvc": ("k8s",), "hf_token_secret": ("k8s",)}

# Valid for build_launch_command's checks (a host name, an absolute path); replaced in the cluster files.
PLACEHOLDER_MASTER = "dpo-dist-master"
PLACEHOLDER_HOSTFILE = "/dpo-dist/allocation-hostfile"
# The shell variables the cluster files set from the allocation, in place of the placeholders.
VAR_HOSTFILE = "DPO_HOSTFILE"
VAR_NODE_RANK = "DPO_NODE_RANK"
VAR_MASTER = "MASTER_ADDR"
_NODE_FLAGS = {"--hostfile": VAR_HOSTFILE, "--node_rank": VAR_NODE_RANK, "--master_addr": VAR_MASTER}

_GRES_RE = re.compile(r"[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)*\Z")
_TIME_RE = re.compile(r"(?:\d+-\d{1,2}(?::\d{1,2}){0,2}|\d+(?::\d{1,2}){0,2})\Z")
_PARTITION_RE = re.compile(r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*\Z")
# A container image reference: [registry[:port]/]path[:tag][@digest] (the distribution spec's grammar, simplified).
_IMAGE_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::\d+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?\Z")
_DNS1123_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_SECRET_KEY_RE = re.compile(r"[-._A-Za-z0-9]+\Z")


class ClusterError(CommandError):
    """A cluster option or file that cannot be emitted safely; the message names the flag and the fix.
    A CommandError, so `launch train` reports it as a usage error (exit 2)."""


def _bad(flag: str, value: str, expected: str, fix: str) -> ClusterError:
    return ClusterError(f"--{flag} {value!r} is refused: expected {expected}. Fix: {fix}.")


def _first_bad_char(value: str, allowed: str) -> str | None:
    for ch in value:
        if not (ch.isascii() and (ch.isalnum() or ch in allowed)):
            return ch
    return None


@dataclass(frozen=True)
class ClusterOptions:
    """The checked --emit options (see `check_cluster_options`)."""

    kind: str
    gres: str | None = None  # Slurm GRES name[:type] (the count is the plan's cards per node); None: no --gres line
    time: str = "24:00:00"
    partition: str | None = None
    image: str | None = None
    pvc: str | None = None
    hf_token_secret: tuple[str, str] = ("hf-token", "token")  # (Secret name, key)


def default_gres(hardware: str) -> str | None:
    """The GRES a node's cards are requested as when --gres is not given: Gaudi `gpu:hpu`, CUDA `gpu`, CPU none."""
    return {"hpu": "gpu:hpu", "cuda": "gpu", "cpu": None}[HARDWARE_KINDS[hardware]]


def check_cluster_options(a, cards: int) -> ClusterOptions | None:
    """The --emit options of `launch train` (TrainArguments `a`), checked; None without --emit. Values from the user
    are data: each is held to the characters its scheduler field allows, so none can carry shell or YAML syntax."""
    kind = getattr(a, "emit", None)
    given = {name: getattr(a, name, None) for name in CLUSTER_FLAGS}
    if kind is None:
        stray = [f"--{n}" for n, v in given.items() if v is not None]
        if stray:
            raise ClusterError(f"{', '.join(stray)} {'applies' if len(stray) == 1 else 'apply'} only with --emit (slurm "
                               "or k8s). Fix: add --emit "
                               f"{CLUSTER_FLAGS[stray[0][2:]][0]}, or drop them.")
        return None
    if kind not in EMIT_KINDS:
        raise ClusterError(f"--emit {kind!r}: expected one of {', '.join(EMIT_KINDS)}.")
    for name, value in given.items():
        if value is not None and kind not in CLUSTER_FLAGS[name]:
            raise ClusterError(f"--{name} applies to --emit {CLUSTER_FLAGS[name][0]}, not --emit {kind}. Fix: drop it.")
    for flag, what in (("max_restarts", "--max_restarts"), ("ssh", "--ssh"), ("ssh_port", "--ssh_port")):
        value = getattr(a, flag, None)
        if value not in (None, 0, False):
            raise ClusterError(f"{what} is for the local launch, which --emit does not start; the scheduler starts the "
                               "nodes. Fix: drop it (for retries use the scheduler's own: sbatch --requeue, or the "
                               "MPIJob's runPolicy.backoffLimit).")
    opts: dict = {"kind": kind}
    if kind == "slurm":
        opts.update(_slurm_options(a, cards))
    else:
        opts.update(_k8s_options(a))
    return ClusterOptions(**opts)


def _slurm_options(a, cards: int) -> dict:
    out: dict = {}
    gres = a.gres if a.gres is not None else default_gres(a.hardware)
    if gres is not None and gres.lower() == "none":
        gres = None
    if gres is not None:
        if not _GRES_RE.match(gres):
            bad = _first_bad_char(gres, "_.-:")
            why = f"it contains {bad!r}" if bad else "an empty part (two colons in a row, or one at an end)"
            raise _bad("gres", gres, "a GRES as the site names it, name[:type] with letters, digits and _.- "
                       f"(e.g. gpu:hpu); {why}", "give the name from the site's gres.conf, or --gres none")
        parts = gres.split(":")
        if parts[-1].isdigit():  # name[:type]:count: the count must be the plan's cards per node
            if int(parts[-1]) != cards or len(parts) == 1:
                raise _bad("gres", gres, f"name[:type] (the count is the plan's {cards} cards per node)",
                           f"drop the count (--gres {':'.join(parts[:-1]) or 'gpu:hpu'}), or plan for "
                           f"--cards {parts[-1]}")
            gres = ":".join(parts[:-1])
        out["gres"] = gres
    else:
        out["gres"] = None
    if a.time is not None:
        t = a.time.strip()
        if not (_TIME_RE.match(t) or t.upper() in ("UNLIMITED", "INFINITE")):
            raise _bad("time", a.time, "a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
                       "e.g. --time 24:00:00 or --time 2-00:00:00")
        out["time"] = t
    if a.partition is not None:
        if not _PARTITION_RE.match(a.partition):
            raise _bad("partition", a.partition, "a partition name (letters, digits, _.-; several comma-separated)",
                       "give the name `sinfo -s` lists")
        out["partition"] = a.partition
    return out


def _k8s_options(a) -> dict:
    if not a.image:
        raise ClusterError("--emit k8s needs --image: the image built from this repository's Dockerfile (`make build`), "
                           "pushed where the cluster pulls from, e.g. --image registry.example.com/dpo-dist:0.1.0.")
    if not _IMAGE_RE.match(a.image):
        bad = _first_bad_char(a.image, "._-:/@")
        raise _bad("image", a.image, "a container image reference, [registry[:port]/]path[:tag][@sha256:digest]"
                   + (f"; it contains {bad!r}" if bad else ""), "give the image as `docker push` named it")
    if not a.pvc:
        raise ClusterError("--emit k8s needs --pvc NAME: a ReadWriteMany PersistentVolumeClaim that every pod mounts "
                           "at the run dir (the DeepSpeed config, checkpoints and the merged model live there, and "
                           "rank 0 merges the shards of every node). Fix: create one (kubectl get pvc lists them) and "
                           "copy the run dir onto it.")
    if not _DNS1123_RE.match(a.pvc):
        raise _bad("pvc", a.pvc, "a PersistentVolumeClaim name (lower-case letters, digits and -, at most 63)",
                   "give the name `kubectl get pvc` lists")
    out = {"image": a.image, "pvc": a.pvc}
    if a.hf_token_secret is not None:
        name, _, key = a.hf_token_secret.partition(":")
        key = key or "token"
        if not _DNS1123_RE.match(name) or not _SECRET_KEY_RE.match(key):
            raise _bad("hf_token_secret", a.hf_token_secret, "NAME[:KEY]: a Secret name (lower-case letters, digits, "
                       "-) and a key (letters, digits, -._)", "e.g. kubectl create secret generic hf-token "
                       "--from-literal=token=... and --hf_token_secret hf-token:token")
        out["hf_token_secret"] = (name, key)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the node command


def placeholder_hosts(nodes: int, cards: int) -> list[HostEntry]:
    """Hosts for build_launch_command's per-node form: DeepSpeed with --no_ssh only counts them."""
    return [HostEntry(host=f"node-{i}", slots=cards, line=i + 1) for i in range(nodes)]


def cluster_command_overrides(nodes: int, cards: int, launcher: str) -> dict:
    """build_launch_command keywords for a cluster launch of `nodes` nodes: on several nodes, DeepSpeed's one command
    per node with the placeholders; on one node nothing changes (command.sh's command)."""
    if nodes <= 1:
        return {}
    if launcher not in ("auto", "deepspeed"):
        raise ClusterError(f"--launcher {launcher} cannot start several nodes from a scheduler; the cluster files start "
                           "DeepSpeed's runner once per node. Fix: drop --launcher (or use --launcher deepspeed).")
    return {"hosts": placeholder_hosts(nodes, cards), "hostfile_path": PLACEHOLDER_HOSTFILE,
            "master_addr": PLACEHOLDER_MASTER, "no_ssh": True, "launcher": "deepspeed", "ssh_port": None,
            "deepspeed_env_path": None}


@dataclass
class NodeLaunch:
    """What every node runs: `argv` (node 0's words; on several nodes the words after --hostfile, --node_rank and
    --master_addr are filled from the allocation), with `env` exported first."""

    argv: list[str]
    env: dict[str, str]
    nodes: int
    cards: int
    hardware: str
    device: str
    master_port: int
    description: str = ""
    forwarded: list[str] = field(default_factory=list)  # names taken from this environment (PT_HPU_*, HCCL_*, --env)

    @property
    def multi(self) -> bool:
        return self.nodes > 1


def forwarded_names(device: str, environ: Mapping[str, str], extra_names: Sequence[str]) -> dict[str, str]:
    """The variables every node needs that this environment holds: the device's forward prefixes (PT_HPU_*, HCCL_*
    on Gaudi, the ones DeepSpeed's pdsh path writes to .deepspeed_env) and the names given with --env. Secret-like
    names are never taken (launch/command/common.py's rule)."""
    out = {}
    prefixes = DEVICE_LAUNCH[device].forward_prefixes
    for name in sorted(environ):
        if prefixes and name.startswith(prefixes) and not is_secret_name(name):
            out[name] = environ[name]
    for name in extra_names:
        check_env_name(name, "--env name", ClusterError)
        if is_secret_name(name):
            raise ClusterError(f"--env {name} looks like a secret; secrets are never written to cluster files. Fix: drop "
                               "it (the Hugging Face token comes from a Kubernetes Secret or the job's environment).")
        if name not in environ:
            raise ClusterError(f"--env {name}: it is not set here, so there is no value to write. Fix: export {name}=... "
                               "before emitting, or drop it.")
        out[name] = environ[name]
    return out


def node_launch(cmd, hardware: str, cards: int, environ: Mapping[str, str], extra_names: Sequence[str]) -> NodeLaunch:
    """The node command and environment of a cluster launch, from the LaunchCommand `cmd` that prepare_run built
    (with `cluster_command_overrides`)."""
    device = HARDWARE_KINDS[hardware]
    argv = list(cmd.per_node[0] if cmd.per_node else cmd.argv)
    nodes = cmd.num_nodes
    if nodes > 1:
        head = argv[:argv.index("--module")] if "--module" in argv else argv
        for flag in _NODE_FLAGS:
            if flag not in head:
                raise ClusterError(f"the per-node command has no {flag}; cannot fill it from the allocation.")
    env = {k: v for k, v in cmd.env.items() if k != "DS_ENV_FILE"}
    forwarded = forwarded_names(device, environ, extra_names)
    for name, value in forwarded.items():
        env.setdefault(name, value)
    for name, value in env.items():
        check_env_name(name, "environment variable", ClusterError)
        if is_secret_name(name):
            raise ClusterError(f"{name} looks like a secret and is never written to a cluster file.")
        quote(value, f"the value of {name}", ClusterError)
    return NodeLaunch(argv=argv, env=env, nodes=nodes, cards=cards, hardware=hardware, device=device,
                      master_port=cmd.master_port, description=cmd.description, forwarded=sorted(forwarded))


def node_line(launch: NodeLaunch, node_rank_var: str) -> str:
    """`exec <node command>` as one bash line, every word quoted; on several nodes the hostfile, node rank and master
    address are "$DPO_HOSTFILE", "$<node_rank_var>" and "$MASTER_ADDR"."""
    words = []
    argv = launch.argv
    stop = argv.index("--module") if "--module" in argv else len(argv)
    fill = {}
    if launch.multi:
        for flag, var in _NODE_FLAGS.items():
            i = argv.index(flag, 0, stop)
            fill[i + 1] = f'"${node_rank_var if var == VAR_NODE_RANK else var}"'
    for i, w in enumerate(argv):
        words.append(fill.get(i) or quote(w, f"argument #{i} of the node command", ClusterError))
    return "exec " + " ".join(words)


def job_name(run_dir, prefix: str = "dpo-") -> str:
    """A name for the job from the run dir's name: lower-case letters, digits and -, at most 40 characters (so that
    `<name>-worker-<i>` stays a valid Kubernetes host name)."""
    base = re.sub(r"[^a-z0-9]+", "-", str(getattr(run_dir, "name", run_dir)).lower()).strip("-") or "run"
    name = (prefix + base)[:40].rstrip("-")
    return name


def refuse_secret_values(text: str, what: str, environ: Mapping[str, str]) -> str:
    """Refuse a generated file whose text holds the value of a secret-named variable of the environment."""
    for value in secret_values(environ):
        if len(value) >= 8 and value in text:
            raise ClusterError(f"{what} would contain the value of a secret-named environment variable (a token?). "
                               "Secrets are never written to cluster files. Fix: remove it from the arguments; the "
                               "ranks read the token from the job's environment or a Kubernetes Secret.")
    return text
