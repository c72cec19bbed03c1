"""Throughput of `lmforge data prepare` against nanoGPT's openwebtext/prepare.py recipe, in the same run.

Corpus: C4 documents (../shared/data/corpora/en/c4_demo.jsonl) repeated to ``--copies`` times its size; tokenizer:
GPT-2 BPE (../shared/data/tokenizers/gpt2). The peer is nanoGPT's loop, restated: ``enc.encode_ordinary(text)`` +
``eot`` per document with tiktoken, concatenated into a uint16 array and written with ``tofile`` (one process; its
``datasets.map(num_proc=...)`` is not installed here). Both produce the same token stream; that is checked.

    python benchmarks/bench_prepare.py [--copies 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = SHARED / "corpora" / "en" / "c4_demo.jsonl"
GPT2 = SHARED / "tokenizers" / "gpt2"


def peer_nanogpt(docs: list[str], out: Path) -> int:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2 / "vocab.bpe"), str(GPT2 / "encoder.json"))
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    ids: list[int] = []
    for text in docs:
        ids.extend(enc.encode_ordinary(text))
        ids.append(enc.eot_token)
    arr = np.array(ids, dtype=np.uint16)
    arr.tofile(out)
    return len(arr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not CORPUS.is_file() or not GPT2.is_dir():
        sys.exit(f"needs {CORPUS} and {GPT2} (../shared is absent)")
    from lmforge.data.dataset import open_prepared
    from lmforge.data.prepare import prepare

    docs = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [f"{d} [{k}]" for k in range(args.copies) for d in docs]  # distinct documents
    tmp = Path(tempfile.mkdtemp())
    try:
        src = tmp / "corpus.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        mb = src.stat().st_size / 1e6

        t0 = time.perf_counter()
        n_peer = peer_nanogpt(docs, tmp / "peer.bin")
        t_peer = time.perf_counter() - t0

        t0 = time.perf_counter()
        prepare([str(src)], str(GPT2), str(tmp / "ours"), val_fraction=0.0, workers=args.workers, progress=False)
        t_ours = time.perf_counter() - t0
        ours = open_prepared(tmp / "ours").tokens("train")
        same = np.array_equal(ours, np.fromfile(tmp / "peer.bin", dtype=np.uint16))

        print(f"corpus: {len(docs):,} documents, {mb:.1f} MB, {n_peer:,} tokens (identical streams: {same})")
        print(f"nanoGPT-style tiktoken loop (1 process): {t_peer:6.2f} s  {n_peer / t_peer / 1e6:6.2f} M tok/s")
        rate = len(ours) / t_ours / 1e6
        print(f"lmforge data prepare ({args.workers} workers):     {t_ours:6.2f} s  {rate:6.2f} M tok/s")
        print(f"ratio ours/peer throughput: {t_peer / t_ours:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
