"""Generation: sampling filters and penalties against transformers' logits processors, log-probs against a full
forward, the slot cache's batched decode against full recomputation, left-padded batches and the continuous-batching
engine against single-sequence generation, stop ids/strings and incremental detokenization."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from slot_decode import decode_against_full_forward
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.infer.engine import Engine, EngineError, Request, SlotRunner
from lmforge.infer.generate import TextStream, complete, generate, generate_batch, stream_steps
from lmforge.infer.sampling import (
    SamplingParams,
    TokenSampler,
    distribution,
    noted_argmax,
    select,
    sparse_distribution,
)
from lmforge.loading import load_model_and_tokenizer
from lmforge.model import Decoder
from lmforge.presets import get_preset

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40)
TEXTS = ["Once upon a time", "Tom had a big red ball and", "The cat", "Lily and her mom went to the park to play",
         "One day", "Sue saw a bird", "Ben", "The sun was hot and the children wanted to swim in the lake"]


@pytest.fixture(scope="module")
def prompts(stories):
    _, tok = stories
    return [[tok.bos_id] + tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def singles(stories, prompts):
    model, _ = stories
    return [generate(model, p, GREEDY) for p in prompts]


# ---- sampling --------------------------------------------------------------------------------------


def hf_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scores = TemperatureLogitsWarper(p.temperature)(None, logits.clone())
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.min_p:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


CASES = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=7),
         SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.05),
         SamplingParams(temperature=0.6, top_k=20, top_p=0.9, min_p=0.02)]


@pytest.mark.parametrize("p", CASES)
def test_filtered_distribution_matches_transformers_warpers(p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    assert torch.allclose(distribution(logits, p), hf_distribution(logits, p), atol=1e-6)


def test_rows_with_their_own_parameters_match_rows_alone():
    torch.manual_seed(1)
    logits = torch.randn(len(CASES), 64) * 2
    together = distribution(logits, CASES)
    for i, p in enumerate(CASES):
        assert torch.allclose(together[i], hf_distribution(logits[i : i + 1], p)[0], atol=1e-6)


def test_greedy_choice_is_torch_argmax_with_ties_nan_and_strided_rows():
    """Greedy rows pick the first of equal maxima, and NaN counts as the largest, as torch.argmax does (on the CPU
    the choice goes through NumPy's argmax)."""
    torch.manual_seed(3)
    logits = torch.randn(5, 40)
    logits[1, [7, 30]] = 9.0  # a tie: the first index wins
    logits[2, 11] = float("nan")
    logits[3, :] = 0.0  # all equal
    greedy = [TokenSampler(SamplingParams(temperature=0), [], 40) for _ in range(5)]
    expect = logits.argmax(dim=-1).tolist()
    assert [c.token for c in select(logits, greedy)] == expect == [expect[0], 7, 11, 0, expect[4]]
    wide = torch.randn(5, 80)
    assert [c.token for c in select(wide[:, ::2], greedy)] == wide[:, ::2].argmax(dim=-1).tolist()
    mixed = greedy[:2] + [TokenSampler(SamplingParams(temperature=1.0, seed=0), [], 40)] + greedy[3:]
    picked = [c.token for c in select(logits, mixed)]
    assert picked[:2] == expect[:2] and picked[3:] == expect[3:]
    # plain greedy rows take a shortcut; a greedy row that reports log-probabilities or is penalized does not
    assert all(g.plain for g in greedy) and all(c.logprob is None for c in select(logits, greedy))
    lp = TokenSampler(SamplingParams(temperature=0, logprobs=True), [], 40)
    pen = TokenSampler(SamplingParams(temperature=0, repetition_penalty=2.0), [7], 40)
    assert not lp.plain and not pen.plain
    out = select(logits, [greedy[0], lp, pen, greedy[3], greedy[4]])
    assert out[1].token == 7 and out[1].logprob == pytest.approx(torch.log_softmax(logits[1], -1)[7].item())
    assert out[2].token == 11 and pen.counts[11] == 1  # NaN still wins; the penalty's counts are kept
    some = select(logits, [greedy[0], lp], [2, 1])  # rows 2 and 1 alone (NumPy's indexing: the lock is kept)
    assert [c.token for c in some] == [11, 7] and some[1].logprob == pytest.approx(out[1].logprob)


def test_draws_follow_the_distribution_and_seeds_reproduce():
    torch.manual_seed(2)
    logits = torch.randn(1, 6) * 1.5
    p = SamplingParams(temperature=0.8, top_k=5)
    n = 4000
    samplers = [TokenSampler(SamplingParams(**{**p.__dict__, "seed": s}), [], 6) for s in range(n)]
    toks = torch.tensor([c.token for c in select(logits.expand(n, 6), samplers)])
    freq = torch.bincount(toks, minlength=6).float() / n
    want = hf_distribution(logits, p)[0]
    sigma = (want * (1 - want) / n).sqrt()
    assert (freq - want).abs().max() <= 5 * sigma.max() + 1e-9, (freq, want)
    assert freq[want == 0].sum() == 0
    again = [c.token for c in select(logits.expand(50, 6), [TokenSampler(SamplingParams(
        **{**p.__dict__, "seed": s}), [], 6) for s in range(50)])]
    assert again == toks[:50].tolist()


@pytest.mark.parametrize("where", ["c", "torch"])
def test_each_rows_draws_follow_its_distribution_in_c_and_in_torch(where, monkeypatch):
    """``select``'s draws, in C (``lmf_sample_rows``: no sort of the vocabulary) and through PyTorch (no library),
    follow ``distribution`` (itself checked against transformers' warpers above) for rows of their own parameters in
    one batch: 3,000 draws a row over 300 tokens, within 5 standard errors per token, none outside the support. The
    edges: top-k with equal logits at its edge keeps exactly k tokens; a greedy row in the batch takes its argmax.
    (Tokens expected fewer than 5 times are counted together.)"""
    from lmforge.infer import clib, sampling

    if where == "torch":
        monkeypatch.setattr(sampling, "library", lambda: None)
    elif sampling.library() is None:
        pytest.skip("no C compiler here: the draws are PyTorch's")
    calls = []
    monkeypatch.setattr(sampling, "draw_rows", lambda *a: calls.append(1) or clib.draw_rows(*a))
    torch.manual_seed(5)
    V, n = 300, 3000
    logits = torch.randn(len(CASES) + 2, V) * 2.5
    logits[-2, :] = torch.where(torch.arange(V) % 7 == 0, 1.0, -1.0)  # 43 equal largest logits, top-k of 5
    params = CASES + [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0)]
    counts = torch.zeros(len(params), V)
    for seed in range(n):
        samplers = [TokenSampler(SamplingParams(**{**p.__dict__, "seed": seed * 10 + i}), [], V)
                    for i, p in enumerate(params)]
        for i, c in enumerate(select(logits, samplers)):
            counts[i, c.token] += 1
    assert bool(calls) == (where == "c")
    freq = counts / n
    for i, p in enumerate(params[:-2]):
        want = distribution(logits[i : i + 1], p)[0]
        assert freq[i][want == 0].sum() == 0, p
        big = want * n >= 5  # tokens expected 5 times or more one by one, the rare ones together
        f, w = torch.cat([freq[i][big], freq[i][~big].sum()[None]]), torch.cat([want[big], want[~big].sum()[None]])
        assert ((f - w).abs() <= 5 * (w * (1 - w) / n).sqrt() + 1e-9).all(), (p, (f - w).abs().max())
    assert (counts[-2] > 0).sum() == 5 and (counts[-2][torch.arange(V) % 7 != 0] == 0).all()  # exactly k, the ties
    assert counts[-1, int(logits[-1].argmax())] == n


