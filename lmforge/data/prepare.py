"""Tokenize a corpus into memory-mapped shards (``lmforge data prepare``).

Output directory (written to a temporary sibling directory, then renamed into place)::

    train.bin, val.bin                 token ids, raw little-endian uint16 (vocabulary <= 65,536) or uint32
    train.offsets.bin, val.offsets.bin int64 start offset of every document in the split's token stream
    tokenizer/                         a copy of the tokenizer (its sha256 is checked when the data is opened)
    index.json                         dtype, token/document counts per split, sources, tokenizer hash and path

Documents are packed back to back: ``[BOS] doc [EOS]`` (by default BOS where the tokenizer starts a text with it,
EOS when it has one). The validation split is either whole documents chosen by a seeded hash of their text
(``split_mode="doc"``: the same document always lands in the same split, whatever the order, worker count or
duplicates), or the last fraction of the token stream (``split_mode="tail"``: nanoGPT's
``train = data[:int(n * 0.9)]``). When documents are too few for the split by document to fill both splits (one
large text file), the tail split is used instead (``index.json``: ``"split_fallback": "tail"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from array import array
from collections.abc import Iterator
from itertools import accumulate, chain
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.io import (
    BadRecords,
    Document,
    check_format_flags,
    check_input_file,
    check_workers,
    file_kind,
    iter_documents,
)
from lmforge.errors import LMForgeError
from lmforge.files import cannot_write_in, check_replaceable, current_umask

INDEX = "index.json"
FORMAT = "lmforge-tokens-v1"
SPLITS = ("train", "val")
SPLIT_MODES = ("doc", "tail")


# ---- tokenizing (in worker processes) --------------------------------------------------------------------------

_TOK: Any = None
_CFG: dict[str, Any] = {}


def _init(tok_path: str, cfg: dict[str, Any]) -> None:
    global _TOK, _CFG
    from lmforge.tokenizer import load_tokenizer

    _TOK, _CFG = load_tokenizer(tok_path), cfg


def _set_tokenizer(tok: Any, cfg: dict[str, Any]) -> None:
    global _TOK, _CFG
    _TOK, _CFG = tok, cfg


def split_hash(text: str, seed: int) -> float:
    """A number uniform in [0, 1) from the document's text and the seed (the doc split's coin)."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:8], "big") / 2**64


def _encode_one(text: str, src: int, line: int = 0) -> np.ndarray:
    c = _CFG
    try:
        ids = np.asarray(_TOK.encode(text, bos=c["bos"], eos=c["eos"]), dtype=np.int64)
    except LMForgeError as e:  # e.g. a character outside a char-level vocabulary: named with its line
        stoi = getattr(_TOK, "stoi", None)
        if line and stoi is not None and file_kind(c["paths"][src]) == "text":  # (a record's line is its start)
            line += text.count("\n", 0, next((i for i, ch in enumerate(text) if ch not in stoi), 0))
        raise LMForgeError(f"{c['paths'][src]}{f':{line}' if line else ''}: {e}") from None
    if ids.size and (ids.min() < 0 or ids.max() >= c["vocab_size"]):
        bad = int(ids.max() if ids.max() >= c["vocab_size"] else ids.min())
        raise LMForgeError(f"{c['paths'][src]}{f':{line}' if line else ''}: the tokenizer produced id {bad}, outside "
                           f"its vocabulary of {c['vocab_size']}")
    return ids.astype(c["dtype"])


