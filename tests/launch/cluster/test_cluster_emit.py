"""`launch train --emit slurm|k8s`: the files, their agreement with command.sh, the schema, the refusals and the
several-node branch run with stand-ins (no training; tests/e2e/test_slurm.py and test_mpijob.py train)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_main
from tests.support.fake_launchers import fake_slurm
from tests.support.k8s_schema import problems

SECRET = "hf_plantedCLUSTERsecret0123456789"
LLAMA70_2x8 = ["--model", "meta-llama/Llama-3-70B", "--hardware", "gaudi2", "--cards", "8", "--nodes", "2", "--full"]
K8S = ["--emit", "k8s", "--image", "registry.example.com/dpo-dist:0.1.0", "--pvc", "dpo-runs"]


def env_for(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PT_HPU_", "HCCL_", "SLURM_")) and k != "GAUDI_SPAWN"}
    env.update(HF_HUB_OFFLINE="1", HF_TOKEN=SECRET, HUGGING_FACE_HUB_TOKEN=SECRET)
    env.update(extra)
    return env


def emit(*args, **env):
    from launch.cli import main

    r = run_main(main, ["train", *map(str, args)], env=env_for(**env))
    assert SECRET not in r.stdout
    return r


def no_secret_in(run: Path) -> None:
    leaked = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [], leaked


def node_words(command_sh: Path, node: int) -> list[str]:
    """The words of node `node`'s command in command.sh (`node_R() { exec ...; }`), or its one command."""
    for line in command_sh.read_text().splitlines():
        if line.startswith(f"node_{node}() {{ exec "):
            return shlex.split(line[len(f"node_{node}() {{ exec "):].rstrip("; }"))
        if line.startswith("exec "):
            return shlex.split(line[5:])
    raise AssertionError(f"no command for node {node} in {command_sh}")


def filled(words: list[str], **values) -> list[str]:
    """command.sh's per-node words with the allocation's hostfile, node rank and master address."""
    out = list(words)
    for flag, key in (("--hostfile", "hostfile"), ("--node_rank", "rank"), ("--master_addr", "master")):
        if key in values:
            out[out.index(flag) + 1] = values[key]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Slurm


