"""Shared fixtures: the tiny assets, and real multi-process launches under a hard timeout."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.backend import cleanup_shm_buffers
from tests.support.testing_utils import ROOT, cpu_env, free_port

PY = sys.executable

# No test reaches the hub. Set here too, before anything imports huggingface_hub (it reads these once), so that the
# entries run in this process (run_main) see the same offline world as the ones run as subprocesses (cpu_env).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_cmd(argv, *, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run argv in its own process group; on timeout kill the whole group and fail the test."""
    proc = subprocess.Popen(
        argv, cwd=cwd or ROOT, env=env or cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, argv))}\n{out[-4000:]}")
    finally:
        words = [str(a) for a in argv]
        if "--master_port" in words:  # DeepSpeed's CPU all-reduce buffers of killed ranks stay in /dev/shm
            cleanup_shm_buffers(words[words.index("--master_port") + 1])
    return subprocess.CompletedProcess(argv, proc.returncode, out, None)


def run_main(main, argv, *, env=None, cwd=None) -> subprocess.CompletedProcess:
    """A command-line entry's ``main(argv)`` run in this process, as its CLI would run it: exit code and combined
    output, with ``env`` as the environment for the call. For the many checks that stop before any work (bad
    arguments, bad inputs), this saves the seconds a fresh interpreter spends importing torch and transformers.
    The root logger, the environment and accelerate's process state are restored afterwards."""
    import contextlib
    import io
    import logging

    out = io.StringIO()
    saved_env, saved_cwd, root = dict(os.environ), os.getcwd(), logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        os.chdir(cwd or saved_cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse's own usage errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        if "accelerate.state" in sys.modules:  # a trainer config made in the call leaves a process-wide state
            sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), None)


def run_ranks(script_args, *, nproc: int = 2, timeout: float = 300, module: str = "dpo_dist.dpo", env=None):
    """`deepspeed --num_accelerators N --module <module> <args>` on CPU (gloo)."""
    argv = [PY, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(nproc), "--master_port", str(free_port()),
            "--module", module, *map(str, script_args)]
    return run_cmd(argv, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_assets():
    from dpo_dist.tiny import ensure_tiny_assets

    return ensure_tiny_assets()


@pytest.fixture(scope="session")
def zero3_config(tmp_path_factory) -> Path:
    """The repo's ZeRO-3 template, used as-is with --deepspeed."""
    path = ROOT / "ds_configs" / "zero3.json"
    assert path.exists(), "ds_configs/zero3.json is missing"
    return path


# The shared 2-rank ZeRO-3 runs: 30 steps, a loss logged every step (the resume test compares them step by step),
# one checkpoint at the end (the merge tests read its ZeRO shards).
ZERO3_STEPS = 30
ZERO3_CHECKPOINT = f"checkpoint-{ZERO3_STEPS}"


def zero3_args(tiny_assets, zero3_config, out_dir, family, mode, extra=(), *, steps=ZERO3_STEPS,
               train_samples=400, merge=False):
    """The dpo_dist.dpo arguments of one 2-rank ZeRO-3 run of a tiny model (any family of
    dpo_dist.tiny.ALL_FAMILIES: llama, gemma3, and the qwen2 / mixtral twins); ``merge`` lets the merge post-step
    run (into ``<out_dir>_merged``)."""
    args = [
        "--model_name_or_path", tiny_assets.model_dir(family), "--dataset_name", tiny_assets.data_dir,
        "--output_dir", out_dir, "--deepspeed", zero3_config, "--max_steps", steps,
        "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8,
        "--learning_rate", 2e-3 if mode == "lora" else 1e-3, "--max_length", 256, "--max_prompt_length", 128,
        "--max_train_samples", train_samples, "--max_eval_samples", 96, "--logging_steps", 1, "--save_steps", steps,
        "--beta", 0.1, "--diagnostics", "--seed", 7, "--dist_timeout", 600,
        *extra,
    ]
    if not merge:
        args.append("--no_merge")  # the merge post-step has its own tests (test_merge.py)
    if mode == "lora":
        args += ["--use_peft", "--lora_r", 8, "--lora_alpha", 16]
    return args


@pytest.fixture(scope="session")
def zero3_run(tiny_assets, zero3_config, tmp_path_factory):
    """``zero3_run(family, mode)``: the output folder of one 2-rank ZeRO-3 DPO run (full: a sharded reference; lora:
    the adapter-off reference), trained once per session on first use and shared by the tests that read it
    (training, merge, comparison). They must not change it: copy first."""
    root = tmp_path_factory.mktemp("zero3-runs")
    done: dict = {}
    failed: dict = {}

    def get(family: str, mode: str) -> Path:
        key = (family, mode)
        if key in failed:  # do not pay for a failing 2-rank run twice
            pytest.fail(failed[key])
        if key not in done:
            out = root / f"{family}-{mode}"
            res = run_ranks(zero3_args(tiny_assets, zero3_config, out, family, mode), nproc=2, timeout=420)
            if res.returncode != 0 or not (out / ZERO3_CHECKPOINT / f"global_step{ZERO3_STEPS}").is_dir():
                failed[key] = f"training {family}/{mode} failed (rc {res.returncode}):\n{res.stdout[-6000:]}"
                pytest.fail(failed[key])
            done[key] = out
        return done[key]

    return get


@functools.cache
def bench_row_lengths(n: int = 1000, max_length: int = 1024) -> list[tuple[int, int]]:
    """(chosen, rejected) row lengths (prompt + response + EOS) of the first n long-tailed bench pairs."""
    from transformers import AutoTokenizer

    from dpo_dist.data.preference import split_hh_transcript
    from dpo_dist.tiny import ensure_bench_assets

    a = ensure_bench_assets()
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    rows = [json.loads(x) for x in open(a.train_file)][:n]
    out = []
    for i, r in enumerate(rows):
        p, c, rj = split_hh_transcript(r["chosen"], r["rejected"], i)
        n_p = len(tok(tok.bos_token + p, add_special_tokens=False)["input_ids"])
        out.append(tuple(min(max_length, n_p + len(tok(x, add_special_tokens=False)["input_ids"]) + 1) for x in (c, rj)))
    return out


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
