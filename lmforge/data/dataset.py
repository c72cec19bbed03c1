"""Prepared token shards (``lmforge data prepare``) opened as memory-mapped arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError


def load_prepared(path: str | Path):
    """(tokenizer, train tokens, val tokens) of a prepared directory; arrays are read-only memmaps."""
    from lmforge.data.prepare import INDEX, tokenizer_hash
    from lmforge.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / INDEX).is_file():
        raise LMForgeError(f"{path}: not a prepared dataset (no {INDEX}; run `lmforge data prepare`)")
    index = json.loads((path / INDEX).read_text())
    tok_dir = path / index["tokenizer"]
    if tokenizer_hash(tok_dir) != index["tokenizer_sha256"]:
        raise LMForgeError(f"{tok_dir}: tokenizer files changed since the data was prepared (hash mismatch)")
    arrays = []
    for split in ("train", "val"):
        f = path / index["splits"][split]["file"]
        n = index["splits"][split]["tokens"]
        if f.stat().st_size != n * np.dtype(index["dtype"]).itemsize:
            raise LMForgeError(f"{f}: size does not match {INDEX} ({n} tokens): truncated or corrupt")
        arrays.append(np.memmap(f, dtype=index["dtype"], mode="r", shape=(n,)) if n else np.zeros(0, index["dtype"]))
    return load_tokenizer(str(tok_dir)), arrays[0], arrays[1]


def document_offsets(path: str | Path, split: str) -> np.ndarray:
    index = json.loads((Path(path) / "index.json").read_text())
    return np.fromfile(Path(path) / index["splits"][split]["offsets"], dtype=np.int64)
