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

from lmforge.errors import LMForgeError
from lmforge.manifest import plain_name
from lmforge.train.batches import TokenWindows

__all__ = ["PreparedData", "TokenWindows", "document_offsets", "load_prepared", "open_prepared"]


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
        return int(self.split(split)["tokens"])

    def split(self, split: str) -> dict[str, Any]:
        """The split's entry in index.json (file, offsets, tokens, documents)."""
        if split not in self.index["splits"]:
            raise LMForgeError(f"{self.path}: no split {split!r} (have {', '.join(self.index['splits'])})")
        return self.index["splits"][split]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (not read into memory)."""
        key = f"tokens:{split}"
        if key not in self._cache:
            s = self.split(split)
            n = int(s["tokens"])
            f = self.path / s["file"]
            self._cache[key] = (np.memmap(f, dtype=self.dtype, mode="r", shape=(n,)) if n
                                else np.zeros(0, self.dtype))
        return self._cache[key]

    def offsets(self, split: str) -> np.ndarray:
        """int64 start offset of each document in the split (the first one is 0)."""
        key = f"offsets:{split}"
        if key not in self._cache:
            self._cache[key] = np.fromfile(self.path / self.split(split)["offsets"], dtype="<i8")
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
    if not isinstance(index, dict):
        raise LMForgeError(f"{path / INDEX}: expected a JSON object, got {type(index).__name__}")
    if index.get("format") != FORMAT:
        raise LMForgeError(f"{path / INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
    _check_index(path / INDEX, index)
    data = PreparedData(path, index)
    if verify_tokenizer and index.get("tokenizer"):
        tok_dir = path / index["tokenizer"]
        if not tok_dir.is_dir() or tokenizer_hash(tok_dir) != index["tokenizer_sha256"]:
            raise LMForgeError(f"{tok_dir}: tokenizer files changed since the data was prepared (hash mismatch)")
    for s in index["splits"].values():
        for k in ("file", "offsets"):
            if not isinstance(s.get(k), str) or not plain_name(s[k]):
                raise LMForgeError(f"{path / INDEX}: split file {s.get(k)!r} is not a file of the dataset")
        f, n = path / s["file"], int(s["tokens"])
        if not f.is_file() or f.stat().st_size != n * data.dtype.itemsize:
            raise LMForgeError(f"{f}: size does not match {INDEX} ({n:,} tokens): truncated or corrupt")
        o = path / s["offsets"]
        if not o.is_file() or o.stat().st_size != 8 * int(s["documents"]):
            raise LMForgeError(f"{o}: size does not match {INDEX} ({s['documents']:,} documents)")
    return data


def _check_index(where: Path, index: dict[str, Any]) -> None:
    """The fields open_prepared and training read, with their types (a damaged index.json was a KeyError,
    AttributeError or ValueError naming no file)."""
    def bad(field: str, what: str) -> LMForgeError:
        return LMForgeError(f"{where}: {field}: {what} (damaged; prepare the data again)")

    if index.get("dtype") not in ("uint16", "uint32"):
        raise bad("dtype", f"{index.get('dtype')!r}, expected 'uint16' or 'uint32'")
    v = index.get("vocab_size")
    if type(v) is not int or v < 1:
        raise bad("vocab_size", f"{v!r}, expected a positive integer")
    splits = index.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise bad("splits", "expected an object with a 'train' split")
    for name, s in splits.items():
        if not isinstance(s, dict):
            raise bad(f"splits.{name}", "expected an object")
        for k in ("tokens", "documents"):
            if type(s.get(k)) is not int or s[k] < 0:
                raise bad(f"splits.{name}.{k}", f"{s.get(k)!r}, expected a count")


def load_prepared(path: str | Path):
    """(tokenizer, train tokens, val tokens) of a prepared directory; arrays are read-only memmaps."""
    data = open_prepared(path)
    vocab = int(data.index["vocab_size"])
    for split in ("train", "val"):  # one pass over each map: damaged ids would fail only when drawn, maybe hours in
        t = data.tokens(split)
        top = int(t.max()) if len(t) else -1
        if top >= vocab:
            at = int(np.argmax(t >= vocab))
            raise LMForgeError(f"{data.path / data.split(split)['file']}: token id {top:,} (first bad one at token "
                               f"{at:,}) is beyond the {vocab:,}-token vocabulary: damaged data")
    return data.tokenizer(), data.tokens("train"), data.tokens("val")


def document_offsets(path: str | Path, split: str) -> np.ndarray:
    return open_prepared(path, verify_tokenizer=False).offsets(split)