@pytest.mark.parametrize("p", CASES + [SamplingParams(temperature=1.0, top_k=5)])
def test_one_rows_sparse_distribution_is_the_distribution(p):
    """``sparse_distribution`` (speculative sampling's p and q; in C where the library is built, the weights the draws
    of ``select`` use) equals ``distribution`` (checked against transformers' warpers) over 50 and 49,152 tokens."""
    torch.manual_seed(6)
    for V in (50, 49152):
        logits = torch.randn(V) * 3
        got, want = sparse_distribution(logits, p), distribution(logits[None], p)[0]
        assert torch.allclose(got, want, atol=1e-6) and torch.equal(got > 0, want > 0), (V, (got - want).abs().max())


def test_c_draws_of_rows_with_nan_or_infinite_logits_and_seeds(monkeypatch):
    """A row with a NaN takes the first NaN (as the argmax does), one with +inf its first +inf, -inf logits are never
    drawn; the same seed draws the same tokens again."""
    from lmforge.infer import sampling

    if sampling.library() is None:
        pytest.skip("no C compiler here: the draws are PyTorch's")
    logits = torch.randn(3, 40)
    logits[0, [4, 9]] = float("nan")
    logits[1, [6, 30]] = float("inf")
    logits[2, :35] = float("-inf")
    p = SamplingParams(temperature=1.5, top_p=0.95)
    for seed in range(20):
        picked = [c.token for c in select(logits, [TokenSampler(SamplingParams(**{**p.__dict__, "seed": seed}), [],
                                                                40) for _ in range(3)])]
        assert picked[:2] == [4, 6] and picked[2] >= 35
    draw = [[c.token for c in select(logits[2:].expand(50, 40), [TokenSampler(SamplingParams(
        **{**p.__dict__, "seed": s}), [], 40) for s in range(50)])] for _ in range(2)]
    assert draw[0] == draw[1] and len(set(draw[0])) > 1


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(3)
    V = 30
    logits = torch.randn(V) * 2
    prompt, out = [1, 4, 4, 9], [9, 12, 4]
    p = SamplingParams(repetition_penalty=1.3)
    s = TokenSampler(p, prompt, V)
    for t in out:
        s.observe(t)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + out]), logits[None].clone())[0]
    assert torch.allclose(s.penalize(logits), ref)


