"""The rank arguments after `--`, read by the launcher: one reader for every flag it looks at."""

from __future__ import annotations


def rank_flag(extra: list[str], flag: str) -> str | None:
    """The value of `flag` among the rank arguments after `--` (`--flag V` or `--flag=V`; the last one wins)."""
    value = None
    for i, word in enumerate(extra):
        name, eq, rest = word.partition("=")
        if name == flag:
            value = rest if eq else (extra[i + 1] if i + 1 < len(extra) else "")
    return value
