"""Prepared token shards (``lmforge data prepare``) opened as memory maps, and fixed-length training windows.

    data = open_prepared("data/")                    # checks sizes and the tokenizer hash
    train = TokenWindows(data.tokens("train"), block_size=256, batch_size=32, seed=0)
    batch = train.next_batch()                       # {"input_ids": (B, T) int64, "targets": (B, T) int64}
    state = train.state_dict(); ...; train.load_state_dict(state)   # resume exactly

Random mode is nanoGPT's ``get_batch``: ``ix = torch.randint(len(data) - T, (B,))`` from a generator seeded with
``seed``, ``x = data[i:i+T]``, ``y = data[i+1:i+1+T]``. Sequential mode walks non-overlapping windows in order
(window k starts at k*T) and wraps around after the last one (an epoch). With ``documents=True`` (needs the
document offsets) a batch also holds ``segment_ids`` (document index within the row, from 0), ``doc_positions``
(position of each token inside its document) and ``loss_mask`` (0 where the target starts a new document, i.e.
predicting it would need to see across a document boundary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LMForgeError

MODES = ("random", "sequential")


@dataclass
class PreparedData:
    """An opened prepared directory: ``index`` is index.json; arrays are read-only memmaps."""

    path: Path
    index: dict[str, Any]
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.index["dtype"]).newbyteorder("<")

    def num_tokens(self, split: str) -> int:
        return int(self._split(split)["tokens"])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.index["splits"]:
            raise LMForgeError(f"{self.path}: no split {split!r} (have {', '.join(self.index['splits'])})")
        return self.index["splits"][split]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (not read into memory)."""
        key = f"tokens:{split}"
        if key not in self._cache:
            s = self._split(split)
            n = int(s["tokens"])
            f = self.path / s["file"]
            self._cache[key] = (np.memmap(f, dtype=self.dtype, mode="r", shape=(n,)) if n
                                else np.zeros(0, self.dtype))
        return self._cache[key]

    def offsets(self, split: str) -> np.ndarray:
        """int64 start offset of each document in the split (the first one is 0)."""
        key = f"offsets:{split}"
        if key not in self._cache:
            self._cache[key] = np.fromfile(self.path / self._split(split)["offsets"], dtype="<i8")
        return self._cache[key]

    def tokenizer(self):
        from lmforge.tokenizer import load_tokenizer

        if not self.index.get("tokenizer"):
            raise LMForgeError(f"{self.path}: no tokenizer stored with the data")
        return load_tokenizer(str(self.path / self.index["tokenizer"]))

    def windows(self, split: str, block_size: int, batch_size: int, **kw) -> TokenWindows:
        """A ``TokenWindows`` over the split (document offsets passed along)."""
        return TokenWindows(self.tokens(split), block_size, batch_size, offsets=self.offsets(split), **kw)