def test_frequency_and_presence_penalties_follow_openai_definition():
    torch.manual_seed(4)
    V = 20
    logits = torch.randn(V)
    prompt, out = [3, 5], [5, 7, 7, 7, 2]
    p = SamplingParams(frequency_penalty=0.4, presence_penalty=0.9)
    s = TokenSampler(p, prompt, V)
    for t in out:
        s.observe(t)
    # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c counted over the generated tokens
    want = [float(logits[j]) - out.count(j) * 0.4 - (0.9 if out.count(j) else 0.0) for j in range(V)]
    assert torch.allclose(s.penalize(logits), torch.tensor(want), atol=1e-6)


def test_penalties_change_greedy_choice_in_generation(stories, prompts):
    model, _ = stories
    plain = generate(model, prompts[0], GREEDY)
    pen = generate(model, prompts[0], SamplingParams(temperature=0, max_new_tokens=40, frequency_penalty=2.0))
    assert plain != pen
    counts = torch.bincount(torch.tensor(pen))
    assert counts.max() <= torch.bincount(torch.tensor(plain)).max()


# ---- single sequence ---------------------------------------------------------------------------------


def test_logprobs_match_a_full_forward(stories, prompts):
    model, _ = stories
    p = SamplingParams(temperature=0.9, top_k=30, max_new_tokens=15, seed=5, logprobs=True, top_logprobs=3)
    steps = list(stream_steps(model, prompts[1], p))
    ids = prompts[1] + [s.token for s in steps]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    P = len(prompts[1])
    for k, s in enumerate(steps):
        assert s.logprob == pytest.approx(float(logp[P - 1 + k, s.token]), abs=1e-4)
        v, i = logp[P - 1 + k].topk(3)
        assert [t for t, _ in s.top_logprobs] == i.tolist()


def test_seeded_sampling_is_reproducible(stories, prompts):
    model, _ = stories
    p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=30, seed=11)
    a, b = generate(model, prompts[0], p), generate(model, prompts[0], p)
    c = generate(model, prompts[0], SamplingParams(**{**p.__dict__, "seed": 12}))
    assert a == b and a != c


def test_stop_id_and_max_new_tokens(stories, prompts, singles):
    model, _ = stories
    out = singles[0]
    stop = out[10]
    first = out.index(stop)
    assert generate(model, prompts[0], SamplingParams(temperature=0, max_new_tokens=40, stop_ids=[stop])) == \
        out[:first]
    c = complete(model, stories[1], prompts[0], SamplingParams(temperature=0, max_new_tokens=7))
    assert c.token_ids == out[:7] and c.finish_reason == "length"


