"""Logging for ranks and tools: rank-prefixed, quiet on non-zero ranks, secrets redacted."""

from __future__ import annotations

import logging
import os
import re
import sys

SECRET_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY")
SECRET_NAME_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")


def is_secret_name(name: str) -> bool:
    """HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD...: a name with a
    word (split at _ or -) that is or ends with a marker, singular or plural. TOKENIZERS_PARALLELISM is not."""
    words = re.split(r"[_\-]", name.upper())
    return name.upper() in SECRET_ENV_NAMES or any(w.rstrip("S").endswith(SECRET_NAME_MARKERS) for w in words if w)


def secret_values(environ=None) -> list[str]:
    """Values of secret-looking environment variables (HF_TOKEN and the like), longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_name(k) and len(v) >= 6}
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
