"""`launch train --emit k8s`: run_dir/mpijob.yaml, a Kubeflow MPIJob (`kubeflow.org/v2beta1`, mpi-operator >= 0.5),
so that `kubectl apply -f run_dir/mpijob.yaml` is all the user types.

The MPI operator's model, as Intel's own Gaudi MPIJob examples use it: `nodes` worker pods (one per node, each
requesting the node's cards) run sshd; the launcher pod runs `mpirun` with one process per worker
(`slotsPerWorker: 1`), and that process is the node command (the same one launch.sbatch and command.sh run), started
with the node's rank (`$OMPI_COMM_WORLD_RANK`). The master address is the first host of the hostfile the operator
writes (/etc/mpi/hostfile: worker 0); DeepSpeed counts nodes and slots from a hostfile of the same hosts. The
environment is the launcher container's, forwarded to every node with `mpirun -x` (sshd sessions see neither the
pod's env nor the image's ENV; PATH is forwarded too, so the nodes find the image's deepspeed). The job's status is the launcher's: mpirun's exit code, the first failing node's.

Workers: `habana.ai/gaudi: <cards>` (the Habana device plugin), `hugepages-2Mi`, memory, `/dev/shm` as a memory-backed
emptyDir with a size limit, capabilities SYS_NICE and IPC_LOCK. On CPU hardware (the CPU twin) no Habana resource
and no huge pages are requested. The run dir is a PersistentVolumeClaim (`--pvc`, ReadWriteMany) mounted at the run
dir's own path, so every path of the command holds in the pods. The Hugging Face token comes from a Secret by
reference (`secretKeyRef`, optional), never inline.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from launch.cluster.common import (
    VAR_HOSTFILE,
    VAR_MASTER,
    VAR_NODE_RANK,
    ClusterError,
    ClusterOptions,
    NodeLaunch,
    job_name,
    node_line,
)
from launch.plan import HARDWARE

__all__ = ["MPIJOB_FILE", "render_mpijob", "mpijob_manifest", "NODE_SCRIPT_INDEX"]

MPIJOB_FILE = "mpijob.yaml"
VAR_HOSTS = "DPO_HOSTS"  # the workers' host names, comma-separated, from the operator's hostfile
HF_TOKEN_VAR = "HF_TOKEN"
NODE_SCRIPT_INDEX = 4  # launcher command: ["bash", "-c", LAUNCHER_SCRIPT, "dpo-node", NODE_SCRIPT]
# Intel's Gaudi Kubernetes examples request these per 8-card worker.
GAUDI_HUGEPAGES_2MI = "95000Mi"
SHM_GIB_HPU = 64


def node_script(launch: NodeLaunch) -> str:
    """What mpirun runs on every worker: its node rank, the hostfile, then the node command."""
    lines = ["set -euo pipefail"]
    if launch.multi:
        lines += [
            f'{VAR_NODE_RANK}="${{OMPI_COMM_WORLD_RANK:?run by mpirun, one process per worker}}"',
            f'{VAR_HOSTFILE}="$(mktemp)"',
            f"tr , '\\n' <<<\"${VAR_HOSTS}\" | sed 's/$/ slots={launch.cards}/' >\"${VAR_HOSTFILE}\"",
        ]
    lines.append(node_line(launch, VAR_NODE_RANK))
    return "\n".join(lines) + "\n"


def launcher_script(launch: NodeLaunch, forward: list[str]) -> str:
    """The launcher pod's script: read the workers from the operator's hostfile, check their number, run mpirun."""
    n = launch.nodes
    xs = " ".join(f"-x {name}" for name in forward)
    return "\n".join([
        "set -euo pipefail",
        "hostfile=\"${OMPI_MCA_orte_default_hostfile:-/etc/mpi/hostfile}\"",
        "hosts=\"$(sed -n 's/[[:space:]].*//p' \"$hostfile\")\"",
        f'if [ "$(wc -l <<<"$hosts")" != {n} ]; then',
        f'  echo "mpijob: planned for {n} worker(s) but $hostfile lists $(wc -l <<<"$hosts")" >&2; exit 2',
        "fi",
        f'export {VAR_MASTER}="$(head -n 1 <<<"$hosts")"',
        f'export {VAR_HOSTS}="$(paste -sd, - <<<"$hosts")"',
        f'echo "mpijob: {n} worker(s), master ${VAR_MASTER}:{launch.master_port}"',
        "token=()",
        f'[ -z "${{{HF_TOKEN_VAR}:-}}" ] || token=(-x {HF_TOKEN_VAR})',
        f'exec mpirun --allow-run-as-root -np {n} --map-by ppr:1:node --bind-to none --tag-output '
        f'-x PATH -x {VAR_MASTER} -x {VAR_HOSTS} {xs} "${{token[@]}}" bash -c "$1"',
    ]) + "\n"


def _quantity_gib(gib: float) -> str:
    return f"{max(1, math.ceil(gib))}Gi"


def mpijob_manifest(launch: NodeLaunch, opts: ClusterOptions, run_dir: Path, plan) -> dict:
    """The MPIJob as a dict (pure)."""
    run_dir = Path(run_dir).resolve()
    name = job_name(run_dir)
    hw = HARDWARE[launch.hardware]
    hpu = launch.device == "hpu"
    env = [{"name": k, "value": v} for k, v in launch.env.items()]
    forward = list(launch.env)
    if opts.hf_token_secret:
        secret, key = opts.hf_token_secret
        env.append({"name": HF_TOKEN_VAR,
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}})
    # Memory per worker. Gaudi/CUDA: a plan that offloads gets the host RAM the planner budgets for it (90% of the
    # hardware's host RAM), one that does not 40% (Intel's Gaudi examples ask 409Gi of a 1 TiB node). CPU ranks: their
    # "card" memory (the plan's RAM per rank) and 2 GiB.
    if launch.device == "cpu":
        memory = _quantity_gib(plan.card_memory_gib * launch.cards + 2)
        shm = _quantity_gib(max(1.0, plan.card_memory_gib * launch.cards / 4))
    else:
        memory = _quantity_gib(hw.host_memory_gib * (0.9 if plan.offload not in (None, "", "none") else 0.4))
        shm = f"{SHM_GIB_HPU}Gi"
    limits: dict = {"memory": memory}
    if hpu:
        limits = {"habana.ai/gaudi": launch.cards, "hugepages-2Mi": GAUDI_HUGEPAGES_2MI, **limits}
    elif launch.device == "cuda":
        limits = {"nvidia.com/gpu": launch.cards, **limits}
    else:
        limits = {"cpu": launch.cards, **limits}
    labels = {"app.kubernetes.io/name": "dpo-dist", "app.kubernetes.io/instance": name}
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "run-dir", "mountPath": str(run_dir)}]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
               {"name": "run-dir", "persistentVolumeClaim": {"claimName": opts.pvc}}]
    worker = {
        "name": "worker",
        "image": opts.image,
        # The operator mounts the launcher's key at /root/.ssh; host keys are made here if the image has none, and
        # sshd listens on 22, where mpirun connects (Habana's images configure 3022 for their own multi-node use).
        "command": ["bash", "-c", "mkdir -p /run/sshd && ssh-keygen -A >/dev/null && exec /usr/sbin/sshd -De -p 22"],
        "resources": {"limits": dict(limits), "requests": dict(limits)},
        "securityContext": {"capabilities": {"add": ["SYS_NICE", "IPC_LOCK"]}},
        "volumeMounts": mounts,
    }
    launcher = {
        "name": "launcher",
        "image": opts.image,
        "command": ["bash", "-c", launcher_script(launch, forward), "dpo-node", node_script(launch)],
        "env": env,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
    }
    assert launcher["command"][NODE_SCRIPT_INDEX] == node_script(launch)
    return {
        "apiVersion": "kubeflow.org/v2beta1",
        "kind": "MPIJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "slotsPerWorker": 1,
            "mpiImplementation": "OpenMPI",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0},
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "Never",
                             "template": {"metadata": {"labels": labels}, "spec": {"containers": [launcher]}}},
                "Worker": {"replicas": launch.nodes, "restartPolicy": "Never",
                           "template": {"metadata": {"labels": labels},
                                        "spec": {"containers": [worker], "volumes": volumes}}},
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # written out in full, no &anchors
        return True


def _str(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render_mpijob(launch: NodeLaunch, opts: ClusterOptions, run_dir: Path, plan) -> str:
    """The text of mpijob.yaml: a comment header, then the MPIJob."""
    run_dir = Path(run_dir).resolve()
    doc = mpijob_manifest(launch, opts, run_dir, plan)
    for text in (run_dir.as_posix(), opts.image or ""):
        if any(ch in text for ch in "\n\r"):
            raise ClusterError(f"{text!r} has a line break, which a manifest cannot carry here.")
    n, cards = launch.nodes, launch.cards
    head = [
        f"# Generated by dpo-dist (launch/cluster/k8s.py) from the plan in {run_dir}/plan.json.",
        f"# Apply with: kubectl apply -f {run_dir}/mpijob.yaml   (the Kubeflow MPI operator, v2beta1 API)",
        f"# {n} worker(s) x {cards} {'CPU rank(s)' if launch.device == 'cpu' else 'card(s)'}; the launcher runs mpirun,"
        " one process per worker, which runs the node command.",
        f"# Before applying: the image {opts.image} pushed where the cluster pulls from; the PVC {opts.pvc}"
        f" (ReadWriteMany) holding this run dir at {run_dir};",
        "# the token as a Secret: kubectl create secret generic "
        + (f"{opts.hf_token_secret[0]} --from-literal={opts.hf_token_secret[1]}=<token>" if opts.hf_token_secret
           else "(none requested)") + ".",
        "# Adapt to the site: HCCL_SOCKET_IFNAME (the pods' interface), hugepages-2Mi and memory, node selectors.",
    ]
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)
    return "\n".join(head) + "\n" + body

