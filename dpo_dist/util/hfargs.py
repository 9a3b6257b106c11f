"""`HfArgumentParser` for the launcher without importing torch.

`transformers.HfArgumentParser` is the argument parser of every dpo-dist entry point (the TRL script style:
dataclasses → flags). Importing it through the `transformers` package pulls torch in (several seconds, and a
head node or laptop that only plans may not have torch at all). Its own module, `transformers/hf_argparser.py`,
needs only the standard library and yaml, so it is loaded here from its file, under a private name, when
transformers has not been imported yet. Where transformers is already loaded, or the file's imports change in
a later release, the package's own class is used.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from dpo_dist.util.errors import ArgumentError

_PRIVATE_NAME = "dpo_dist_hf_argparser"


def _standalone():
    if _PRIVATE_NAME in sys.modules:
        return sys.modules[_PRIVATE_NAME].HfArgumentParser
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_argparser.py"
    file_spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, path)
    if file_spec is None or file_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[_PRIVATE_NAME] = module
    try:
        file_spec.loader.exec_module(module)
    except ImportError:  # the file grew package-relative imports: use the package
        del sys.modules[_PRIVATE_NAME]
        return None
    return module.HfArgumentParser


def hf_argument_parser():
    """The `HfArgumentParser` class; torch-free unless transformers is already imported."""
    if "transformers" not in sys.modules:
        cls = _standalone()
        if cls is not None:
            return cls
    from transformers import HfArgumentParser  # heavy: transformers' package import loads torch

    return HfArgumentParser


def parse_dataclasses(dataclass_types, argv: list[str] | None, *, prog: str, description: str | None = None) -> tuple:
    """Parse `argv` into instances of `dataclass_types` (one dataclass or several). An unknown argument is an
    ArgumentError naming it (exit 2 at the entry points), not a traceback; `--help` and argparse's own usage errors
    exit as argparse does."""
    parser = hf_argument_parser()(dataclass_types, prog=prog, description=description)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise ArgumentError(f"unknown arguments {remaining}; run `{prog} --help` for the list.")
    return tuple(parsed)
