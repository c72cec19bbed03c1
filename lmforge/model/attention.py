"""Causal self-attention with multi-head, grouped-query and multi-query variants, via PyTorch's SDPA."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.matmul import call
from lmforge.model.cache import KVCache
from lmforge.model.positions import rotate


class Attention(nn.Module):
    """One fused [Q | K | V] projection, rotary (optional), SDPA, output projection."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_size
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=cfg.attn_out_bias)
        self.dropout = cfg.dropout
        self.scale = cfg.attn_scale
        self.interleaved = cfg.rope_interleaved
        self.glm2d_rotary = cfg.position == "glm2d" and cfg.glm2d == "rotary"
        # another attention for inference, set by lmforge.infer.native.flash_attention_in: (q, k, v, mask, causal,
        # scale) -> (B, T, n_head, head_size), or None to leave those inputs to SDPA
        self.kernel: Callable[..., torch.Tensor | None] | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv, self.hd
        y = call(self.qkv, x)
        qk = y[..., : (nh + nkv) * hd].view(B, T, nh + nkv, hd).transpose(1, 2)
        if rope is not None:  # queries and keys share the positions: one rotation of both (fewer ops per step)
            qk = self._rotate(qk, rope)
        q, k = qk.split([nh, nkv], dim=1)
        v = y[..., (nh + nkv) * hd :].view(B, T, nkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        causal = mask is None and T > 1 and k.shape[2] == T
        if self.kernel is not None and not torch.is_grad_enabled() and not (self.training and self.dropout):
            out = self.kernel(q, k, v, mask, causal, self.scale)  # (B, T, nh, hd), or None: not for these
            if out is not None:
                return call(self.proj, out.view(B, T, nh * hd))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.scale,
            # grouped/multi-query: SDPA pairs each query head with its kv head itself; repeating k and v to every
            # head instead copied the whole cache per layer (16x slower for one query over 512 keys at batch 128)
            enable_gqa=self.n_kv != self.n_head,
        )
        return call(self.proj, y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))

    def _rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.glm2d_rotary:  # ChatGLM-6B: first half by position, second half by block position
            cos, sin, cos_b, sin_b = rope
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((rotate(x1, cos, sin, self.interleaved), rotate(x2, cos_b, sin_b, self.interleaved)), -1)
        cos, sin = rope
        return rotate(x, cos, sin, self.interleaved)