def test_stop_strings_cut_the_text(stories, prompts, singles):
    model, tok = stories
    full = tok.decode(prompts[2] + singles[2])[len(tok.decode(prompts[2])) :]
    assert full == complete(model, tok, prompts[2], GREEDY).text
    for stop in (full[20:24], full[5:6], full[30:45]):
        c = complete(model, tok, prompts[2], SamplingParams(temperature=0, max_new_tokens=40, stop=[stop]))
        assert c.text == full.split(stop)[0] and c.finish_reason == "stop", stop


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(stories):
    _, tok = stories
    text = " héllo 世界, wörld! ünïcödé 🙂 end"
    ids = tok.encode(text)
    assert any(i < 259 for i in ids)  # byte-fallback tokens: characters split across tokens
    ts = TextStream(tok, [tok.bos_id], stop=["XYZ"])
    pieces = [ts.push(i) for i in ids]
    assert "".join(pieces) + ts.flush() == tok.decode([tok.bos_id] + ids)
    assert all("\ufffd" not in p for p in pieces)
    ts = TextStream(tok, [tok.bos_id], stop=["wörld"])
    shown = ""
    for i in ids:
        shown += ts.push(i)
        assert "wör" not in shown
        if ts.stopped:
            break
    assert ts.stopped and shown == tok.decode([tok.bos_id] + ids).split("wörld")[0]


def test_text_stream_takes_a_tokens_own_bytes_where_the_tokenizer_knows_them(stories):
    """A tokenizer's ``bytes_after(prev, id)`` (llama2c: a token's piece after one that showed text) replaces the two
    window decodes: the same pieces, token by token, as without it, over random ids with BOS, EOS, <unk>, byte
    tokens (characters split across tokens) and text; the decodes are skipped for most tokens."""
    import random

    _, tok = stories

    class Plain:  # the same tokenizer without bytes_after
        decode_bytes = staticmethod(tok.decode_bytes)

    rng = random.Random(0)
    special = [0, tok.bos_id, tok.eos_id]
    calls = [0]
    counted = tok.decode_bytes

    def counting(ids):
        calls[0] += 1
        return counted(ids)

    for trial in range(200):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(3, tok.vocab_size) for _ in range(40)]
        prompt = [rng.randrange(3, tok.vocab_size)] if trial % 2 else [tok.bos_id]
        fast, plain = TextStream(tok, prompt, stop=["e t"] if trial % 3 == 0 else None), TextStream(Plain(), prompt)
        if trial % 3 == 0:
            plain = TextStream(Plain(), prompt, stop=["e t"])
        tok.decode_bytes = counting
        try:
            got = [fast.push(i) for i in ids] + [fast.flush()]
        finally:
            del tok.decode_bytes
        assert got == [plain.push(i) for i in ids] + [plain.flush()], ids
        assert fast.text == plain.text
    assert calls[0] < 200 * 40  # (two decodes a token without it)


# ---- batched decode ------------------------------------------------------------------------------------


FAST = ["tiny-llama", "tiny-gpt1", "tiny-gpt2", "tiny-gpt3", "tiny-palm", "tiny-bloom", "tiny-qwen", "tiny-chatglm2"]


@pytest.mark.parametrize("name", FAST + ["tiny-glm", "tiny-chatglm", "tiny-llama:slow", "tiny-gpt3:slow"])
def test_slot_runner_decode_matches_full_forward(name):
    """Slots at different lengths decode together; every row's logits equal a full forward of its sequence
    (through the lean decode step, or ``Decoder.forward`` with per-row positions for GLM and on request)."""
    torch.manual_seed(0)
    name, _, slow = name.partition(":")
    cfg = get_preset(name, block_size=64, vocab_size=97)
    model = Decoder(cfg).eval()
    runner = SlotRunner(model, 4, 48)
    assert runner.fast == (cfg.position != "glm2d")
    runner.fast = runner.fast and not slow
    seqs = {0: [5, 6, 7, 8, 9, 10, 11], 1: [3], 3: [40, 41, 42, 43]}  # slot 2 idle
    for s, got, want in decode_against_full_forward(runner, model, seqs):
        assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (name, slow, s)


