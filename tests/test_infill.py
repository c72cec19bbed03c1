"""GLM blank infilling: the paper's worked example exactly, sampler statistics on real text against independent
formulas (zero-truncated Poisson(3) lengths, 15 % coverage, uniform placement, uniform gMASK tail, 70/30 mix,
whole-sentence sMASK), exact reconstruction, and a batch lmforge's Decoder consumes (2D positions + prefix)."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.assets import TINYSHAKESPEARE
from lmforge.config import ModelConfig
from lmforge.data.infill import (
    IGNORE,
    InfillTokens,
    build_sample,
    collate,
    corrupt,
    place_spans,
    reconstruct,
    sample_gmask_span,
    sample_mask_spans,
    sample_sentence_spans,
    sentence_end_ids,
)
from lmforge.model import Decoder
from lmforge.tokenizer.char import CharTokenizer

HONGLOUMENG = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "hongloumeng.txt"
TEXT = TINYSHAKESPEARE.read_text(encoding="utf-8")
CHARS = CharTokenizer.from_text(TEXT)
IDS = CHARS.encode(TEXT)  # tinyshakespeare, tokenized character by character (65 ids)
TOK = InfillTokens.after_vocab(CHARS.vocab_size)  # ids 65..69
X = [1, 2, 3, 4, 5, 6]


def docs(n_docs: int, length: int, start: int = 0) -> list[list[int]]:
    return [IDS[start + k * length : start + (k + 1) * length] for k in range(n_docs)]


def test_paper_worked_example():
    """x1..x6, spans {x3} and {x5, x6}; part B holds x5 x6 first, then x3 (the paper's figure 2)."""
    s = build_sample(X, [(2, 3), (4, 6)], TOK, TOK.mask, order=[1, 0])
    M, S, E = TOK.mask, TOK.sop, TOK.eop
    assert s.input_ids == [1, 2, M, 4, M, S, 5, 6, S, 3]
    assert s.targets == [IGNORE] * 5 + [5, 6, E, 3, E]
    assert s.paper_positions() == [[1, 2, 3, 4, 5, 5, 5, 5, 3, 3], [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]]
    assert s.position_ids == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]  # 0-based here: the paper's row minus one
    assert s.prefix_len == 5 and s.loss_mask == [0] * 5 + [1] * 5
    assert reconstruct(s, TOK) == X
    b = collate([s, build_sample(X, [(0, 1)], TOK, TOK.mask)], pad_id=0)
    assert b["position_ids"].shape == (2, 2, 10) and b["position_ids"][0].tolist() == [
        [0, 1, 2, 3, 4, 4, 4, 4, 2, 2], [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]]
    assert b["prefix_len"].tolist() == [5, 6] and b["input_ids"][1].tolist() == [M, 2, 3, 4, 5, 6, S, 1, 0, 0]
    assert b["targets"][1].tolist() == [IGNORE] * 6 + [1, E, IGNORE, IGNORE] and b["loss_mask"].sum() == 7
    with pytest.raises(ValueError, match="overlap"):
        build_sample(X, [(1, 3), (2, 4)], TOK, TOK.mask)


def ztp(k: int, lam: float = 3.0) -> float:
    """Zero-truncated Poisson pmf (the 39-token cap removes ~1e-23 of the mass)."""
    return math.exp(-lam) * lam**k / math.factorial(k) / (1 - math.exp(-lam))


def test_mask_span_lengths_are_poisson_3():
    rng = random.Random(0)
    lengths = [e - s for d in docs(110, 4000) for s, e in sample_mask_spans(len(d), rng)]
    n = len(lengths)
    assert n > 18_000
    mean = 3 / (1 - math.exp(-3))  # 3.157
    assert abs(statistics.mean(lengths) - mean) < 4 * statistics.pstdev(lengths) / math.sqrt(n)
    counts = Counter(min(x, 8) for x in lengths)
    expected = {k: n * ztp(k) for k in range(1, 8)} | {8: n * (1 - sum(ztp(k) for k in range(1, 8)))}
    chi2 = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001