def test_slurm_llama70b_two_gaudi2_nodes(tmp_path):
    run = tmp_path / "run"
    r = emit(*LLAMA70_2x8, "--run_dir", run, "--emit", "slurm", HCCL_SOCKET_IFNAME="eth0", HCCL_SECRET_KEY="x" * 12)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "not launched" in r.stdout and f"sbatch {run / 'launch.sbatch'}" in r.stdout
    text = (run / "launch.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(run / "launch.sbatch")]).returncode == 0
    sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert sbatch[:4] == ["#SBATCH --job-name=dpo-run", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                          "#SBATCH --gres=gpu:hpu:8"]
    assert {"#SBATCH --time=24:00:00", "#SBATCH --exclusive", f"#SBATCH --chdir={ROOT}",
            f"#SBATCH --output={run.resolve()}/slurm-%j.out"} <= set(sbatch)
    # The plan's environment: command.sh's exports, and the HCCL_* of this environment (secret-like names never).
    for line in ("export PT_HPU_LAZY_MODE=1", "export PT_ENABLE_INT64_SUPPORT=1", "export PT_HPU_MAX_COMPOUND_OP_SIZE=1000",
                 "export HCCL_SOCKET_IFNAME=eth0"):
        assert line in text.splitlines()
    assert "HCCL_SECRET_KEY" not in text
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in text
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun "))
    words = shlex.split(srun)
    inner = shlex.split(words[words.index("-c") + 1])
    assert inner[0] == "exec"
    assert inner[1:] == filled(node_words(run / "command.sh", 0), hostfile="$DPO_HOSTFILE", rank="$SLURM_NODEID",
                               master="$MASTER_ADDR")
    assert "--num_gpus" not in inner and "--no_ssh" in inner
    no_secret_in(run)


def test_slurm_cpu_one_node_runs_command_sh_command(tmp_path, tiny_assets):
    run = tmp_path / "run"
    r = emit("--model", tiny_assets.llama_dir, "--hardware", "cpu", "--cards", "2", "--run_dir", run, "--emit", "slurm",
             "--time", "30", "--partition", "debug", "--", "--dataset_name", tiny_assets.data_dir, "--max_steps", "2")
    assert r.returncode == 0, r.stdout[-3000:]
    text = (run / "launch.sbatch").read_text()
    assert "#SBATCH --gres" not in text and "#SBATCH --cpus-per-task=2" in text
    assert "#SBATCH --time=30" in text and "#SBATCH --partition=debug" in text
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun "))
    words = shlex.split(srun)
    inner = shlex.split(words[words.index("-c") + 1])
    assert inner[1:] == node_words(run / "command.sh", 0)  # one node: command.sh's command itself
    assert "scontrol" not in text
    assert not (run / "output").exists()  # nothing ran


def test_slurm_two_nodes_branch_with_fake_srun_and_scontrol(tmp_path, tiny_assets):
    """The several-node branch, run: scontrol gives the hosts, srun starts the node command once per node with its
    SLURM_NODEID; a recording `deepspeed` shows what each node would run."""
    run = tmp_path / "run"
    r = emit("--model", tiny_assets.llama_dir, "--hardware", "cpu", "--cards", "1", "--nodes", "2", "--run_dir", run,
             "--emit", "slurm", "--", "--dataset_name", tiny_assets.data_dir)
    assert r.returncode == 0, r.stdout[-3000:]
    env = env_for(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_NUM_NODES="2",
                  FAKE_SLURM_HOSTS="127.0.0.1,localhost", **fake_slurm(tmp_path / "bin", record_deepspeed=True))
    res = subprocess.run(["bash", str(run / "launch.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "launch.sbatch: exit code 0" in res.stdout and "master 127.0.0.1:" in res.stdout
    record = tmp_path / "bin" / "record"
    hostfile = f"{run.resolve()}/hostfile.slurm-4242"
    assert Path(hostfile).read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    for node in (0, 1):
        argv = (record / f"node-{node}.argv").read_text().splitlines()
        assert argv == filled(node_words(run / "command.sh", node)[1:], hostfile=hostfile, rank=str(node),
                              master="127.0.0.1")
        assert "MASTER_ADDR=127.0.0.1" in (record / f"node-{node}.env").read_text().splitlines()
        assert "DS_ACCELERATOR=cpu" in (record / f"node-{node}.env").read_text().splitlines()
    # A different allocation than the plan's is refused at the start of the job.
    env["SLURM_JOB_NUM_NODES"] = "3"
    res = subprocess.run(["bash", str(run / "launch.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "planned for 2 node(s), but Slurm allocated 3" in res.stderr


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_llama70b_two_gaudi2_nodes_validates(tmp_path):
    run = tmp_path / "run"
    r = emit(*LLAMA70_2x8, "--run_dir", run, *K8S, "--hf_token_secret", "hub-token:hf")
    assert r.returncode == 0, r.stdout[-3000:]
    doc = yaml.safe_load((run / "mpijob.yaml").read_text())
    assert problems(doc) == []
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
    specs = doc["spec"]["mpiReplicaSpecs"]
    assert specs["Launcher"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    worker = specs["Worker"]["template"]["spec"]
    (c,) = worker["containers"]
    assert c["image"] == "registry.example.com/dpo-dist:0.1.0"
    assert c["resources"]["limits"]["habana.ai/gaudi"] == 8 and c["resources"]["limits"]["hugepages-2Mi"]
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert set(c["securityContext"]["capabilities"]["add"]) == {"SYS_NICE", "IPC_LOCK"}
    vols = {v["name"]: v for v in worker["volumes"]}
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert vols[shm["name"]]["emptyDir"]["medium"] == "Memory" and vols[shm["name"]]["emptyDir"]["sizeLimit"]
    run_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(run.resolve()))
    assert vols[run_mount["name"]]["persistentVolumeClaim"]["claimName"] == "dpo-runs"
    (launcher,) = specs["Launcher"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in launcher["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "hf",
                                                                                    "optional": True}}}
    assert env["PT_HPU_LAZY_MODE"]["value"] == "1"
    # The node command is command.sh's, with the allocation's hostfile, node rank and master address.
    script = launcher["command"][4]
    line = next(ln for ln in script.splitlines() if ln.startswith("exec "))
    assert shlex.split(line)[1:] == filled(node_words(run / "command.sh", 0), hostfile="$DPO_HOSTFILE",
                                           rank="$DPO_NODE_RANK", master="$MASTER_ADDR")
    for name in env:  # every variable reaches the nodes through mpirun -x (the token only when set)
        assert f"-x {name}" in launcher["command"][2]
    assert subprocess.run(["bash", "-n", "-c", launcher["command"][2]]).returncode == 0
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    no_secret_in(run)


def test_k8s_cpu_twin_requests_no_habana_resources(tmp_path, tiny_assets):
    run = tmp_path / "run"
    r = emit("--model", tiny_assets.llama_dir, "--hardware", "cpu", "--cards", "2", "--nodes", "2", "--run_dir", run,
             *K8S, "--", "--dataset_name", tiny_assets.data_dir)
    assert r.returncode == 0, r.stdout[-3000:]
    doc = yaml.safe_load((run / "mpijob.yaml").read_text())
    assert problems(doc) == []
    (c,) = doc["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert not [k for k in c["resources"]["limits"] if "habana" in k or "hugepages" in k]
    assert c["resources"]["limits"]["cpu"] == 2


def test_k8s_launcher_command_on_loopback_with_a_recording_deepspeed(tmp_path, tiny_assets):
    """The launcher container's command, run here: it reads the operator's hostfile, and mpirun (a stand-in that gives
    each rank only a login environment and the -x names) runs the node script once per worker."""
    run = tmp_path / "run"
    assert emit("--model", tiny_assets.llama_dir, "--hardware", "cpu", "--cards", "1", "--nodes", "2", "--run_dir", run,
                *K8S, "--env", "HF_HUB_OFFLINE", "--", "--dataset_name", tiny_assets.data_dir).returncode == 0
    doc = yaml.safe_load((run / "mpijob.yaml").read_text())
    (launcher,) = doc["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
    hostfile = tmp_path / "mpi-hostfile"  # what the operator writes for slotsPerWorker: 1
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    env = {k: v for k, v in env_for(**fake_slurm(tmp_path / "bin", record_deepspeed=True)).items()
           if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    env.update({e["name"]: e["value"] for e in launcher["env"] if "value" in e},
               OMPI_MCA_orte_default_hostfile=str(hostfile))
    res = subprocess.run(launcher["command"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "master 127.0.0.1:" in res.stdout
    record = tmp_path / "bin" / "record"
    for rank in (0, 1):
        argv = (record / f"node-{rank}.argv").read_text().splitlines()
        assert argv[argv.index("--node_rank") + 1] == str(rank) and argv[argv.index("--master_addr") + 1] == "127.0.0.1"
        assert (record / f"node-{rank}.hostfile").read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
        seen = (record / f"node-{rank}.env").read_text().splitlines()
        assert "MASTER_ADDR=127.0.0.1" in seen and "DS_ACCELERATOR=cpu" in seen  # forwarded with -x
    # A different number of workers than planned is refused before mpirun.
    hostfile.write_text("127.0.0.1 slots=1\n")
    res = subprocess.run(launcher["command"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "planned for 2 worker(s)" in res.stderr


# ---------------------------------------------------------------------------------------------------------------
# refusals: exit 2, a message naming the flag and the fix, nothing written


@pytest.mark.parametrize("args,message", [
    (["--emit", "slurm", "--gres", "gpu;rm -rf /"], "--gres 'gpu;rm -rf /' is refused"),
    (["--emit", "slurm", "--gres", "gpu:hpu:4"], "the count is the plan's 8 cards per node"),
    (["--emit", "slurm", "--gres", "gpu::hpu"], "an empty part"),
    (["--emit", "slurm", "--time", "1 day"], "--time '1 day' is refused"),
    (["--emit", "slurm", "--partition", "a b"], "--partition 'a b' is refused"),
    (["--emit", "k8s", "--pvc", "runs"], "--emit k8s needs --image"),
    (["--emit", "k8s", "--image", "img:1$(id)", "--pvc", "runs"], "--image 'img:1$(id)' is refused"),
    (["--emit", "k8s", "--image", "reg/img:1"], "--emit k8s needs --pvc"),
    (["--emit", "k8s", "--image", "reg/img:1", "--pvc", "Runs_1"], "--pvc 'Runs_1' is refused"),
    (["--emit", "k8s", "--image", "reg/img:1", "--pvc", "runs", "--hf_token_secret", "tok en"],
     "--hf_token_secret 'tok en' is refused"),
    (["--emit", "k8s", "--image", "reg/img:1", "--pvc", "runs", "--gres", "gpu"], "--gres applies to --emit slurm"),
    (["--nodes", "1", "--image", "reg/img:1"], "--image applies only with --emit (slurm or k8s)"),
    (["--emit", "slurm", "--max_restarts", "1"], "--max_restarts is for the local launch"),
    (["--emit", "slurm", "--launcher", "torchrun"], "--launcher torchrun cannot start several nodes"),
])
def test_bad_cluster_values_are_refused(tmp_path, args, message):
    run = tmp_path / "run"
    r = emit(*LLAMA70_2x8, "--run_dir", run, *args)
    assert r.returncode == 2, r.stdout[-2000:]
    assert message in r.stdout, r.stdout[-2000:]
    assert not run.exists()


def test_node_count_must_match_the_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=8\nb slots=8\nc slots=8\n")
    run = tmp_path / "run"
    r = emit(*LLAMA70_2x8, "--hostfile", hosts, "--run_dir", run, "--emit", "slurm")
    assert r.returncode == 2 and "--nodes 2 but the hostfile" in r.stdout
    assert not run.exists()
    # With a hostfile alone, its hosts are the node count.
    r = emit(*[a for a in LLAMA70_2x8 if a not in ("--nodes", "2")], "--hostfile", hosts, "--run_dir", run,
             "--emit", "slurm")
    assert r.returncode == 0, r.stdout[-2000:]
    assert "#SBATCH --nodes=3" in (run / "launch.sbatch").read_text()


def test_a_token_in_the_arguments_is_refused(tmp_path):
    run = tmp_path / "run"
    r = emit(*LLAMA70_2x8, "--run_dir", run, "--emit", "slurm", "--", "--run_name", SECRET)
    assert r.returncode == 2 and "HF_TOKEN" in r.stdout
    assert not run.exists()
