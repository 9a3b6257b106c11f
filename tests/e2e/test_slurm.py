"""`launch train --emit slurm`, submitted for real: `sbatch run_dir/launch.sbatch` on a one-host Slurm cluster on this
machine (munge, slurmctld, slurmd; `.ci/slurm_setup.sh` installs and starts it, `.ci/run` calls it and so does the
fixture here). 1 node x 2 CPU ranks of the tiny Llama: the job trains, the loss falls, the merge post-step runs once,
and the exit code is in Slurm's job completion record and the job's output. Skipped, with the reason, where the
daemons cannot start.

The several-node branch of the script runs too, on loopback: `srun` and `scontrol` are stand-ins
(tests/support/fake_launchers.py) that start the node command once per "node" on this machine, with SLURM_NODEID,
and give 127.0.0.1 and localhost as the allocation's hosts; 2 nodes x 1 CPU rank train."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cpu_env, free_port, read_json, run_cmd
from dpo_dist.backend import cleanup_shm_buffers
from tests.support.fake_launchers import fake_slurm

pytestmark = pytest.mark.slow

SLURM_DIR = Path(os.environ.get("DPO_SLURM_DIR", "/tmp/dpo-dist-slurm"))
DPO = ["--max_steps", "10", "--learning_rate", "1e-3", "--logging_steps", "1", "--max_train_samples", "320",
       "--max_eval_samples", "48", "--save_steps", "1000"]
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def slurm_env():
    """The environment that reaches the one-host cluster (SLURM_CONF), after .ci/slurm_setup.sh; a skip naming the
    reason when it cannot start."""
    try:
        res = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_setup.sh")], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(".ci/slurm_setup.sh took more than 600 s")
    out = res.stdout + res.stderr
    print(out)
    skips = [ln[len("SKIP:"):].strip() for ln in out.splitlines() if ln.startswith("SKIP:")]
    if skips:
        pytest.skip(f"no Slurm cluster here: {skips[-1]}")
    if res.returncode != 0:
        pytest.skip(f".ci/slurm_setup.sh failed (exit {res.returncode}): {out[-600:]}")
    return {"SLURM_CONF": str(SLURM_DIR / "slurm.conf")}


def emit_argv(model, data, run_dir, port, *launch_args, dpo=DPO):
    return [sys.executable, "-m", "launch", "train", "--model", str(model), "--hardware", "cpu", "--max_length", "256",
            "--max_prompt_length", "128", "--run_dir", str(run_dir), "--master_port", str(port),
            "--emit", "slurm", *launch_args, "--", "--dataset_name", str(data), *dpo]


def wait_for_job(job: str, env: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env, timeout=30)
        if q.returncode == 0 and q.stdout.strip() in ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return
        time.sleep(3)
    subprocess.run(["scancel", job], env=env, timeout=30)
    pytest.fail(f"Slurm job {job} did not finish within {timeout:.0f} s (cancelled)")


def no_token_in(run: Path, token: str) -> None:
    rand = token.split("_")[-1]
    assert [p for p in run.rglob("*") if p.is_file() and rand.encode() in p.read_bytes()] == []


def test_sbatch_trains_on_the_one_host_cluster(tmp_path, tiny_assets, slurm_env):
    run = tmp_path / "run"
    token = "hf_PLANTED_" + secrets.token_hex(16)
    env = cpu_env(HF_TOKEN=token, **slurm_env)
    port = free_port()
    res = run_cmd(emit_argv(tiny_assets.llama_dir, tiny_assets.data_dir, run, port, "--cards", "2", "--full",
                            "--zero_stage", "3"), timeout=180, env=env)
    assert res.returncode == 0, res.stdout[-4000:]
    script = run / "launch.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not (run / "output").exists()  # --emit writes, never launches

    t0 = time.monotonic()
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = sub.stdout.strip().split(";")[0]
    try:
        wait_for_job(job, env, JOB_TIMEOUT_S)
    finally:
        cleanup_shm_buffers(port)  # CPU ranks' all-reduce buffers, in case a rank was killed
    took = time.monotonic() - t0

    out = (run / f"slurm-{job}.out").read_text()
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env, timeout=30).stdout
    comp = [ln for ln in (SLURM_DIR / "jobcomp.log").read_text().splitlines() if f"JobId={job} " in ln]
    m = read_json(run / "output" / "training_metrics.json")
    said = " ".join(re.findall(r"\b(?:JobState|ExitCode)=\S+", show))
    recorded = " ".join(re.findall(r"\b(?:JobState|ExitCode)=\S+", comp[-1])) if comp else "none"
    print(f"slurm job {job}: {took:.0f} s; scontrol: {said}; jobcomp: {recorded}; "
          f"loss {m['first_train_loss']:.4f} -> {m['last_train_loss']:.4f}")
    assert "launch.sbatch: exit code 0" in out, out[-4000:]
    assert re.search(r"\bJobState=COMPLETED\b", show) and re.search(r"\bExitCode=0:0\b", show), show
    assert comp and "JobState=COMPLETED" in comp[-1] and "ExitCode=0:0" in comp[-1], comp
    assert (m["world_size"], m["zero_stage"], m["steps"]) == (2, 3, 10)
    assert m["last_train_loss"] < m["first_train_loss"]
    # The merge post-step ran once, on rank 0, into a verified folder.
    assert out.count("post-step: merging") == 1, out[-4000:]
    report = read_json(run / "output_merged" / "merge_report.json")
    assert report["max_logit_diff"] <= report["tolerance"]
    no_token_in(run, token)


def test_two_node_script_on_loopback_with_fake_srun_and_scontrol(tmp_path, tiny_assets):
    run = tmp_path / "run"
    port = free_port()
    res = run_cmd(emit_argv(tiny_assets.llama_dir, tiny_assets.data_dir, run, port, "--cards", "1", "--nodes", "2",
                            "--use_peft", "--zero_stage", "3", dpo=[*DPO, "--no_merge"]), timeout=180, env=cpu_env())
    assert res.returncode == 0, res.stdout[-4000:]
    env = cpu_env(SLURM_JOB_ID="777", SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_NUM_NODES="2",
                  FAKE_SLURM_HOSTS="127.0.0.1,localhost", **fake_slurm(tmp_path / "bin"))
    try:
        res = run_cmd(["bash", str(run / "launch.sbatch")], timeout=600, env=env)
    finally:
        cleanup_shm_buffers(port)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "launch.sbatch: exit code 0" in res.stdout and "master 127.0.0.1:" in res.stdout
    assert (run / "hostfile.slurm-777").read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    m = read_json(run / "output" / "training_metrics.json")
    print(f"2 nodes (fake srun): loss {m['first_train_loss']:.4f} -> {m['last_train_loss']:.4f}")
    assert (m["world_size"], m["zero_stage"], m["steps"]) == (2, 3, 10)
    assert m["last_train_loss"] < m["first_train_loss"]
