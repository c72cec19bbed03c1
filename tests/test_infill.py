"""GLM blank infilling: the paper's worked example exactly, sampler statistics on real text, exact reconstruction,
and a batch the decoder consumes (2D positions + prefix mask)."""

from __future__ import annotations

import random
import statistics

import torch

from lmforge.assets import TINYSHAKESPEARE
from lmforge.config import ModelConfig
from lmforge.data.infill import (
    IGNORE,
    InfillTokens,
    build_sample,
    collate,
    corrupt,
    reconstruct,
    sample_gmask_span,
    sample_mask_spans,
    sample_sentence_spans,
)
from lmforge.model import Decoder

TOK = InfillTokens(mask=90, gmask=91, smask=92, sop=93, eop=94)
X = [1, 2, 3, 4, 5, 6]


def test_paper_worked_example():
    """x1..x6, spans {x3} and {x5, x6}; part B holds x5 x6 first, then x3 (the paper's figure)."""
    s = build_sample(X, [(2, 3), (4, 6)], TOK, TOK.mask, order=[1, 0])
    M, S, E = TOK.mask, TOK.sop, TOK.eop
    assert s.input_ids == [1, 2, M, 4, M, S, 5, 6, S, 3]
    assert s.targets == [IGNORE] * 5 + [5, 6, E, 3, E]
    assert [p + 1 for p in s.position_ids] == [1, 2, 3, 4, 5, 5, 5, 5, 3, 3]  # the paper's 1-based "Position 1"
    assert s.block_position_ids == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]  # "Position 2"
    assert s.prefix_len == 5
    assert reconstruct(s, TOK) == X


def corpus_ids(n=200_000):
    text = TINYSHAKESPEARE.read_text()[:n]
    chars = sorted(set(text))
    return [chars.index(c) for c in text]


def test_mask_sampler_statistics_on_real_text():
    ids = corpus_ids()
    rng = random.Random(0)
    lengths, fractions = [], []
    for k in range(400):
        doc = ids[k * 400 : k * 400 + 400]
        spans = sample_mask_spans(len(doc), rng)
        assert all(e0 < s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # sorted, separated, never overlapping
        assert all(0 <= s < e <= len(doc) for s, e in spans)
        lengths += [e - s for s, e in spans]
        fractions.append(sum(e - s for s, e in spans) / len(doc))
        sample = build_sample(doc, spans, TOK, TOK.mask, rng)
        assert reconstruct(sample, TOK) == doc
    assert abs(statistics.mean(fractions) - 0.15) < 0.005
    # Poisson(3) truncated at >= 1 (and at the remaining budget): mean a little above 3
    assert 2.7 < statistics.mean(lengths) < 3.4
    assert abs(sum(1 for x in lengths if x == 3) / len(lengths) - 0.224) < 0.04  # P(3) of Poisson(3) = 0.224


def test_gmask_and_mix_statistics():
    rng = random.Random(1)
    fr = [(100 - sample_gmask_span(100, rng)[0][0]) / 100 for _ in range(4000)]
    assert min(fr) >= 0.5 and max(fr) <= 1.0
    assert abs(statistics.mean(fr) - 0.75) < 0.01 and abs(sum(f < 0.625 for f in fr) / len(fr) - 0.25) < 0.03
    ids = corpus_ids(20_000)
    kinds = [corrupt(ids[:300], TOK, rng).kind for _ in range(2000)]
    assert abs(kinds.count("gmask") / 2000 - 0.7) < 0.03 and set(kinds) == {"gmask", "mask"}
    s = corrupt(ids[:300], TOK, random.Random(5), gmask_prob=1.0)
    assert s.input_ids[s.prefix_len - 1] == TOK.gmask and s.spans[0][1] == 300
    assert reconstruct(s, TOK) == ids[:300]


def test_sentence_spans_are_whole_sentences():
    ids = corpus_ids(5000)
    period = sorted(set(TINYSHAKESPEARE.read_text()[:5000])).index(".")
    spans = sample_sentence_spans(ids, {period}, random.Random(2))
    assert spans
    for s, e in spans:
        assert (e == len(ids) or ids[e - 1] == period) and (s == 0 or ids[s - 1] == period)


def test_decoder_consumes_glm_batch():
    ids = corpus_ids(4000)
    rng = random.Random(3)
    batch = collate([corrupt(ids[i * 100 : i * 100 + 100], TOK, rng) for i in range(4)])
    cfg = ModelConfig(vocab_size=95, block_size=256, n_layer=2, n_embd=32, n_head=4, position="glm2d",
                      glm2d="rotary", norm="layernorm", mlp="geglu", multiple_of=16)
    torch.manual_seed(0)
    m = Decoder(cfg)
    loss = m.loss(batch["input_ids"], batch["targets"], position_ids=batch["position_ids"],
                  prefix_len=batch["prefix_len"])
    assert torch.isfinite(loss) and 3.0 < loss.item() < 6.0  # about ln(95) at init
    loss.backward()
