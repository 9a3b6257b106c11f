"""`python -m launch.rank_args WORDS...` runs `python -m launch WORDS... <the words of $ARGS>`: how the Makefile's
training targets hand `ARGS` (extra dpo_dist.dpo flags) to the launcher.

Make variables reach commands as data, never as shell text. `make train-8x ARGS='--learning_rate 1e-6
--dataset_name "my data"'` leaves ARGS in the environment, and this splits it into words with Python's shlex: quotes
group words, and `$(...)`, backticks and `;` are plain characters. No shell ever reads the value.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping

from launch.cli import main as launch_main

ENV_NAME = "ARGS"
EXIT_USAGE = 2


def rank_words(value: str | None) -> list[str]:
    """The words of ARGS (shlex, POSIX rules); a ValueError naming ARGS and the fix when a quote is left open."""
    try:
        return shlex.split(value or "")
    except ValueError as e:
        raise ValueError(f"{ENV_NAME}={value!r} cannot be split into words ({e}). Fix: close every quote, e.g. "
                         f"{ENV_NAME}='--learning_rate 1e-6 --dataset_name \"my data\"'.") from None


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    try:
        words = rank_words(env.get(ENV_NAME))
    except ValueError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return launch_main(argv + words)


if __name__ == "__main__":
    sys.exit(main())
