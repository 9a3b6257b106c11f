"""`launch train --emit k8s`: the MPIJob validates against the MPI operator's v2beta1 CRD schema (vendored, with the
core Pod template schema it embeds, tests/support/k8s_schema.py), and what it runs, runs: the launcher container's
command and environment, taken from the YAML, start 2 loopback "workers" of 1 CPU rank each through an `mpirun`
stand-in that gives each rank only a login environment and the `-x` names (tests/support/fake_launchers.py), as
ssh into a worker pod would. The tiny Llama trains and its loss falls."""

from __future__ import annotations

import os
import secrets
import sys

import pytest
import yaml

from conftest import cpu_env, free_port, read_json, run_cmd
from dpo_dist.backend import cleanup_shm_buffers
from tests.support.fake_launchers import fake_slurm
from tests.support.k8s_schema import problems

pytestmark = pytest.mark.slow

DPO = ["--max_steps", "10", "--learning_rate", "1e-3", "--logging_steps", "1", "--max_train_samples", "320",
       "--max_eval_samples", "48", "--save_steps", "1000", "--no_merge"]


def test_mpijob_worker_command_and_env_train_on_two_loopback_ranks(tmp_path, tiny_assets):
    run = tmp_path / "run"
    port = free_port()
    token = "hf_PLANTED_" + secrets.token_hex(16)
    res = run_cmd([sys.executable, "-m", "launch", "train", "--model", str(tiny_assets.llama_dir), "--hardware", "cpu",
                   "--cards", "1", "--nodes", "2", "--use_peft", "--zero_stage", "3", "--max_length", "256",
                   "--max_prompt_length", "128", "--run_dir", str(run), "--master_port", str(port), "--emit", "k8s",
                   "--image", "registry.example.com/dpo-dist:test", "--pvc", "dpo-runs",
                   "--env", "HF_HUB_OFFLINE,HF_DATASETS_OFFLINE,TOKENIZERS_PARALLELISM",
                   "--", "--dataset_name", str(tiny_assets.data_dir), *DPO], timeout=180, env=cpu_env(HF_TOKEN=token))
    assert res.returncode == 0, res.stdout[-4000:]
    text = (run / "mpijob.yaml").read_text()
    assert token.split("_")[-1] not in text and "secretKeyRef" in text
    doc = yaml.safe_load(text)
    assert problems(doc) == []

    (launcher,) = doc["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
    yaml_env = {e["name"]: e["value"] for e in launcher["env"] if "value" in e}
    assert {"DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE"} <= set(yaml_env)
    hostfile = tmp_path / "mpi-hostfile"  # /etc/mpi/hostfile as the operator writes it (slotsPerWorker: 1)
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    base = {k: v for k, v in cpu_env().items() if k not in yaml_env}  # the pod's own: PATH, HOME, PYTHONPATH
    env = {**base, **fake_slurm(tmp_path / "bin"), **yaml_env, "OMPI_MCA_orte_default_hostfile": str(hostfile),
           "HF_TOKEN": token}  # what the secretKeyRef gives the launcher
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{base['PATH']}"  # the stand-in mpirun, then the image's (venv's) tools
    try:
        res = run_cmd(launcher["command"], timeout=600, env=env)
    finally:
        cleanup_shm_buffers(port)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "mpijob: 2 worker(s), master 127.0.0.1:" in res.stdout
    m = read_json(run / "output" / "training_metrics.json")
    print(f"MPIJob node command on 2 loopback workers: loss {m['first_train_loss']:.4f} -> {m['last_train_loss']:.4f}")
    assert (m["world_size"], m["zero_stage"], m["steps"]) == (2, 3, 10)
    assert m["last_train_loss"] < m["first_train_loss"]
    rand = token.split("_")[-1]
    assert rand not in res.stdout
    assert [p for p in run.rglob("*") if p.is_file() and rand.encode() in p.read_bytes()] == []
