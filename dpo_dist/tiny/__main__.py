"""``python -m dpo_dist.tiny [--cache_dir D] [--force] [--bench]``: build the built-in assets and print their paths as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from dpo_dist.tiny.assets import ensure_bench_assets, ensure_tiny_assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_dist.tiny",
        description="Build the embedded default (tiny Llama/Gemma 3 and the Qwen2/Mixtral twins, tokenizer, hh-rlhf data and the same data in "
                    "every other format) and print its paths.")
    parser.add_argument("--cache_dir", default=None,
                        help="cache folder (default: $DPO_DIST_CACHE or <repo>/.cache/dpo-dist)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    parser.add_argument("--bench", action="store_true",
                        help="also build the benchmark assets (long-tailed data, ~26M-parameter models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out: dict[str, Any] = {"tiny": ensure_tiny_assets(args.cache_dir, force=args.force).to_dict()}
    if args.bench:
        out["bench"] = ensure_bench_assets(args.cache_dir, force=args.force).to_dict()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
