"""Length bucketing with static shapes: at most K sequence lengths, chosen to minimise padding.

Why: TRL pads each batch to its longest row (a new shape almost every step: recompiles on HPU),
``GaudiDPOTrainer`` pads everything to ``max_length`` (static, but mostly padding on long-tailed
data). Here every row is padded to one of K bucket lengths chosen from the data's own length
histogram, so there are at most K shapes and little padding.

- ``choose_buckets(lengths, k)``: exact dynamic programme over the sorted distinct lengths
  (O(K·m²) vectorised, m distinct lengths ≤ max_length): bucket lengths minimising the total
  padded length Σ bucket(ℓ)·count(ℓ). The largest length is always a bucket.
- ``BucketBatchSampler``: seeded, deterministic per (seed, epoch) for resume, distributed:
  every rank gets the same number of batches, rank r takes batches r, r+W, ...
- Rows: chosen and rejected rows of a pair are run as two forwards, each padded to its own
  bucket (``chosen_pad_to`` / ``rejected_pad_to`` in the batch, set by ``engine.EngineCollator``). One concatenated forward
  must pad the shorter (usually rejected) row to the longer one: on the bench data that alone
  is 14% padding, whatever the buckets. Right padding (attention 0) changes no log-prob.
- Packed (``--packing``, dpo_dist/model/packing.py): the 2b rows of a batch run as ONE row, padded
  once from its total to one of K bucket *totals* (``packed_pad_to``), chosen by the same DP on
  the totals of the batches ``PackedBatchSampler`` will form. Per-row buckets cannot go below
  ~12% padding on the bench data with 8 shapes; packed totals reach a few %.
- Shared prompt (``--share_prompt``, on with packing): a pair whose two rows keep their whole prompt runs it once
  in the packed row, ``prompt + chosen + rejected`` (dpo_dist/model/packing.py ``pack_pairs``).
  ``packed_pair_length`` is the one rule for a pair's tokens in a packed row; the sampler, the bucket
  totals, the collator and the planner's data measurement all take it from here.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import numpy as np


def choose_buckets(lengths: Sequence[int], k: int) -> list[int]:
    """At most ``k`` bucket lengths minimising Σ_i bucket(lengths[i]) (bucket = smallest ≥ length)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vals, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    m = len(vals)
    if m == 0:
        return []
    if m <= k:
        return [int(v) for v in vals]
    cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)  # cum[i] = count of vals[:i]
    inf = float("inf")
    # dp[j][i]: min cost covering vals[:i] with j buckets, the last bucket at vals[i-1].
    dp = np.full((k + 1, m + 1), inf)
    arg = np.zeros((k + 1, m + 1), dtype=np.int64)
    dp[0][0] = 0.0
    for j in range(1, k + 1):
        prev = dp[j - 1]
        for i in range(1, m + 1):
            # previous bucket ends at vals[t-1] for t < i; this one covers vals[t:i] at vals[i-1]
            cand = prev[:i] + vals[i - 1] * (cum[i] - cum[:i])
            t = int(np.argmin(cand))
            dp[j][i], arg[j][i] = cand[t], t
    j = int(np.argmin(dp[:, m]))
    out, i = [], m
    while j > 0 and i > 0:
        out.append(int(vals[i - 1]))
        i = int(arg[j][i])
        j -= 1
    return sorted(out)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket ≥ length (the largest bucket when the length exceeds all)."""
    i = bisect.bisect_left(buckets, length)
    return buckets[min(i, len(buckets) - 1)]


def padding_fraction(lengths: Sequence[int], buckets: Sequence[int]) -> float:
    """Padding / padded tokens when every row is padded to its bucket (lower bound, per row)."""
    real = sum(lengths)
    padded = sum(bucket_of(x, buckets) for x in lengths)
    return 1.0 - real / padded if padded else 0.0


def row_lengths(prompt_len: int, completion_len: int, max_length: int | None) -> int:
    """Tokens of one row as TRL feeds it (prompt already truncated to max_prompt_length,
    completion to max_completion_length by tokenisation; keep_end truncation to max_length)."""
    n = prompt_len + completion_len
    return min(n, max_length) if max_length else n


def shares_prompt(prompt_len: int, chosen_len: int, rejected_len: int, max_length: int | None) -> bool:
    """Whether a pair's rows can share their prompt in a packed row: both rows keep the whole prompt (no
    keep_end truncation to max_length cuts either row; a cut would take different prompt tokens from each) and
    the prompt is not empty."""
    fits = max_length is None or prompt_len + max(chosen_len, rejected_len) <= max_length
    return prompt_len > 0 and fits


def packed_pair_length(prompt_len: int, chosen_len: int, rejected_len: int, max_length: int | None,
                       share_prompt: bool) -> int:
    """Tokens one pair takes in a packed row: prompt + chosen + rejected when it shares its prompt, else its two
    rows (``row_lengths``) back to back."""
    if share_prompt and shares_prompt(prompt_len, chosen_len, rejected_len, max_length):
        return prompt_len + chosen_len + rejected_len
    return row_lengths(prompt_len, chosen_len, max_length) + row_lengths(prompt_len, rejected_len, max_length)


def _part_lengths(dataset) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token counts of every pair of a TRL-tokenised dataset."""
    return tuple([len(x) for x in dataset[f"{k}_input_ids"]] for k in ("prompt", "chosen", "rejected"))


