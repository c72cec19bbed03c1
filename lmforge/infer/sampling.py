"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), min-p; repetition (CTRL), frequency and presence
(OpenAI) penalties; log-probabilities of the chosen tokens.

``sample(logits, params)`` draws for rows that share one set of parameters. ``TokenSampler`` holds the state of one
sequence (its random generators, the token counts the penalties need) and ``select`` picks the next token of many
sequences at once, each with its own parameters: on the CPU in one call of the C helpers (``lmf_sample_rows``: no sort
of the vocabulary), else in a few batched tensor operations. Both draw from the same distribution (``distribution``)
with one uniform number per sampled token from the sequence's generator; a seed's tokens may differ between them.
"""

from __future__ import annotations

import ctypes
import random

import torch

from lmforge.infer.clib import distribution_rows, draw_rows, library, loaded
from lmforge.infer.params import Choice, SamplingParams, cut_at_stop

HELD_ARGMAX = 1 << 13  # logits (rows x vocabulary) an argmax in C takes with the interpreter lock kept (a few us;
# NumPy's is faster alone: SmolLM2's 49,152 logits 6 against 21 us, so larger ones stay NumPy's)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,), every row with the same parameters (penalties are not applied here)."""
    if p.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if p.top_p < 1.0:
        probs = probs / probs.sum(dim=-1, keepdim=True)
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= p.top_p, 0.0)  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- per-sequence state and batched selection ------------------------------------------------------


class TokenSampler:
    """The sampling state of one sequence: parameters, random generator, token counts for the penalties."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)  # speculative decoding's draws
        self.rng = random.Random(seed)  # select's: one uniform draw per sampled token
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        # greedy, no penalty, no log-probabilities: the token is the argmax and nothing else is kept or reported
        self.plain = params.greedy and not params.penalized and not params.logprobs and not params.top_logprobs
        if params.penalized:
            self.counts = torch.zeros(vocab_size)  # generated tokens only (OpenAI's penalties)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # prompt and output (CTRL's penalty)
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab_size], dtype=torch.long)
            self.seen[ids] = True

    def observe(self, token: int) -> None:
        if self.counts is not None and 0 <= token < self.counts.numel():
            self.counts[token] += 1
            self.seen[token] = True

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) float -> penalized logits (a new tensor)."""
        p = self.params
        V = logits.shape[-1]
        counts, seen = self.counts[:V].to(logits.device), self.seen[:V].to(logits.device)
        if p.repetition_penalty != 1.0:
            r = p.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if p.frequency_penalty or p.presence_penalty:
            logits = logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty
        return logits


def select(logits: torch.Tensor, samplers: list[TokenSampler], rows: list[int] | None = None) -> list[Choice]:
    """Pick the next token of each row of ``logits`` (B, V) with that row's sampler; updates their counts. ``rows``:
    the rows of ``logits`` to pick from (one per sampler; default all)."""
    plain = all(s.plain for s in samplers)  # the common serving case, per row a few Python operations less
    if plain and (top := noted_argmax(logits)) is not None:
        return list(map(Choice, top if rows is None else [top[i] for i in rows]))
    if rows is not None and len(rows) != logits.shape[0]:
        logits = take_rows(logits, rows)
    if logits.dtype != torch.float32:  # (.float() of float32 logits is no work, but lets the interpreter lock go)
        logits = logits.float()
    if plain:
        return list(map(Choice, _argmax(logits)))
    B = logits.shape[0]
    want_lp = [s.params.logprobs or s.params.top_logprobs > 0 for s in samplers]
    logp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
    if any(s.counts is not None for s in samplers):
        logits = torch.stack([s.penalize(logits[i]) if s.counts is not None else logits[i]
                              for i, s in enumerate(samplers)])
    greedy = [s.params.greedy for s in samplers]
    lib = library() if logits.device.type == "cpu" and logits.dim() == 2 and not all(greedy) else None
    if all(greedy):
        tokens = _argmax(logits)
    elif lib is not None:  # every row in C: no sort of the vocabulary (SmolLM2's 49,152 logits: 2.8 ms a row)
        x = logits if logits.stride(1) == 1 else logits.contiguous()
        tokens = draw_rows(lib, x.data_ptr(), B, x.shape[1], x.stride(0), [s.params for s in samplers],
                           [0.0 if g else s.rng.random() for s, g in zip(samplers, greedy)])
    else:
        tokens = [0] * B
        rows = [i for i in range(B) if not greedy[i]]
        sub = logits if len(rows) == B else logits[rows]
        probs, idx = _filtered_sorted(sub, [samplers[i].params for i in rows])
        u = torch.tensor([[1.0 - samplers[i].rng.random()] for i in rows], dtype=probs.dtype,
                         device=probs.device)  # in (0, 1]
        cdf = probs.cumsum(dim=-1)
        j = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)
        picked = idx.gather(1, j).squeeze(1).tolist()
        for r, t in zip(rows, picked):
            tokens[r] = t
        g = [i for i in range(B) if greedy[i]]
        if g:
            for i, t in zip(g, _argmax(logits[g])):
                tokens[i] = t
    out = []
    for i, (s, t) in enumerate(zip(samplers, tokens)):
        s.observe(t)
        c = Choice(t)
        if want_lp[i]:
            c.logprob = float(logp[i, t])
            k = s.params.top_logprobs
            if k:
                v, ix = logp[i].topk(min(k, logp.shape[-1]))
                c.top_logprobs = list(zip(ix.tolist(), v.tolist()))
        out.append(c)
    return out


