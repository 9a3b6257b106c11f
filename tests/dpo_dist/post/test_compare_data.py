"""The comparison reads its held-out pairs through the training loader, so bad data is refused the same way: the
file and 1-based line of a bad byte or a malformed line, pairs of nothing but chosen == rejected (exit 1, nothing
written, no traceback)."""

from __future__ import annotations

import json

import pytest

from conftest import cpu_env, run_main


def _line(i: int) -> bytes:
    return (json.dumps({"prompt": f"\n\nHuman: q{i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": f" no {i}"})
            + "\n").encode()


@pytest.mark.parametrize("case, bad, needle", [
    ("bytes", b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n', "line 2, column 13: byte 0xff is not valid UTF-8"),
    ("json", b'{"prompt": "x" "chosen": "a"}\n', "line 2, column 16: Expecting ',' delimiter"),
    ("identical", None, "none of its 6 pairs can teach a preference"),
])
def test_compare_refuses_bad_held_out_data(tiny_assets, tmp_path, case, bad, needle):
    from dpo_dist.post.compare import main

    data = tmp_path / "prefs.jsonl"
    if bad is None:
        data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " x", "rejected": " x"}) + "\n" for i in range(6)))
    else:
        data.write_bytes(_line(1) + bad + b"".join(_line(i) for i in range(3, 9)))
    work = tmp_path / "work"
    work.mkdir()
    res = run_main(main, ["--base_model", tiny_assets.llama_dir, "--finetuned_model", tiny_assets.llama_dir,
                          "--dataset_name", data, "--device", "cpu"], cwd=work, env=cpu_env())
    assert res.returncode == 1, res.stdout[-3000:]
    assert f"error: --dataset_name {data}: " in res.stdout and needle in res.stdout, res.stdout[-3000:]
    assert "Traceback" not in res.stdout and list(work.iterdir()) == []
