"""Autoregressive generation with a KV cache: prefill the prompt, then decode one token at a time.

- ``stream`` / ``generate``: one sequence, token ids.
- ``stream_steps`` / ``complete``: one sequence with text: incremental detokenization, stop strings, log-probs.
- ``generate_batch``: prompts of different lengths in one batch (left padding, a key mask, positions from the mask).
- ``Sequence``: the per-sequence state (sampler, stop rules, text) shared by these and by the serving engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lmforge.infer.engine import SlotRunner
from lmforge.infer.sampling import SamplingParams, TokenSampler, select
from lmforge.infer.sequence import Sequence, Step  # noqa: F401 - also importable from here, as before
from lmforge.infer.speculative import resolve_draft, speculative_steps
from lmforge.infer.text import TextStream  # noqa: F401 - also importable from here, as before
from lmforge.model import Decoder, KVCache


@torch.inference_mode()
def stream_steps(model: Decoder, prompt_ids: list[int], params: SamplingParams, tokenizer=None,
                 seq: Sequence | None = None, draft: Decoder | Callable[[], Decoder] | str | None = "auto"
                 ) -> Iterator[Step]:
    """Generate one sequence, yielding a ``Step`` per token (with text when a tokenizer is given).

    Stops at a stop id (not yielded), a stop string (text cut before it), ``max_new_tokens`` or the context end.
    Pass ``seq`` to read ``finish_reason`` and the full text afterwards. ``draft``: a model proposing tokens for
    speculative decoding (``lmforge.infer.speculative``: the same tokens and distribution, fewer passes over the
    weights), or a function making it (called after the first token); "auto" (default): the model's int4 copy where
    that pays (a float32 model of 64 MiB of block weights or more on a CPU with the int4 kernel), built after the
    first token; None: none.
    """
    params.check()
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token (e.g. BOS)")
    cfg = model.cfg
    nv = model.num_virtual_tokens  # prefix/prompt tuning: virtual tokens take the start of the context
    ctx = cfg.block_size - nv
    if len(prompt_ids) >= ctx and params.max_new_tokens > 0:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context of {ctx}")
    seq = seq or Sequence(prompt_ids, params, tokenizer, ctx, cfg.vocab_size, TokenSampler)
    if seq.finish_reason is not None:
        return
    cap = min(cfg.block_size, nv + len(prompt_ids) + params.max_new_tokens)
    draft = resolve_draft(model, draft, lazy=True)
    if draft is not None and seq.limit > 1 and not nv:
        yield from speculative_steps(model, draft, seq, cap)
        return
    runner = SlotRunner(model, 1, cap)
    logits = runner.prefill(0, prompt_ids)[None]
    while True:
        (choice,) = select(logits, [seq.sampler])
        step = seq.accept(choice)
        if step is not None:
            yield step
        if seq.finish_reason is not None:
            return
        logits = runner.decode([choice.token])


def stream(model: Decoder, prompt_ids: list[int], params: SamplingParams, tokenizer=None,
           draft: Decoder | str | None = "auto") -> Iterator[int]:
    """Yield new token ids one by one until a stop id, ``max_new_tokens`` or the context length (stop strings
    too when a tokenizer is given); ``draft`` as in ``stream_steps``."""
    for step in stream_steps(model, prompt_ids, params, tokenizer, draft=draft):
        if step.token >= 0:
            yield step.token


def generate(model: Decoder, prompt_ids: list[int], params: SamplingParams, tokenizer=None) -> list[int]:
    return list(stream(model, prompt_ids, params, tokenizer))


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float | None] = field(default_factory=list)


def complete(model: Decoder, tokenizer, prompt_ids: list[int], params: SamplingParams) -> Completion:
    """Generate one sequence and return its text (stop strings applied), ids and finish reason."""
    seq = Sequence(prompt_ids, params, tokenizer, model.cfg.block_size - model.num_virtual_tokens,
                   model.cfg.vocab_size, TokenSampler)
    steps = list(stream_steps(model, prompt_ids, params, tokenizer, seq=seq))
    return Completion(seq.output_text, list(seq.out_ids), seq.finish_reason or "length",
                      [s.logprob for s in steps if s.token >= 0])


@torch.inference_mode()
def generate_batch(model: Decoder, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   tokenizer=None) -> list[list[int]]:
    """Generate for several prompts of different lengths in one batch: prompts are left-padded, padding is hidden
    by a key mask and each row's positions count only its real tokens. Returns the new ids of each prompt."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    plist = params if isinstance(params, list) else [params] * len(prompts)
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    nv = model.num_virtual_tokens  # prefix/prompt tuning: the decoder adds its virtual tokens before the prompts
    ctx = cfg.block_size - nv
    seqs = [Sequence(p, sp, tokenizer, ctx - (P - len(p)), cfg.vocab_size, TokenSampler)
            for p, sp in zip(prompts, plist)]
    for sp in plist:
        sp.check()
    steps = max(s.limit for s in seqs)
    if steps <= 0:
        return [[] for _ in prompts]
    max_len = P + steps
    if P >= ctx:
        raise ValueError(f"prompt of {P} tokens leaves no room in the context of {ctx}")
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    mask = torch.ones(B, max_len, dtype=torch.bool, device=device)  # preallocated key mask, sliced per step
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, device=device)
        mask[i, : P - len(p)] = False
    pos = (mask[:, :P].long().cumsum(-1) - 1).clamp_min(0)  # positions from the mask
    if cfg.position == "glm2d":
        pos = torch.stack([pos, torch.zeros_like(pos)], dim=1)
    cache = KVCache(cfg, B, nv + max_len, device=device, dtype=dtype)
    logits = model(ids, position_ids=pos, key_mask=mask[:, :P], cache=cache)[:, -1]
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    samplers = [s.sampler for s in seqs]
    for _ in range(steps):
        choices = select(logits, samplers)
        for s, c in zip(seqs, choices):
            if s.finish_reason is None:
                s.accept(c)
        if all(s.finish_reason is not None for s in seqs):
            break
        x = torch.tensor([[c.token] for c in choices], device=device)
        S = cache.pos + 1 - nv  # the key mask covers the real tokens; the decoder adds the virtual ones
        p = next_pos[:, None] if cfg.position != "glm2d" else torch.stack([next_pos[:, None], 0 * next_pos[:, None]], 1)
        logits = model(x, position_ids=p, key_mask=mask[:, :S], cache=cache)[:, -1]
        next_pos = next_pos + 1
    return [s.out_ids for s in seqs]
