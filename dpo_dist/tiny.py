"""The embedded default: what dpo-dist trains on when no hub is reachable.

Everything here is generated locally and deterministically from a seed:

* a preference dataset in Anthropic/hh-rlhf format (``chosen``/``rejected``
  transcripts that share everything up to the last ``"\\n\\nAssistant:"``),
  written by templates over a dozen topics. The chosen answer is polite,
  helpful and on-topic; the rejected one is rude, dismissive or off-topic, so
  a tiny randomly initialised model learns the preference quickly (measured with
  trl 0.22 DPOTrainer, one CPU process, batch 8, beta 0.1: held-out reward accuracy
  1.0 after 50 steps at lr 5e-4 for tiny Llama, 0.99 after 50 steps at lr 1e-4 for tiny Gemma 3);
* a byte-level BPE tokenizer trained with ``tokenizers`` on that data;
* tiny Llama (``LlamaForCausalLM``) and Gemma 3 (``Gemma3ForCausalLM``,
  tied embeddings) checkpoints built from the real ``transformers`` config
  classes with random weights, saved as normal HF folders.

``ensure_tiny_assets()`` builds them on demand into a cache folder (nothing
large is committed), atomically and under a file lock, so that every rank of a
distributed job may call it at once. ``ensure_bench_assets()`` builds the
larger, long-tailed variant used by the padding/bucketing benchmark.

CLI: ``python -m dpo_dist.tiny [--cache_dir D] [--force] [--bench]`` builds
and prints the paths as JSON.

Parameter counts (vocab 1024, the size of the trained tokenizer):

=============  ============  =============
size           llama         gemma3
=============  ============  =============
``tiny``           205,120        139,904
``bench``       26,354,176     25,839,104
=============  ============  =============

(Llama keeps an untied ``lm_head`` like Llama 2/3 7B/8B; Gemma 3 ties it to the
embedding, so it counts once.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from dpo_dist.util.paths import cache_root

if TYPE_CHECKING:  # heavy imports stay lazy: the data side needs neither torch nor transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

ASSISTANT_TAG = "\n\nAssistant:"
HUMAN_TAG = "\n\nHuman:"

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<bos>", "<eos>", "<pad>", "<unk>"
# Order fixes the ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]

FAMILIES = ("llama", "gemma3")
SIZES = ("tiny", "bench")

TINY_VERSION = "tiny-v1"
BENCH_VERSION = "bench-v1"
COMPLETE_MARKER = ".complete"
BUILDS_LOG_SUFFIX = ".builds.log"

# hh-rlhf style chat template, so that chat-style callers render the same format
# the models are trained on (plain-string DPO data never uses it).
HH_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)

# --------------------------------------------------------------------------------------
# 1. Preference data
# --------------------------------------------------------------------------------------

# Each topic: slot entities, question templates (with {x}) and helpful, on-topic steps.
TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "entities": ["banana bread", "vegetable soup", "fried rice", "pancakes", "lasagna",
                     "chicken curry", "tomato sauce", "pizza dough", "omelettes", "lentil stew"],
        "questions": ["How do I make {x}?", "What is a simple recipe for {x}?",
                      "Can you help me cook {x} for dinner tonight?", "What do I need to make good {x}?",
                      "My {x} always turns out bland. How can I fix it?"],
        "steps": ["Gather all the ingredients for {x} before you start cooking.",
                  "Heat the pan over medium heat and add a little oil.",
                  "Season {x} with salt and taste it as you go.",
                  "Follow the recipe closely the first time, then adjust it to your taste.",
                  "Let {x} rest for a few minutes before serving.",
                  "Chop the vegetables into even pieces so they cook at the same rate.",
                  "Use fresh ingredients, because they make {x} taste much better.",
                  "Preheat the oven and check {x} a few minutes before the timer ends."],
    },
    "travel": {
        "entities": ["Japan", "Paris", "Iceland", "New York", "Mexico City", "Rome",
                     "a national park", "the mountains", "Lisbon", "Seoul"],
        "questions": ["How should I plan a trip to {x}?", "What should I pack for a week in {x}?",
                      "Is {x} a good place to visit in the spring?",
                      "How can I save money when traveling to {x}?", "What are the best things to do in {x}?"],
        "steps": ["Book your flight and hotel for {x} a few weeks early to get better prices.",
                  "Check the weather in {x} before you pack.",
                  "Make a short list of the places you most want to see.",
                  "Keep a copy of your passport and tickets on your phone.",
                  "Use public transport to get around, because it is cheap and fast.",
                  "Learn a few local phrases before your trip to {x}.",
                  "Leave some free time in your plan so the trip does not feel rushed.",
                  "Buy travel insurance in case your plans change."],
    },
    "programming": {
        "entities": ["Python", "JavaScript", "a sorting function", "a web server", "unit tests",
                     "a SQL query", "a REST API", "git branches", "a memory leak", "a recursive function"],
        "questions": ["How do I get started with {x}?", "Can you explain how to debug {x}?",
                      "What is the best way to learn about {x}?",
                      "I am stuck on {x} in my project. What should I do?",
                      "How can I write cleaner code for {x}?"],
        "steps": ["Start with a small example of {x} and run it often.",
                  "Read the error message carefully, because it usually points to the line with the bug.",
                  "Write a unit test for each function so you notice when something breaks.",
                  "Use print statements or a debugger to check the value of each variable.",
                  "Split the code for {x} into small functions with clear names.",
                  "Read the official documentation and try the examples yourself.",
                  "Commit your code to version control before you make big changes.",
                  "Search the exact error message online, because others have often solved it."],
    },
    "health": {
        "entities": ["poor sleep", "a headache", "back pain", "stress at work", "a cold",
                     "drinking more water", "healthy eating", "seasonal allergies", "bad posture", "eye strain"],
        "questions": ["Do you have any advice about {x}?", "What can I do about {x}?",
                      "How should I deal with {x}?", "What are some tips for {x}?",
                      "I have been struggling with {x} lately. Any advice?"],
        "steps": ["Try to keep a regular daily routine, which helps with {x}.",
                  "Drink plenty of water and eat balanced meals.",
                  "Get at least seven hours of sleep each night.",
                  "Take short breaks and stretch during the day.",
                  "Take a short walk outside every day, because light exercise helps.",
                  "If {x} does not improve after a week, please talk to a doctor.",
                  "Keep a simple diary to notice what makes {x} better or worse.",
                  "Limit caffeine in the afternoon and screens before bed."],
    },
    "finance": {
        "entities": ["a monthly budget", "an emergency fund", "credit card debt", "retirement savings",
                     "a car loan", "filing my taxes", "saving for a house", "student loans",
                     "index funds", "grocery spending"],
        "questions": ["Can you give me advice about {x}?", "What is a good plan for {x}?",
                      "How should I handle {x}?", "I am worried about {x}. Where do I begin?",
                      "What are the first steps for {x}?"],
        "steps": ["Write down your income and every expense for one month.",
                  "Set a clear goal for {x} and a date to reach it.",
                  "Pay off the debt with the highest interest rate first.",
                  "Set up an automatic transfer to savings on payday.",
                  "Keep three to six months of expenses in an emergency fund.",
                  "Compare a few options before you sign anything about {x}.",
                  "Review your plan for {x} once a month and adjust it.",
                  "Avoid new debt while you are working on {x}."],
    },
    "gardening": {
        "entities": ["tomatoes", "roses", "herbs", "a vegetable garden", "houseplants", "strawberries",
                     "a lawn", "succulents", "peppers", "sunflowers"],
        "questions": ["How do I take care of {x}?", "Can you give me tips for growing {x}?",
                      "What should I know before planting {x}?", "Any advice on keeping {x} healthy?",
                      "When is the best time to plant {x}?"],
        "steps": ["Choose a spot for {x} that gets at least six hours of sunlight.",
                  "Water deeply but not too often, and let the soil dry a little between waterings.",
                  "Use good soil with plenty of compost.",
                  "Check the leaves every week for pests.",
                  "Add a layer of mulch to keep the soil moist.",
                  "Feed {x} with a gentle fertilizer once a month.",
                  "Remove dead leaves so the plants stay healthy.",
                  "Leave enough space between plants so air can move around them."],
    },
    "fitness": {
        "entities": ["running", "a home workout", "strength training", "yoga", "swimming", "a marathon",
                     "push ups", "cycling", "stretching", "losing weight"],
        "questions": ["How do I get started with {x}?", "What is a good beginner plan for {x}?",
                      "Can you give me tips for {x}?", "How often should I practice {x}?",
                      "I want to get better at {x}. Where do I start?"],
        "steps": ["Start slowly with {x} and increase the effort a little each week.",
                  "Warm up for five to ten minutes before you exercise.",
                  "Rest at least one day a week so your muscles can recover.",
                  "Focus on good form before you add more weight or speed.",
                  "Track your workouts in a notebook to see your progress.",
                  "Drink water and eat some protein after training.",
                  "Set a small weekly goal for {x} that you can actually reach.",
                  "Stretch gently after each session."],
    },
    "pets": {
        "entities": ["a new puppy", "an older cat", "a rabbit", "a parrot", "a goldfish", "a rescue dog",
                     "a kitten", "a hamster", "a shy cat", "a large dog"],
        "questions": ["How do I take care of {x}?", "What should I feed {x}?", "How can I train {x}?",
                      "Any tips for living with {x}?", "I just adopted {x}. What should I do first?"],
        "steps": ["Give {x} a quiet place to rest while it settles in.",
                  "Feed your pet at the same times every day.",
                  "Take your pet to a vet for a checkup in the first few weeks.",
                  "Use small treats and praise to reward good behavior.",
                  "Keep fresh water available at all times.",
                  "Be patient, because {x} may need a few weeks to trust you.",
                  "Play with your pet every day so it gets enough exercise.",
                  "Remove anything dangerous from the floor, such as cables and small objects."],
    },
    "home repair": {
        "entities": ["a leaky faucet", "a squeaky door", "a hole in the wall", "a clogged drain",
                     "a running toilet", "peeling paint", "a loose cabinet handle", "a drafty window",
                     "a broken tile", "a stuck window"],
        "questions": ["How do I fix {x}?", "What tools do I need to repair {x}?", "Can I fix {x} myself?",
                      "What is the easiest way to deal with {x}?",
                      "There is {x} in my apartment. What should I do?"],
        "steps": ["Turn off the water or power before you work on {x}.",
                  "Take a photo before you take anything apart so you remember how it goes back.",
                  "Get the basic tools ready: a screwdriver, pliers, and a flashlight.",
                  "Buy the replacement part at a hardware store and bring the old one to match it.",
                  "Work slowly and keep the small parts in a cup.",
                  "Watch a short video about {x} to see the steps first.",
                  "If the problem with {x} is bigger than expected, call a professional.",
                  "Clean the area well before you apply anything new."],
    },
    "music": {
        "entities": ["the guitar", "the piano", "singing", "the drums", "the violin", "music theory",
                     "songwriting", "the ukulele", "reading sheet music", "playing by ear"],
        "questions": ["How do I learn {x}?", "What is a good practice routine for {x}?",
                      "Can you give me tips for {x} as a beginner?",
                      "I am an adult beginner. Is it too late to learn {x}?", "How can I get better at {x}?"],
        "steps": ["Practice {x} for fifteen minutes every day instead of once a week for hours.",
                  "Learn a few simple songs you enjoy, because that keeps you motivated.",
                  "Use a metronome to keep a steady tempo.",
                  "Record yourself and listen back to find what to improve.",
                  "Find a teacher or an online course for {x} to build good habits early.",
                  "Warm up your hands and voice before you practice.",
                  "Break a hard passage into small pieces and play it slowly.",
                  "Be patient, since progress with {x} takes a few months."],
    },
    "studying": {
        "entities": ["a math exam", "a history test", "a Spanish quiz", "a chemistry final", "an essay deadline",
                     "a job interview", "the driving test", "a presentation", "a statistics class",
                     "a reading test"],
        "questions": ["How should I prepare for {x}?", "What is the best way to study for {x}?",
                      "Can you help me get ready for {x}?",
                      "I only have a week left before {x}. What should I do?", "Do you have study tips for {x}?"],
        "steps": ["Make a study schedule for {x} and stick to it.",
                  "Study in short sessions of twenty-five minutes with short breaks.",
                  "Test yourself with practice questions instead of only rereading notes.",
                  "Explain the main ideas out loud as if you were teaching a friend.",
                  "Start with the topics you find hardest.",
                  "Get a good night of sleep before {x}.",
                  "Ask your teacher or classmates about anything you do not understand.",
                  "Review your notes for {x} a little every day."],
    },
    "cars": {
        "entities": ["an oil change", "a flat tire", "a dead battery", "buying a used car",
                     "strange brake noises", "winter driving", "a check engine light", "washing my car",
                     "low tire pressure", "a long road trip"],
        "questions": ["What should I know about {x}?", "Can you give me advice about {x}?",
                      "How do I handle {x}?", "I have never dealt with {x} before. Where do I start?",
                      "What is the right way to deal with {x}?"],
        "steps": ["Read the owner manual, because it explains {x} for your model.",
                  "Check the tire pressure and oil level once a month.",
                  "Park somewhere safe and turn on your hazard lights before you start.",
                  "Keep a small emergency kit in the trunk.",
                  "Ask a trusted mechanic to take a look if you are not sure.",
                  "Write down the date and mileage every time you do maintenance.",
                  "Compare prices from two or three shops before you pay for repairs.",
                  "Drive gently for the first few miles while the engine warms up."],
    },
}
TOPIC_NAMES = list(TOPICS)  # fixed order: determinism never depends on set/dict hashing

HELPFUL_OPENERS = [
    "Sure! Here are a few steps for {x}.",
    "Happy to help with {x}. Here is what I would do.",
    "Great question. Here are a few steps that usually work.",
    "Of course. Here is a simple way to approach {x}.",
    "Good question! Here is a short guide to {x}.",
    "Sure, I can help with that. Here are a few tips.",
]
HELPFUL_CLOSERS = [
    "I hope this helps!",
    "I hope this helps. Let me know if you have more questions.",
    "Good luck, and feel free to ask if anything is unclear.",
    "Let me know how it goes. I hope this helps!",
    "Have fun with {x}, and I hope this helps!",
]
HELPFUL_FILLERS = [  # topic-neutral helpful sentences, used by long answers
    "Take your time with each step.",
    "It is normal to make a few mistakes at first.",
    "Small steady progress is better than one big effort.",
    "Write down what works for you so you can repeat it.",
    "If something is unclear, it is fine to ask for help.",
    "Try one change at a time so you can see what makes the difference.",
    "Be kind to yourself while you learn.",
]
RUDE_LINES = [
    "Figure it out yourself.",
    "Whatever. Ask someone else.",
    "Why are you asking me? Look it up.",
    "That is a stupid question.",
    "I don't care about {x}.",
    "Not my problem.",
    "Ugh, this again? Figure it out.",
    "Do it yourself, I am busy.",
    "Nobody cares. Go away.",
    "Ask someone who actually cares.",
    "Stop bothering me with {x}.",
    "Seriously? Use your brain.",
]
DISMISSIVE_PREFIXES = [
    "Whatever.",
    "Ugh, fine.",
    "Not my problem, but anyway.",
    "I don't care about {x}. Anyway,",
    "Boring.",
    "Who cares.",
    "Meh.",
]
LAZY_LINES = [
    "I don't know and I don't care.",
    "Maybe just google it or something.",
    "No idea. Stop asking me about {x}.",
    "Can't be bothered. Try a search engine.",
    "Dunno. Not worth my time.",
]
FOLLOW_UPS = ["Thanks! {q}", "That makes sense. {q}", "One more thing. {q}", "Great, thank you. {q}",
              "Okay, got it. {q}"]
HUMAN_CONTEXT = [  # extra background in a human turn (long-tail mode)
    "I have tried a few things already, but nothing worked well.",
    "My friend suggested a couple of ideas, but I am not sure they are right.",
    "I am a complete beginner, so please keep it simple.",
    "I do not have a lot of time or money for this.",
    "I have been thinking about this for a few weeks now.",
    "Last time I tried, it went badly and I gave up.",
    "I read a few articles online, but they all said different things.",
    "It matters to me because my family is counting on me.",
]


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
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


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


# --------------------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str] | Iterator[str], vocab_size: int = 1024,
                    model_max_length: int = 1024) -> "PreTrainedTokenizerFast":
    """Byte-level BPE trained with ``tokenizers``; ``<bos>/<eos>/<pad>/<unk>`` are ids 1/2/0/3.

    No special token is added automatically (TRL tokenizes DPO prompts with
    ``add_special_tokens=False`` and appends ``<eos>`` itself); decoding is byte-exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the vocab, so no unk is ever produced
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: generate() rejects them
    )
    fast.chat_template = HH_CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------