def test_mask_coverage_placement_and_reconstruction_on_real_text():
    rng = random.Random(1)
    fractions, first, last = [], [], []
    for doc in docs(2500, 400):
        spans = sample_mask_spans(len(doc), rng)
        assert all(e0 < s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # never overlapping, never touching
        assert all(0 <= s < e <= len(doc) for s, e in spans)
        covered = sum(e - s for s, e in spans)
        assert 60 <= covered < 60 + 39  # drawn until int(0.15 * 400) tokens are covered; the last draw overshoots
        fractions.append(covered / len(doc))
        first.append(spans[0][1] - spans[0][0])
        last.append(spans[-1][1] - spans[-1][0])
        sample = build_sample(doc, spans, TOK, TOK.mask, rng)
        assert reconstruct(sample, TOK) == doc
        assert sample.input_ids.count(TOK.mask) == len(spans) == sample.input_ids.count(TOK.sop)
    assert 0.15 <= statistics.mean(fractions) < 0.16
    # the overshooting (size-biased) draw is shuffled among the others: no position is favoured
    assert abs(statistics.mean(first) - statistics.mean(last)) < 0.2


def test_span_placement_is_uniform_over_all_arrangements():
    """place_spans against brute-force enumeration: every arrangement with a gap between spans equally likely."""
    lengths, n = [2, 1, 2], 9
    valid = [p for p in itertools.product(range(n), repeat=3)
             if p[0] + 2 < p[1] and p[1] + 1 < p[2] and p[2] + 2 <= n]
    rng = random.Random(2)
    counts = Counter(tuple(s for s, _ in place_spans(lengths, n, rng)) for _ in range(20_000))
    assert set(counts) == set(valid)
    e = 20_000 / len(valid)
    chi2 = sum((counts[p] - e) ** 2 / e for p in valid)
    assert chi2 < 2 * (len(valid) - 1) + 30  # mean df, sd sqrt(2 df): far inside for a uniform draw


def test_gmask_tail_length_is_uniform_50_to_100_percent():
    rng = random.Random(3)
    fr = sorted((1000 - sample_gmask_span(1000, rng)[0][0]) / 1000 for _ in range(4000))
    assert 0.5 <= fr[0] and fr[-1] <= 1.0
    ks = max(max(abs((i + 1) / len(fr) - (f - 0.5) / 0.5), abs(i / len(fr) - (f - 0.5) / 0.5))
             for i, f in enumerate(fr))
    assert ks < 1.63 / math.sqrt(len(fr))  # Kolmogorov-Smirnov against U(0.5, 1), p = 0.01
    doc = IDS[:300]
    s = corrupt(doc, TOK, random.Random(5), gmask_prob=1.0)
    assert s.kind == "gmask" and s.input_ids[s.prefix_len - 1] == TOK.gmask and s.spans[0][1] == 300
    assert s.input_ids[s.prefix_len :] == [TOK.sop] + doc[s.spans[0][0] :]
    assert s.block_position_ids[s.prefix_len :] == list(range(1, 302 - s.spans[0][0]))
    assert reconstruct(s, TOK) == doc


def test_mask_gmask_mix_is_70_30_and_configurable():
    rng = random.Random(4)
    ends = {CHARS.stoi[c] for c in ".?!;:\n"}
    samples = [corrupt(doc, TOK, rng) for doc in docs(2000, 200)]
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == {"gmask", "mask"} and abs(kinds["gmask"] / 2000 - 0.7) < 0.035  # 3.4 sigma
    assert all(reconstruct(s, TOK) == d for s, d in zip(samples, docs(2000, 200)))
    kinds = Counter(corrupt(d, TOK, rng, gmask_prob=0.3, smask_prob=0.3, sentence_ends=ends).kind
                    for d in docs(2000, 200))
    assert abs(kinds["gmask"] / 2000 - 0.3) < 0.035 and abs(kinds["smask"] / 2000 - 0.3) < 0.035
    with pytest.raises(ValueError, match="sentence_ends"):
        corrupt(IDS[:50], TOK, rng, gmask_prob=0.3, smask_prob=0.5)


def check_sentence_spans(ids: list[int], ends: set[int], rng: random.Random, tok: InfillTokens = TOK) -> float:
    spans = sample_sentence_spans(ids, ends, rng)
    assert spans
    for s, e in spans:  # whole sentences: cut right after an end token (or at the document's edges)
        assert (e == len(ids) or ids[e - 1] in ends) and (s == 0 or ids[s - 1] in ends)
        assert not any(t in ends for t in ids[s : e - 1])
    covered = sum(e - s for s, e in spans)
    assert covered >= int(0.15 * len(ids)) and covered - max(e - s for s, e in spans) < int(0.15 * len(ids))
    sample = build_sample(ids, spans, tok, tok.smask, rng, kind="smask")
    assert reconstruct(sample, tok) == ids
    return covered / len(ids)


def test_smask_spans_are_whole_sentences():
    ends = sentence_end_ids(CHARS)
    assert {CHARS.decode([i]) for i in ends} == set(".?!;:\n") & set(CHARS.chars)
    rng = random.Random(6)
    fr = [check_sentence_spans(d, ends, rng) for d in docs(200, 2000)]
    assert 0.15 <= statistics.mean(fr) < 0.2


def test_smask_on_chinese_text():
    if not HONGLOUMENG.is_file():
        pytest.skip(f"{HONGLOUMENG} not found (../shared is absent)")
    text = HONGLOUMENG.read_text(encoding="utf-8")[20_000:120_000]
    tok = CharTokenizer.from_text(text)
    ends = sentence_end_ids(tok)
    assert {tok.stoi[c] for c in "。？！" if c in tok.stoi} <= ends and tok.stoi["的"] not in ends
    ids = tok.encode(text)
    rng = random.Random(7)
    special = InfillTokens.after_vocab(tok.vocab_size)  # above the ~3,000-character vocabulary
    fr = [check_sentence_spans(ids[k * 1000 : (k + 1) * 1000], ends, rng, special) for k in range(100)]
    assert 0.15 <= statistics.mean(fr) < 0.2


def test_decoder_consumes_glm_batch():
    rng = random.Random(3)
    samples = [corrupt(d, TOK, rng, gmask_prob=0.5) for d in docs(4, 100)]
    batch = collate(samples)
    cfg = ModelConfig(vocab_size=TOK.eop + 1, block_size=256, n_layer=2, n_embd=32, n_head=4, position="glm2d",
                      glm2d="rotary", norm="layernorm", mlp="geglu", multiple_of=16)
    torch.manual_seed(0)
    m = Decoder(cfg).eval()
    kw = {"position_ids": batch["position_ids"], "prefix_len": batch["prefix_len"]}
    loss = m.loss(batch["input_ids"], batch["targets"], **kw)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(cfg.vocab_size)) < 1.0  # about ln(70) at init
    logits = m(batch["input_ids"], **kw)
    mask = batch["loss_mask"].bool()  # loss only over part B
    ref = F.cross_entropy(logits[mask], batch["targets"][mask])
    assert torch.allclose(loss, ref) and int(mask.sum()) == sum(len(s.targets) - s.prefix_len for s in samples)
    loss.backward()

    # what each token sees, probed by changing one input and watching the logits (sample 0, unpadded alone)
    s = samples[0]
    one = collate([s])
    base = m(one["input_ids"], position_ids=one["position_ids"], prefix_len=one["prefix_len"])[0]
    assert torch.allclose(base, logits[0, : len(s.input_ids)], atol=1e-5)  # padding in the batch changes nothing
    P, T = s.prefix_len, len(s.input_ids)

    def changed(pos: int) -> torch.Tensor:
        x = one["input_ids"].clone()
        x[0, pos] = (x[0, pos] + 1) % 60
        out = m(x, position_ids=one["position_ids"], prefix_len=one["prefix_len"])[0]
        return (out - base).abs().amax(-1) > 1e-6  # which positions' logits moved

    assert changed(P - 1)[: P - 1].all()  # part A is bidirectional: the last A token reaches the first
    assert changed(P - 1)[P:].all()  # part B sees all of A
    j = P + (T - P) // 2
    moved = changed(j)
    assert not moved[:j].any() and moved[j:].all()  # part B is causal, and A never sees B
