"""Hostfile parsing and validation (`host slots=N`), with errors that point at the problem.

Format (one node per line; the first host is the master, rank 0's node)::

    # full-line comment
    worker-0 slots=8     # trailing comment
    10.0.0.12 slots=8

- `#` starts a comment anywhere on a line; blank lines are ignored.
- `host` is an RFC 1123 hostname (labels of letters, digits and `-`, not starting or ending
  with `-`, each at most 63 characters, 253 in all), an IPv4 address or an IPv6 address.
  Anything else is refused: in particular every shell metacharacter (`;`, `$(`, backticks,
  quotes, `|&<>`, spaces inside a name, control characters), because host names reach `ssh`,
  `pdsh -w` and, in some DeepSpeed versions, a `shell=True` ssh check.
- `slots=N` with N a positive integer, written without spaces around `=`. When the launcher
  asks for C cards per node, every N must equal C.
- Nothing else may follow `slots=N` except a comment (MPI's `max_slots=` is not understood).
- A host may appear once (case-insensitive: DNS names are).

Why hand-written: DeepSpeed's own `deepspeed.launcher.runner.fetch_hostfile` matches
`^(\\S+)\\s+slots=(\\d+)` and reports "Hostfile contains a bad entry: <line>" with no line number,
column or fix, silently ignores trailing junk (`host slots=8 max_slots=9`), accepts any
non-space text as a host (including `a;touch` and `$(id)`), and only warns (then launches
locally) when the file is missing. optimum-habana's `DistributedRunner.process_hostfile` is
stricter in the wrong way: it rejects comment lines. The format accepted here is a subset of
what `fetch_hostfile` parses, and on every file we accept it gives the same hosts, slots and
order (tests/launch/command/test_hostfile.py checks that against the installed DeepSpeed).

Pure: no torch, no deepspeed, no network. `python -m launch.command.hostfile FILE [--cards N]` prints a
summary or the error (exit 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["HostEntry", "HostfileError", "parse_hostfile", "parse_hostfile_text", "validate_hostfile_cli", "host_problem",
           "is_loopback", "LOOPBACK_NAMES", "main"]

FORMAT_HELP = "one node per line as `host slots=N`, e.g. `worker-0 slots=8` (comments start with #)"

_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.:")
_TOKEN_RE = re.compile(r"[^ \t]+")
_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")  # all controls but TAB
_SHELL_META = set(";&|<>$`\\\"'(){}[]*?!~#= ")


class HostfileError(ValueError):
    """A hostfile problem. `str(err)` names the file, line and column, quotes the offending
    text, and says what was expected and how to fix it. Attributes: path, line, column, text."""

    def __init__(self, message: str, *, path: str, line: int | None = None, column: int | None = None,
                 text: str | None = None):
        super().__init__(message)
        self.path = path
        self.line = line
        self.column = column
        self.text = text


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int  # 1-based line number in the hostfile


def _printable(s: str) -> str:
    """Escape control characters so a message can be printed safely on one line."""
    return "".join(c if c == "\t" or (c.isprintable() and c not in "\u2028\u2029") else repr(c)[1:-1] for c in s)


def _error(path: str, lineno: int, col: int, raw: str, problem: str, expected: str, fix: str) -> HostfileError:
    shown = _printable(raw.rstrip("\n"))
    caret_pad = len(_printable(raw[: col - 1]).expandtabs(1))
    gutter = f"  {lineno} | "
    message = (
        f"{path}:{lineno}:{col}: {problem}\n"
        f"{gutter}{shown.expandtabs(1)}\n"
        f"{' ' * (len(gutter) - 2)}| {' ' * caret_pad}^\n"
        f"  expected: {expected}\n"
        f"  fix: {fix}"
    )
    return HostfileError(message, path=path, line=lineno, column=col, text=raw)


def host_problem(host: str) -> tuple[int, str, str] | None:
    """None if `host` is a valid hostname / IPv4 / IPv6; else `(offset, problem, fix)` with the
    0-based offset of the offending character. The command builders (launch/command/common.py) check every
    host name and master address they put on a command line with it."""
    for i, ch in enumerate(host):
        if ch not in _HOST_CHARS:
            kind = "shell metacharacter" if ch in _SHELL_META else "character"
            fix = "use the node's DNS name or IP address exactly"
            if ch == "_":
                fix = "underscores are not allowed in hostnames (RFC 1123); use '-' or the node's IP address"
            elif ch in "\"'":
                fix = "write the host without quotes"
            return i, f"{kind} {ch!r} is not allowed in a host name (in {host!r})", fix
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return 0, f"{host!r} contains ':' but is not a valid IPv6 address", (
                "write a plain IPv6 address (no brackets, no port, no zone id) or a hostname; "
                "the ssh port is set with --ssh_port / ~/.ssh/config, not in the hostfile")
        return None
    if len(host) > 253:
        return 0, f"host name is {len(host)} characters long (at most 253 allowed)", "use a shorter DNS name or the IP address"
    labels = host.split(".")
    if all(label.isdigit() for label in labels if label):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return 0, f"{host!r} looks like an IPv4 address but is not a valid one", "write four numbers 0-255 separated by dots, e.g. 10.0.0.12"
        return None
    offset = 0
    for label in labels:
        if not _LABEL_RE.match(label):
            if label == "":
                why = "an empty label (two dots in a row, or a leading/trailing dot)"
            elif len(label) > 63:
                why = f"label {label!r} is longer than 63 characters"
            else:
                why = f"label {label!r} starts or ends with '-'"
            return offset, f"{host!r} is not a valid hostname: {why}", "use the node's DNS name (RFC 1123) or its IP address"
        offset += len(label) + 1
    return None


# Names that resolve to this machine's loopback interface everywhere (Debian and Ubuntu add the ip6- ones to
# /etc/hosts). Any other name may resolve anywhere, so it is not loopback without a DNS lookup.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """True when `host` is this machine's loopback: one of `LOOPBACK_NAMES` (any case), an address in
    127.0.0.0/8 or ::1, also with an IPv6 zone id (`::1%lo`). No DNS lookup: for a resolved name, ask about
    each of its addresses. The launcher counts ranks per machine with it (every loopback host is this
    machine) and the doctor uses it to tell a loopback hostfile from a real cluster."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def parse_hostfile_text(text: str, expected_slots: int | None = None, *, name: str = "<hostfile>") -> list[HostEntry]:
    """Parse hostfile text. `name` is what error messages call the file."""
    if expected_slots is not None and (not isinstance(expected_slots, int) or isinstance(expected_slots, bool)
                                       or expected_slots < 1):
        raise ValueError(f"expected_slots must be a positive int or None, got {expected_slots!r}")
    entries: list[HostEntry] = []
    seen = {}  # lower-cased host -> line number
    # Split on "\n" only (so line numbers match editors); tolerate CRLF files.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        hash_at = line.find("#")
        content = line if hash_at < 0 else line[:hash_at]
        if content.strip(" \t") == "":
            continue
        m = _CONTROL_RE.search(content)
        if m:
            ch = m.group()
            return_err = _error(name, lineno, m.start() + 1, line, f"control character {ch!r} in the line",
                                FORMAT_HELP, "remove the character (was the file edited on another system or pasted from a terminal?)")
            raise return_err
        tokens = [(t.start(), t.group()) for t in _TOKEN_RE.finditer(content)]
        host_at, host = tokens[0]
        problem = host_problem(host)
        if problem is not None:
            off, what, fix = problem
            raise _error(name, lineno, host_at + off + 1, line, f"invalid host: {what}",
                         "an RFC 1123 hostname (letters, digits, '-', '.'), an IPv4 or an IPv6 address, then slots=N", fix)
        if len(tokens) == 1:
            end = host_at + len(host)
            exp = expected_slots if expected_slots is not None else 8
            raise _error(name, lineno, end + 1, line, f"missing slots for host {host!r}", FORMAT_HELP,
                         f"add the number of cards on that node: `{host} slots={exp}`")
        slots_at, slots_tok = tokens[1]
        if not slots_tok.startswith("slots="):
            if slots_tok in ("slots", "slots=") or slots_tok.startswith("slots") and len(tokens) > 2 and tokens[2][1].startswith("="):
                fix = "write `slots=N` without spaces around '='"
                problem_txt = f"malformed slots {slots_tok!r}"
            elif "=" in slots_tok and slots_tok.split("=")[0].lower() in ("max_slots", "max-slots", "cpu", "gpus"):
                fix = "only `slots=N` is understood; remove the other key"
                problem_txt = f"unknown key {slots_tok!r} where slots=N was expected"
            else:
                fix = f"hostnames cannot contain spaces; write `{host} slots=N`"
                problem_txt = f"unexpected text {slots_tok!r} after host {host!r} (expected slots=N)"
            raise _error(name, lineno, slots_at + 1, line, problem_txt, FORMAT_HELP, fix)
        value = slots_tok[len("slots="):]
        if not value.isascii() or not value.isdigit() or int(value) < 1:
            spaced = value == "" and len(tokens) > 2
            raise _error(name, lineno, slots_at + len("slots=") + 1, line,
                         f"slots must be a positive integer, got {value!r}" if value else "slots has no value",
                         "slots=N with N a whole number of cards >= 1, e.g. slots=8",
                         "write `slots=N` without spaces around '='" if spaced else "write the number of cards to use on that node")
        slots = int(value)
        if len(tokens) > 2:
            extra_at, extra = tokens[2]
            raise _error(name, lineno, extra_at + 1, line, f"unknown extra text {extra!r} after slots={value}",
                         FORMAT_HELP, "remove it, or start a comment with '#'")
        if expected_slots is not None and slots != expected_slots:
            raise _error(name, lineno, slots_at + len("slots=") + 1, line,
                         f"host {host!r} has slots={slots} but {expected_slots} cards per node were asked for",
                         f"slots={expected_slots} on every line (the same number of cards on each node)",
                         f"set slots={expected_slots} here, or ask for --cards {slots} if every node has {slots} cards")
        key = host.lower()
        if key in seen:
            raise _error(name, lineno, host_at + 1, line,
                         f"duplicate host {host!r} (already listed on line {seen[key]})",
                         "each node listed once", "remove one of the two lines (give one line per node, with all its cards in slots=N)")
        seen[key] = lineno
        entries.append(HostEntry(host=host, slots=slots, line=lineno))
    if not entries:
        raise HostfileError(
            f"{name}: the hostfile lists no hosts (only blank lines or comments).\n"
            f"  expected: {FORMAT_HELP}\n"
            "  fix: add one line per node, e.g. `worker-0 slots=8`; see hostfiles/gaudi_2x8.txt",
            path=name,
        )
    return entries


