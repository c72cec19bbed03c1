"""Speculative decoding (``lmforge.infer.speculative``): checked tokens' logits are a full forward's, greedy decoding
gives plain decoding's tokens (also with a draft that proposes badly), speculative sampling keeps the model's
distribution, penalties and log-probabilities stay the sampler's, and `lmforge generate --draft` prints what plain
decoding prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.infer.engine import SlotRunner
from lmforge.infer.generate import Sequence, stream_steps
from lmforge.infer.sampling import SamplingParams, TokenSampler, distribution, draw
from lmforge.infer.speculative import accept, draft_unsupported, make_draft, speculative_steps
from lmforge.model import Decoder
from lmforge.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(get_preset("tiny-llama", block_size=128, vocab_size=96)).eval().requires_grad_(False)
    for p in model.parameters():  # logits of a trained model's spread
        p.mul_(2.5)
    return model


@pytest.mark.parametrize("native", ["1", "0"])
def test_extend_gives_a_full_forwards_logits_and_takes_positions_back(native, monkeypatch):
    """``SlotRunner.extend`` after a prefill: the logits of every new token are the full forward's; setting the
    length back and extending with other tokens gives theirs (the C step's rows and the decoder's path)."""
    monkeypatch.setenv("LMFORGE_NATIVE", native)
    model = _model()
    prompt, more, other = [1, 5, 9, 13, 2], [7, 8, 30, 31], [40, 41, 42]
    runner = SlotRunner(model, 1, 64)
    runner.prefill(0, prompt)
    got = runner.extend(0, more)
    want = model(torch.tensor([prompt + more]))[0, len(prompt):]
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item()) and runner.lens[0] == 9
    runner.lens[0] = 7  # keep two of them
    got = runner.extend(0, other)
    want = model(torch.tensor([prompt + more[:2] + other]))[0, 7:]
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item()) and runner.lens[0] == 10


@pytest.mark.parametrize("bad_draft", [False, True])
def test_greedy_gives_plain_decodings_tokens(bad_draft):
    """Greedy with the model's int4 copy proposing (nearly always right) and with an unrelated model proposing
    (nearly always wrong): the tokens of plain decoding, to the length asked."""
    model = _model()
    draft = make_draft(model) if not bad_draft else _model(seed=7)
    prompt = [1, 5, 9, 13]
    for n in (1, 2, 17, 60):
        params = SamplingParams(temperature=0, max_new_tokens=n)
        plain = [s.token for s in stream_steps(model, prompt, params, draft=None)]
        ours = [s.token for s in stream_steps(model, prompt, params, draft=draft)]
        assert ours == plain and len(ours) == n


def test_the_first_token_does_not_wait_for_the_draft(monkeypatch):
    """With ``draft="auto"`` (where a draft pays) the first token comes from the prompt's forward before the draft is
    built; the draft then proposes the rest (greedy: plain decoding's tokens)."""
    from lmforge.infer import speculative

    model = _model()
    monkeypatch.setattr(speculative, "draft_unsupported", lambda model, any_size=False: None)
    events = []
    monkeypatch.setattr(speculative, "make_draft", lambda m: events.append("draft") or make_draft(m))
    params = SamplingParams(temperature=0, max_new_tokens=20)
    steps = stream_steps(model, [1, 5, 9, 13], params, draft="auto")
    first = next(steps)
    assert events == []
    ours = [first.token] + [s.token for s in steps]
    assert events == ["draft"]
    assert ours == [s.token for s in stream_steps(model, [1, 5, 9, 13], params, draft=None)]


def test_a_drafts_runner_leaves_the_models_planned_step_alone():
    """The draft shares the model's norms; a runner of the draft made after the model's step was planned (its C
    step points into those tensors) moves none of them, and the model's logits stay the same."""
    from lmforge.infer.speculative import Speculator

    model = _model()
    runner = SlotRunner(model, 1, 64)
    runner.prefill(0, [1, 5, 9, 13])
    before = runner.extend(0, [7, 8, 9])
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    Speculator(make_draft(model), 64)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    runner.lens[0] = 4
    assert torch.equal(runner.extend(0, [7, 8, 9]), before)


def test_penalties_seeds_and_logprobs_stay_the_samplers():
    """Sampling with a repetition penalty (the model's own choice is compared with the draft's): the same seed gives
    plain decoding's tokens and log-probabilities."""
    model = _model()
    params = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=5, max_new_tokens=40, logprobs=True,
                  top_logprobs=2)
    plain = list(stream_steps(model, [1, 5, 9], SamplingParams(**params), draft=None))
    ours = list(stream_steps(model, [1, 5, 9], SamplingParams(**params), draft=make_draft(model)))
    assert [s.token for s in ours] == [s.token for s in plain]
    assert all(abs(a.logprob - b.logprob) < 1e-4 and [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
               for a, b in zip(ours, plain))


def test_speculative_sampling_step_draws_from_the_models_distribution():
    """``accept``: a token drawn from q, kept or replaced, is distributed as p (30,000 draws against the exact p,
    within 5 standard errors per token)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.2, 0.4, 0.1, 0.0, 0.1, 0.2])
    n = 30000
    counts = torch.zeros(6)
    for d in torch.multinomial(q, n, replacement=True, generator=gen).tolist():
        counts[accept(p, q, d, gen)[1]] += 1
    freq = counts / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), freq


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    """``draw`` (speculative sampling's draws; torch.multinomial took 0.92 ms a draw over SmolLM2's vocabulary):
    30,000 draws from an unnormalised distribution with zeros at both ends and inside, within 5 standard errors per
    token; the same generator state draws the same tokens."""
    p = torch.tensor([0.0, 1.0, 0.0, 0.4, 0.6, 0.0])
    gen = torch.Generator().manual_seed(1)
    n = 30000
    freq = torch.bincount(torch.tensor([draw(p, gen) for _ in range(n)]), minlength=6) / n
    want = p / p.sum()
    assert freq[want == 0].sum() == 0 and ((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt()).all(), freq
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [draw(p, a) for _ in range(20)] == [draw(p, b) for _ in range(20)]


def test_sampled_sequences_follow_the_model():
    """Whole sequences sampled with an unrelated model proposing: the second token's frequencies given the first
    follow the model's distribution at that position (top-p 0.9 truncation included), not the draft's."""
    model = _model()
    draft = _model(seed=7)
    prompt = [1, 5, 9]
    p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3)
    firsts: dict[int, list[int]] = {}
    for seed in range(600):
        seq = Sequence(prompt, SamplingParams(**{**p.__dict__, "seed": seed}), None, 128, 96, TokenSampler)
        out = [s.token for s in speculative_steps(model, draft, seq, 16)]
        firsts.setdefault(out[0], []).append(out[1])
    first, seconds = max(firsts.items(), key=lambda kv: len(kv[1]))
    want = distribution(model(torch.tensor([prompt + [first]]))[0, -1:], p)[0]
    freq = torch.bincount(torch.tensor(seconds), minlength=96).float() / len(seconds)
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / len(seconds)).sqrt() + 1e-6).all()
    assert (freq[want == 0] == 0).all()


def test_auto_leaves_small_and_quantized_models_alone():
    from lmforge.quant import QuantConfig, quantize_model

    model = _model()
    assert "MiB" in draft_unsupported(model)
    assert draft_unsupported(model, any_size=True) in (None, "no int4 kernel here (AVX512-VNNI and a C compiler)")
    quantize_model(model, QuantConfig(bits=8))
    assert draft_unsupported(model, any_size=True) == "a quantized or adapted model"


def test_generate_with_a_draft_prints_what_plain_decoding_prints():
    """`lmforge generate --draft int4` on the bundled stories260K, greedy: plain decoding's text; a quantized model
    is refused in one line."""
    if draft_unsupported(_model(), any_size=True):
        pytest.skip(f"no int4 draft here: {draft_unsupported(_model(), any_size=True)}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "lmforge", "generate", "--prompt", "Once upon a time", "--temperature", "0",
            "--max-new-tokens", "80"]
    ours = subprocess.run(base + ["--draft", "int4"], capture_output=True, text=True, env=env, timeout=300)
    plain = subprocess.run(base + ["--draft", "none"], capture_output=True, text=True, env=env, timeout=300)
    assert ours.returncode == 0 and plain.returncode == 0, ours.stderr[-2000:] + plain.stderr[-2000:]
    assert ours.stdout == plain.stdout and len(ours.stdout) > 100


def test_engine_decodes_a_lone_request_speculatively():
    """The serving engine with a Speculator: a request running alone takes rounds of the draft (greedy: plain
    decoding's tokens); requests running together take batched steps, with their plain tokens too."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.speculative import Speculator

    model = _model()
    plain = {p: [s.token for s in stream_steps(model, [p, 5, 9], SamplingParams(temperature=0, max_new_tokens=30),
                                               draft=None)] for p in (1, 2, 3)}
    engine = Engine(model, max_batch=4, max_len=128)
    engine.speculator = spec = Speculator(make_draft(model), engine.runner.max_len)
    try:
        alone = engine.submit([1, 5, 9], SamplingParams(temperature=0, max_new_tokens=30))
        assert [s.token for s in alone.result()] == plain[1] and spec.rounds > 0
        rounds = spec.rounds
        together = [engine.submit([p, 5, 9], SamplingParams(temperature=0, max_new_tokens=30)) for p in (2, 3)]
        assert [[s.token for s in r.result()] for r in together] == [plain[2], plain[3]]
        assert spec.rounds - rounds < 10  # mostly batched steps (the last one alone may speculate)
    finally:
        engine.close()
