"""GLM's autoregressive blank infilling (Du et al., 2022; GLM-130B's MASK/gMASK mix).

A document x is corrupted into part A (x with each sampled span replaced by one mask token) and part B (the spans,
shuffled, each opened by [S] and closed by [E]). The model reads A bidirectionally and generates B left to right:

    input_ids     = A + [S, span1..., S, span2..., ...]
    targets       = (ignored over A) + [span1..., E, span2..., E, ...]
    position_ids  = "position 1": positions in A; for a B token, the position of its span's mask token in A
    block_pos_ids = "position 2": 0 over A; 1, 2, ..., len(span)+1 inside each B span (counted from its [S])
    prefix_len    = len(A): A attends bidirectionally, B causally and to all of A (lmforge's ``prefix_len``)
    loss_mask     = 0 over A, 1 over B

The paper's worked example: x = [x1..x6], spans {x3} and {x5 x6}, B order (x5 x6), (x3)::

    input_ids  x1 x2 M  x4 M  S  x5 x6 S  x3
    targets    -  -  -  -  -  x5 x6 E  x3 E
    position 1 1  2  3  4  5  5  5  5  3  3      (the paper counts from 1; here ``position_ids`` counts from 0,
    position 2 0  0  0  0  0  1  2  3  1  2       i.e. ``position_ids + 1`` is the paper's row; ``paper_positions``)

Span samplers, as in GLM's reference implementation: [MASK] spans whose lengths follow Poisson(3) (zero-truncated,
at most 39) drawn until 15 % of the tokens are covered, placed uniformly at random (every placement with at least
one kept token between spans equally likely); [gMASK] one span covering the tail of the document, its length
uniform over 50-100 % of it (at least one token stays in A); [sMASK] whole sentences chosen at random until ~15 %
of the tokens are covered. GLM-130B trains on 70 % gMASK and 30 % MASK samples (``corrupt``'s default).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch

IGNORE = -100
SENTENCE_END_CHARS = ".?!;:\n。？！；：…"  # GLM's contains_sentence_end (. ? ! ; : newline) plus CJK marks


@dataclass(frozen=True)
class InfillTokens:
    """Ids of the five special tokens, chosen by the caller (e.g. ``InfillTokens.after_vocab(tok.vocab_size)``)."""

    mask: int  # [MASK]
    gmask: int  # [gMASK]
    smask: int  # [sMASK]
    sop: int  # [S], start of a span in part B
    eop: int  # [E], end of a span (a target)

    def __post_init__(self) -> None:
        ids = (self.mask, self.gmask, self.smask, self.sop, self.eop)
        if len(set(ids)) != 5 or min(ids) < 0:
            raise ValueError(f"infilling token ids must be 5 distinct non-negative ids, got {ids}")

    @classmethod
    def after_vocab(cls, vocab_size: int) -> InfillTokens:
        """The five ids vocab_size .. vocab_size+4 (grow the model's embedding by 5)."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2, vocab_size + 3, vocab_size + 4)


@dataclass
class InfillSample:
    input_ids: list[int]
    targets: list[int]  # IGNORE over part A
    position_ids: list[int]  # 0-based "position 1"
    block_position_ids: list[int]  # "position 2"
    prefix_len: int  # len(part A)
    spans: list[tuple[int, int]]  # (start, end) in the original document, sorted
    order: list[int]  # order of the spans in part B (indices into ``spans``)
    kind: str  # "mask", "gmask" or "smask"

    @property
    def loss_mask(self) -> list[int]:
        return [int(t != IGNORE) for t in self.targets]

    def paper_positions(self) -> list[list[int]]:
        """The two position rows as the paper's figure prints them (position 1 counted from 1)."""
        return [[p + 1 for p in self.position_ids], list(self.block_position_ids)]


def poisson_length_weights(lam: float = 3.0, max_len: int = 39) -> list[float]:
    """P(length = k) for k = 1..max_len: Poisson(lam) without zero, cut at max_len (GLM: range(1, 40))."""
    w = [math.exp(-lam) * lam**k / math.factorial(k) for k in range(1, max_len + 1)]
    s = sum(w)
    return [x / s for x in w]


def place_spans(lengths: list[int], n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Spans of the given lengths (in this order) in a document of n tokens, uniformly among all the placements
    that keep at least one token between consecutive spans. (GLM's ``sample_spans`` sorts k independent uniform
    draws instead, which favours spread-out placements; here each of the C(m+k, k) placements is equally likely.)"""
    k = len(lengths)
    m = n - sum(lengths) - (k - 1)  # free positions once the mandatory separators are set aside
    if k == 0:
        return []
    if m < 0:
        raise ValueError(f"spans of lengths {lengths} do not fit in {n} tokens")
    # stars and bars: a k-subset of m+k slots <-> a non-decreasing sequence of k places in [0, m]
    places = [c - i for i, c in enumerate(sorted(rng.sample(range(m + k), k)))]
    spans, offset = [], 0
    for place, ln in zip(places, lengths):
        spans.append((offset + place, offset + place + ln))
        offset += ln + 1
    return spans


def sample_mask_spans(n: int, rng: random.Random, ratio: float = 0.15, lam: float = 3.0, max_len: int = 39
                      ) -> list[tuple[int, int]]:
    """[MASK] spans: lengths from Poisson(lam) (zero-truncated, <= max_len) drawn until at least
    ``max(1, int(ratio * n))`` tokens are covered, then placed uniformly (``place_spans``). If they cannot all be
    separated inside the document, spans are dropped from the end of the (random) list until they fit."""
    if n <= 0:
        return []
    weights = poisson_length_weights(lam, max_len)
    target = max(1, int(ratio * n))
    lengths: list[int] = []
    covered = 0
    while covered < target:
        lengths.append(rng.choices(range(1, max_len + 1), weights=weights)[0])
        covered += lengths[-1]
    while lengths and sum(lengths) + len(lengths) - 1 > n:
        lengths.pop()
    if not lengths:  # a very short document: one span of what fits
        lengths = [min(n, target)]
    rng.shuffle(lengths)  # the draw that crossed the target is size-biased: it must not always come last
    return place_spans(lengths, n, rng)


def sample_gmask_span(n: int, rng: random.Random, lo: float = 0.5, hi: float = 1.0) -> list[tuple[int, int]]:
    """[gMASK]: one span covering the tail of the document, its length uniform over [lo, hi] of the document
    (rounded, and at most n-1 so that part A keeps at least one token; a 1-token document is masked whole)."""
    if n <= 0:
        return []
    if n == 1:
        return [(0, 1)]
    ln = min(n - 1, max(1, round(n * rng.uniform(lo, hi))))
    return [(n - ln, n)]


def sentence_spans(ids: list[int], ends: set[int]) -> list[tuple[int, int]]:
    """The document cut after every token in ``ends`` (the last sentence may lack an end token)."""
    spans, start = [], 0
    for i, t in enumerate(ids):
        if t in ends:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(ids):
        spans.append((start, len(ids)))
    return spans


def sample_sentence_spans(ids: list[int], ends: set[int], rng: random.Random, ratio: float = 0.15
                          ) -> list[tuple[int, int]]:
    """[sMASK]: whole sentences taken in random order until at least ``ratio`` of the tokens are covered (GLM's
    gap-sentence mode); at least one sentence stays in part A. Sorted by position."""
    sents = sentence_spans(ids, ends)
    rng.shuffle(sents)
    chosen, covered = [], 0
    for s, e in sents[: len(sents) - 1]:
        chosen.append((s, e))
        covered += e - s
        if covered >= int(ratio * len(ids)):
            break
    return sorted(chosen)


def sentence_end_ids(tokenizer, chars: str = SENTENCE_END_CHARS) -> set[int]:
    """Ids of the tokens whose text contains a sentence-ending character (for [sMASK])."""
    out = set()
    for i in range(tokenizer.vocab_size):
        try:
            piece = tokenizer.decode([i])
        except Exception:  # special or unused ids some tokenizers cannot decode alone
            continue
        if any(c in piece for c in chars):
            out.add(i)
    return out


def build_sample(ids: list[int], spans: Iterable[tuple[int, int]], tok: InfillTokens, mask_id: int,
                 rng: random.Random | None = None, order: list[int] | None = None, kind: str = "mask"
                 ) -> InfillSample:
    """Corrupt ``ids`` at ``spans`` (non-overlapping) into GLM's A/B layout, each span replaced by ``mask_id``.
    ``order`` fixes the order of the (sorted) spans in part B; by default they are shuffled with ``rng``."""
    ids = list(ids)
    spans = sorted(spans)
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"spans {(s0, e0)} and {(s1, _)} overlap")
    if any(not 0 <= s < e <= len(ids) for s, e in spans):
        raise ValueError(f"spans {spans} are empty or outside the document of {len(ids)} tokens")
    a, mask_pos, prev = [], [], 0
    for s, e in spans:
        a.extend(ids[prev:s])
        mask_pos.append(len(a))
        a.append(mask_id)
        prev = e
    a.extend(ids[prev:])
    if order is None:
        order = list(range(len(spans)))
        (rng or random.Random(0)).shuffle(order)
    if sorted(order) != list(range(len(spans))):
        raise ValueError(f"order {order} is not a permutation of the {len(spans)} spans")
    inputs, targets = list(a), [IGNORE] * len(a)
    pos, block = list(range(len(a))), [0] * len(a)
    for j in order:
        s, e = spans[j]
        span = ids[s:e]
        inputs += [tok.sop] + span
        targets += span + [tok.eop]
        pos += [mask_pos[j]] * (len(span) + 1)
        block += list(range(1, len(span) + 2))
    return InfillSample(inputs, targets, pos, block, len(a), spans, list(order), kind)


def corrupt(ids: list[int], tok: InfillTokens, rng: random.Random, gmask_prob: float = 0.7,
            smask_prob: float = 0.0, sentence_ends: set[int] | None = None, ratio: float = 0.15,
            lam: float = 3.0) -> InfillSample:
    """One training sample: [gMASK] with probability ``gmask_prob`` (GLM-130B: 0.7), [sMASK] with ``smask_prob``
    (needs ``sentence_ends``), else [MASK] spans."""
    if gmask_prob < 0 or smask_prob < 0 or gmask_prob + smask_prob > 1:
        raise ValueError(f"gmask_prob {gmask_prob} + smask_prob {smask_prob} must be probabilities summing to <= 1")
    if smask_prob > 0 and not sentence_ends:
        raise ValueError("smask_prob > 0 needs sentence_ends (e.g. sentence_end_ids(tokenizer))")
    u = rng.random()
    if u < gmask_prob:
        return build_sample(ids, sample_gmask_span(len(ids), rng), tok, tok.gmask, rng, kind="gmask")
    if u < gmask_prob + smask_prob:
        spans = sample_sentence_spans(ids, sentence_ends, rng, ratio)
        if spans:  # a one-sentence document falls back to [MASK] spans
            return build_sample(ids, spans, tok, tok.smask, rng, kind="smask")
    return build_sample(ids, sample_mask_spans(len(ids), rng, ratio, lam), tok, tok.mask, rng, kind="mask")


def reconstruct(sample: InfillSample, tok: InfillTokens) -> list[int]:
    """The original document from part A and the (shuffled) spans of part B: the inverse of ``build_sample``,
    read from ``input_ids``/``position_ids`` only."""
    a = sample.input_ids[: sample.prefix_len]
    b_in = sample.input_ids[sample.prefix_len :]
    b_pos = sample.position_ids[sample.prefix_len :]
    fills: dict[int, list[int]] = {}
    i = 0
    while i < len(b_in):
        if b_in[i] != tok.sop:
            raise ValueError(f"part B token {i} is {b_in[i]}, expected [S] ({tok.sop})")
        j = i + 1
        while j < len(b_in) and b_in[j] != tok.sop:
            j += 1
        fills[b_pos[i]] = b_in[i + 1 : j]
        i = j
    out = []
    for p, t in enumerate(a):
        out.extend(fills[p] if p in fills else [t])
    return out


def collate(samples: list[InfillSample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch for ``Decoder(input_ids, position_ids=(B, 2, T), prefix_len=(B,))``: int64 tensors
    ``input_ids``, ``targets`` (IGNORE over A and padding), ``loss_mask``, ``position_ids`` (B, 2, T) and
    ``prefix_len``. Padding comes after every real token, so causal attention never lets them see it."""
    T = max(len(s.input_ids) for s in samples)

    def pad(x: list[int], v: int) -> list[int]:
        return x + [v] * (T - len(x))

    targets = torch.tensor([pad(s.targets, IGNORE) for s in samples], dtype=torch.long)
    return {
        "input_ids": torch.tensor([pad(s.input_ids, pad_id) for s in samples], dtype=torch.long),
        "targets": targets,
        "loss_mask": (targets != IGNORE).long(),
        "position_ids": torch.tensor([[pad(s.position_ids, 0), pad(s.block_position_ids, 0)] for s in samples],
                                     dtype=torch.long),
        "prefix_len": torch.tensor([s.prefix_len for s in samples], dtype=torch.long),
    }