def with_argmax(logits: torch.Tensor, top: list[int]) -> torch.Tensor:
    """``logits`` noted with each row's argmax ``top`` (as ``_argmax`` finds it), found where they were computed (the
    C step): greedy rows take it (``select``) while the tensor is unchanged since (its version; an inference tensor
    has none, and is not noted)."""
    if not logits.is_inference():
        logits.lmf_argmax = (logits._version, top)
    return logits


def noted_argmax(logits: torch.Tensor) -> list[int] | None:
    """The argmax of each row noted by ``with_argmax``, if the tensor has not changed since; else None."""
    noted = getattr(logits, "lmf_argmax", None)
    return noted[1] if noted is not None and noted[0] == logits._version else None


def take_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``logits[rows]``; a CPU float32 tensor's through NumPy, keeping the interpreter lock: torch's indexing lets it
    go, and a decoding thread then waited for the HTTP thread to give it back."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy()[rows])
    return logits[rows]


def _argmax(logits: torch.Tensor) -> list[int]:
    """The index of each row's largest value (the first of equals; NaN counts as largest, as in torch). On the CPU
    up to ``HELD_ARGMAX`` logits go through ``lmf_argmax_rows`` (called keeping the interpreter lock: NumPy's
    argmax and ``.numpy()`` let it go, and a decoding thread then waited for it while the HTTP thread ran; under 16
    streams of stories260K that wait and the like were 4 % of the decoding), the others through NumPy: its vectorised
    argmax takes 3 us for SmolLM2's 49,152 logits where torch's takes 30."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        lib = loaded()  # (never built for this)
        if (lib is not None and logits.dim() == 2 and logits.stride(1) == 1
                and 0 < logits.shape[0] * logits.shape[1] <= HELD_ARGMAX):
            n = logits.shape[0]
            out = (ctypes.c_int64 * n)()
            lib.held.lmf_argmax_rows(logits.data_ptr(), n, logits.shape[1], logits.stride(0), out)
            return out[:]
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def _filtered_sorted(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, min-p, top-p for each row with its own parameters, in the order of each row's
    logits sorted descending. Returns (unnormalised probabilities, vocabulary ids), both (R, K)."""
    R, V = logits.shape
    dev = logits.device
    temp = torch.tensor([[p.temperature] for p in params], device=dev)
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    K = max(ks)
    if K < V:  # every row truncates: only the top K need sorting
        vals, idx = torch.topk(logits, K, dim=-1)
    else:
        vals, idx = logits.sort(dim=-1, descending=True)
    vals = vals / temp
    if min(ks) < K:
        rank = torch.arange(K, device=dev)[None]
        vals = vals.masked_fill(rank >= torch.tensor(ks, device=dev)[:, None], float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([[p.min_p] for p in params], device=dev)
        probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    if any(p.top_p < 1.0 for p in params):
        probs = probs / probs.sum(dim=-1, keepdim=True)
        top_p = torch.tensor([[p.top_p] for p in params], device=dev)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)
    return probs, idx


