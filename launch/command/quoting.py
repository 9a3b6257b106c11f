"""Safe quoting for everything the launcher hands to a shell.

Three kinds of shell sit between `launch train` and a rank:

1. **Our own `command.sh`**, run with bash. Every word is passed through `shlex.quote`, which
   is exact for bash *except* for strings that no single-quoted word should carry: control
   characters (newline, CR, NUL, ESC, ...). Those are refused, naming the argument, because a
   newline inside a quoted argument is almost always an injection attempt or a paste error,
   and it breaks the one-line logs and `--dry-run` output.

2. **Shells we do not control that re-split our words.** optimum-habana's `gaudi_spawn.py`
   joins its argv with spaces (wrapping a word that contains a space in double quotes) and
   `DistributedRunner.run()` executes the result with `subprocess.Popen(shell=True,
   executable="/bin/bash")`. DeepSpeed's PDSH runner does the same on every remote node: it
   wraps a user argument that contains a space in double quotes (escaping only `"`) and sends
   the line to the remote shell. Inside double quotes `$`, backticks and `\\` stay live, and
   outside them every metacharacter is live. Pre-quoting cannot help (the wrapper would add a
   second layer of quotes that reach the program), so a word that crosses one of these shells
   must consist of characters that mean nothing to it: `RESHELL_SAFE_CHARS` (and no `%` on the
   PDSH path, where pdsh substitutes `%n`, `%h`, ...). Anything else is refused with the
   argument's position and the first offending character.

3. **`.deepspeed_env`**: DeepSpeed's runner reads `NAME=value` lines, strips the value and, if
   it has a character outside `[\\w@%+=:,./-]`, wraps it in double quotes before writing
   `export NAME="value";` into the remote pdsh command. So values must not contain `$`,
   backticks, `"`, `\\`, `!`, `%`, newlines or other control characters (see
   `check_deepspeed_env_value`).

Nothing here imports torch or deepspeed.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from collections.abc import Iterable, Sequence

__all__ = [
    "QuotingError",
    "RESHELL_SAFE_CHARS",
    "PDSH_SAFE_CHARS",
    "describe_char",
    "find_control_char",
    "check_no_control",
    "quote",
    "quote_argv",
    "check_reshell_safe",
    "check_env_name",
    "check_deepspeed_env_value",
]


class QuotingError(ValueError):
    """A string cannot be passed safely to a shell. The message names the argument."""


# C0 controls (incl. TAB, LF, CR, NUL, ESC), DEL, C1 controls, and the Unicode line and
# paragraph separators (which Python's str.splitlines and many terminals treat as newlines).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Characters that mean nothing to bash inside or outside double quotes, and that neither
# gaudi_spawn's nor DeepSpeed-PDSH's re-joining treats specially. Space is allowed: both
# wrappers put a word containing a space inside double quotes, where a space is literal.
RESHELL_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./- ")
# pdsh replaces `%h`, `%u`, `%n` in the remote command (DeepSpeed relies on `--node_rank=%n`).
PDSH_SAFE_CHARS = RESHELL_SAFE_CHARS - {"%"}

# Values in `.deepspeed_env` end up as `export NAME="value";` on each node (see module doc).
_DS_ENV_UNSAFE = frozenset('$`"\\!%')

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def describe_char(ch: str) -> str:
    """`';' (U+003B SEMICOLON)`: unambiguous even for invisible characters."""
    name = unicodedata.name(ch, "")
    if not name:
        name = {"\n": "LINE FEED", "\r": "CARRIAGE RETURN", "\t": "TAB", "\x00": "NUL", "\x1b": "ESCAPE"}.get(
            ch, "control character"
        )
    shown = repr(ch)
    return f"{shown} (U+{ord(ch):04X} {name})"


def find_control_char(value: str) -> int | None:
    """Index of the first control character in `value`, or None."""
    m = _CONTROL_RE.search(value)
    return None if m is None else m.start()


def _excerpt(value: str, limit: int = 80) -> str:
    """repr() of the value, shortened: safe to print (no raw control characters)."""
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return repr(value)


def check_no_control(value: str, what: str, exc: type[Exception] = QuotingError) -> str:
    """Return `value` if it has no control characters; otherwise raise `exc` naming `what`."""
    if not isinstance(value, str):
        raise exc(f"{what} must be a string, got {type(value).__name__} {value!r}")
    i = find_control_char(value)
    if i is not None:
        raise exc(
            f"{what} {_excerpt(value)} contains {describe_char(value[i])} at position {i + 1}. "
            "Control characters (newlines, carriage returns, tabs, NUL, escape sequences) cannot be "
            "passed safely through a shell script or a log line. Fix: remove the character; if the "
            "value really needs one, put it in a file and pass the file's path."
        )
    return value


def quote(value: str, what: str, exc: type[Exception] = QuotingError) -> str:
    """`shlex.quote(value)` after refusing control characters (which would be quoted correctly
    by bash but break every line-oriented consumer: logs, dry-run output, pdsh)."""
    return shlex.quote(check_no_control(value, what, exc))


def quote_argv(argv: Sequence[str], what: str = "argument", exc: type[Exception] = QuotingError) -> str:
    """One shell line from an argv, every word quoted. Error messages say `what #i`."""
    return " ".join(quote(a, f"{what} #{i} of the command", exc) for i, a in enumerate(argv))


def check_reshell_safe(
    value: str,
    what: str,
    via: str,
    allowed: Iterable[str] = RESHELL_SAFE_CHARS,
    exc: type[Exception] = QuotingError,
) -> str:
    """Refuse a word that a foreign shell (`via`, e.g. "gaudi_spawn.py (DistributedRunner runs
    it with bash)") would re-interpret. Allowed: letters, digits, `_@%+=:,./-` and space."""
    check_no_control(value, what, exc)
    allowed = frozenset(allowed)
    if value == "":
        raise exc(
            f"{what} is an empty string; {via} joins words with spaces, so an empty word would "
            "vanish and shift every argument after it. Fix: drop it or give it a value."
        )
    for i, ch in enumerate(value):
        if ch not in allowed:
            shown = "".join(sorted(allowed - {" "}))
            raise exc(
                f"{what} {_excerpt(value)} contains {describe_char(ch)} at position {i + 1}, which "
                f"{via} would hand to a shell unquoted, so it cannot be passed through safely. "
                f"Allowed there: letters, digits, spaces and {shown!r}. Fix: rename the path or "
                "value, or put the option in a file (e.g. a --config recipe) and pass its path."
            )
    return value