def open_prepared(path: str | Path, verify_tokenizer: bool = True) -> PreparedData:
    """Open a prepared directory, checking its format, the shard sizes and (optionally) the tokenizer hash."""
    from lmforge.data.prepare import FORMAT, INDEX, tokenizer_hash

    path = Path(path)
    if not (path / INDEX).is_file():
        raise LMForgeError(f"{path}: not a prepared dataset (no {INDEX}; run `lmforge data prepare`)")
    try:
        index = json.loads((path / INDEX).read_text())
    except ValueError as e:
        raise LMForgeError(f"{path / INDEX}: not valid JSON ({e})") from None
    if index.get("format") != FORMAT:
        raise LMForgeError(f"{path / INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
    data = PreparedData(path, index)
    if verify_tokenizer and index.get("tokenizer"):
        tok_dir = path / index["tokenizer"]
        if not tok_dir.is_dir() or tokenizer_hash(tok_dir) != index["tokenizer_sha256"]:
            raise LMForgeError(f"{tok_dir}: tokenizer files changed since the data was prepared (hash mismatch)")
    for s in index["splits"].values():
        f, n = path / s["file"], int(s["tokens"])
        if not f.is_file() or f.stat().st_size != n * data.dtype.itemsize:
            raise LMForgeError(f"{f}: size does not match {INDEX} ({n:,} tokens): truncated or corrupt")
        o = path / s["offsets"]
        if not o.is_file() or o.stat().st_size != 8 * int(s["documents"]):
            raise LMForgeError(f"{o}: size does not match {INDEX} ({s['documents']:,} documents)")
    return data


def load_prepared(path: str | Path):
    """(tokenizer, train tokens, val tokens) of a prepared directory; arrays are read-only memmaps."""
    data = open_prepared(path)
    return data.tokenizer(), data.tokens("train"), data.tokens("val")


def document_offsets(path: str | Path, split: str) -> np.ndarray:
    return open_prepared(path, verify_tokenizer=False).offsets(split)


class TokenWindows:
    """Batches of fixed-length windows ``x = tokens[i:i+T]``, ``y = tokens[i+1:i+T+1]`` as int64 tensors.

    ``mode="random"``: nanoGPT's ``get_batch`` with its own seeded generator; ``"sequential"``: windows k*T in
    order, wrapping around. Under data parallelism each step draws ``batch_size * world`` windows and rank r takes
    its slice, so ranks differ and world=1 is the plain stream. The position is the number of batches drawn:
    ``state_dict()``/``load_state_dict()`` (JSON-serializable) resume exactly. The interface (next_batch, skip,
    state_dict, load_state_dict, fixed_batches) is the one lmforge's Trainer uses."""

    def __init__(self, tokens: np.ndarray | torch.Tensor, block_size: int, batch_size: int, mode: str = "random",
                 seed: int = 0, rank: int = 0, world: int = 1, offsets: np.ndarray | None = None,
                 documents: bool = False) -> None:
        self.tokens = tokens if isinstance(tokens, np.ndarray) else tokens.numpy()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: allowed values are {list(MODES)}")
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size {block_size} and batch_size {batch_size} must be >= 1")
        if len(self.tokens) < block_size + 1:
            raise LMForgeError(f"only {len(self.tokens):,} tokens: need at least block_size+1 = {block_size + 1}")
        if documents and offsets is None:
            raise ValueError("documents=True needs the document offsets")
        self.block_size, self.batch_size, self.mode = block_size, batch_size, mode
        self.rank, self.world, self.seed = rank, world, seed
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.int64)
        self.documents = documents
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0  # batches drawn so far: the resumable position

    @property
    def num_windows(self) -> int:
        """Windows in one sequential epoch (non-overlapping, stride block_size)."""
        return (len(self.tokens) - 1) // self.block_size

    def _starts(self) -> list[int]:
        T, b, n = self.block_size, self.batch_size, self.batch_size * self.world
        if self.mode == "random":
            ix = torch.randint(len(self.tokens) - T, (n,), generator=self.gen)
        else:
            ix = (torch.arange(self.batches * n, (self.batches + 1) * n) % self.num_windows) * T
        return ix[self.rank * b : (self.rank + 1) * b].tolist()

    def batch_at(self, starts: list[int]) -> dict[str, torch.Tensor]:
        """The batch of windows starting at ``starts``."""
        T = self.block_size
        x = np.stack([self.tokens[i : i + T + 1].astype(np.int64) for i in starts])
        out = {"input_ids": torch.from_numpy(x[:, :-1].copy()), "targets": torch.from_numpy(x[:, 1:].copy())}
        if self.documents:
            pos = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(T + 1)  # (B, T+1) token positions
            doc = np.searchsorted(self.offsets, pos, side="right") - 1  # document index of each token
            seg = doc - doc[:, :1]
            out["segment_ids"] = torch.from_numpy(seg[:, :-1].copy())
            out["doc_positions"] = torch.from_numpy((pos - self.offsets[np.maximum(doc, 0)])[:, :-1].copy())
            out["loss_mask"] = torch.from_numpy((seg[:, 1:] == seg[:, :-1]).astype(np.int64))
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.batch_at(self._starts())
        self.batches += 1
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def skip(self, n: int) -> None:
        """Advance by ``n`` batches without building them."""
        if self.mode == "random":
            for _ in range(n):
                torch.randint(len(self.tokens) - self.block_size, (self.batch_size * self.world,), generator=self.gen)
        self.batches += n

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "seed": self.seed, "batches": self.batches, "block_size": self.block_size,
                "batch_size": self.batch_size, "world": self.world, "tokens": len(self.tokens)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        mine = {"mode": self.mode, "block_size": self.block_size, "batch_size": self.batch_size,
                "world": self.world, "tokens": len(self.tokens)}
        for k, v in mine.items():
            if k in s and s[k] != v:
                raise LMForgeError(f"data state has {k}={s[k]!r} but this dataset has {v!r}: cannot resume the "
                                   "same stream")
        self.gen.manual_seed(s["seed"])
        self.seed, self.batches = s["seed"], 0
        self.skip(s["batches"])

    def fixed_batches(self, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        """``n`` batches from a fresh stream with ``seed`` (evaluation: the same batches every time)."""
        other = TokenWindows(self.tokens, self.block_size, self.batch_size, self.mode, seed, self.rank, self.world,
                             self.offsets, self.documents)
        return [other.next_batch() for _ in range(n)]