def test_quantized_model_decodes_through_the_lean_step(prompts):
    from lmforge.quant import QuantConfig, quantize_model

    model, tok = load_model_and_tokenizer(None, None, "cpu")
    quantize_model(model.eval(), QuantConfig(bits=8))
    p = SamplingParams(temperature=0, max_new_tokens=25)
    want = []
    for ids in prompts[:3]:
        ids = list(ids)
        with torch.no_grad():  # greedy by full recomputation, no cache
            for _ in range(25):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        want.append(ids[-25:])
    assert [generate(model, x, p) for x in prompts[:3]] == want
    eng = Engine(model, tok, max_batch=2)
    try:
        assert [[s.token for s in eng.submit(x, p)] for x in prompts[:3]] == want
    finally:
        eng.close()


def test_a_quantized_layer_switched_to_another_mode_decodes_in_that_mode(prompts):
    """The lean step calls each quantized layer's decode function directly: switching the mode after decoding
    (``set_compute``) must reach it (the exact dequantize path gives the full forward's logits)."""
    from lmforge.quant import QuantConfig, quantize_model, set_compute

    model, _ = load_model_and_tokenizer(None, None, "cpu")
    quantize_model(model.eval(), QuantConfig(bits=4, group_size=32))
    ids = list(prompts[0])
    runner = SlotRunner(model, 1, 64)
    runner.prefill(0, ids[:-1])
    runner.decode([ids[-1]])  # auto mode: the fast functions are made here
    set_compute(model, "dequant")
    runner.prefill(0, ids[:-1])
    got = runner.decode([ids[-1]])[0]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0, -1]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_single_sequences(stories, prompts, singles):
    model, _ = stories
    assert generate_batch(model, prompts, GREEDY) == singles


def test_engine_equals_single_sequences_with_slot_reuse(stories, prompts, singles):
    model, tok = stories
    eng = Engine(model, tok, max_batch=3)  # 8 requests, 3 slots: finished slots are reused
    try:
        reqs = [eng.submit(p, GREEDY) for p in prompts]
        outs = [[s.token for s in r if s.token >= 0] for r in reqs]
    finally:
        eng.close()
    assert outs == singles
    assert eng.max_active == 3 and eng.prefill_batches > 0  # several prompts prefilled in one forward
    assert eng.steps < sum(len(o) for o in outs)  # decoded in batches


def test_engine_gives_a_sink_the_last_step_and_the_end_together(stories, prompts):
    """A finished request's last step and DONE reach a sink with ``put_many`` in one call: a server reading the sink
    never sees the last token without the end (and holds the stream back, waiting for more)."""
    model, tok = stories
    calls: list[list] = []
    done = threading.Event()

    class Sink:
        def put(self, item):
            calls.append([item])

        def put_many(self, items):
            calls.append(list(items))
            if sum(c[-1][1] is Request.DONE for c in calls) == 2:
                done.set()

    eng = Engine(model, tok, max_batch=2)
    try:
        eng.submit_group([(p, SamplingParams(temperature=0, max_new_tokens=3), i) for i, p in enumerate(prompts[:2])],
                         Sink())
        assert done.wait(60)
    finally:
        eng.close()
    for i in range(2):
        mine = [c for c in calls if c[0][0] == i]
        assert [len(c) for c in mine] == [1, 1, 2], mine  # the prefill's token, one decode step, the last + DONE
        assert mine[-1][0][1].token >= 0 and mine[-1][1] == (i, Request.DONE)


def test_engine_thread_decodes_with_its_own_torch_threads(stories, prompts, singles):
    """``Engine(threads=N)``: the engine's thread sets its torch threads itself (`lmforge serve` keeps its own thread
    at one, so only the engine's thread has an OpenMP pool); results are unchanged."""
    model, tok = stories
    before = torch.get_num_threads()
    seen: list[tuple[str, int]] = []
    hook = model.lm_head.register_forward_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads())))
    try:
        torch.set_num_threads(2)
        eng = Engine(model, tok, max_batch=2, threads=1)
        try:
            outs = [[s.token for s in eng.submit(p, GREEDY) if s.token >= 0] for p in prompts[:2]]
        finally:
            eng.close()
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert outs == singles[:2]
    assert seen and all(name == "lmforge-engine" and n == 1 for name, n in seen), seen