def _read(path: str | os.PathLike) -> str:
    shown = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise HostfileError(
            f"{shown}: hostfile not found.\n  expected: an existing file, {FORMAT_HELP}\n"
            "  fix: check the path (relative paths are from the current directory); examples are in hostfiles/",
            path=shown) from None
    except IsADirectoryError:
        raise HostfileError(f"{shown}: is a directory, not a hostfile.\n  fix: pass the hostfile itself, e.g. hostfiles/gaudi_2x8.txt",
                            path=shown) from None
    except PermissionError:
        raise HostfileError(f"{shown}: hostfile is not readable (permission denied).\n  fix: chmod a+r the file or copy it somewhere readable",
                            path=shown) from None
    except OSError as e:
        raise HostfileError(f"{shown}: cannot read the hostfile: {e.strerror or e}.\n  fix: check the path", path=shown) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise HostfileError(
            f"{shown}:{lineno}:{col}: the hostfile is not UTF-8 text (byte 0x{data[e.start]:02x}).\n"
            "  fix: save it as plain UTF-8/ASCII text", path=shown, line=lineno, column=col) from None


def parse_hostfile(path_or_text: str | os.PathLike, expected_slots: int | None = None) -> list[HostEntry]:
    """Parse a hostfile into `HostEntry(host, slots, line)` in file order (first = master).

    `path_or_text`: a `pathlib.Path` (or other PathLike) is read as a file; a `str` containing a
    newline is parsed as hostfile text; any other `str` is a file path (use `parse_hostfile_text`
    to parse a one-line text unambiguously). `expected_slots`: the cards per node the launcher
    asks for; every host's slots must equal it. Raises `HostfileError`.
    """
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return parse_hostfile_text(path_or_text, expected_slots, name="<hostfile text>")
    return parse_hostfile_text(_read(path_or_text), expected_slots, name=os.fspath(path_or_text))


