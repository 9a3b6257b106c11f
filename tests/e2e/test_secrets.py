"""Secrets: with a planted HF_TOKEN in the environment, plan, train (dry-run and real), merge and
compare, then look for the planted value in every byte they printed and every file they wrote.

One module fixture runs the whole chain once (2 CPU ranks, 3 steps, tiny Llama); every command has a hard timeout.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

from conftest import cpu_env, free_port, read_json, run_cmd, run_main

pytestmark = pytest.mark.slow

SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
DPO_SMALL = ["--max_steps", "3", "--max_train_samples", "64", "--max_eval_samples", "8", "--logging_steps", "1",
             "--save_steps", "2"]  # a checkpoint-2/ too: optimizer, RNG, scheduler, training_args.bin, trainer_state.json


def needles(token: str) -> list[bytes]:
    """The token, and its random part alone (catches a prefix rewritten or cut), as UTF-8 and as UTF-16."""
    rand = token.split("_")[-1]
    return [x.encode(enc) for x in (token, rand) for enc in ("utf-8", "utf-16-le")]


def find_leaks(token: str, root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(n in data for n in needles(token)):
                found.append(str(path.relative_to(root)))
    return found


@pytest.fixture(scope="module")
def planted(tiny_assets, tmp_path_factory):
    token = "hf_PLANTED_" + secrets.token_hex(16)
    base = tmp_path_factory.mktemp("secrets")
    env = cpu_env(**dict.fromkeys(SECRET_VARS, token), HF_DATASETS_CACHE=base / "datasets_cache")
    hosts = base / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    gaudi_hosts = base / "gaudi_hosts"
    gaudi_hosts.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    model, data = str(tiny_assets.llama_dir), str(tiny_assets.data_dir)
    launch = [sys.executable, "-m", "launch"]
    lengths = ["--max_length", "256", "--max_prompt_length", "128"]
    outputs: dict[str, object] = {}

    def run(name, argv, timeout=120, expect=0, in_process=True):
        """Entries that start no ranks run in this process (conftest.run_main, the same code as their CLI)."""
        if in_process:
            import importlib

            main = importlib.import_module("launch.cli" if argv[2] == "launch" else argv[2]).main
            res = run_main(main, [str(a) for a in argv[3:]], env=env)
        else:
            res = run_cmd([str(a) for a in argv], timeout=timeout, env=env)
        outputs[name] = res
        assert res.returncode == expect, f"{name}: exit {res.returncode}\n{res.stdout[-6000:]}"
        return res

    run("plan", [*launch, "plan", "--model", model, "--hardware", "cpu", "--cards", "2", *lengths])
    run("plan --json", [*launch, "plan", "--model", model, "--hardware", "cpu", "--cards", "2", *lengths, "--json"])
    run("plan gaudi2 70B", [*launch, "plan", "--model", "meta-llama/Llama-3-70B", "--hardware", "gaudi2", "--cards", "8",
                            "--nodes", "2"])
    run("train --dry-run, one node", [*launch, "train", "--model", model, "--hardware", "cpu", "--cards", "2", *lengths,
                                      "--run_dir", base / "dry_single", "--dry-run", "--", "--dataset_name", data])
    run("train --dry-run, 2-host hostfile (no_ssh)",
        [*launch, "train", "--model", model, "--hardware", "cpu", "--cards", "1", "--hostfile", hosts, *lengths,
         "--run_dir", base / "dry_multi", "--dry-run", "--", "--dataset_name", data])
    run("train --dry-run, 2-host hostfile over pdsh (.deepspeed_env)",
        [*launch, "train", "--model", model, "--hardware", "cpu", "--cards", "1", "--hostfile", hosts, *lengths, "--ssh",
         "--ssh_port", "2222", "--env", "HF_HUB_OFFLINE,HF_DATASETS_OFFLINE", "--run_dir", base / "dry_pdsh", "--dry-run",
         "--", "--dataset_name", data])
    run("train --dry-run, gaudi2 2 nodes (.deepspeed_env)",
        [*launch, "train", "--model", "meta-llama/Llama-3-8B", "--hardware", "gaudi2", "--cards", "8", "--hostfile",
         gaudi_hosts, "--env", "HF_HUB_OFFLINE", "--run_dir", base / "dry_gaudi", "--dry-run"])
    run("train --dry-run asked to forward HF_TOKEN (refused)",
        [*launch, "train", "--model", model, "--hardware", "cpu", "--cards", "1", "--hostfile", hosts, *lengths, "--ssh",
         "--env", "HF_TOKEN", "--run_dir", base / "dry_refused", "--dry-run"], expect=2)
    run("train, 2 CPU ranks, with merge",
        [*launch, "train", "--model", model, "--hardware", "cpu", "--cards", "2", *lengths, "--run_dir", base / "run",
         "--master_port", free_port(), "--", "--dataset_name", data, *DPO_SMALL], timeout=480, in_process=False)
    run("merge", [sys.executable, "-m", "dpo_dist.merge", "--checkpoint", base / "run" / "output", "--output",
                  base / "merged_again", "--base_model", model], timeout=240)
    run("compare", [sys.executable, "-m", "dpo_dist.compare_base_vs_dpo", "--base_model", model, "--finetuned_model",
                    base / "run" / "output_merged", "--dataset_name", data, "--max_eval_samples", "8", "--num_prompts",
                    "1", "--num_gen_prompts", "2", "--max_new_tokens", "8", *lengths, "--device", "cpu",
                    "--output_json", base / "compare" / "dpo_comparison_results.json"], timeout=240)
    return token, base, outputs


def test_the_chain_ran_and_wrote_what_is_checked(planted):
    _, base, outputs = planted
    run = base / "run"
    for name in ("plan.json", "ds_config.json", "command.sh", "launch.log"):
        assert (run / name).is_file(), name
    assert (base / "dry_pdsh" / ".deepspeed_env").is_file() and (base / "dry_gaudi" / ".deepspeed_env").is_file()
    assert (run / "output" / "training_metrics.json").is_file() and read_json(run / "output" / "training_metrics.json")["world_size"] == 2
    assert list((run / "output").glob("checkpoint-*/training_args.bin")) and (run / "output" / "training_args.bin").is_file()
    assert list((run / "output").glob("checkpoint-*/trainer_state.json"))
    assert (run / "output" / "README.md").is_file()  # the model card
    assert (run / "output_merged" / "merge_report.json").is_file() and (base / "merged_again" / "merge_report.json").is_file()
    assert (base / "compare" / "dpo_comparison_results.json").is_file()
    assert not (base / "dry_refused").exists()


def test_scanner_finds_a_planted_value(planted, tmp_path):
    token, _, _ = planted
    (tmp_path / "a.bin").write_bytes(b"\x80\x04" + token.split("_")[-1].encode() + b"\x00")
    (tmp_path / "b.txt").write_text("nothing here")
    assert find_leaks(token, tmp_path) == ["a.bin"]


def test_no_output_shows_the_token(planted):
    token, _, outputs = planted
    leaked = [name for name, res in outputs.items() if any(n.decode("utf-8", "ignore") in res.stdout for n in needles(token)[::2])]
    assert not leaked, f"the planted token appears in the output of: {leaked}"


def test_refusal_to_forward_the_token_names_it_without_its_value(planted):
    _, _, outputs = planted
    out = outputs["train --dry-run asked to forward HF_TOKEN (refused)"].stdout
    assert "HF_TOKEN looks like a secret" in out and "huggingface-cli login" in out


def test_no_file_written_holds_the_token(planted):
    token, base, _ = planted
    n_files = sum(1 for p in base.rglob("*") if p.is_file())
    assert n_files > 30, n_files
    assert find_leaks(token, base) == []
