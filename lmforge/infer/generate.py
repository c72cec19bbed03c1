"""Autoregressive generation with a KV cache: prefill the prompt, then decode one token at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.infer.sampling import SamplingParams, sample
from lmforge.model import Decoder, KVCache


@torch.inference_mode()
def stream(model: Decoder, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids one by one until a stop id, ``max_new_tokens`` or the context length."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token (e.g. BOS)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cfg = model.cfg
    max_len = min(cfg.block_size, len(prompt_ids) + params.max_new_tokens)
    if len(prompt_ids) >= max_len and params.max_new_tokens > 0:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context of {cfg.block_size}")
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    cache = KVCache(cfg, 1, max_len, device=device, dtype=dtype)
    x = torch.tensor([prompt_ids], device=device)
    stops = set(params.stop_ids)
    for _ in range(min(params.max_new_tokens, max_len - len(prompt_ids))):
        logits = model(x, cache=cache)[:, -1]
        nxt = sample(logits, params, gen)
        tok = int(nxt.item())
        if tok in stops:
            return
        yield tok
        x = nxt.view(1, 1)


def generate(model: Decoder, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    return list(stream(model, prompt_ids, params))