def validate_hostfile_cli(path: str | os.PathLike, cards: int | None = None) -> dict:
    """Validate a hostfile for `cards` cards per node; return a JSON-able summary:
    `{"hostfile", "hosts", "slots", "nodes", "slots_per_node", "world_size", "master_addr"}`.
    `slots_per_node` is None when nodes differ (only possible when `cards` is None)."""
    entries = parse_hostfile(path, expected_slots=cards)
    slots = [e.slots for e in entries]
    return {
        "hostfile": os.fspath(path),
        "hosts": [e.host for e in entries],
        "slots": slots,
        "nodes": len(entries),
        "slots_per_node": slots[0] if len(set(slots)) == 1 else None,
        "world_size": sum(slots),
        "master_addr": entries[0].host,
        "entries": [asdict(e) for e in entries],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.command.hostfile", description="Validate a `host slots=N` hostfile.")
    p.add_argument("hostfile")
    p.add_argument("--cards", type=int, default=None, help="cards per node every line must have")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        s = validate_hostfile_cli(a.hostfile, a.cards)
    except HostfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(s, indent=2))
    else:
        per = s["slots_per_node"] if s["slots_per_node"] is not None else "/".join(map(str, s["slots"]))
        print(f"{s['hostfile']}: OK, {s['nodes']} node(s) x {per} slots = world size {s['world_size']}; "
              f"master: {s['master_addr']}")
        for e in s["entries"]:
            print(f"  line {e['line']}: {e['host']} slots={e['slots']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