# 3. Models
# --------------------------------------------------------------------------------------

_SHAPES = {
    # hidden, layers, heads, kv heads, head_dim, intermediate, max positions, gemma3 sliding window
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, max_position_embeddings=1024, sliding_window=256),
    "bench": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  head_dim=64, intermediate_size=1376, max_position_embeddings=2048, sliding_window=512),
}


def tiny_config(family: str, tokenizer: "PreTrainedTokenizerFast", size: str = "tiny"):
    """The ``LlamaConfig`` / ``Gemma3TextConfig`` for ``build_tiny_model`` (fp32, random init)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    shape = dict(_SHAPES[size])
    sliding_window = shape.pop("sliding_window")
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        attention_bias=False,
        attention_dropout=0.0,
        use_cache=True,
        torch_dtype="float32",
        **shape,
    )
    if family == "llama":
        # Llama 2/3 7B/8B layout: SiLU MLP, RoPE, untied lm_head.
        return transformers.LlamaConfig(
            hidden_act="silu", rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False,
            mlp_bias=False, **common)
    n = shape["num_hidden_layers"]
    # Gemma 3: 5 local (sliding) layers per global one; a 2-layer model keeps one of each.
    layer_types = (["sliding_attention", "full_attention"] if n < 6 else
                   ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)])
    return transformers.Gemma3TextConfig(
        hidden_activation="gelu_pytorch_tanh",
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling=None,
        query_pre_attn_scalar=shape["head_dim"],
        sliding_window=sliding_window,
        layer_types=layer_types,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        attn_implementation="eager",
        **common,
    )


def build_tiny_model(family: str, tokenizer: "PreTrainedTokenizerFast", size: str = "tiny",
                     seed: int = 0) -> "PreTrainedModel":
    """A randomly initialised ``LlamaForCausalLM`` or ``Gemma3ForCausalLM`` (fp32), seeded.

    ``tiny``: hidden 64, 2 layers, 4 heads (2 kv), head_dim 16, MLP 128, 1024 positions
    (llama 205,120 / gemma3 139,904 parameters with a 1024-token vocab).
    ``bench``: hidden 512, 8 layers, 8 heads, head_dim 64, MLP 1376, 2048 positions
    (llama 26,354,176 / gemma3 25,839,104 parameters with a 1024-token vocab).
    The caller's torch RNG state is left untouched.
    """
    import torch
    from transformers import GenerationConfig, Gemma3ForCausalLM, LlamaForCausalLM

    config = tiny_config(family, tokenizer, size)
    cls = LlamaForCausalLM if family == "llama" else Gemma3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32)
    if family == "gemma3":
        model.config._attn_implementation = "eager"
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    return model


def param_count(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------
# 4. On-demand cache: atomic, locked, versioned
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TinyAssets:
    """Paths of the built embedded default (see ``ensure_tiny_assets``)."""

    root: Path
    data_dir: Path        # train.jsonl + test.jsonl (hh-rlhf)
    tokenizer_dir: Path
    llama_dir: Path       # HF folder: config, safetensors, generation config, tokenizer
    gemma3_dir: Path

    def model_dir(self, family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
        return self.llama_dir if family == "llama" else self.gemma3_dir

    @property
    def train_file(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def test_file(self) -> Path:
        return self.data_dir / "test.jsonl"

    def to_dict(self) -> dict[str, str]:
        d = {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.update(train_file=str(self.train_file), test_file=str(self.test_file))
        return d


@dataclasses.dataclass(frozen=True)
class BenchAssets(TinyAssets):
    """Same layout as ``TinyAssets``, with long-tailed data and ~26M-parameter models."""


def default_cache_dir() -> Path:
    return cache_root()


def _assets(cls, root: Path):
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
    tmp = root / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    os.replace(tmp, root / COMPLETE_MARKER)


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
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks until the builder is done
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _ensure(version: str, builder, cache_dir, force: bool, seed: int) -> Path:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / version
    if not force and _is_complete(root, version):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{version}.lock"):
        # Re-check under the lock: another rank may have built it while we waited.
        if not force and _is_complete(root, version):
            return root
        # We hold the lock, so any temp dir left here belongs to a builder that died.
        for stale in cache.glob(f".{version}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=cache))
        try:
            builder(tmp, seed)
            _make_readable(tmp)
            _write_marker(tmp, version, seed, time.time() - t0)
            if root.exists():  # stale, half-built or forced: move aside, then swap in atomically
                old = cache / f".{version}.tmp-old-{os.getpid()}"
                os.rename(root, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        dt = time.time() - t0
        with open(cache / f".{version}{BUILDS_LOG_SUFFIX}", "a") as log:
            log.write(json.dumps({"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                                  "seconds": round(dt, 2)}) + "\n")
        logger.info("built %s in %.1fs at %s", version, dt, root)
        return root


def _build_family_dirs(tmp: Path, tokenizer, size: str, seed: int) -> None:
    tokenizer.save_pretrained(tmp / "tokenizer")
    for family in FAMILIES:
        model = build_tiny_model(family, tokenizer, size=size, seed=seed)
        model.save_pretrained(tmp / family, safe_serialization=True)
        tokenizer.save_pretrained(tmp / family)
        del model


def _build_tiny(tmp: Path, seed: int) -> None:
    paths = write_preference_dataset(tmp / "data", n_train=2000, n_test=200, seed=seed)
    texts = [t for r in read_jsonl(paths["train"]) for t in (r["chosen"], r["rejected"])]
    tok = train_tokenizer(texts, vocab_size=1024, model_max_length=1024)
    _build_family_dirs(tmp, tok, "tiny", seed)


def _build_bench(tmp: Path, seed: int) -> None:
    paths = write_preference_dataset(tmp / "data", n_train=2000, n_test=200, seed=seed, long_tail=True)
    texts = [t for r in read_jsonl(paths["train"]) for t in (r["chosen"], r["rejected"])]
    tok = train_tokenizer(texts, vocab_size=1024, model_max_length=2048)
    _build_family_dirs(tmp, tok, "bench", seed)


def ensure_tiny_assets(cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                       seed: int = 0) -> TinyAssets:
    """Build (once) and return the embedded default under ``<cache_dir>/tiny-v1``.

    ``cache_dir`` defaults to ``$DPO_DIST_CACHE`` or ``<repo root>/.cache/dpo-dist``.
    Contents: ``data/`` (2000 train + 200 test hh-rlhf rows), ``tokenizer/`` (byte-level BPE,
    vocab 1024), ``llama/`` and ``gemma3/`` (tiny random models with the tokenizer, loadable by
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``). Safe to call from every rank
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


# --------------------------------------------------------------------------------------
# 5. CLI
# --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_dist.tiny",
        description="Build the embedded default (tiny Llama/Gemma 3, tokenizer, hh-rlhf data) and print its paths.")
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
