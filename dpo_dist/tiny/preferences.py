"""Synthetic preference data in Anthropic/hh-rlhf format, generated deterministically from a seed.

``chosen``/``rejected`` transcripts share everything up to the last ``"\\n\\nAssistant:"``; they are
written by templates over a dozen topics. The chosen answer is polite, helpful and on-topic; the
rejected one is rude, dismissive or off-topic, so a tiny randomly initialised model learns the
preference quickly.

The sentences come from ``corpus.json`` next to this module:

* ``topics``: per topic, slot ``entities``, ``questions`` (with ``{x}`` for the entity) and
  helpful, on-topic ``steps``;
* ``helpful_openers`` / ``helpful_closers``: the frame of a chosen answer;
* ``helpful_fillers``: topic-neutral helpful sentences, used by long answers;
* ``rude_lines``, ``dismissive_prefixes``, ``lazy_lines``: the material of rejected answers;
* ``follow_ups``: how a later human turn opens (``{q}`` is the question);
* ``human_context``: extra background in a human turn (long-tail mode).

JSON keeps the order of every list and of the topics, so the rows depend on the seed alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any

from dpo_dist.data.preference import ASSISTANT_TAG
from dpo_dist.util.atomic import write_atomic

HUMAN_TAG = "\n\nHuman:"

_CORPUS: dict[str, Any] = json.loads(resources.files(__package__).joinpath("corpus.json").read_text(encoding="utf-8"))

TOPICS: dict[str, dict[str, list[str]]] = _CORPUS["topics"]
TOPIC_NAMES = list(TOPICS)  # fixed order: determinism never depends on set/dict hashing
HELPFUL_OPENERS: list[str] = _CORPUS["helpful_openers"]
HELPFUL_CLOSERS: list[str] = _CORPUS["helpful_closers"]
HELPFUL_FILLERS: list[str] = _CORPUS["helpful_fillers"]
RUDE_LINES: list[str] = _CORPUS["rude_lines"]
DISMISSIVE_PREFIXES: list[str] = _CORPUS["dismissive_prefixes"]
LAZY_LINES: list[str] = _CORPUS["lazy_lines"]
FOLLOW_UPS: list[str] = _CORPUS["follow_ups"]
HUMAN_CONTEXT: list[str] = _CORPUS["human_context"]


def _fill(template: str, x: str) -> str:
    out = template.replace("{x}", x)
    return out[0].upper() + out[1:] if out else out


def _draw_steps(rng: random.Random, topic: str, x: str, k: int, *, fillers: bool) -> list[str]:
    pool = TOPICS[topic]["steps"]
    if k <= len(pool):
        picks = rng.sample(pool, k)
    else:  # long answers: every step once, then topic-neutral helpful filler
        picks = rng.sample(pool, len(pool)) + [rng.choice(HELPFUL_FILLERS) for _ in range(k - len(pool))]
        rng.shuffle(picks)
    if fillers and k >= 3 and rng.random() < 0.5:
        picks.insert(rng.randrange(1, len(picks)), rng.choice(HELPFUL_FILLERS))
    return [_fill(s, x) for s in picks]


def _helpful_answer(rng: random.Random, topic: str, x: str, k: int, *, closer: bool = True) -> str:
    parts = [_fill(rng.choice(HELPFUL_OPENERS), x)]
    parts += _draw_steps(rng, topic, x, k, fillers=True)
    if closer:
        parts.append(_fill(rng.choice(HELPFUL_CLOSERS), x))
    return " ".join(parts)


def _rejected_answer(rng: random.Random, topic: str, x: str, k: int) -> str:
    """Rude, lazy, or off-topic-and-dismissive; ``k`` scales the off-topic length."""
    r = rng.random()
    if r < 0.4:  # rude
        lines = rng.sample(RUDE_LINES, 1 + (rng.random() < 0.5) + (k >= 4))
        return " ".join(_fill(s, x) for s in lines)
    if r < 0.8:  # off-topic, with a dismissive prefix
        other = rng.choice([t for t in TOPIC_NAMES if t != topic])
        y = rng.choice(TOPICS[other]["entities"])
        steps = _draw_steps(rng, other, y, max(1, k), fillers=False)
        return " ".join([_fill(rng.choice(DISMISSIVE_PREFIXES), x)] + steps)
    lines = rng.sample(LAZY_LINES, 1 + (rng.random() < 0.3))  # lazy non-answer
    if rng.random() < 0.5:
        lines.append(rng.choice(RUDE_LINES))
    return " ".join(_fill(s, x) for s in lines)


def _question(rng: random.Random, topic: str, x: str, n_context: int) -> str:
    q = _fill(rng.choice(TOPICS[topic]["questions"]), x)
    if n_context:
        ctx = rng.sample(HUMAN_CONTEXT, min(n_context, len(HUMAN_CONTEXT)))
        q = q + " " + " ".join(ctx) if rng.random() < 0.5 else " ".join(ctx) + " " + q
    return q


def _lognormal_int(rng: random.Random, mu: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(math.exp(rng.gauss(mu, sigma))))))


def _make_row(rng: random.Random, long_tail: bool) -> dict[str, str]:
    topic = rng.choice(TOPIC_NAMES)
    x = rng.choice(TOPICS[topic]["entities"])
    if long_tail:
        # hh-rlhf-like: most dialogues are one or two turns, a few are long chains.
        n_prev = 0 if rng.random() < 0.6 else min(1 + int(rng.expovariate(0.5)), 7)
        k_final = _lognormal_int(rng, 0.8, 0.75, 1, 16)
        k_rej = _lognormal_int(rng, 0.6, 0.75, 1, 14)
        n_ctx = _lognormal_int(rng, -0.7, 1.0, 0, 5) if rng.random() < 0.5 else 0
    else:
        n_prev = 1 if rng.random() < 0.2 else 0
        k_final = 1 if rng.random() < 0.85 else 2
        k_rej = rng.choice((1, 1, 1, 2))
        n_ctx = 0

    history = ""
    for i in range(n_prev):
        if long_tail or rng.random() < 0.5:
            t_prev = rng.choice(TOPIC_NAMES)
            y = rng.choice(TOPICS[t_prev]["entities"])
        else:  # same topic, possibly another entity
            t_prev, y = topic, rng.choice(TOPICS[topic]["entities"])
        n_ctx_prev = _lognormal_int(rng, -0.7, 1.0, 0, 3) if long_tail and rng.random() < 0.4 else 0
        k_prev = _lognormal_int(rng, 0.6, 0.75, 1, 12) if long_tail else 1
        q_prev = _question(rng, t_prev, y, n_ctx_prev)
        if i > 0:
            q_prev = rng.choice(FOLLOW_UPS).replace("{q}", q_prev)
        a_prev = _helpful_answer(rng, t_prev, y, k_prev, closer=long_tail and rng.random() < 0.5)
        history += f"{HUMAN_TAG} {q_prev}{ASSISTANT_TAG} {a_prev}"

    q = _question(rng, topic, x, n_ctx)
    if n_prev:
        q = rng.choice(FOLLOW_UPS).replace("{q}", q)
    prompt = f"{history}{HUMAN_TAG} {q}{ASSISTANT_TAG}"
    chosen = _helpful_answer(rng, topic, x, k_final, closer=long_tail or rng.random() < 0.7)
    rejected = _rejected_answer(rng, topic, x, k_rej)
    return {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}


def make_preference_rows(n: int, seed: int, *, long_tail: bool = False) -> list[dict[str, str]]:
    """``n`` distinct hh-rlhf rows ``{"chosen", "rejected"}``, deterministic in ``seed``.

    Both transcripts share everything up to the last ``"\\n\\nAssistant:"``; about 20% are
    multi-turn (earlier turns identical in both). Default rows are short (tiny tokenizer:
    median 68 / p90 123 / max 176 tokens for prompt + chosen). ``long_tail=True`` draws
    log-normal-ish, hh-rlhf-like lengths: ~40% multi-turn (up to 8 turns), longer answers
    and human turns (median 138 / p90 426 / max ~1190 tokens).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(int(seed) * 2 + int(bool(long_tail)))
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct rows")
        row = _make_row(rng, long_tail)
        key = (row["chosen"], row["rejected"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def split_hh(text: str) -> tuple[str, str]:
    """Split one hh-rlhf transcript into (prompt ending in ``"\\n\\nAssistant:"``, final answer)."""
    i = text.rindex(ASSISTANT_TAG) + len(ASSISTANT_TAG)
    return text[:i], text[i:]


def _test_seed(seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dpo-dist-test-split-{seed}".encode()).digest()[:4], "big")


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))


def write_preference_dataset(out_dir: str | os.PathLike, n_train: int = 2000, n_test: int = 200,
                             seed: int = 0, long_tail: bool = False) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``out_dir`` and return their paths.

    The test rows come from a seed derived from ``seed`` and are disjoint from the train rows
    (no identical (chosen, rejected) pair). The folder holds nothing else, so both
    ``datasets.load_dataset(out_dir)`` and ``load_dataset("json", data_files=...)`` give
    the splits ``train`` and ``test``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_preference_rows(n_train, seed, long_tail=long_tail)
    seen = {(r["chosen"], r["rejected"]) for r in train}
    pool = make_preference_rows(n_test + n_test // 2 + 50, _test_seed(seed), long_tail=long_tail)
    test = [r for r in pool if (r["chosen"], r["rejected"]) not in seen][:n_test]
    if len(test) < n_test:
        raise RuntimeError("could not draw enough held-out rows disjoint from train")
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["test"], test)
    return paths


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