def distribution(logits: torch.Tensor, params: SamplingParams | list[SamplingParams]) -> torch.Tensor:
    """The normalised distribution (B, V) that ``select`` draws from (after temperature and truncation)."""
    params = params if isinstance(params, list) else [params] * logits.shape[0]
    probs, idx = _filtered_sorted(logits.float(), params)
    out = torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device).scatter(-1, idx, probs)
    return out / out.sum(dim=-1, keepdim=True)


def sparse_distribution(logits: torch.Tensor, p: SamplingParams, candidates: int = 1024) -> torch.Tensor:
    """``distribution`` of one row (V,) for a sampled sequence, from its ``candidates`` most likely tokens where the
    truncation keeps no more than those (a sort of SmolLM2's 49,152 logits takes 2.8 ms; this 0.3), else the full
    sort."""
    V = logits.shape[-1]
    logits = logits.float()
    truncated = 0 < p.top_k < V or p.top_p < 1.0 or p.min_p > 0  # (else a softmax, as fast in PyTorch)
    lib = library() if logits.device.type == "cpu" and logits.dim() == 1 and p.temperature > 0 and truncated else None
    if lib is not None:  # the distribution lmf_sample_rows draws from (SmolLM2 with top-p 0.9: 0.30 -> 0.10 ms)
        x, out = logits.contiguous(), torch.empty(V)
        distribution_rows(lib, x.data_ptr(), 1, V, V, [p], out.data_ptr())
        return out
    topk = 0 < p.top_k < V
    C = p.top_k if topk else min(V, candidates)
    if p.temperature > 0 and not topk and p.top_p >= 1.0 and p.min_p <= 0:  # no truncation
        return torch.softmax(logits / p.temperature, dim=-1)
    if p.temperature <= 0 or C == V:
        return distribution(logits[None], p)[0]
    vals, idx = torch.topk(logits, C)
    z = vals / p.temperature
    probs = torch.exp(z - torch.logsumexp(z if topk else logits / p.temperature, 0))
    if p.min_p > 0:
        keep = probs >= p.min_p * probs[0]
        if not topk and keep[-1]:
            return distribution(logits[None], p)[0]
        probs = probs * keep
    if p.top_p < 1.0:
        q = probs / (probs.sum() if topk or p.min_p > 0 else 1.0)
        keep = (q.cumsum(0) - q) < p.top_p
        if not topk and p.min_p <= 0 and keep[-1]:
            return distribution(logits[None], p)[0]
        probs = probs * keep
    out = torch.zeros(V)
    out[idx] = probs / probs.sum()
    return out


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from ``probs`` (V,), non-negative and not all zero (unnormalised): the first whose running sum
    (float64) passes a uniform number times the total; a token of probability 0 is never drawn. What
    ``torch.multinomial(probs, 1)`` draws, without its cost on a large vocabulary (SmolLM2's 49,152: 0.92 ms a draw
    with a generator, 0.05 ms this way)."""
    c = probs.cumsum(0, dtype=torch.float64)
    u = torch.rand((), generator=generator, dtype=torch.float64) * c[-1]
    return min(int(torch.searchsorted(c, u, right=True)), probs.numel() - 1)


def chosen(logits: torch.Tensor, sampler: TokenSampler, token: int) -> Choice:
    """The ``Choice`` of ``token`` picked from ``logits`` (V,) by other means (speculative sampling): counted by the
    sampler, with its log-probabilities where asked."""
    sampler.observe(token)
    c = Choice(token)
    p = sampler.params
    if p.logprobs or p.top_logprobs:
        logp = torch.log_softmax(logits.float(), dim=-1)
        c.logprob = float(logp[token])
        if p.top_logprobs:
            v, ix = logp.topk(min(p.top_logprobs, logp.shape[-1]))
            c.top_logprobs = list(zip(ix.tolist(), v.tolist()))
    return c


__all__ = ["Choice", "SamplingParams", "TokenSampler", "chosen", "cut_at_stop", "distribution", "draw", "sample",
           "select", "sparse_distribution"]
