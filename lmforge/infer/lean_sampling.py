"""Next-token selection in NumPy for the lean runtime (``lmforge.infer.lean``: no PyTorch in the process): what
``lmforge.infer.sampling`` does with PyTorch, on the same ``SamplingParams``. ``sample`` draws one token (temperature,
top-k, min-p, top-p); ``LeanSampler`` keeps one sequence's state (its generator, the counts its penalties need) and
``select`` picks the next token of each row of a batch with its own sampler. A seed gives other samples than under
PyTorch (another generator); the distributions, greedy choices, penalties and log-probabilities are the same.
"""

from __future__ import annotations

import random

import numpy as np

from lmforge.infer.clib import draw_rows, loaded
from lmforge.infer.params import Choice, SamplingParams


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float,
           rng: np.random.Generator) -> int:
    """A token from logits (V,), as ``lmforge.infer.sampling.sample`` draws it (greedy at temperature 0); in C where the
    library is loaded (``lmf_sample_rows``: SmolLM2's 49,152 logits 0.3 ms -> 60 us with top-p)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    lib = loaded()
    if lib is not None and logits.dtype == np.float32 and logits.ndim == 1:
        x = np.ascontiguousarray(logits)
        p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        return draw_rows(lib, x.ctypes.data, 1, x.shape[0], x.shape[0], [p], [rng.random()])[0]
    idx, p = support(logits, temperature, top_k, top_p, min_p)
    c = np.cumsum(p)
    return int(idx[min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), len(idx) - 1)])


def support(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
            min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The tokens ``sample`` may draw and their probabilities (float64, summing to 1): temperature, then top-k, min-p
    and top-p (the smallest set of most likely tokens whose mass reaches top_p, found among the tokens above a
    threshold lowered until they hold that mass: no sort of the whole vocabulary)."""
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.shape[0]:
        z = np.where(z < np.partition(z, -top_k)[-top_k], -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if min_p > 0:
        probs[probs < min_p * probs.max()] = 0.0
    if top_p < 1.0:
        probs /= probs.sum()
        t = probs.max() * 1e-3
        while True:
            cand = np.flatnonzero(probs >= t) if t > 0 else np.arange(probs.shape[0])
            if t == 0 or probs[cand].sum() >= top_p:
                break
            t = t * 1e-3 if t > 1e-200 else 0.0
        order = cand[np.argsort(-probs[cand], kind="stable")]
        sp = probs[order]
        keep = np.cumsum(sp) - sp < top_p  # mass of strictly more likely tokens below top_p
        idx, p = order[keep], sp[keep]
    else:
        idx = np.flatnonzero(probs)
        p = probs[idx]
    return idx, p / p.sum()


def distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """``support`` as probabilities over the whole vocabulary."""
    idx, p = support(logits, temperature, top_k, top_p, min_p)
    out = np.zeros(logits.shape[0])
    out[idx] = p
    return out


class LeanSampler:
    """The sampling state of one sequence (``sampling.TokenSampler`` in NumPy): parameters, random generator, token
    counts for the penalties."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int) -> None:
        self.params = params
        # a negative (int64) seed as torch's manual_seed takes it (numpy refuses negative seeds)
        self.rng = np.random.default_rng(params.seed % 2**64 if params.seed is not None else random.getrandbits(63))
        self.counts: np.ndarray | None = None
        self.seen: np.ndarray | None = None
        # greedy, no penalty, no log-probabilities: the token is the argmax and nothing else is kept or reported
        self.plain = params.greedy and not params.penalized and not params.logprobs and not params.top_logprobs
        if params.penalized:
            self.counts = np.zeros(vocab_size, np.float32)  # generated tokens only (OpenAI's penalties)
            self.seen = np.zeros(vocab_size, bool)  # prompt and output (CTRL's penalty)
            self.seen[[i for i in prompt_ids if 0 <= i < vocab_size]] = True

    def observe(self, token: int) -> None:
        if self.counts is not None and 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """logits (V,) float32 -> penalized logits (a new array)."""
        p = self.params
        V = logits.shape[-1]
        counts, seen = self.counts[:V], self.seen[:V]
        out = np.array(logits, np.float32)
        if p.repetition_penalty != 1.0:
            r = np.float32(p.repetition_penalty)
            out = np.where(seen, np.where(out > 0, out / r, out * r), out)
        if p.frequency_penalty or p.presence_penalty:
            out = out - counts * np.float32(p.frequency_penalty) - (counts > 0) * np.float32(p.presence_penalty)
        return out.astype(np.float32, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities (V,) float32 of logits (V,), computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max()
    return (z - np.log(np.exp(z).sum())).astype(np.float32)


def select(logits: np.ndarray, samplers: list[LeanSampler], rows: list[int] | None = None) -> list[Choice]:
    """Pick the next token of each row of ``logits`` (B, V) float32 with that row's sampler (``sampling.select``);
    updates their counts. ``rows``: the rows of ``logits`` to pick from (one per sampler; default all)."""
    if rows is not None and len(rows) != logits.shape[0]:
        logits = logits[rows]
    if all(s.plain for s in samplers):  # the common serving case
        return [Choice(t) for t in logits.argmax(axis=-1).tolist()]
    z = logits
    if any(s.counts is not None for s in samplers):
        z = np.stack([s.penalize(row) if s.counts is not None else row for row, s in zip(logits, samplers)])
    lib = loaded()  # (the lean runtime's decoding loaded it)
    if lib is not None:  # every row in C (lmforge.infer.sampling's draw): no sort of the vocabulary
        z = np.ascontiguousarray(z, np.float32)
        tokens = draw_rows(lib, z.ctypes.data, z.shape[0], z.shape[1], z.strides[0] // 4, [s.params for s in samplers],
                           [0.0 if s.params.greedy else s.rng.random() for s in samplers])
    else:
        tokens = [sample(row, s.params.temperature, s.params.top_k, s.params.top_p, s.params.min_p, s.rng)
                  for row, s in zip(z, samplers)]
    out = []
    for row, s, t in zip(logits, samplers, tokens):
        p = s.params
        c = Choice(t)
        s.observe(c.token)
        if p.logprobs or p.top_logprobs:  # under the model: before penalties, temperature and truncation
            lp = log_softmax(row)
            c.logprob = float(lp[c.token])
            k = min(p.top_logprobs, lp.shape[0])
            if k:
                top = np.argpartition(-lp, k - 1)[:k]
                top = top[np.argsort(-lp[top], kind="stable")]
                c.top_logprobs = list(zip(top.tolist(), lp[top].tolist()))
        out.append(c)
    return out


__all__ = ["LeanSampler", "distribution", "log_softmax", "sample", "select", "support"]
