"""launch/command/hostfile.py: the `host slots=N` parser and validator.

Pure and fast: no processes, no network. DeepSpeed is imported only to check that the format we
accept is a subset of what its own `fetch_hostfile` parses, with the same result.
"""

from __future__ import annotations

import collections
import json
import os

import pytest

from conftest import ROOT
from launch.command.hostfile import (
    HostEntry,
    HostfileError,
    main,
    parse_hostfile,
    parse_hostfile_text,
    validate_hostfile_cli,
)

REPO = ROOT
GAUDI_2X8 = REPO / "hostfiles" / "gaudi_2x8.txt"
LOOPBACK = REPO / "hostfiles" / "cpu_loopback_2x1.txt"

# Valid hostfile texts: comments (full-line and trailing), blank lines, tabs, CRLF, IPv4/IPv6,
# FQDNs, numeric-leading labels, leading zeros in slots.
VALID = {
    "simple": ("worker-0 slots=8\nworker-1 slots=8\n", [("worker-0", 8), ("worker-1", 8)]),
    "comments": (
        "# a comment\n\n   # indented comment\nnode-a slots=8   # master\n\nnode-b slots=8#tight comment\n",
        [("node-a", 8), ("node-b", 8)],
    ),
    "tabs_and_crlf": ("\tnode-a\tslots=4\r\nnode-b  slots=4 \r\n", [("node-a", 4), ("node-b", 4)]),
    "ips": ("10.0.0.12 slots=2\n::1 slots=2\nfe80::1:2 slots=2\n", [("10.0.0.12", 2), ("::1", 2), ("fe80::1:2", 2)]),
    "fqdn": ("gaudi-01.rack3.example.com slots=8\n3com.net slots=8\n", [("gaudi-01.rack3.example.com", 8), ("3com.net", 8)]),
    "loopback": ("localhost slots=1\n127.0.0.1 slots=1\n", [("localhost", 1), ("127.0.0.1", 1)]),
    "leading_zero_slots": ("h1 slots=08\n", [("h1", 8)]),
    "no_trailing_newline": ("h1 slots=1", [("h1", 1)]),
}


def _pairs(entries):
    return [(e.host, e.slots) for e in entries]


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_texts_parse(name):
    text, expected = VALID[name]
    entries = parse_hostfile_text(text)
    assert _pairs(entries) == expected
    assert all(isinstance(e, HostEntry) for e in entries)


def test_line_numbers_are_file_lines():
    entries = parse_hostfile_text("# c\n\nh1 slots=1\n# c\nh2 slots=1\n")
    assert [e.line for e in entries] == [3, 5]


def test_repo_examples_parse():
    gaudi = parse_hostfile(GAUDI_2X8, expected_slots=8)
    assert _pairs(gaudi) == [("gaudi-node-0", 8), ("gaudi-node-1", 8)]
    loop = parse_hostfile(str(LOOPBACK), expected_slots=1)
    assert _pairs(loop) == [("localhost", 1), ("127.0.0.1", 1)]
    text = GAUDI_2X8.read_text()
    # the example documents what the brief asks for
    for needle in ("3022", "passwordless ssh", "FIRST host is the master", "slots="):
        assert needle in text


def test_str_with_newline_is_text_and_path_like_is_file(tmp_path):
    p = tmp_path / "h.txt"
    p.write_text("a slots=2\n")
    assert _pairs(parse_hostfile(p)) == [("a", 2)]
    assert _pairs(parse_hostfile(str(p))) == [("a", 2)]
    assert _pairs(parse_hostfile("b slots=3\n")) == [("b", 3)]