def pair_packed_lengths(dataset, max_length: int | None, share_prompt: bool) -> list[int]:
    """``packed_pair_length`` of every pair of a TRL-tokenised dataset."""
    return [packed_pair_length(a, b, d, max_length, share_prompt) for a, b, d in zip(*_part_lengths(dataset))]


def pair_row_lengths(dataset, max_length: int | None) -> tuple[list[int], list[int]]:
    """(chosen row lengths, rejected row lengths) of a TRL-tokenised dataset."""
    p, c, r = _part_lengths(dataset)
    return ([row_lengths(a, b, max_length) for a, b in zip(p, c)],
            [row_lengths(a, b, max_length) for a, b in zip(p, r)])


class BucketBatchSampler:
    """Batches of ``batch_size`` pairs grouped by bucket; this rank's share of them.

    Per epoch (seed + epoch): pairs are grouped by their chosen row's bucket, shuffled inside a
    group, then stably sorted by their rejected row's bucket, and cut into batches. A group's
    leftover (< batch_size) pairs move up to the next larger group (their rows fit its bucket).
    The very last partial batch is completed with pairs drawn (seeded) from the data already
    in it, and the batch list is padded by repeating its first batches to a multiple of
    ``num_replicas`` (as ``DistributedSampler`` pads): every rank then gets the same number of
    batches, all of ``batch_size`` pairs. Batch order is shuffled. Rank r takes batches r::W.
    """

    def __init__(self, chosen_lengths: Sequence[int], rejected_lengths: Sequence[int], buckets: Sequence[int],
                 batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.buckets = sorted(buckets)
        self.cb = [self.buckets.index(bucket_of(x, self.buckets)) for x in chosen_lengths]
        self.rb = [self.buckets.index(bucket_of(x, self.buckets)) for x in rejected_lengths]
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.cb):
            groups.setdefault(b, []).append(i)
        batches, carry = [], []
        for b in sorted(groups):
            idx = carry + groups[b]
            if self.shuffle:
                rng.shuffle(idx)
            idx.sort(key=lambda i: self.rb[i])  # stable: ties stay shuffled
            n_full = len(idx) // self.batch_size * self.batch_size
            batches += [idx[s:s + self.batch_size] for s in range(0, n_full, self.batch_size)]
            carry = idx[n_full:]
        return _complete(batches, carry, self.batch_size, self.num_replicas, rng, self.shuffle)

    def __iter__(self):
        yield from self.all_batches()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        # Carrying leftovers up never creates more than ceil(n / batch_size) batches.
        return _batches_per_rank(len(self.cb), self.batch_size, self.num_replicas)


