"""Position encodings: rotary (RoPE, halves or interleaved pairs, partial), ALiBi slopes. Learned tables live in
the decoder."""

from __future__ import annotations

import math

import torch
from torch import nn


class Rotary(nn.Module):
    """cos/sin tables for ``dim`` rotated channels, gathered at arbitrary position ids."""

    def __init__(self, dim: int, max_len: int, theta: float = 10000.0, interleaved: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.interleaved = interleaved
        device = torch.get_default_device()
        with torch.device("cpu"):  # see _ON_CPU
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            t = torch.arange(max_len, dtype=torch.int64).float()
            freqs = torch.outer(t, inv_freq)  # (max_len, dim/2)
            if interleaved:  # (f0, f0, f1, f1, ...)
                emb = freqs.repeat_interleave(2, dim=-1)
            else:  # (f0, f1, ..., f0, f1, ...)
                emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) or (T,) -> cos, sin of shape (B|1, 1, T, dim), ready to broadcast over heads."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (B, H, T, D); the rest pass through."""
    d = cos.shape[-1]
    x_rot, x_pass = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return out if x_pass is None else torch.cat((out, x_pass), dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), with BLOOM's rule for head counts that are not powers of two."""
    device = torch.get_default_device()
    closest = 2 ** math.floor(math.log2(n_head))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    with torch.device("cpu"):  # see _ON_CPU
        slopes = base ** torch.arange(1, closest + 1, dtype=torch.float32)
        if closest != n_head:
            extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
            n_rest = min(closest, n_head - closest)
            extra = extra_base ** torch.arange(1, 1 + 2 * n_rest, 2, dtype=torch.float32)
            slopes = torch.cat([slopes, extra])
    return slopes.to(device)


# _ON_CPU: the tables are computed on the CPU and moved to the device the model is built on. Computed under a
# ``torch.device("meta")`` context (how checkpoints are built before loading) they would go through torch._refs,
# which imports torch._dynamo: ~1 s and ~80 MB for every command that loads a model.
