"""Preallocated key/value cache for incremental decoding (prefill, then one token at a time)."""

from __future__ import annotations

import os

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError

MEMORY_FRACTION = 0.5  # a cache may take at most this share of the device's memory


def device_memory(device: torch.device | str | None) -> int:
    """Total bytes of the device's memory (physical RAM for the CPU)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def kv_cache_len(cfg: ModelConfig, n_seqs: int, max_len: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> int:
    """Positions per sequence to allocate for a key/value cache, checked before anything is allocated.

    ``max_len`` (a user's ``--max-len``) must fit in ``MEMORY_FRACTION`` of the device's memory (else a one-line
    error); without it the model's ``block_size`` is used, reduced to what fits."""
    per_pos = 2 * cfg.n_layer * n_seqs * cfg.kv_heads * cfg.head_size * torch.empty(0, dtype=dtype).element_size()
    budget = int(device_memory(device) * MEMORY_FRACTION)
    fit = budget // per_pos
    if max_len is not None:
        if max_len < 1:
            raise LMForgeError(f"--max-len {max_len}: must be >= 1")
        n = max_len
        if n > fit:
            # (the command's levers: serve's --max-len and --max-batch, self-instruct's and rejection-sample's
            # --batch-size and --max-new-tokens; it named --max-len to commands without one)
            most = budget // (per_pos // n_seqs * n)
            raise LMForgeError(f"a key/value cache of {n:,} positions x {n_seqs:,} sequences needs "
                               f"{n * per_pos / 2**30:.1f} GiB, more than {budget / 2**30:.1f} GiB: at most {most:,} "
                               f"such sequences fit at once, or {n_seqs:,} of at most {fit:,} positions each")
        return n
    if fit < 1:
        raise LMForgeError(f"a key/value cache for {n_seqs} sequences needs {per_pos / 2**30:.1f} GiB per position, "
                           f"more than {budget / 2**30:.1f} GiB: the model is too large for this device")
    return min(cfg.block_size, fit)


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
        self.max_len = kv_cache_len(cfg, batch_size, max_len, dtype, device)
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
