"""Bad preference data: a bad byte or a malformed line is named by file and 1-based line, with what was expected
and the fix; pairs that cannot teach a preference are dropped with a warning, and a split of nothing else is
refused (no training run needed: these call the loader)."""

from __future__ import annotations

import json
import logging

import pytest

from dpo_dist.args import DataArguments
from dpo_dist.data.preference import DataError, load_preference_splits, normalise

H, A = "\n\nHuman:", "\n\nAssistant:"


def _row(i: int, chosen: str | None = None, rejected: str | None = None) -> dict:
    return {"prompt": f"{H} question {i}?{A}", "chosen": f" good answer {i}" if chosen is None else chosen,
            "rejected": f" bad answer {i}" if rejected is None else rejected}


def _lines(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _load(path, **kw):
    return load_preference_splits(DataArguments(dataset_name=str(path), **kw), 0)


# --------------------------------------------------------------------------- bytes and lines


def test_invalid_utf8_line_names_the_file_and_line(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(_lines(_row(i) for i in range(3)) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
                     + _lines(_row(i) for i in range(3, 8)))
    with pytest.raises(DataError) as e:
        _load(data)
    msg = str(e.value)
    assert f"--dataset_name {data}: line 4, column 16" in msg and "0xe9 is not valid UTF-8" in msg
    assert "must be UTF-8" in msg and "Fix: re-save the file as UTF-8" in msg and "iconv" in msg


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_invalid_utf8_in_json_and_csv_files(tmp_path, suffix):
    data = tmp_path / f"prefs{suffix}"
    if suffix == ".json":
        data.write_bytes(b'[\n{"prompt": "p", "chosen": "a", "rejected": "b"},\n{"prompt": "\xff", "chosen": "a", '
                         b'"rejected": "b"}\n]\n')
        line = 3
    else:
        data.write_bytes(b"prompt,chosen,rejected\np,a,b\np,a,b\np,\xc3(,b\n")
        line = 4
    with pytest.raises(DataError, match=rf"prefs{suffix}: line {line}, column \d+: byte 0x.. is not valid UTF-8"):
        _load(data)


def test_invalid_utf8_in_a_folder_names_the_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(_lines(_row(i) for i in range(6)))
    (folder / "test.jsonl").write_bytes(_lines([_row(0)]) + b'{"prompt": "\x80"}\n')
    with pytest.raises(DataError, match=r"data: test\.jsonl line 2, column 13: byte 0x80 is not valid UTF-8"):
        _load(folder)


def test_malformed_json_line_is_named_by_its_1_based_line_and_the_real_cause(tmp_path):
    data = tmp_path / "prefs.jsonl"
    good = _lines(_row(i) for i in range(3)).decode()
    data.write_text(good + '{"prompt": "x", "chosen": "a" "rejected": "b"}\n' + good)
    with pytest.raises(DataError) as e:
        _load(data)
    msg = str(e.value)
    assert f"--dataset_name {data}: line 4, column 31: Expecting ',' delimiter" in msg, msg
    assert "not valid JSON" in msg and "one JSON object per line" in msg and "Fix: repair or delete that line" in msg
    assert "row 3" not in msg and "ArrowInvalid" not in msg  # datasets' 0-based row and pyarrow's cause


def test_malformed_json_array_file_names_the_line(tmp_path):
    data = tmp_path / "prefs.json"
    data.write_text("[\n" + ",\n".join(json.dumps(_row(i)) for i in range(3)) + ',\n{"prompt": "x",, }\n]\n')
    with pytest.raises(DataError) as e:
        _load(data)
    msg = str(e.value)
    assert f"--dataset_name {data}: line 5, column 16: Expecting property name" in msg and "not valid JSON" in msg, msg
    assert "changed from object to array" not in msg  # the cause datasets reports (its JSON Lines attempt)


@pytest.mark.parametrize("line, needle", [
    ('["not", "an", "object"]', "line 3: a JSON array; expected an object"),
    ('{"prompt": "p", "chosen": 5, "rejected": "b"}', "line 3: 'chosen' is a JSON number; expected a string"),
])
def test_json_line_of_the_wrong_shape(tmp_path, line, needle):
    data = tmp_path / "prefs.jsonl"
    data.write_text(_lines(_row(i) for i in range(2)).decode() + line + "\n" + _lines([_row(9)]).decode())
    with pytest.raises(DataError, match="Fix:") as e:
        _load(data)
    assert f"--dataset_name {data}: {needle}" in str(e.value)


def test_row_numbers_in_row_errors_are_1_based():
    from datasets import Dataset

    explicit = Dataset.from_list([_row(0), _row(1), {"prompt": "p", "chosen": None, "rejected": "r"}])
    with pytest.raises(DataError, match=r"split 'train' row 3: prompt/chosen/rejected must be strings"):
        normalise(explicit, "train", "d.jsonl")
    hh = Dataset.from_list([{"chosen": f"{H} q{A} yes", "rejected": f"{H} q{A} no"}, {"chosen": f"{H} q", "rejected": "x"}])
    with pytest.raises(DataError, match=r"--dataset_name d\.jsonl: split 'train' row 2: the 'chosen' transcript"):
        normalise(hh, "train", "d.jsonl")


def test_good_file_still_loads(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(_lines(_row(i) for i in range(20)))
    train, held = _load(data)
    assert len(train) + len(held) == 20 and train.column_names == ["prompt", "chosen", "rejected"]


# --------------------------------------------------------------------------- degenerate pairs


def test_degenerate_pairs_are_dropped_with_a_warning(tmp_path, caplog):
    rows = [_row(i) for i in range(1, 21)]
    rows[1] = _row(2, chosen=" same", rejected=" same")  # row 2
    rows[4] = _row(5, chosen=" same", rejected=" same")  # row 5
    rows[6] = _row(7, rejected="")  # row 7
    rows[8] = _row(9, chosen="   ")  # row 9: blank
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(_lines(rows))
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data.preference"):
        train, held = _load(data, eval_fraction=0.25)
    assert len(train) + len(held) == 16
    for ds in (train, held):
        assert all(c.strip() and r.strip() and c != r for c, r in zip(ds["chosen"], ds["rejected"]))
    warning = next(r.getMessage() for r in caplog.records if "cannot teach a preference" in r.getMessage())
    assert "split 'train': dropped 4 of 20 pairs" in warning
    assert "2 with chosen == rejected" in warning and "2 with an empty chosen or rejected response" in warning
    assert "rows 2, 5, 7, 9 (1-based)" in warning


def test_degenerate_pairs_in_the_test_split_too(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(_lines(_row(i) for i in range(8)))
    (folder / "test.jsonl").write_bytes(_lines([_row(0), _row(1, chosen=" x", rejected=" x"), _row(2)]))
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data.preference"):
        train, held = _load(folder)
    assert len(train) == 8 and len(held) == 2
    assert any("split 'test': dropped 1 of 3 pairs" in r.getMessage() and "rows 2 (1-based)" in r.getMessage()
               for r in caplog.records)


def test_only_degenerate_pairs_is_refused(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(_lines([_row(i, chosen=" same", rejected=" same") for i in range(7)] + [_row(7, chosen="")]))
    with pytest.raises(DataError) as e:
        _load(data)
    msg = str(e.value)
    assert f"--dataset_name {data}: split 'train': none of its 8 pairs can teach a preference" in msg
    assert "7 with chosen == rejected" in msg and "1 with an empty chosen or rejected response" in msg
    assert "rows 1, 2, 3, 4, 5 and 3 more, 1-based" in msg and "Fix:" in msg


def test_a_test_split_of_only_degenerate_pairs_is_refused(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(_lines(_row(i) for i in range(8)))
    (folder / "test.jsonl").write_bytes(_lines([_row(0, chosen=" x", rejected=" x")]))
    with pytest.raises(DataError, match=r"split 'test': none of its 1 pairs can teach a preference"):
        _load(folder)
