"""Where dpo-dist keeps things on disk: the checkout's root and the cache folder (tiny assets, reference cache)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "DPO_DIST_CACHE"


def cache_root() -> Path:
    """$DPO_DIST_CACHE, else `.cache/dpo-dist` in the checkout."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "dpo-dist"