def test_engine_concurrent_submitters_and_seeded_sampling(stories, prompts):
    model, tok = stories
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=25, seed=i) for i in range(len(prompts))]
    want = [generate(model, p, sp) for p, sp in zip(prompts, params)]
    got: dict[int, list[int]] = {}
    eng = Engine(model, tok, max_batch=8)

    def client(i):
        got[i] = [s.token for s in eng.submit(prompts[i], params[i]) if s.token >= 0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        eng.close()
    assert [got[i] for i in range(len(prompts))] == want


def test_engine_survives_a_failing_request_and_cancellation(stories, prompts, singles):
    model, tok = stories
    eng = Engine(model, tok, max_batch=2)
    real, real_many = eng.runner.prefill, eng.runner.prefill_many

    def prefill(slot, ids):
        if ids == prompts[1]:
            raise RuntimeError("boom")
        return real(slot, ids)

    def prefill_many(slots, ids):
        if prompts[1] in ids:
            raise RuntimeError("boom")
        return real_many(slots, ids)

    eng.runner.prefill, eng.runner.prefill_many = prefill, prefill_many
    try:
        bad = eng.submit(prompts[1], GREEDY)
        long = eng.submit(prompts[0], SamplingParams(temperature=0, max_new_tokens=400))
        first = next(iter(long))
        long.cancel()
        good = eng.submit(prompts[2], GREEDY)
        with pytest.raises(EngineError, match="boom"):
            bad.result()
        assert [s.token for s in good if s.token >= 0] == singles[2]
        rest = list(long)
        assert first.token == singles[0][0] and len(rest) < 399 and long.finish_reason == "cancelled"
        with pytest.raises(ValueError, match="context"):
            eng.submit([1] * 600, GREEDY)
    finally:
        eng.close()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # untied, tied output projection
def test_frozen_float32_weights_decode_column_major_with_the_same_results(tmp_path, name):
    """A model nothing trains gets its linear weights laid out for decoding (same shapes and values, tied weights
    still one tensor, saved files unchanged): row-major where the C step's lmf_gemv reads them (rows of a multiple
    of 16 inputs, AVX512), column-major for PyTorch's product otherwise; a model with trainable weights is left as
    it is."""
    from safetensors.torch import load_file

    from lmforge.checkpoint import save_checkpoint
    from lmforge.infer.engine import stream_layout
    from lmforge.infer.native import library

    torch.manual_seed(0)
    cfg = get_preset(name, block_size=64, vocab_size=97)
    model = Decoder(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt, p = [5, 6, 7, 8], SamplingParams(temperature=0, max_new_tokens=20)
    want = generate(model, prompt, p)
    assert stream_layout(model) == 0 and model.blocks[0].mlp.fc1.weight.is_contiguous()  # trainable: untouched
    model.requires_grad_(False)
    with torch.inference_mode():
        assert generate(model, prompt, p) == want  # SlotRunner lays the weights out
    lib = library()
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            w = m.weight
            row = lib is not None and lib.lmf_gemv_ok(w.shape[1])
            assert (w.is_contiguous() if row else w.stride() == (1, w.shape[0])) and not w.is_inference()
    assert model.__dict__["_lmforge_laid_out"]
    assert (model.lm_head.weight is model.wte.weight) == cfg.tie_embeddings
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.tensor([prompt * 3])
    with torch.no_grad():
        ref = Decoder(cfg).eval()
        ref.load_state_dict(before)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    saved = load_file(str(save_checkpoint(model, tmp_path / "m") / "model.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in saved)
    # loaded from the file (tensors on a mapping of it, whose pages are handed back once copied): the same again
    from lmforge.checkpoint import load_model

    loaded = load_model(tmp_path / "m").eval().requires_grad_(False)
    assert generate(loaded, prompt, p) == want
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_column_major_layout_keeps_two_parameters_that_view_one_loaded_tensor(tmp_path):
    """Two parameters on one tensor of a loaded file (an untied model whose output projection was loaded from the
    embedding): the file pages under them stay until both are copied, so the one copied second keeps the values
    it was given in place after loading (not the file's)."""
    from lmforge.checkpoint import load_model, save_checkpoint
    from lmforge.infer.engine import stream_layout

    torch.manual_seed(0)
    cfg = get_preset("tiny-llama", block_size=64, vocab_size=97)
    assert not cfg.tie_embeddings
    save_checkpoint(Decoder(cfg), tmp_path / "m")
    model = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        model.lm_head.weight.data = model.wte.weight.data  # two parameters, one storage on the file's mapping
        model.wte.weight.mul_(2.0)  # changed in place after loading
    want = model.wte.weight.detach().clone()
    model.requires_grad_(False)
    assert stream_layout(model) > 0
    torch.testing.assert_close(model.wte.weight, want, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, want, rtol=0, atol=0)


def test_an_infinite_temperature_is_refused():
    """It sampled uniformly (random bytes, exit 0) while NaN and negative values were refused."""
    for t in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            SamplingParams(temperature=t).check()
    SamplingParams(temperature=0.0).check()


# ---- the next step begun in the background while a lone request's tokens are reported --------------------------


def test_runner_start_finish_gives_decodes_logits_and_guards_the_cache(stories, prompts):
    """``SlotRunner.start``/``finish``: the same logits and cache as ``decode`` (a row in a slot other than 0, idle
    rows before it); while a step is under way nothing else may use the runner."""
    model, _ = stories
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = SlotRunner(model, 4), SlotRunner(model, 4)
        for r in (a, b):
            r.prefill(2, prompts[0])
        toks = [None, None, 7]
        for _ in range(2):  # a step of three rows is planned and has run once: start applies from then on
            a.decode(toks)
            b.decode(toks)
        for tok in (7, 300, 9):
            want = a.decode([None, None, tok])
            assert b.start([None, None, tok])
            with pytest.raises(RuntimeError, match="under way"):
                b.decode([None, None, tok])
            with pytest.raises(RuntimeError, match="under way"):
                b.prefill(0, prompts[1])
            got = b.finish()
            assert torch.equal(got, want) and got.shape[0] == 1  # slot 2's row alone
            assert a.lens == b.lens
        with pytest.raises(RuntimeError, match="no decoding step"):
            b.finish()
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    finally:
        torch.set_num_threads(before)


def test_engine_begins_a_lone_requests_next_step_with_the_same_results(stories, prompts):
    """Once one request runs alone (here in slot 2, the others done), its next step is begun before its token is
    reported: greedy and seeded sampling give what single-sequence generation gives; a stop string found after the
    next step began drops that step; a request arriving meanwhile waits for it and decodes alike."""
    model, tok = stories
    full = tok.decode(prompts[2] + generate(model, prompts[2], GREEDY))[len(tok.decode(prompts[2])):]
    cases = [(prompts[0], SamplingParams(temperature=0, max_new_tokens=3)),
             (prompts[1], SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=6, seed=3)),
             (prompts[3], SamplingParams(temperature=0.8, max_new_tokens=60, seed=5)),
             (prompts[2], SamplingParams(temperature=0, max_new_tokens=40, stop=[full[25:29]]))]
    late = (prompts[4], SamplingParams(temperature=0, max_new_tokens=30))
    want = [complete(model, tok, p, sp) for p, sp in [*cases, late]]
    eng = Engine(model, tok, max_batch=4, threads=2)
    try:
        reqs = eng.submit_group([(p, sp, i) for i, (p, sp) in enumerate(cases[:3])])
        alone = iter(reqs[2])
        for _ in range(20):  # the two short ones end, the third runs alone in slot 2
            next(alone)
        started = eng.started_steps
        reqs.append(eng.submit(*cases[3]))  # arrives while a step is under way
        reqs.append(eng.submit(*late))
        for r in reqs:
            r.result()
    finally:
        eng.close()
    assert started > 0 and eng.started_steps > started
    for r, w in zip(reqs, want):
        assert r.token_ids == w.token_ids and r.finish_reason == w.finish_reason
    assert reqs[3].text == want[3].text == full.split(full[25:29])[0]


def test_a_pair_of_threads_shares_a_begun_steps_rows(stories, prompts):
    """Decoding on a pair of threads (``SlotRunner.pair``): a step of six rows begun in the background and joined
    (two chunks, one perhaps computed by the joining thread) gives a synchronous step's logits, argmax and cache."""
    model, _ = stories
    a, b = SlotRunner(model, 8), SlotRunner(model, 8)
    if not b.pair_threads():
        pytest.skip("no one-call step or background thread here")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # (as Engine keeps it: the library's thread is the second)
    try:
        for r in (a, b):
            for s in range(6):
                r.prefill(s, prompts[s])
            r.decode([6 + s for s in range(6)])  # (the first step of a row count is planned: begun from then on)
            r.decode([None, 4, None, 5])
        for t in range(3):
            toks = [7 + t + s for s in range(6)]
            want = a.decode(toks)
            assert b.start(toks)
            got = b.finish()
            assert torch.equal(got, want) and noted_argmax(got) == want.argmax(dim=-1).tolist()
            assert torch.equal(b.decode([None, 5, None, 6]), a.decode([None, 5, None, 6]))  # (begun and joined)
    finally:
        torch.set_num_threads(before)
    assert a.lens == b.lens and torch.equal(a.k[:, :6, :, :20], b.k[:, :6, :, :20])


def test_a_begun_step_is_timed_from_its_start_to_the_end_of_its_computation(stories, prompts):
    """``begun_seconds`` (the engine's decode_seconds for a begun step): the step's time under way as the library
    measured it, from its start to the end of its last rows, not the caller's wait for it (none here: it joins 50 ms
    later) nor the time before the join."""
    model, _ = stories
    r = SlotRunner(model, 4)
    if not r.pair_threads():
        pytest.skip("no one-call step or background thread here")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for s in range(4):
            r.prefill(s, prompts[s])
        r.decode([5, 6, 7, 8])  # (planned: begun from then on)
        for _ in range(3):
            assert r.start([9, 10, 11, 12])
            t = time.perf_counter()
            time.sleep(0.05)
            r.finish()
            assert 0 < r.begun_seconds < min(0.02, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)


def test_engine_on_a_pair_of_threads_begins_steps_of_many_requests(stories, prompts):
    """With two threads and a one-call step, the engine begins the next step of every running request before it
    reports their tokens: greedy and seeded sampling, a stop string (its row dropped from the begun step), a
    cancelled request and one arriving mid-step all give what they give alone."""
    model, tok = stories
    full = tok.decode(prompts[2] + generate(model, prompts[2], GREEDY))[len(tok.decode(prompts[2])):]
    cases = [(prompts[0], SamplingParams(temperature=0, max_new_tokens=30)),
             (prompts[1], SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=40, seed=3)),
             (prompts[2], SamplingParams(temperature=0, max_new_tokens=40, stop=[full[25:29]])),
             (prompts[3], SamplingParams(temperature=0.8, max_new_tokens=60, seed=5))]
    late = (prompts[4], SamplingParams(temperature=0, max_new_tokens=30))
    want = [complete(model, tok, p, sp) for p, sp in [*cases, late]]
    eng = Engine(model, tok, max_batch=6, threads=2)
    try:
        reqs = eng.submit_group([(p, sp, i) for i, (p, sp) in enumerate(cases)])
        doomed = eng.submit(prompts[5], SamplingParams(temperature=0, max_new_tokens=200))
        steps = iter(reqs[3])
        for _ in range(10):
            next(steps)
        doomed.cancel()
        reqs.append(eng.submit(*late))  # arrives while a step is under way
        for r in reqs:
            r.result()
    finally:
        eng.close()
    if not eng.runner.pair:
        pytest.skip("no one-call step or background thread here")
    assert eng.started_rows > eng.started_steps > 0  # steps of several rows begun
    for r, w in zip(reqs, want):
        assert r.token_ids == w.token_ids and r.finish_reason == w.finish_reason
    assert reqs[2].text == want[2].text == full.split(full[25:29])[0] and doomed.finish_reason == "cancelled"


def test_engine_cancels_and_closes_with_a_step_under_way(stories, prompts, singles):
    model, tok = stories
    eng = Engine(model, tok, max_batch=2, threads=2)
    try:
        long = eng.submit(prompts[0], SamplingParams(temperature=0, max_new_tokens=400))
        steps = iter(long)
        for _ in range(30):
            next(steps)
        long.cancel()
        rest = list(steps)
        assert long.finish_reason == "cancelled" and len(rest) < 370
        assert eng.started_steps > 0
        assert [s.token for s in eng.submit(prompts[2], GREEDY) if s.token >= 0] == singles[2]
        eng.submit(prompts[1], SamplingParams(temperature=0, max_new_tokens=400))
        time.sleep(0.05)
    finally:
        eng.close()  # (a step may be under way: it is waited for)
    assert not eng._thread.is_alive()