def _encode_batch(batch: list[tuple[str, int, int, int]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Tokenize a batch of documents: (all ids concatenated, ids per document, split coin per document, source per
    document, bytes read). One result per batch keeps the inter-process traffic small."""
    parts, lengths, coins, srcs, nbytes = [], [], [], [], 0
    for text, src, n, line in batch:
        nbytes += n
        ids = _encode_one(text, src, line)
        if not len(ids):
            continue
        parts.append(ids)
        lengths.append(len(ids))
        coins.append(split_hash(text, _CFG["seed"]) if _CFG["hash"] else 0.0)
        srcs.append(src)
    ids = np.concatenate(parts) if parts else np.zeros(0, _CFG["dtype"])
    return ids, np.asarray(lengths, np.int64), np.asarray(coins, np.float64), np.asarray(srcs, np.int64), nbytes


def _items(docs: Iterator[Document], sizes: list[int]) -> Iterator[tuple[str, int, int, int]]:
    """``(text, source index, bytes read since the previous document, line)`` (bytes of the files as stored)."""
    starts = [0, *accumulate(sizes)]
    done = 0
    for d in docs:
        pos = starts[d.source_index] + d.offset
        yield d.text, d.source_index, max(0, pos - done), d.line
        done = max(done, pos)


def _batches(items: Iterator[tuple[str, int, int, int]], max_chars: int = 1 << 20, max_docs: int = 4096
             ) -> Iterator[list[tuple[str, int, int, int]]]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[0])
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---- the prepared directory ------------------------------------------------------------------------------------

def tokenizer_hash(path: str | Path) -> str:
    """sha256 over a tokenizer directory's files (sorted name + bytes), or of a single tokenizer file."""
    path = Path(path)
    h = hashlib.sha256()

    def update(f: Path) -> None:  # in blocks: a GGUF model as --tokenizer (or a model directory) is gigabytes
        with open(f, "rb") as src:
            for block in iter(lambda: src.read(1 << 24), b""):
                h.update(block)

    if path.is_file():
        update(path)
        return h.hexdigest()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        update(f)
    return h.hexdigest()


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def _settings(index: dict[str, Any], mtimes: bool = True) -> dict[str, Any]:
    """What a rerun must match to reuse an existing output: the settings, and each source's path, size and
    modification time (a file rewritten with the same size, e.g. shuffled, was taken as prepared already)."""
    keys = ("tokenizer_source_sha256", "split_mode", "val_fraction", "seed", "bos", "eos", "field", "separator")
    out = {k: index.get(k) for k in keys}
    out["sources"] = [(s.get("path"), s.get("bytes"), s.get("mtime_ns") if mtimes else None)
                      for s in _sources(index) if isinstance(s, dict)]
    return out


def _check_not_inside(out: Path, inputs: list[str], tokenizer: Path | None) -> None:
    """The output directory is replaced whole: an input file or the tokenizer inside it would be deleted (with
    --overwrite) or mistaken for data. Its own tokenizer copy (``out/tokenizer``, read before) may be reused."""
    for p, what in [(Path(i), "input") for i in inputs] + [(tokenizer, "tokenizer")] * (tokenizer is not None):
        r = p.resolve()
        if r == out or out in r.parents and not (what == "tokenizer" and r == out / "tokenizer"):
            raise LMForgeError(f"--output {out}: holds the {what} {p}, which replacing the output would delete; "
                               "write elsewhere")


def _sources(index: dict[str, Any]) -> list:
    s = index.get("sources")
    return s if isinstance(s, list) else []


def _reuse_or_refuse(out: Path, index: dict[str, Any]) -> None:
    """Returns when the prepared ``out`` was made from the same sources and settings as ``index`` (said on stderr);
    else one line saying what differs (an unreadable index.json too: it was a JSONDecodeError naming no file)."""
    try:
        old = json.loads((out / INDEX).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        old = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not isinstance(old, dict):
        what = old if isinstance(old, str) else f"a JSON {type(old).__name__}"
        raise LMForgeError(f"{out / INDEX}: not a prepared dataset's index ({what}); --overwrite replaces the output")
    # (an output prepared before times were recorded is compared without them)
    mt = all(isinstance(s, dict) and "mtime_ns" in s for s in _sources(old))
    if _settings(old, mt) == _settings(index, mt):
        print(f"{out}: already prepared (use --overwrite to redo it)", file=sys.stderr)
        return
    diff = [k for k, v in _settings(index, mt).items() if _settings(old, mt).get(k) != v]
    raise LMForgeError(f"{out}: already prepared from different {', '.join(diff)} (use --overwrite to replace it, or "
                       "another --output)")


class _Writer:
    """Appends one split's tokens to ``NAME.bin`` and its document starts to memory (8 bytes per document)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.tokens = 0
        self.offsets = array("q")

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: their ids concatenated, and the length of each."""
        if not len(lengths):
            return
        starts = self.tokens + np.concatenate([[0], np.cumsum(lengths[:-1])])
        self.offsets.extend(starts.tolist())
        self.f.write(ids.tobytes())
        self.tokens += len(ids)

    def close(self) -> None:
        self.f.close()


def _split_tail(tmp: Path, w: _Writer, dtype: np.dtype, val_fraction: float) -> dict[str, tuple[int, np.ndarray]]:
    """Cut the one written stream at ``int(n * (1 - val_fraction))`` into train.bin and val.bin."""
    n = w.tokens
    n_train = int(n * (1 - val_fraction)) if val_fraction > 0 else n
    starts = np.frombuffer(w.offsets, dtype=np.int64) if len(w.offsets) else np.zeros(0, np.int64)
    size = np.dtype(dtype).itemsize
    with open(tmp / "train.bin", "rb+") as f, open(tmp / "val.bin", "wb") as v:
        f.seek(n_train * size)
        shutil.copyfileobj(f, v, 1 << 24)
        f.truncate(n_train * size)
    val_starts = starts[starts >= n_train] - n_train
    if n > n_train and (len(val_starts) == 0 or val_starts[0] != 0):
        val_starts = np.concatenate([[0], val_starts])  # the split begins inside a document
    return {"train": (n_train, starts[starts < n_train]), "val": (n - n_train, val_starts.astype(np.int64))}


def prepare(inputs: list[str], tokenizer: Any, output: str, val_fraction: float = 0.001, split_mode: str = "doc",
            bos: bool | None = None, eos: bool | None = None, workers: int = 0, seed: int = 0,
            overwrite: bool = False, skip_bad: bool = False, field: str = "text", separator: str | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``output`` (see the module docstring) and return its index.

    ``tokenizer`` is a path ``load_tokenizer`` reads, or a Tokenizer object (then encoding runs in this process
    unless the object can ``save()`` itself). ``bos``/``eos`` None: BOS when the tokenizer starts a text with it,
    EOS when it has one.
    ``workers`` 0: min(2, CPUs). An existing complete output with the same sources and settings is returned as is
    (with a note on stderr); with different ones it is an error unless ``overwrite``."""
    from tqdm import tqdm

    from lmforge.tokenizer import load_tokenizer

    if not inputs:
        raise LMForgeError("no input files")
    if not 0 <= val_fraction < 1:
        raise LMForgeError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if split_mode not in SPLIT_MODES:
        raise LMForgeError(f"--split-mode {split_mode!r}: allowed values are {list(SPLIT_MODES)}")
    check_workers(workers)
    check_format_flags(inputs, field, doc_separator=None if separator is None else repr(separator))
    if separator == "":
        raise LMForgeError("--doc-separator: must not be empty")
    for p in inputs:
        check_input_file(p)
    tok_obj = not isinstance(tokenizer, (str, os.PathLike))
    tok = tokenizer if tok_obj else load_tokenizer(str(tokenizer))
    # BOS where the tokenizer starts a text with it (as transformers and llama.cpp encode): SmolLM2's says
    # add_bos_token=false and its BOS is <|im_start|>, which began every document
    asked = (bos, eos)
    bos = bool(tok.prompt_prefix()) if bos is None else bos
    eos = (tok.eos_id is not None) if eos is None else eos
    if bos and tok.bos_id is None:
        raise LMForgeError("--bos: the tokenizer has no BOS token")
    if eos and tok.eos_id is None:
        raise LMForgeError("--eos: the tokenizer has no EOS token")
    dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")  # little-endian on every machine
    stats = [Path(p).stat() for p in inputs]
    sources = [{"path": str(Path(p).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
               for p, st in zip(inputs, stats)]
    index: dict[str, Any] = {
        "format": FORMAT, "dtype": dtype.name, "vocab_size": int(tok.vocab_size),
        "bos": bos, "eos": eos, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "tokenizer": None, "tokenizer_sha256": None,
        "tokenizer_source": None if tok_obj else str(Path(tokenizer).resolve()),
        "tokenizer_source_sha256": None if tok_obj else tokenizer_hash(tokenizer),
        "split_mode": split_mode, "val_fraction": val_fraction, "seed": seed, "field": field,
        "separator": separator, "sources": sources,
    }

    out = Path(output).resolve()
    _check_not_inside(out, inputs, None if tok_obj else Path(tokenizer))
    if is_prepared(out):
        if not overwrite:
            _reuse_or_refuse(out, index)
            return json.loads((out / INDEX).read_text(encoding="utf-8"))
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LMForgeError(f"{out}: exists and is not a prepared dataset (no {INDEX}); refusing to replace it")

    check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise cannot_write_in(out, out.parent, e) from None
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the output gets ordinary permissions
    pool = None
    try:
        tok_dir = None
        try:
            tok.save(str(tmp / "tokenizer"))
            tok_dir = tmp / "tokenizer"
            index["tokenizer"], index["tokenizer_sha256"] = "tokenizer", tokenizer_hash(tok_dir)
        except NotImplementedError:  # a Tokenizer object that cannot be written: no copy, encode in-process
            print("note: the tokenizer cannot save itself; no copy is stored with the data", file=sys.stderr)
        cfg = {"bos": bos, "eos": eos, "seed": seed, "vocab_size": int(tok.vocab_size), "dtype": dtype,
               "hash": split_mode == "doc" and val_fraction > 0, "paths": [str(p) for p in inputs]}
        workers = workers or min(2, os.cpu_count() or 1)
        one_doc = separator is None and len(inputs) == 1 and file_kind(inputs[0]) == "text"
        bad = BadRecords(skip_bad)
        docs = iter_documents(inputs, field=field, txt_split="raw", separator=separator, drop_empty=True,
                              meta=False, bad=bad)
        items = _items(docs, [s["bytes"] for s in sources])
        if workers > 1 and tok_dir is not None and not one_doc:
            pool = get_context("spawn").Pool(workers, initializer=_init, initargs=(str(tok_dir), cfg))
            encoded = pool.imap(_encode_batch, _batches(items))
        else:
            _set_tokenizer(tok, cfg)
            encoded = map(_encode_batch, _batches(items))
        # the bar starts once the first batch is tokenized: a bad record in it is said in one line, not after a bar
        encoded = iter(encoded)
        first = next(encoded, None)
        streams = ("train",) if split_mode == "tail" else SPLITS
        writers = {s: _Writer(tmp / f"{s}.bin") for s in streams}
        docs_per_source = [0] * len(inputs)
        total = sum(s["bytes"] for s in sources)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr,
                   disable=not progress or first is None, mininterval=0.2 if sys.stderr.isatty() else 10.0)
        try:
            for ids, lengths, coins, srcs, nbytes in chain([first] if first is not None else [], encoded):
                bar.update(nbytes)
                for src in srcs.tolist():
                    docs_per_source[src] += 1
                if not cfg["hash"]:
                    writers["train"].add(ids, lengths)
                    continue
                is_val = coins < val_fraction
                per_token = np.repeat(is_val, lengths)
                writers["train"].add(ids[~per_token], lengths[~is_val])
                writers["val"].add(ids[per_token], lengths[is_val])
            bar.update(max(0, total - bar.n))  # the rest: trailing blank lines, skipped records, .gz trailers
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if not (writers["train"].tokens or writers["val"].tokens):
            if bad.count:  # (--skip-bad skipped every record: a wrong --field, not an empty input)
                raise LMForgeError(f"{inputs[0]}: no document left: all {bad.count} records were skipped as bad "
                                   f"(first: {bad.examples[0]})")
            what = "the inputs are" if len(inputs) > 1 else "the input is"
            raise LMForgeError(f"{inputs[0]}: no tokens for the train split ({what} empty)")
        fallback = cfg["hash"] and not (writers["train"].tokens and writers["val"].tokens)
        if fallback:  # too few documents for a split by document (one large file): cut the stream's tail instead
            whole = writers["train"] if writers["train"].tokens else writers["val"]
            if whole is writers["val"]:
                os.replace(tmp / "val.bin", tmp / "train.bin")
            empty = "validation" if whole is writers["train"] else "train"
            print(f"note: {sum(docs_per_source)} document(s) left the {empty} split empty; the last {val_fraction:g} "
                  "of the tokens is the validation split instead (--split-mode tail)", file=sys.stderr)
            index["split_fallback"] = "tail"
        if split_mode == "tail" or fallback:
            splits = _split_tail(tmp, whole if fallback else writers["train"], dtype, val_fraction)
        else:
            splits = {s: (w.tokens, np.frombuffer(w.offsets, dtype=np.int64) if len(w.offsets) else
                          np.zeros(0, np.int64)) for s, w in writers.items()}
        index["splits"] = {}
        for s, (n, offsets) in splits.items():
            offsets.astype("<i8").tofile(tmp / f"{s}.offsets.bin")
            index["splits"][s] = {"file": f"{s}.bin", "tokens": int(n), "documents": int(len(offsets)),
                                  "offsets": f"{s}.offsets.bin"}
        for s, n in zip(sources, docs_per_source):
            s["documents"] = n
        index["skipped_bad_records"] = bad.count
        if not (bos or eos) and sum(docs_per_source) > 1 and asked == (None, None):
            print(f"note: the tokenizer has no BOS or EOS: the {sum(docs_per_source):,} documents are packed with "
                  "nothing between them (offsets mark their starts; a char tokenizer has no special tokens)",
                  file=sys.stderr)
        if bad.count:
            print(f"skipped {bad.count} bad record(s) (first: {bad.examples[0]})", file=sys.stderr)
        if not splits["train"][0]:
            raise LMForgeError(f"{inputs[0]}: no tokens for the train split (empty inputs, or --val-fraction too "
                               "large)")
        if val_fraction > 0 and not splits["val"][0]:
            print(f"warning: the validation split is empty (val-fraction {val_fraction} of "
                  f"{splits['train'][0]:,} tokens)", file=sys.stderr)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")  # written last: marks the output complete
        from lmforge.checkpoint import replace_dir  # imports torch: not at module level (tokenizer workers)

        replace_dir(tmp, out)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
    return index
