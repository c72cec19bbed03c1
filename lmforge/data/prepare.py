"""Tokenize a corpus into memory-mapped shards: ``train.bin`` / ``val.bin`` (uint16 when the vocabulary fits,
else uint32), document offsets, the tokenizer, and ``index.json``. Written to a temp directory, then renamed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError

INDEX = "index.json"


def read_documents(paths: list[str], skip_bad: bool = False, field: str = "text") -> Iterator[str]:
    """Documents from .txt (a whole file is one document), .jsonl (``field`` of each line) or .parquet files."""
    bad = 0
    for p in map(Path, paths):
        if not p.is_file():
            raise LMForgeError(f"{p}: no such input file")
        if p.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise LMForgeError(f"{p}: reading parquet needs `pip install pyarrow`") from None
            yield from (t for t in pq.read_table(p, columns=[field]).column(field).to_pylist() if t)
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LMForgeError(f"{p}: not UTF-8 text (byte {e.start})") from None
        if p.suffix != ".jsonl":
            yield text
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                doc = rec[field]
                if not isinstance(doc, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError) as e:
                if skip_bad:
                    bad += 1
                    continue
                what = "invalid JSON" if isinstance(e, ValueError) else f"field {field!r} missing or not a string"
                raise LMForgeError(f"{p}:{n}: {what} (use --skip-bad to skip such records)") from None
            if doc:
                yield doc
    if bad:
        print(f"skipped {bad} bad record(s)", file=sys.stderr)


_TOK = None


def _init(tok_path: str) -> None:
    global _TOK
    from lmforge.tokenizer import load_tokenizer

    _TOK = load_tokenizer(tok_path)


def _encode(args: tuple[str, bool, bool]) -> np.ndarray:
    text, bos, eos = args
    return np.asarray(_TOK.encode(text, bos=bos, eos=eos), dtype=np.int64)


def tokenizer_hash(tok_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in tok_dir.iterdir() if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def prepare(inputs: list[str], tokenizer: str, output: str, val_fraction: float = 0.001, split_mode: str = "doc",
            bos: bool | None = None, eos: bool | None = None, workers: int = 0, seed: int = 0,
            overwrite: bool = False, skip_bad: bool = False, field: str = "text") -> dict:
    from tqdm import tqdm

    from lmforge.tokenizer import load_tokenizer

    out = Path(output)
    if (out / INDEX).is_file() and not overwrite:
        print(f"{out} is already prepared (use --overwrite to redo it)", file=sys.stderr)
        return json.loads((out / INDEX).read_text())
    if not 0 <= val_fraction < 1:
        raise LMForgeError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if split_mode not in ("doc", "tail"):
        raise LMForgeError(f"--split-mode {split_mode!r}: allowed values are ['doc', 'tail']")
    tok = load_tokenizer(tokenizer)
    bos = (tok.bos_id is not None) if bos is None else bos
    eos = (tok.eos_id is not None) if eos is None else eos
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok.save(str(tmp / "tokenizer"))
        workers = workers or min(2, os.cpu_count() or 1)
        docs = read_documents(inputs, skip_bad, field)
        jobs = ((d, bos, eos) for d in docs)
        if workers > 1:
            pool = get_context("spawn").Pool(workers, initializer=_init, initargs=(str(tmp / "tokenizer"),))
            encoded = pool.imap(_encode, jobs, chunksize=16)
        else:
            _init(str(tmp / "tokenizer"))
            pool, encoded = None, map(_encode, jobs)
        chunks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        for i, ids in enumerate(tqdm(encoded, desc="tokenize", unit="doc", file=sys.stderr)):
            digest = hashlib.sha256(f"{seed}:{i}".encode()).digest()
            is_val = split_mode == "doc" and int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
            chunks["val" if is_val else "train"].append(ids)
        if pool is not None:
            pool.close()
            pool.join()
        if split_mode == "tail":  # the last fraction of the token stream (nanoGPT's split)
            flat = np.concatenate(chunks["train"]) if chunks["train"] else np.zeros(0, np.int64)
            n_train = int(len(flat) * (1 - val_fraction))
            ends = np.cumsum([len(c) for c in chunks["train"]])
            chunks = {"train": [flat[:n_train]], "val": [flat[n_train:]]}
            offsets = {"train": np.concatenate([[0], ends[ends < n_train]]), "val": np.array([0])}
        else:
            offsets = {k: np.concatenate([[0], np.cumsum([len(c) for c in v])[:-1]]) if v else np.zeros(0, np.int64)
                       for k, v in chunks.items()}
        index = {"format": "lmforge-tokens-v1", "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
                 "tokenizer": "tokenizer", "tokenizer_source": str(tokenizer),
                 "tokenizer_sha256": tokenizer_hash(tmp / "tokenizer"), "bos": bos, "eos": eos,
                 "sources": [str(p) for p in inputs], "split_mode": split_mode, "val_fraction": val_fraction,
                 "splits": {}}
        for split, parts in chunks.items():
            arr = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
            arr.tofile(tmp / f"{split}.bin")
            offsets[split].astype(np.int64).tofile(tmp / f"{split}.offsets.bin")
            index["splits"][split] = {"file": f"{split}.bin", "tokens": int(len(arr)),
                                      "documents": int(len(offsets[split])), "offsets": f"{split}.offsets.bin"}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index