@pytest.mark.parametrize("name", sorted(VALID))
def test_accepted_format_is_a_subset_of_deepspeeds_with_same_result(name, tmp_path):
    """Whatever we accept, DeepSpeed's own fetch_hostfile parses to the same hosts, slots and order,
    so the file can be handed to `deepspeed --hostfile` unchanged."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    text, _ = VALID[name]
    p = tmp_path / "hostfile"
    p.write_bytes(text.encode())
    ours = collections.OrderedDict((e.host, e.slots) for e in parse_hostfile(p))
    theirs = runner.fetch_hostfile(str(p))
    assert list(theirs.items()) == list(ours.items())


def test_repo_examples_match_deepspeed():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    for path in (GAUDI_2X8, LOOPBACK):
        ours = [(e.host, e.slots) for e in parse_hostfile(path)]
        assert list(runner.fetch_hostfile(str(path)).items()) == ours


# ---- errors: (text, expected_slots, line, column, fragments that must be in the message)
ERRORS = {
    "missing_slots": ("node-a slots=8\nnode-b\n", None, 2, 7, ["missing slots", "'node-b'", "node-b slots=8"]),
    "slots_zero": ("a slots=0\n", None, 1, 9, ["positive integer", "'0'"]),
    "slots_negative": ("a slots=-1\n", None, 1, 9, ["positive integer", "'-1'"]),
    "slots_word": ("a slots=eight\n", None, 1, 9, ["positive integer", "'eight'"]),
    "slots_float": ("a slots=1.5\n", None, 1, 9, ["positive integer", "'1.5'"]),
    "slots_empty": ("a slots=\n", None, 1, 9, ["slots has no value"]),
    "slots_spaced": ("a slots = 8\n", None, 1, 3, ["without spaces"]),
    "slots_unicode_digit": ("a slots=\u0668\n", None, 1, 9, ["positive integer"]),
    "duplicate": ("a slots=1\nb slots=1\na slots=1\n", None, 3, 1, ["duplicate host 'a'", "line 1"]),
    "duplicate_case": ("Node-1 slots=1\nnode-1 slots=1\n", None, 2, 1, ["duplicate host"]),
    "semicolon": ("a;touch X slots=1\n", None, 1, 2, ["';'", "'a;touch'", "shell metacharacter"]),
    "cmd_subst": ("$(id) slots=1\n", None, 1, 1, ["'$'", "'$(id)'"]),
    "backticks": ("`id` slots=1\n", None, 1, 1, ["'`'"]),
    "space_in_name": ("my host slots=1\n", None, 1, 4, ["'host'", "cannot contain spaces"]),
    "quoted_name": ('"a b" slots=1\n', None, 1, 1, ["without quotes"]),
    "single_quote": ("a'b slots=1\n", None, 1, 2, ["\"'\""]),
    "pipe": ("a|b slots=1\n", None, 1, 2, ["'|'"]),
    "ampersand": ("a&b slots=1\n", None, 1, 2, ["'&'"]),
    "redirect_out": ("a>b slots=1\n", None, 1, 2, ["'>'"]),
    "redirect_in": ("a<b slots=1\n", None, 1, 2, ["'<'"]),
    "dollar_var": ("$HOST slots=1\n", None, 1, 1, ["'$'"]),
    "newline_in_name": ("a\nb slots=1\n", None, 1, 2, ["missing slots", "'a'"]),
    "carriage_return_mid": ("a\rb slots=1\n", None, 1, 2, ["control character"]),
    "nul": ("a\x00b slots=1\n", None, 1, 2, ["control character"]),
    "escape_seq": ("\x1b[31mred slots=1\n", None, 1, 1, ["control character"]),
    "nbsp": ("a\u00a0b slots=1\n", None, 1, 2, ["'\\xa0'"]),
    "underscore": ("worker_1 slots=8\n", None, 1, 7, ["'_'", "RFC 1123"]),
    "bad_ipv4": ("10.0.0.300 slots=8\n", None, 1, 1, ["not a valid one"]),
    "ipv6_with_port": ("[::1]:22 slots=8\n", None, 1, 1, ["'['"]),
    "ipv6_bad": ("fe80::zz slots=8\n", None, 1, 1, ["not a valid IPv6"]),
    "ipv6_zone": ("fe80::1%eth0 slots=8\n", None, 1, 8, ["'%'"]),
    "leading_hyphen": ("-node slots=8\n", None, 1, 1, ["starts or ends with '-'"]),
    "double_dot": ("a..b slots=8\n", None, 1, 3, ["empty label"]),
    "long_label": ("a" * 64 + " slots=8\n", None, 1, 1, ["longer than 63"]),
    "extra_token": ("a slots=8 max_slots=8\n", None, 1, 11, ["unknown extra text 'max_slots=8'"]),
    "max_slots_only": ("a max_slots=8\n", None, 1, 3, ["unknown key"]),
    "slots_mismatch": ("a slots=8\nb slots=4\n", 8, 2, 9, ["slots=4", "8 cards per node", "--cards 4"]),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_name_file_line_column_and_fix(name, tmp_path):
    text, expected_slots, line, col, fragments = ERRORS[name]
    p = tmp_path / "hosts.txt"
    p.write_bytes(text.encode())
    with pytest.raises(HostfileError) as ei:
        parse_hostfile(p, expected_slots=expected_slots)
    err = ei.value
    msg = str(err)
    assert isinstance(err, ValueError)
    assert (err.line, err.column) == (line, col), msg
    assert msg.startswith(f"{p}:{line}:{col}: "), msg
    assert "expected:" in msg and "fix:" in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    # the caret points at the reported column of the echoed line
    echoed, caret = msg.split("\n")[1:3]
    assert caret.index("|") == echoed.index("|")
    assert caret.index("^") - (caret.index("|") + 2) == col - 1
    # the message is printable on one terminal line each: no raw control characters
    assert not any(ord(c) < 32 and c != "\n" for c in msg)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_empty_hostfile(text, tmp_path):
    p = tmp_path / "empty"
    p.write_text(text)
    with pytest.raises(HostfileError, match="lists no hosts") as ei:
        parse_hostfile(p)
    assert str(p) in str(ei.value) and "fix:" in str(ei.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(HostfileError, match="hostfile not found") as ei:
        parse_hostfile(p)
    assert str(p) in str(ei.value)


def test_directory_and_unreadable(tmp_path):
    with pytest.raises(HostfileError, match="is a directory"):
        parse_hostfile(tmp_path)
    p = tmp_path / "secret"
    p.write_text("a slots=1\n")
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):  # running as root: permissions are not enforced
            pytest.skip("root can read a mode-000 file")
        with pytest.raises(HostfileError, match="not readable"):
            parse_hostfile(p)
    finally:
        p.chmod(0o600)


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1"
    p.write_bytes(b"a slots=1\nb\xe9 slots=1\n")
    with pytest.raises(HostfileError, match="not UTF-8") as ei:
        parse_hostfile(p)
    assert (ei.value.line, ei.value.column) == (2, 2)


def test_hostile_hostnames_refused_before_anything_runs(tmp_path, monkeypatch):
    """Hostile host names are refused by the validator (nothing is executed)."""
    monkeypatch.chdir(tmp_path)
    for host in ["a;touch X", "$(touch X)", "`touch X`", "a b", "a&&touch X", "a|touch X", "x'$(touch X)'"]:
        with pytest.raises(HostfileError):
            parse_hostfile_text(f"{host} slots=1\n")
    with pytest.raises(HostfileError):
        parse_hostfile_text("ok slots=1\na\ntouch X slots=1\n")
    assert not (tmp_path / "X").exists()


def test_validate_hostfile_cli_summary():
    s = validate_hostfile_cli(GAUDI_2X8, cards=8)
    assert s["hosts"] == ["gaudi-node-0", "gaudi-node-1"]
    assert (s["nodes"], s["slots_per_node"], s["world_size"], s["master_addr"]) == (2, 8, 16, "gaudi-node-0")
    json.dumps(s)
    mixed = validate_hostfile_cli("a slots=2\nb slots=4\n")
    assert mixed["slots_per_node"] is None and mixed["world_size"] == 6


def test_main_exit_codes(capsys, tmp_path):
    assert main([str(LOOPBACK), "--cards", "1"]) == 0
    out = capsys.readouterr().out
    assert "world size 2" in out and "master: localhost" in out
    bad = tmp_path / "bad"
    bad.write_text("a;id slots=1\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1:2:" in err
    assert main([str(LOOPBACK), "--cards", "8", "--json"]) == 2
