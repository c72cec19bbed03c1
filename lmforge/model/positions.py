"""Position encodings: rotary (RoPE, halves or interleaved pairs, partial), ALiBi slopes. Learned tables live in
the decoder."""

from __future__ import annotations

import math

import torch
from torch import nn

EAGER_POSITIONS = 1 << 15  # rotary tables up to this many positions are built at once; longer ones grow on use


class Rotary(nn.Module):
    """cos/sin tables for ``dim`` rotated channels, gathered at arbitrary position ids.

    Tables cover ``min(max_len, EAGER_POSITIONS)`` positions when built and grow (doubling, up to ``max_len``) when
    a forward reaches past them, so a config with a huge ``block_size`` costs memory for the context actually used.
    """

    def __init__(self, dim: int, max_len: int, theta: float = 10000.0, interleaved: bool = False) -> None:
        super().__init__()
        self.dim, self.max_len, self.theta = dim, max_len, theta
        self.interleaved = interleaved
        cos, sin = self._tables(min(max_len, EAGER_POSITIONS), torch.get_default_device())
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.device("cpu"):  # see _ON_CPU
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))
            t = torch.arange(n, dtype=torch.int64).float()
            freqs = torch.outer(t, inv_freq)  # (n, dim/2)
            if self.interleaved:  # (f0, f0, f1, f1, ...)
                emb = freqs.repeat_interleave(2, dim=-1)
            else:  # (f0, f1, ..., f0, f1, ...)
                emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(device), emb.sin().to(device)

    def ensure(self, n: int) -> None:
        """Grow the tables to cover positions ``0..n-1`` (at least doubling, at most ``max_len``)."""
        have = self.cos.shape[0]
        if n > have and have < self.max_len:
            self.cos, self.sin = self._tables(min(self.max_len, max(n, 2 * have)), self.cos.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) or (T,) -> cos, sin of shape (B|1, 1, T, dim), ready to broadcast over heads."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if self.cos.shape[0] < self.max_len and position_ids.numel():
            self.ensure(int(position_ids.max()) + 1)
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
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = x_rot * cos + rotated * sin
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
