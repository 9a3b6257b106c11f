"""Logging for ranks and tools: rank-prefixed, quiet on non-zero ranks, secrets redacted."""

from __future__ import annotations

import logging
import os
import re
import sys

SECRET_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY")
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY)", re.IGNORECASE)


def secret_values(environ=None) -> list[str]:
    """Values of secret-looking environment variables (HF_TOKEN and the like), longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if (k in SECRET_ENV_NAMES or _SECRET_NAME.search(k)) and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)


def redact(text: str, environ=None) -> str:
    for v in secret_values(environ):
        text = text.replace(v, "***")
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger once: rank 0 at `level`, other ranks at WARNING."""
    r = rank()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{r}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if r == 0 else logging.WARNING)
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_warning() if r == 0 else transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_warning() if r == 0 else datasets.utils.logging.set_verbosity_error()
        if r != 0:
            datasets.disable_progress_bars()
    except ImportError:
        pass
    return logging.getLogger("dpo_dist")
