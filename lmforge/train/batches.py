"""Batch sources for the trainer: fixed-length windows of a token stream, resumable and rank-aware.

Every rank draws the same *global* batch from one seeded generator and keeps its own slice, so N processes with
batch b see exactly what one process with batch N*b sees (the distributed-equivalence test relies on this).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class RandomWindows:
    """nanoGPT's ``get_batch``: random offsets into the token array, x = tokens[i:i+T], y = tokens[i+1:i+T+1]."""

    def __init__(self, tokens: np.ndarray | torch.Tensor, block_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.tokens = tokens if isinstance(tokens, np.ndarray) else tokens.numpy()
        if len(self.tokens) <= block_size + 1:
            raise ValueError(f"only {len(self.tokens)} tokens: need more than block_size+1 = {block_size + 1}")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world = rank, world
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.batches = 0  # batches drawn so far (the resumable position)

    def next_batch(self) -> dict[str, torch.Tensor]:
        T, b = self.block_size, self.batch_size
        ix = torch.randint(len(self.tokens) - T - 1, (b * self.world,), generator=self.gen)
        ix = ix[self.rank * b : (self.rank + 1) * b].tolist()
        x = torch.from_numpy(np.stack([self.tokens[i : i + T].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([self.tokens[i + 1 : i + 1 + T].astype(np.int64) for i in ix]))
        self.batches += 1
        return {"input_ids": x, "targets": y}

    def skip(self, n: int) -> None:
        for _ in range(n):
            torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size * self.world,), generator=self.gen)
        self.batches += n

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches": self.batches}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.gen.manual_seed(s["seed"])
        self.seed, self.batches = s["seed"], 0
        self.skip(s["batches"])

    def fixed_batches(self, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        """``n`` batches from a fresh generator (evaluation: the same batches at every eval)."""
        other = RandomWindows(self.tokens, self.block_size, self.batch_size, seed, self.rank, self.world)
        return [other.next_batch() for _ in range(n)]
