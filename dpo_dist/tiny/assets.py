"""The on-demand cache of the built-in assets: versioned, built once under a lock, swapped in whole.

``ensure_tiny_assets()`` builds data, tokenizer and both tiny models into a temp folder under an
``flock``, writes a ``.complete`` marker (version, per-file sizes and sha256), then renames the folder
into place, so that every rank of a distributed job may call it at once. ``ensure_bench_assets()``
builds the larger, long-tailed variant used by the padding/bucketing benchmark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dpo_dist.data.chat_templates import BUILTIN_TEMPLATES, TEMPLATE_TOKENS
from dpo_dist.tiny.formats import FORMATS, write_format_dataset
from dpo_dist.tiny.models import ALL_FAMILIES, FAMILIES, TWIN_FAMILIES, build_tiny_model
from dpo_dist.tiny.preferences import read_jsonl, write_preference_dataset
from dpo_dist.tiny.tokenizer import CHAT_TOKENS, train_tokenizer
from dpo_dist.util.atomic import replace_folder, write_json_atomic
from dpo_dist.util.paths import cache_root

logger = logging.getLogger(__name__)

# v2: chat templates per family, turn-marker tokens, the data in every format; v3: the Qwen2 and Mixtral twins (the
# v2 files are unchanged, byte for byte)
TINY_VERSION = "tiny-v3"
BENCH_VERSION = "bench-v1"
COMPLETE_MARKER = ".complete"
BUILDS_LOG_SUFFIX = ".builds.log"
# The chat template each tiny model folder carries (dpo_dist.data.chat_templates.BUILTIN_TEMPLATES).
# Mixtral reuses llama3's (its own [INST] template is not built in); Qwen2 carries its own ChatML template, whose turn
# markers its folder's tokenizer adds as special tokens (ids 1024, 1025), so the shared tokenizer stays as it was.
FAMILY_TEMPLATES = {"llama": "llama3", "gemma3": "gemma3", "qwen2": "qwen2", "mixtral": "llama3"}


@dataclasses.dataclass(frozen=True)
class TinyAssets:
    """Paths of the built embedded default (see ``ensure_tiny_assets``)."""

    root: Path
    data_dir: Path        # train.jsonl + test.jsonl (hh-rlhf)
    tokenizer_dir: Path
    llama_dir: Path       # HF folder: config, safetensors, generation config, tokenizer
    gemma3_dir: Path

    def model_dir(self, family: str) -> Path:
        """The model folder of ``family``: llama, gemma3, or (tiny assets only) the qwen2 / mixtral twins."""
        if family not in ALL_FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {ALL_FAMILIES}")
        return self.root / family

    @property
    def train_file(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def test_file(self) -> Path:
        return self.data_dir / "test.jsonl"

    def format_dir(self, fmt: str) -> Path:
        """The built-in data in format ``fmt`` (dpo_dist.tiny.formats.FORMATS; ``hh`` is ``data_dir``)."""
        if fmt == "hh":
            return self.data_dir
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {('hh', *FORMATS)}")
        return self.root / f"data-{fmt}"

    def to_dict(self) -> dict[str, str]:
        d = {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.update(train_file=str(self.train_file), test_file=str(self.test_file))
        d.update({f"data_{fmt}_dir": str(self.format_dir(fmt)) for fmt in FORMATS if self.format_dir(fmt).is_dir()})
        d.update({f"{f}_dir": str(self.model_dir(f)) for f in TWIN_FAMILIES if self.model_dir(f).is_dir()})
        return d


@dataclasses.dataclass(frozen=True)
class BenchAssets(TinyAssets):
    """Same layout as ``TinyAssets``, with long-tailed data and ~26M-parameter models."""


def default_cache_dir() -> Path:
    return cache_root()


def _assets(cls: type[TinyAssets], root: Path) -> TinyAssets:
    return cls(root=root, data_dir=root / "data", tokenizer_dir=root / "tokenizer",
               llama_dir=root / "llama", gemma3_dir=root / "gemma3")


def _manifest(root: Path) -> dict[str, list]:
    files: dict[str, list] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != COMPLETE_MARKER:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            files[p.relative_to(root).as_posix()] = [p.stat().st_size, h.hexdigest()]
    return files


def _write_marker(root: Path, version: str, seed: int, build_s: float) -> None:
    files = _manifest(root)
    content = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    marker = {"version": version, "seed": seed, "content_sha256": content, "files": files,
              "build_seconds": round(build_s, 2), "built_by": f"{socket.gethostname()}:{os.getpid()}"}
    write_json_atomic(root / COMPLETE_MARKER, marker, indent=1, sort_keys=True)


def read_marker(root: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(root) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def verify_cache(root: str | os.PathLike) -> bool:
    """Deep check: recompute every file's sha256 and compare with the ``.complete`` marker."""
    root = Path(root)
    marker = read_marker(root)
    return bool(marker) and _manifest(root) == marker.get("files")


