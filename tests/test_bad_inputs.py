"""Bad input: each case exits non-zero with a message that names the input and the fix, writes no
half-finished output and deletes nothing that was there before.

Cases already covered elsewhere are not repeated here: a missing model argument, an unknown loss type, beta,
learning rate, batch size and max_prompt_length >= max_length, and an existing non-empty output dir
(tests/dpo_dist/test_args_and_data.py); hostfile errors (tests/launch/command/test_hostfile.py, tests/launch/command/test_command.py); a merge with a
missing shard (tests/e2e/test_merge.py); a corrupt or partial checkpoint on resume (tests/e2e/test_resume.py).

Every case runs the entry's `main()` in the test process (conftest.run_main: the same code as the CLI, without a
fresh interpreter's import time); the Makefile cases run make. Each test prints
`BAD_INPUT | case | exit code | first line of the message` (see it with `pytest -rP`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import ROOT, cpu_env, run_cmd, run_main

TIMEOUT = 180
SMALL = ["--device", "cpu", "--max_steps", "3", "--max_train_samples", "64", "--max_eval_samples", "8",
         "--max_length", "256", "--max_prompt_length", "128"]


def snapshot(root: Path) -> dict:
    """Every path under root -> file bytes (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def message_line(output: str, marker: str = "error:") -> str:
    for line in output.splitlines():
        if marker in line:
            return line[line.index(marker):].strip() if marker == "error:" else line.strip()
    return ""


def report(case: str, res, line: str) -> None:
    print(f"BAD_INPUT | {case} | {res.returncode} | {line}")


def run_dpo(case: str, *argv, env=None):
    from dpo_dist.train.dpo import main

    res = run_main(main, [*SMALL, *argv], env=env or cpu_env())
    line = message_line(res.stdout)
    report(case, res, line)
    assert res.returncode != 0, res.stdout[-3000:]
    assert line, f"no 'error:' line in the output:\n{res.stdout[-3000:]}"
    assert "Traceback" not in res.stdout, res.stdout[-3000:]
    return res, line


def assert_nothing_written(tmp_path: Path, before: dict, out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not Path(str(out) + "_merged").exists()
    assert snapshot(tmp_path) == before, "files under the test folder changed"


# ----------------------------------------------------------------------------------------------------------
# rank entry: model, data, output dir, DeepSpeed config


def test_local_model_path_that_does_not_exist(tmp_path, tiny_assets):
    before, out = snapshot(tmp_path), tmp_path / "out"
    missing = tmp_path / "models" / "llama-that-is-not-here"
    res, line = run_dpo("local model path missing", "--model_name_or_path", missing, "--dataset_name", tiny_assets.data_dir,
                        "--output_dir", out)
    assert f"--model_name_or_path {missing}" in line and "no such model folder" in line and "Check the path" in line
    assert_nothing_written(tmp_path, before, out)


def test_hub_id_without_network(tmp_path, tiny_assets):
    before, out = snapshot(tmp_path), tmp_path / "out"
    model = "nonexistent-org/nonexistent-model"
    res, line = run_dpo("hub id, no network (HF_HUB_OFFLINE=1)", "--model_name_or_path", model, "--dataset_name",
                        tiny_assets.data_dir, "--output_dir", out, env=cpu_env(HF_HUB_OFFLINE="1"))
    assert f"--model_name_or_path {model}" in line
    assert "HF_HUB_OFFLINE=1 is set" in line and "pass the local folder" in line and "huggingface-cli download" in line
    assert_nothing_written(tmp_path, before, out)


def test_hub_dataset_without_network(tmp_path, tiny_assets):
    before, out = snapshot(tmp_path), tmp_path / "out"
    name = "nonexistent-org/nonexistent-preferences"
    res, line = run_dpo("hub dataset, no network", "--model_name_or_path", tiny_assets.llama_dir, "--dataset_name", name,
                        "--output_dir", out)
    assert f"--dataset_name {name}" in line and "hub may be unreachable" in line and "local folder" in line
    assert_nothing_written(tmp_path, before, out)


def test_dataset_without_the_needed_columns(tmp_path, tiny_assets):
    data = tmp_path / "text_only.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(8)))
    before, out = snapshot(tmp_path), tmp_path / "out"
    res, line = run_dpo("dataset without prompt/chosen/rejected", "--model_name_or_path", tiny_assets.llama_dir,
                        "--dataset_name", data, "--output_dir", out)
    assert f"--dataset_name {data}" in line and "['text']" in line and "prompt/chosen/rejected" in line and "Fix:" in line
    assert_nothing_written(tmp_path, before, out)


def test_empty_dataset_file(tmp_path, tiny_assets):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    before, out = snapshot(tmp_path), tmp_path / "out"
    res, line = run_dpo("empty dataset file", "--model_name_or_path", tiny_assets.llama_dir, "--dataset_name", data,
                        "--output_dir", out)
    assert f"--dataset_name {data}" in line and "empty" in line and "Fix:" in line
    assert "SchemaInferenceError" not in res.stdout and "DatasetGenerationError" not in res.stdout
    assert_nothing_written(tmp_path, before, out)


def test_empty_dataset_folder(tmp_path, tiny_assets):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n")
    (data / "test.jsonl").write_text("")
    before, out = snapshot(tmp_path), tmp_path / "out"
    res, line = run_dpo("dataset folder of empty files", "--model_name_or_path", tiny_assets.llama_dir, "--dataset_name",
                        data, "--output_dir", out)
    assert f"--dataset_name {data}" in line and "empty" in line and "train.jsonl" in line
    assert_nothing_written(tmp_path, before, out)


def test_every_row_longer_than_max_length(tmp_path, tiny_assets):
    before, out = snapshot(tmp_path), tmp_path / "out"
    res, line = run_dpo("all rows exceed max_length", "--model_name_or_path", tiny_assets.llama_dir, "--dataset_name",
                        tiny_assets.data_dir, "--output_dir", out, "--max_length", "16", "--max_prompt_length", "8")
    assert "all 64 rows are longer than --max_length 16" in line and "raise --max_length" in line
    assert_nothing_written(tmp_path, before, out)


def test_output_dir_under_a_file(tmp_path, tiny_assets):
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    blocker.chmod(0o755)  # executable too: root passes os.access(W_OK | X_OK) on it, so that check alone would miss it
    before, out = snapshot(tmp_path), blocker / "out"
    res, line = run_dpo("output dir under a regular file", "--model_name_or_path", tiny_assets.llama_dir,
                        "--dataset_name", tiny_assets.data_dir, "--output_dir", out)
    assert res.returncode == 2
    assert f"--output_dir {out}" in line and "is a file, not a folder" in line and "Choose an --output_dir" in line
    assert snapshot(tmp_path) == before and blocker.read_text() == "a file, not a folder"


def test_output_dir_that_cannot_be_created(tmp_path, tiny_assets):
    """/proc refuses new folders even to root, which os.access does not show: the real write probe catches it."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    out = Path("/proc/dpo-dist-cannot-write-here/out")
    res, line = run_dpo("output dir that cannot be written (/proc)", "--model_name_or_path", tiny_assets.llama_dir,
                        "--dataset_name", tiny_assets.data_dir, "--output_dir", out)
    assert res.returncode == 2
    assert f"--output_dir {out}" in line and "cannot create anything in /proc" in line and "Choose a folder" in line
    assert not out.parent.exists()


@pytest.mark.parametrize(
    "case,text,needles",
    [
        ("ds_config not valid JSON", '{\n  "zero_optimization": {"stage": 3,}\n}\n',
         ["not valid JSON (line 2, column 36", "Start from a template in ds_configs/"]),
        ("ds_config zero stage 7", '{"zero_optimization": {"stage": 7}}', ["zero_optimization.stage must be 0, 1, 2 or 3 (got 7)", "ds_configs/zero3.json"]),
        ("ds_config zero_optimization not an object", '{"zero_optimization": 3}', ["zero_optimization must be an object", "ds_configs/"]),
        ("ds_config a JSON list", "[1, 2]", ["expected a JSON object", "got a JSON list"]),
        ("ds_config zero stage true", '{"zero_optimization": {"stage": true}}', ["(got True)"]),
    ],
)
def test_malformed_ds_config(tmp_path, tiny_assets, case, text, needles):
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(text)
    before, out = snapshot(tmp_path), tmp_path / "out"
    res, line = run_dpo(case, "--model_name_or_path", tiny_assets.llama_dir, "--dataset_name", tiny_assets.data_dir,
                        "--output_dir", out, "--deepspeed", cfg)
    assert res.returncode == 2
    assert f"--deepspeed {cfg}" in line
    for needle in needles:
        assert needle in line, line
    assert_nothing_written(tmp_path, before, out)


def test_failure_into_an_existing_output_dir_keeps_its_files(tmp_path, tiny_assets):
    """With --overwrite_output_dir, a run that fails on its input must still leave the old files as they were."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    data = tmp_path / "text_only.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    before = snapshot(tmp_path)
    res, line = run_dpo("bad dataset into an existing output dir", "--model_name_or_path", tiny_assets.llama_dir,
                        "--dataset_name", data, "--output_dir", out, "--overwrite_output_dir")
    assert "['text']" in line
    assert snapshot(tmp_path) == before
    assert not Path(str(out) + "_merged").exists()


# ----------------------------------------------------------------------------------------------------------
# launcher and Makefile


def run_launch(case: str, *argv, env=None, marker="error:"):
    from launch.cli import main

    res = run_main(main, argv, env=env or cpu_env())
    line = message_line(res.stdout, marker)
    report(case, res, line)
    assert "Traceback" not in res.stdout, res.stdout[-3000:]
    return res, line


def test_more_cpu_cards_than_cores(tmp_path, tiny_assets):
    cards = max(64, (os.cpu_count() or 1) + 1)
    run = tmp_path / "run"
    res, line = run_launch(f"launch train --hardware cpu --cards {cards} --dry-run", "train", "--model",
                           tiny_assets.llama_dir, "--hardware", "cpu", "--cards", cards, "--run_dir", run, "--dry-run")
    assert res.returncode == 2, res.stdout[-3000:]
    assert f"--cards {cards}" in line and f"{os.cpu_count()} CPU cores" in line and f"--cards {os.cpu_count()}" in line
    assert not run.exists()


def test_more_gaudi_cards_than_visible(tmp_path, tiny_assets):
    run = tmp_path / "run"
    res, line = run_launch("launch train --hardware gaudi2 --cards 8, HABANA_VISIBLE_DEVICES=0,1", "train", "--model",
                           tiny_assets.llama_dir, "--hardware", "gaudi2", "--cards", "8", "--run_dir", run, "--dry-run",
                           env=cpu_env(HABANA_VISIBLE_DEVICES="0,1"))
    assert res.returncode == 2, res.stdout[-3000:]
    assert "--cards 8" in line and "HABANA_VISIBLE_DEVICES=0,1 makes 2 visible" in line and "--cards 2" in line
    assert not run.exists()


def test_available_cards_is_only_checked_when_known():
    from launch.cli import LaunchError, PlanArguments, available_cards, check_cards_available
    from launch.command.hostfile import HostEntry

    assert available_cards("cpu", {}, cpu_count=4) == (4, "this machine has 4 CPU cores")
    assert available_cards("gaudi2", {"HABANA_VISIBLE_DEVICES": "all"}, hl_smi=lambda: None)[0] is None
    assert available_cards("gaudi3", {}, hl_smi=lambda: 8)[0] == 8
    assert available_cards("cuda", {"CUDA_VISIBLE_DEVICES": "0,1,2"})[0] == 3
    assert available_cards("cuda", {})[0] is None
    a = PlanArguments(model="m", hardware="gaudi2", cards=8)
    check_cards_available(a, None, environ={}, hl_smi=lambda: None)  # unknown: a laptop planning for a Gaudi node
    remote = [HostEntry("worker-0", 8, 1), HostEntry("worker-1", 8, 2)]
    check_cards_available(a, remote, environ={"HABANA_VISIBLE_DEVICES": "0"})  # other machines: not this node's cards
    with pytest.raises(LaunchError, match=r"--cards 8 .*HABANA_VISIBLE_DEVICES=0,1,2,3 makes 4 visible"):
        check_cards_available(a, None, environ={"HABANA_VISIBLE_DEVICES": "0,1,2,3"})
    with pytest.raises(LaunchError, match="--cards 3"):
        check_cards_available(PlanArguments(model="m", hardware="cpu", cards=3),
                              [HostEntry("localhost", 3, 1), HostEntry("127.0.0.1", 3, 2)], environ={}, cpu_count=2)


def test_plan_that_does_not_fit(tmp_path):
    res, line = run_launch("launch plan Llama-3-70B full on 8 gaudi2", "plan", "--model", "meta-llama/Llama-3-70B",
                           "--hardware", "gaudi2", "--cards", "8", "--full", marker="Suggestion:")
    assert res.returncode == 3, res.stdout[-3000:]
    assert "Does not fit on 8 gaudi2 card(s)" in res.stdout and "Smallest fit: 16 gaudi2 cards" in res.stdout


def test_train_dry_run_of_a_plan_that_does_not_fit_writes_nothing(tmp_path):
    run = tmp_path / "run"
    res, line = run_launch("launch train --dry-run Llama-3-70B full on 8 gaudi2", "train", "--model",
                           "meta-llama/Llama-3-70B", "--hardware", "gaudi2", "--cards", "8", "--full", "--run_dir", run,
                           "--dry-run")
    assert res.returncode == 3, res.stdout[-3000:]
    assert "does not fit in 94.6 GiB per card" in line and "Smallest fit: 16 gaudi2 cards" in line
    assert not run.exists() and "command.sh" not in os.listdir(tmp_path)


@pytest.mark.parametrize("target", ["train-8x", "sanity"])
def test_makefile_target_without_model(target):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    stamp = ROOT / ".venv" / ".installed"
    stamp_before = stamp.stat().st_mtime_ns if stamp.exists() else None
    res = run_cmd(["make", "-s", target], timeout=60, env=env, cwd=ROOT)
    line = message_line(res.stdout)
    report(f"make -s {target} (no MODEL)", res, line)
    assert res.returncode != 0
    assert "MODEL is required" in line and f"make {target} MODEL=" in line
    assert "pip" not in res.stdout and "python" not in res.stdout.lower()  # no install, no launch started
    assert (stamp.stat().st_mtime_ns if stamp.exists() else None) == stamp_before


# ----------------------------------------------------------------------------------------------------------
# bad bytes, bad lines and degenerate pairs in the preference data (the loader's own cases:
# tests/dpo_dist/data/test_bad_data.py)


def _pref_line(i: int) -> bytes:
    return (json.dumps({"prompt": f"\n\nHuman: q{i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": f" no {i}"})
            + "\n").encode()


@pytest.mark.parametrize("case, bad, needle", [
    ("invalid UTF-8 line", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
     "line 3, column 16: byte 0xe9 is not valid UTF-8"),
    ("malformed JSON line", b'{"prompt": "x", "chosen": "a" "rejected": "b"}\n', "line 3, column 31: Expecting ','"),
])
def test_bad_line_in_the_preference_file(tmp_path, tiny_assets, case, bad, needle):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(_pref_line(1) + _pref_line(2) + bad + b"".join(_pref_line(i) for i in range(4, 12)))
    before, out = snapshot(tmp_path), tmp_path / "out"
    res, line = run_dpo(case, "--model_name_or_path", tiny_assets.llama_dir, "--dataset_name", data, "--output_dir", out)
    assert f"--dataset_name {data}: {needle}" in line and "Fix:" in line
    assert "UnicodeDecodeError" not in res.stdout and "DatasetGenerationError" not in res.stdout
    assert_nothing_written(tmp_path, before, out)


def test_preference_file_of_identical_pairs(tmp_path, tiny_assets):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " same", "rejected": " same"}) + "\n"
                            for i in range(8)))
    before, out = snapshot(tmp_path), tmp_path / "out"
    res, line = run_dpo("only chosen == rejected pairs", "--model_name_or_path", tiny_assets.llama_dir,
                        "--dataset_name", data, "--output_dir", out)
    assert "none of its 8 pairs can teach a preference" in line and "8 with chosen == rejected" in line
    assert_nothing_written(tmp_path, before, out)


def test_sft_with_a_dpo_flag(tmp_path, tiny_assets):
    from dpo_dist.train.sft import main

    before, out = snapshot(tmp_path), tmp_path / "out"
    res = run_main(main, [*SMALL[:-2], "--model_name_or_path", tiny_assets.llama_dir, "--dataset_name",
                          tiny_assets.data_dir, "--output_dir", out, "--loss_type", "ipo"], env=cpu_env())
    line = message_line(res.stdout)
    report("sft given a DPO flag", res, line)
    assert res.returncode == 2 and "--loss_type is a DPO option; the SFT step" in line, res.stdout[-3000:]
    assert_nothing_written(tmp_path, before, out)