def check_env_name(name: str, what: str = "environment variable name", exc: type[Exception] = QuotingError) -> str:
    if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
        raise exc(
            f"{what} {name!r} is not a valid environment variable name. Expected letters, digits and "
            "'_', not starting with a digit (e.g. HCCL_SOCKET_IFNAME)."
        )
    return name


def check_deepspeed_env_value(name: str, value: str, exc: type[Exception] = QuotingError) -> str:
    """A value DeepSpeed's runner can carry to every node unchanged (see the module docstring).

    Error messages never print the value (it may be sensitive): they name the variable and the
    offending character only."""
    if not isinstance(value, str):
        raise exc(f".deepspeed_env value of {name} must be a string, got {type(value).__name__}")
    i = find_control_char(value)
    if i is not None:
        raise exc(
            f"The value of {name} contains {describe_char(value[i])} at position {i + 1}; "
            ".deepspeed_env holds one NAME=value per line, so it cannot carry newlines or other "
            "control characters. Fix: unset or correct the variable, or do not forward it."
        )
    if value != value.strip():
        raise exc(
            f"The value of {name} has leading or trailing whitespace, which DeepSpeed's runner strips "
            "when it reads .deepspeed_env, so the nodes would get a different value. Fix: trim it."
        )
    for j, ch in enumerate(value):
        if ch in _DS_ENV_UNSAFE or not ch.isprintable() or ord(ch) > 0x7E:
            raise exc(
                f"The value of {name} contains {describe_char(ch)} at position {j + 1}. DeepSpeed's "
                "PDSH runner forwards .deepspeed_env values as export NAME=\"value\" to a remote shell, "
                "where $, backticks, double quotes, backslashes, ! and % (pdsh substitutes %n) are "
                "live, and non-ASCII text is not portable. Fix: use a plain ASCII value, or set the "
                "variable on each node (e.g. in its container environment) instead of forwarding it."
            )
    return value
