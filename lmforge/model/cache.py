"""Preallocated key/value cache for incremental decoding (prefill, then one token at a time)."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig


class KVCache:
    """Keys and values of every layer, shape (layers, batch, kv_heads, max_len, head_dim).

    ``pos`` is the number of positions already written; the decoder advances it after each forward.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or cfg.block_size
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, self.max_len, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at ``pos`` and return all keys/values so far for ``layer``."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


class PrefixedKV:
    """A KVCache stand-in for a forward without a cache when prefix tuning is on: each layer's keys/values are
    the fixed prefix (n_layer, B, kv_heads, P, head_dim) followed by the new ones; ``pos`` is the prefix length."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v, self.pos = k, v, k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.k[layer].to(k.dtype), k], dim=2), torch.cat([self.v[layer].to(v.dtype), v], dim=2)
