"""The real multi-node launch path: DeepSpeed's default pdsh/ssh runner, not `--no_ssh`.

A throwaway sshd listens on 127.0.0.1:$DPO_SSHD_PORT (default 2222; `.ci/sshd_setup.sh` installs openssh-server
and pdsh and starts it, `.ci/run` calls it). The hostfile's two entries, `localhost` and `127.0.0.1`, are both this
machine, so DeepSpeed's runner ssh-checks the first host, then pdsh logs in to each "node" over ssh and starts
`deepspeed.launcher.launch --node_rank=%n` there. The launch test skips, with the reason, when sshd or pdsh is
not there; the dry-run tests always run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cpu_env, free_port, read_json, run_cmd

PORT = int(os.environ.get("DPO_SSHD_PORT", "2222"))
HOSTS = "localhost slots=1\n127.0.0.1 slots=1\n"
LENGTHS = ["--max_length", "256", "--max_prompt_length", "128"]
DPO_SMALL = ["--max_steps", "3", "--max_train_samples", "64", "--max_eval_samples", "8", "--logging_steps", "1",
             "--no_merge"]
FORWARD = "HF_HUB_OFFLINE,HF_DATASETS_OFFLINE"  # pdsh's remote shells start from a clean login environment


def sshd_unavailable() -> str | None:
    """Why the pdsh/ssh launch cannot run here, or None when it can."""
    for tool in ("pdsh", "ssh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run .ci/sshd_setup.sh as root: apt-get install openssh-server pdsh)"
    try:
        with socket.create_connection(("127.0.0.1", PORT), timeout=3):
            pass
    except OSError as e:
        return f"no sshd on 127.0.0.1:{PORT} ({e.strerror or e}); run .ci/sshd_setup.sh to start one"
    for host in ("localhost", "127.0.0.1"):
        try:
            res = subprocess.run(["ssh", "-p", str(PORT), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "echo", "ok"],
                                 capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            return f"ssh -p {PORT} {host} timed out"
        if res.returncode != 0 or res.stdout.strip() != "ok":
            return (f"ssh -p {PORT} {host} does not log in without a prompt ({(res.stderr or res.stdout).strip()[:200]}); "
                    "run .ci/sshd_setup.sh")
    return None


def kill_leftovers(marker: str) -> None:
    """SIGKILL the processes this test started (found by the unique run dir in their command line), e.g. ranks that
    pdsh started under sshd, which are outside the launcher's process group."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def launch_argv(model, data, hostfile, run_dir, *extra_launch):
    return [sys.executable, "-m", "launch", "train", "--model", str(model), "--hardware", "cpu", "--cards", "1",
            "--hostfile", str(hostfile), *LENGTHS, "--run_dir", str(run_dir), "--master_port", str(free_port()),
            *extra_launch, "--", "--dataset_name", str(data), *DPO_SMALL]


def test_ssh_dry_run_builds_the_pdsh_command(tmp_path, tiny_assets):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(HOSTS)
    run = tmp_path / "run"
    res = run_cmd(launch_argv(tiny_assets.llama_dir, tiny_assets.data_dir, hostfile, run, "--ssh", "--ssh_port", str(PORT),
                              "--env", FORWARD, "--dry-run"), timeout=120, env=cpu_env())
    assert res.returncode == 0, res.stdout[-3000:]
    text = (run / "command.sh").read_text()
    assert f"--hostfile {hostfile}" in text and f"--ssh_port {PORT}" in text and "--master_addr 127.0.0.1" in text
    assert "--no_ssh" not in text and "--node_rank" not in text and "node_1()" not in text  # one pdsh launch, not one per node
    assert f"DS_ENV_FILE={run / '.deepspeed_env'}" in text
    env_lines = (run / ".deepspeed_env").read_text().splitlines()
    assert {"DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1", "HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1"} <= set(env_lines)


def test_ssh_port_without_the_ssh_path_is_refused(tmp_path, tiny_assets):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(HOSTS)
    run = tmp_path / "run"
    res = run_cmd(launch_argv(tiny_assets.llama_dir, tiny_assets.data_dir, hostfile, run, "--ssh_port", str(PORT),
                              "--dry-run"), timeout=120, env=cpu_env())
    assert res.returncode == 2
    assert "ssh_port only applies to DeepSpeed's multi-node pdsh/ssh launch" in res.stdout
    assert not run.exists()


@pytest.mark.slow
def test_two_nodes_over_pdsh_and_ssh_on_loopback(tmp_path, tiny_assets):
    why = sshd_unavailable()
    if why:
        pytest.skip(why)
    hostfile = tmp_path / "hosts"
    hostfile.write_text(HOSTS)
    run = tmp_path / "run"
    argv = launch_argv(tiny_assets.llama_dir, tiny_assets.data_dir, hostfile, run, "--ssh", "--ssh_port", str(PORT),
                       "--env", FORWARD)
    token = "hf_PLANTED_" + secrets.token_hex(16)  # the secrets rule on this path too: never sent to the nodes or written
    t0 = time.monotonic()
    try:
        res = run_cmd(argv, timeout=480, env=cpu_env(HF_TOKEN=token, HUGGING_FACE_HUB_TOKEN=token))
    finally:
        kill_leftovers(str(run))
    took = time.monotonic() - t0
    print(f"pdsh/ssh two-node launch on loopback: exit {res.returncode} in {took:.0f} s")
    assert res.returncode == 0, res.stdout[-6000:]

    # DeepSpeed's runner took the pdsh path and each "node" ran its own node launcher over ssh.
    assert "cmd = pdsh -S -f 1024 -w localhost,127.0.0.1" in res.stdout, res.stdout[-4000:]
    assert "localhost: " in res.stdout and "127.0.0.1: " in res.stdout
    assert "node_rank=0" in res.stdout and "node_rank=1" in res.stdout
    text = (run / "command.sh").read_text()
    assert f"--ssh_port {PORT}" in text and "--no_ssh" not in text

    m = read_json(run / "output" / "training_metrics.json")
    assert (m["world_size"], m["steps"]) == (2, 3)
    assert m["first_train_loss"] is not None and m["eval_loss"] is not None
    assert (run / "launch.log").is_file()

    rand = token.split("_")[-1]
    assert rand not in res.stdout
    assert [p for p in run.rglob("*") if p.is_file() and rand.encode() in p.read_bytes()] == []


def test_ci_run_starts_sshd_before_the_tests():
    lines = [x.strip() for x in (ROOT / ".ci" / "run").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[-1] == "make test"
    assert ".ci/sshd_setup.sh || true" in lines and lines.index(".ci/sshd_setup.sh || true") < len(lines) - 1
