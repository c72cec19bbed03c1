"""Token selection in NumPy (``lmforge.infer.lean_sampling``, the lean server's) against PyTorch's
(``lmforge.infer.sampling``) on the same logits: greedy choices, log-probabilities, penalties and the distributions
sampled rows are drawn from."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lmforge.infer import lean_sampling as ls
from lmforge.infer import sampling as ts
from lmforge.infer.params import SamplingParams


def _logits(B: int, V: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((B, V)) * 3).astype(np.float32)


def test_greedy_takes_the_first_of_equal_largest_logits():
    x = _logits(4, 1000)
    x[1, [7, 9]] = x[1].max() + 1
    got = ls.select(x, [ls.LeanSampler(SamplingParams(temperature=0), [], 1000) for _ in range(4)])
    want = ts.select(torch.from_numpy(x.copy()), [ts.TokenSampler(SamplingParams(temperature=0), [], 1000)
                                                  for _ in range(4)])
    assert [c.token for c in got] == [c.token for c in want] and got[1].token == 7
    rows = [3, 1]  # (the rows of the requests still running, of a step that computed more)
    got = ls.select(x, [ls.LeanSampler(SamplingParams(temperature=0), [], 1000) for _ in rows], rows)
    want = ts.select(torch.from_numpy(x.copy()), [ts.TokenSampler(SamplingParams(temperature=0), [], 1000)
                                                  for _ in rows], rows)
    assert [c.token for c in got] == [c.token for c in want] == [int(x[3].argmax()), 7]


@pytest.mark.parametrize("V", [1000, 49152])
def test_logprobs_and_top_logprobs_are_pytorchs(V):
    x = _logits(3, V, 1)
    p = SamplingParams(temperature=0, logprobs=True, top_logprobs=5)
    got = ls.select(x, [ls.LeanSampler(p, [], V) for _ in range(3)])
    want = ts.select(torch.from_numpy(x.copy()), [ts.TokenSampler(p, [], V) for _ in range(3)])
    for g, w in zip(got, want):
        assert g.token == w.token and abs(g.logprob - w.logprob) < 1e-5
        assert [i for i, _ in g.top_logprobs] == [i for i, _ in w.top_logprobs]
        assert np.allclose([v for _, v in g.top_logprobs], [v for _, v in w.top_logprobs], atol=1e-5)


def test_penalties_are_pytorchs_over_steps():
    """Repetition, frequency and presence penalties: the same penalized logits and greedy tokens over 12 steps, each
    step's token counted by both samplers."""
    V, prompt = 300, [1, 2, 3, 50, 50]
    p = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    ours, theirs = ls.LeanSampler(p, prompt, V), ts.TokenSampler(p, prompt, V)
    rng = np.random.default_rng(3)
    base = _logits(1, V, 2)[0]
    for step in range(12):
        x = base + rng.standard_normal(V).astype(np.float32) * 0.1
        assert np.allclose(ours.penalize(x), theirs.penalize(torch.from_numpy(x.copy())).numpy(), atol=1e-6)
        (g,), (w,) = ls.select(x[None], [ours]), ts.select(torch.from_numpy(x[None].copy()), [theirs])
        assert g.token == w.token, step


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(temperature=1.2, top_k=5),
                                dict(temperature=1.0, top_p=0.7), dict(temperature=0.9, min_p=0.1, top_p=0.95),
                                dict(temperature=1.0, top_k=8, top_p=0.8, min_p=0.05)])
@pytest.mark.parametrize("where", ["c", "numpy"])
def test_sampled_rows_follow_pytorchs_distribution(kw, where, monkeypatch):
    """``select`` and ``sample`` draw from PyTorch's distribution: in C where the library is loaded (the lean
    runtime's decoding loads it), in NumPy where it is not."""
    from lmforge.infer import clib

    if where == "numpy":
        monkeypatch.setattr(ls, "loaded", lambda: None)
    elif clib.library() is None:
        pytest.skip("no C compiler here: the draws are NumPy's")
    calls = []
    monkeypatch.setattr(ls, "draw_rows", lambda *a: calls.append(1) or clib.draw_rows(*a))
    x = _logits(1, 40, 4)
    p = SamplingParams(seed=5, **kw)
    want = ts.distribution(torch.from_numpy(x.copy()), p)[0].double().numpy()
    s = ls.LeanSampler(p, [], 40)
    for draw in (lambda: ls.select(x, [s])[0].token, lambda: ls.sample(x[0], p.temperature, p.top_k, p.top_p,
                                                                        p.min_p, s.rng)):
        draws = np.bincount([draw() for _ in range(20000)], minlength=40) / 20000
        assert (draws[want == 0] == 0).all()
        assert 0.5 * np.abs(draws - want).sum() < 0.03
    assert bool(calls) == (where == "c")


def test_a_seed_repeats_itself():
    x = _logits(1, 100, 6)
    p = SamplingParams(temperature=1.0, seed=11)
    a, b = ls.LeanSampler(p, [], 100), ls.LeanSampler(p, [], 100)
    assert [ls.select(x, [a])[0].token for _ in range(30)] == [ls.select(x, [b])[0].token for _ in range(30)]
    # a negative seed (an int64, as OpenAI's API and the server's schema allow) was numpy's bare ValueError
    neg = [ls.LeanSampler(SamplingParams(temperature=1.0, seed=seed), [], 100) for seed in (-1, 2**64 - 1)]
    assert [ls.select(x, [neg[0]])[0].token for _ in range(30)] == [ls.select(x, [neg[1]])[0].token
                                                                    for _ in range(30)]


def test_importing_it_does_not_import_torch():
    code = "import sys, lmforge.infer.lean_sampling, lmforge.serve.server, lmforge.commands.serve\n" \
           "assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
