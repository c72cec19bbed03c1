"""GLM's autoregressive blank infilling (Du et al., 2022).

A document x is corrupted into part A (x with each sampled span replaced by one mask token) and part B (the spans,
shuffled, each opened by [S] and closed by [E]). The model reads A bidirectionally and generates B left to right:

    inputs   = A + [S, span1..., S, span2..., ...]
    targets  = (ignored over A) + [span1..., E, span2..., E, ...]
    position = positions in A; for a B token, the position of its span's mask token in A
    block    = 0 over A; 1, 2, ... inside each B span (counted from its [S])
    prefix   = len(A): A attends bidirectionally, B causally and to all of A (lmforge's ``prefix_len``)

Positions are 0-based here (the paper's figure counts from 1). Span samplers: [MASK] spans with Poisson(3) lengths
until 15 % of tokens are covered; [gMASK] one span covering the tail (50-100 % of the document); [sMASK] whole
sentences up to ~15 %. GLM-130B mixes 70 % gMASK and 30 % MASK.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass
class InfillTokens:
    mask: int  # [MASK]
    gmask: int  # [gMASK]
    smask: int  # [sMASK]
    sop: int  # [S]
    eop: int  # [E]


@dataclass
class InfillSample:
    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    block_position_ids: list[int]
    prefix_len: int
    spans: list[tuple[int, int]]  # (start, end) in the original document, sorted
    kind: str


def sample_mask_spans(n: int, rng: random.Random, ratio: float = 0.15, lam: float = 3.0) -> list[tuple[int, int]]:
    """Non-overlapping spans with Poisson(lam) lengths (>= 1) until ``ratio`` of the n tokens are covered.

    The lengths are drawn first, then placed uniformly among the gaps they leave (every arrangement of the
    spans in the free positions is equally likely), as in GLM's implementation."""
    target = max(1, round(n * ratio))
    nprng = np.random.default_rng(rng.getrandbits(32))
    lengths, covered = [], 0
    while covered < target:
        ln = max(1, int(nprng.poisson(lam)))
        ln = min(ln, target - covered)
        lengths.append(ln)
        covered += ln
    rng.shuffle(lengths)
    free = n - covered
    if free < len(lengths) - 1:  # spans must be separated by at least one kept token
        lengths = lengths[: free + 1]
        free = n - sum(lengths)
    # choose gap sizes: len(lengths)+1 gaps, inner gaps >= 1, summing to `free`
    k = len(lengths)
    inner_min = k - 1
    cuts = sorted(rng.randint(0, free - inner_min) for _ in range(k))
    gaps = [cuts[0]] + [cuts[i] - cuts[i - 1] + 1 for i in range(1, k)]
    spans, pos = [], 0
    for g, ln in zip(gaps, lengths):
        pos += g
        spans.append((pos, pos + ln))
        pos += ln
    return spans


def sample_gmask_span(n: int, rng: random.Random, lo: float = 0.5, hi: float = 1.0) -> list[tuple[int, int]]:
    """One span covering the tail of the document, its length uniform over [lo, hi] of the document."""
    ln = max(1, min(n - 1, round(n * rng.uniform(lo, hi)))) if n > 1 else 1
    return [(n - ln, n)]


def sample_sentence_spans(ids: list[int], ends: set[int], rng: random.Random, ratio: float = 0.15
                          ) -> list[tuple[int, int]]:
    """Whole sentences (split after tokens in ``ends``) chosen at random until ~ratio of tokens are covered."""
    sents, start = [], 0
    for i, t in enumerate(ids):
        if t in ends:
            sents.append((start, i + 1))
            start = i + 1
    if start < len(ids):
        sents.append((start, len(ids)))
    order = list(range(len(sents)))
    rng.shuffle(order)
    chosen, covered, target = [], 0, ratio * len(ids)
    for j in order:
        if covered >= target:
            break
        if len(chosen) + 1 >= len(sents):  # keep at least one sentence in part A
            break
        chosen.append(sents[j])
        covered += sents[j][1] - sents[j][0]
    return sorted(chosen)


def build_sample(ids: list[int], spans: list[tuple[int, int]], tok: InfillTokens, mask_id: int,
                 rng: random.Random | None = None, order: list[int] | None = None, kind: str = "mask"
                 ) -> InfillSample:
    """Corrupt ``ids`` at ``spans`` (sorted, non-overlapping) into GLM's A/B layout. ``order`` fixes the order of
    the spans in part B (default: shuffled with ``rng``)."""
    spans = sorted(spans)
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
    inputs, targets = list(a), [IGNORE] * len(a)
    pos, block = list(range(len(a))), [0] * len(a)
    for j in order:
        s, e = spans[j]
        span = ids[s:e]
        inputs += [tok.sop] + span
        targets += span + [tok.eop]
        pos += [mask_pos[j]] * (len(span) + 1)
        block += list(range(1, len(span) + 2))
    return InfillSample(inputs, targets, pos, block, len(a), spans, kind)


def corrupt(ids: list[int], tok: InfillTokens, rng: random.Random, gmask_prob: float = 0.7,
            smask_prob: float = 0.0, sentence_ends: set[int] | None = None) -> InfillSample:
    """One training sample: gMASK with probability ``gmask_prob`` (GLM-130B: 0.7), sMASK with ``smask_prob``,
    else MASK spans."""
    u = rng.random()
    if u < gmask_prob:
        return build_sample(ids, sample_gmask_span(len(ids), rng), tok, tok.gmask, rng, kind="gmask")
    if u < gmask_prob + smask_prob and sentence_ends:
        spans = sample_sentence_spans(ids, sentence_ends, rng)
        if spans:
            return build_sample(ids, spans, tok, tok.smask, rng, kind="smask")
    return build_sample(ids, sample_mask_spans(len(ids), rng), tok, tok.mask, rng, kind="mask")


def reconstruct(sample: InfillSample, tok: InfillTokens) -> list[int]:
    """The original document from part A and the (shuffled) spans of part B: inverse of ``build_sample``."""
    a = sample.input_ids[: sample.prefix_len]
    b_in = sample.input_ids[sample.prefix_len :]
    b_pos = sample.position_ids[sample.prefix_len :]
    fills: dict[int, list[int]] = {}
    i = 0
    while i < len(b_in):
        assert b_in[i] == tok.sop
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
    """Right-pad a batch for ``Decoder(input_ids, position_ids=(B,2,T), prefix_len=(B,))``; padding is ignored in
    the loss and, being after every real token, never attended to by them."""
    T = max(len(s.input_ids) for s in samples)

    def pad(x, v):
        return x + [v] * (T - len(x))

    return {
        "input_ids": torch.tensor([pad(s.input_ids, pad_id) for s in samples]),
        "targets": torch.tensor([pad(s.targets, IGNORE) for s in samples]),
        "position_ids": torch.stack([torch.tensor([pad(s.position_ids, 0), pad(s.block_position_ids, 0)])
                                     for s in samples]),
        "prefix_len": torch.tensor([s.prefix_len for s in samples]),
    }