def _make_readable(root: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes 0600: open the cache up to the umask."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _is_complete(root: Path, version: str) -> bool:
    """Cheap check: marker of this version, every listed file present with its size."""
    marker = read_marker(root)
    if not marker or marker.get("version") != version:
        return False
    try:
        return all((root / rel).stat().st_size == size for rel, (size, _) in marker["files"].items())
    except (OSError, KeyError, TypeError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks until the builder is done
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _ensure(version: str, builder: Callable[[Path, int], None], cache_dir: str | os.PathLike | None,
            force: bool, seed: int) -> Path:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / version
    if not force and _is_complete(root, version):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{version}.lock"):
        # Re-check under the lock: another rank may have built it while we waited.
        if not force and _is_complete(root, version):
            return root
        # We hold the lock, so any temp or moved-aside folder left here belongs to a builder that died.
        for stale in [*cache.glob(f".{version}.tmp-*"), *cache.glob(f".{version}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=cache))
        try:
            builder(tmp, seed)
            _make_readable(tmp)
            _write_marker(tmp, version, seed, time.time() - t0)
            replace_folder(tmp, root)  # a stale, half-built or forced old copy is moved aside, then removed
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        dt = time.time() - t0
        with open(cache / f".{version}{BUILDS_LOG_SUFFIX}", "a") as log:
            log.write(json.dumps({"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                                  "seconds": round(dt, 2)}) + "\n")
        logger.info("built %s in %.1fs at %s", version, dt, root)
        return root


def _build_family_dirs(tmp: Path, tokenizer, size: str, seed: int, *, family_templates: bool = False) -> None:
    """The shared tokenizer folder (hh template) and one model folder per family; with ``family_templates`` each
    model folder's tokenizer carries its family's chat template (FAMILY_TEMPLATES)."""
    tokenizer.save_pretrained(tmp / "tokenizer")
    shared = tokenizer.chat_template
    for family in FAMILIES:
        model = build_tiny_model(family, tokenizer, size=size, seed=seed)
        model.save_pretrained(tmp / family, safe_serialization=True)
        if family_templates:
            tokenizer.chat_template = BUILTIN_TEMPLATES[FAMILY_TEMPLATES[family]]
        tokenizer.save_pretrained(tmp / family)
        tokenizer.chat_template = shared
        del model


def _build_twin_dirs(tmp: Path, seed: int) -> None:
    """The Qwen2 and Mixtral twins, each with the shared tokenizer (reloaded from ``tmp/tokenizer``) and its
    family's chat template; Qwen2's tokenizer gains the ChatML turn markers as special tokens."""
    from transformers import AutoTokenizer  # deferred: transformers

    for family in TWIN_FAMILIES:
        tok = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
        name = FAMILY_TEMPLATES[family]
        extra = [t for t in TEMPLATE_TOKENS[name] if t not in tok.get_vocab()]
        if extra:
            tok.add_special_tokens({"additional_special_tokens": [*tok.additional_special_tokens, *extra]})
        tok.chat_template = BUILTIN_TEMPLATES[name]
        model = build_tiny_model(family, tok, size="tiny", seed=seed)
        model.save_pretrained(tmp / family, safe_serialization=True)
        tok.save_pretrained(tmp / family)
        del model


def _build_tiny(tmp: Path, seed: int) -> None:
    paths = write_preference_dataset(tmp / "data", n_train=2000, n_test=200, seed=seed)
    for fmt in FORMATS:
        write_format_dataset(tmp / "data", tmp / f"data-{fmt}", fmt)
    texts = [t for r in read_jsonl(paths["train"]) for t in (r["chosen"], r["rejected"])]
    tok = train_tokenizer(texts, vocab_size=1024, model_max_length=1024, chat_tokens=CHAT_TOKENS)
    _build_family_dirs(tmp, tok, "tiny", seed, family_templates=True)
    _build_twin_dirs(tmp, seed)


def _build_bench(tmp: Path, seed: int) -> None:
    paths = write_preference_dataset(tmp / "data", n_train=2000, n_test=200, seed=seed, long_tail=True)
    texts = [t for r in read_jsonl(paths["train"]) for t in (r["chosen"], r["rejected"])]
    tok = train_tokenizer(texts, vocab_size=1024, model_max_length=2048)
    _build_family_dirs(tmp, tok, "bench", seed)


def ensure_tiny_assets(cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                       seed: int = 0) -> TinyAssets:
    """Build (once) and return the embedded default under ``<cache_dir>/tiny-v3`` (TINY_VERSION).

    ``cache_dir`` defaults to ``$DPO_DIST_CACHE`` or ``<repo root>/.cache/dpo-dist``.
    Contents: ``data/`` (2000 train + 200 test hh-rlhf rows), the same rows in every other format
    (``data-<format>/``, ``format_dir``), ``tokenizer/`` (byte-level BPE, vocab 1024, hh chat template),
    ``llama/`` and ``gemma3/`` (tiny random models with the tokenizer and their family's chat template,
    Llama-3-like and Gemma-3-like), ``qwen2/`` and ``mixtral/`` (the tiny Qwen2 and Mixtral twins, ChatML and
    Llama-3-like templates; ``model_dir(family)``), all loadable by ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``). Safe to call from every rank
    at once: one builds into a temp dir under an ``flock`` and renames it into place, the
    others wait; a ``.complete`` marker (version + content hash) guards against half-built
    caches. Gemma 3 should be loaded with ``attn_implementation="eager"`` for training (the
    attention implementation is not stored in ``config.json``).
    """
    version = TINY_VERSION if seed == 0 else f"{TINY_VERSION}-seed{seed}"
    return _assets(TinyAssets, _ensure(version, _build_tiny, cache_dir, force, seed))


def ensure_bench_assets(cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                        seed: int = 0) -> BenchAssets:
    """Like ``ensure_tiny_assets`` for the benchmark: long-tailed data, ``bench``-size models
    (~26M parameters, ~100 MB each on disk), 2048 positions. Built only when asked for."""
    version = BENCH_VERSION if seed == 0 else f"{BENCH_VERSION}-seed{seed}"
    return _assets(BenchAssets, _ensure(version, _build_bench, cache_dir, force, seed))