def _batches_per_rank(n: int, batch_size: int, num_replicas: int) -> int:
    total = -(-n // batch_size) if n else 0
    return -(-total // num_replicas)


def _complete(batches: list, carry: list, batch_size: int, num_replicas: int, rng: random.Random, shuffle: bool):
    """The last partial batch completed with pairs drawn (seeded) from it, batch order shuffled,
    the list padded by repeating its first batches to a multiple of ``num_replicas``."""
    if carry:
        fill = [carry[rng.randrange(len(carry))] for _ in range(batch_size - len(carry))]
        batches.append(carry + fill)
    if shuffle:
        rng.shuffle(batches)
    if batches and len(batches) % num_replicas:
        extra = num_replicas - len(batches) % num_replicas
        batches += [batches[i % len(batches)] for i in range(extra)]
    return batches


class PackedBatchSampler:
    """Batches of ``batch_size`` pairs whose packed totals (Σ ``packed_pair_length``) are
    close to each other, for ``--packing``: a micro-batch is one packed row, so its padding is its
    total's distance to the next bucket total, and equal totals need few buckets.

    Per epoch (seed + epoch): pairs are shuffled and cut into windows of ``window`` batches; in a
    window the pairs are sorted longest first and dealt to its batches boustrophedon (1..m, m..1,
    ...), which balances the totals (a long pair goes with short ones). The last partial batch,
    the batch order and the padding to ``num_replicas`` are as in ``BucketBatchSampler``.
    """

    def __init__(self, pair_lengths: Sequence[int], batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, window: int = 64):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.lengths = list(pair_lengths)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.shuffle, self.window, self.epoch = seed, shuffle, window, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        n_full = len(idx) // self.batch_size * self.batch_size
        idx, carry = idx[:n_full], idx[n_full:]
        batches, span = [], self.window * self.batch_size
        for w in range(0, n_full, span):
            chunk = sorted(idx[w:w + span], key=lambda i: -self.lengths[i])
            m = len(chunk) // self.batch_size
            groups = [[] for _ in range(m)]
            for k, i in enumerate(chunk):
                turn, j = divmod(k, m)
                groups[j if turn % 2 == 0 else m - 1 - j].append(i)
            batches += groups
        return _complete(batches, carry, self.batch_size, self.num_replicas, rng, self.shuffle)

    def __iter__(self):
        yield from self.all_batches()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return _batches_per_rank(len(self.lengths), self.batch_size, self.num_replicas)

    def totals(self, epochs: int) -> list[int]:
        """The packed total of every batch of epochs 0..epochs-1 (what the bucket totals must cover)."""
        keep, out = self.epoch, []
        for e in range(max(1, epochs)):
            self.set_epoch(e)
            out += [sum(self.lengths[i] for i in b) for b in self.all_batches()]
        self.set_epoch(keep)
        return out


def unpadded_tokens(batch: dict, max_length: int | None) -> int:
    """Tokens the policy forward is fed for one batch, padding left out: a packed row's real length (a shared
    prompt counted once), else every row's tokens (each row cut at max_length)."""
    if "packed_cu_seqlens" in batch:
        return int(batch["packed_cu_seqlens"][-1])
    return int(sum(int(x.sum()) for x in _batch_row_lengths(batch, max_length)))


def _batch_row_lengths(batch: dict, max_length: int | None) -> list:
    """[b] real tokens of the chosen rows and of the rejected rows of a collated batch (``row_lengths``)."""
    p = batch["prompt_attention_mask"].sum(-1)
    return [(p + batch[k].sum(-1)).clamp(max=max_length or 2**31)
            for k in ("chosen_attention_mask", "rejected_attention_mask")]


def fed_tokens(batch: dict, max_length: int | None) -> int:
    """Tokens (real + padding) the policy forward is fed for one trl-0.22 batch.

    Packed batches: packed_pad_to. Bucketed batches: b·chosen_pad_to + b·rejected_pad_to. TRL's default: 2b rows of the width
    left after flush_left, i.e. the longest row (≤ max_length)."""
    b = int(batch["prompt_input_ids"].shape[0])
    if "packed_input_ids" in batch:  # one packed row
        return int(batch["packed_input_ids"].shape[1])
    if "packed_pad_to" in batch:
        return int(batch["packed_pad_to"])
    if "chosen_pad_to" in batch:
        return b * (int(batch["chosen_pad_to"]) + int(batch["rejected_pad_to"]))
    return 2 * b * max(int(x.max()) for x in _batch_row_lengths(batch, max_length))
