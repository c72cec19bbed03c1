"""Throughput of `lmforge data clean`: MB/s per stage on the real corpora, the whole pipeline with 1 and 2
processes, and our MinHash / MinHash-LSH against datasketch's in the same run.

Corpora (../shared/data/corpora): C4 web documents (en/c4_demo.jsonl), Wikipedia articles (en/wiki_demo.txt, one
per line) and 红楼梦 (hongloumeng.txt, one document per paragraph), each repeated ``--copies`` times with a marker so
that the copies stay distinct documents. Every stage sees the whole corpus (not only the survivors of the stages
before it), so each figure is that stage's own throughput in UTF-8 MB/s, single process.

Peer: datasketch (pip install datasketch). 1) signatures for the same shingle sets: ours (numpy, a batch at a time)
vs ``MinHash.update_batch`` (its default sha1 of each shingle, and with our 64-bit shingle hashes passed through an
identity hash function); 2) near-duplicate removal end to end (tokenize, shingle, sign, LSH query/insert with
verification at the same threshold) vs ``MinHashLSH``. Both find near-duplicates of planted perturbed copies; the
counts are printed.

    python benchmarks/bench_clean.py [--copies 3] [--stages lang,quality,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"


def load(copies: int) -> dict[str, list[str]]:
    c4 = [json.loads(x)["text"] for x in (CORPORA / "en" / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines()]
    wiki = [x for x in (CORPORA / "en" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    hlm = [p.strip() for p in re.split(r"\n\s*\n", (CORPORA / "hongloumeng.txt").read_text(encoding="utf-8"))
           if p.strip()]
    rep = {"c4": c4, "wiki": wiki, "hongloumeng": hlm}
    return {k: [f"{t} [{i}]" for i in range(copies) for t in v] for k, v in rep.items()}


def mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def bench_stages(corpora: dict[str, list[str]], names: list[str]) -> None:
    from lmforge.data.clean.pipeline import STAGES, run_stages
    from lmforge.data.io import Document

    print(f"{'stage':<15}" + "".join(f"{k + ' MB/s':>18}" for k in corpora))
    for name in names:
        row = f"{name:<15}"
        for texts in corpora.values():
            if name == "decontaminate":
                tmp = Path(tempfile.mkdtemp()) / "eval.jsonl"
                tmp.write_text("".join(json.dumps({"text": t[:300]}) + "\n" for t in texts[::50]))
                st = STAGES[name](eval_files=[str(tmp)])
            elif name == "perplexity":
                st = STAGES[name](score=lambda t: float(len(t)), max_perplexity=1e9)
            else:
                st = STAGES[name]()
            docs = [Document(t, "bench", i) for i, t in enumerate(texts)]
            t0 = time.perf_counter()
            for _ in run_stages([st], docs, 256):
                pass
            row += f"{mb(texts) / (time.perf_counter() - t0):>18.2f}"
        print(row, flush=True)


def bench_pipeline(corpora: dict[str, list[str]]) -> None:
    from lmforge.data.clean import clean

    tmp = Path(tempfile.mkdtemp())
    src = tmp / "all.jsonl"
    texts = [t for v in corpora.values() for t in v]
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    size = mb(texts)
    outs = {}
    for w in (1, 2):
        t0 = time.perf_counter()
        rep = clean([str(src)], tmp / f"out{w}.jsonl", tmp / f"rep{w}.json", progress=False, workers=w)
        dt = time.perf_counter() - t0
        outs[w] = (tmp / f"out{w}.jsonl").read_bytes()
        print(f"default pipeline, {w} process{'es' if w > 1 else ''}: {size:.1f} MB in {dt:.1f} s = "
              f"{size / dt:.2f} MB/s; kept {rep['documents_out']:,} of {rep['documents_in']:,} documents")
    print(f"  same output with 1 and 2 processes: {outs[1] == outs[2]}")


def bench_minhash(corpora: dict[str, list[str]], threshold: float = 0.8, num_perm: int = 128) -> None:
    import datasketch

    from lmforge.data.clean.dedup import NearDedup
    from lmforge.data.clean.text import tokens
    from lmforge.data.io import Document

    rng = random.Random(0)
    zh = [t for t in corpora["hongloumeng"] if len(t) >= 300]
    base = corpora["c4"][:300] + zh[:1000]
    planted = []  # perturbed copies: ~1 word (English) or character (Chinese) in 100 replaced
    for t in corpora["c4"][:300:10]:
        w = t.split(" ")
        for i in rng.sample(range(len(w)), max(1, len(w) // 100)):
            w[i] = "zzz"
        planted.append(" ".join(w))
    for t in zh[:1000:33]:
        c = list(t)
        for i in rng.sample(range(len(c)), max(1, len(c) // 100)):
            c[i] = "丁"
        planted.append("".join(c))
    texts = base + planted
    sources = corpora["c4"][:300:10] + zh[:1000:33]

    def sh(t: str) -> set[str]:
        tok = tokens(t)
        return {" ".join(tok[i:i + 5]) for i in range(len(tok) - 4)}

    truly = sum(len(sh(a) & sh(b)) / len(sh(a) | sh(b)) >= threshold for a, b in zip(sources, planted))
    size = mb(texts)
    nd = NearDedup(threshold=threshold, num_perm=num_perm)
    shingles = [nd.shingles(t) for t in texts]

    # 1) signatures only, same shingle sets
    t0 = time.perf_counter()
    ours = nd.minhash.signatures(shingles)
    t_ours = time.perf_counter() - t0
    n_sh = sum(len(s) for s in shingles)
    strs = []
    for t in texts:
        tok = tokens(t)
        n = min(5, len(tok))
        strs.append(list({" ".join(tok[i:i + n]).encode("utf-8") for i in range(len(tok) - n + 1)}))
    t0 = time.perf_counter()
    for s in strs:
        m = datasketch.MinHash(num_perm=num_perm)
        m.update_batch(s)
    t_ds = time.perf_counter() - t0
    ident = [s.tolist() for s in shingles]
    t0 = time.perf_counter()
    for s in ident:
        m = datasketch.MinHash(num_perm=num_perm, hashfunc=lambda x: x & 0xFFFFFFFF)
        m.update_batch(s)
    t_ds_int = time.perf_counter() - t0
    print(f"MinHash signatures, {len(texts):,} documents, {n_sh:,} shingles, {num_perm} permutations:")
    print(f"  lmforge (numpy, batched)           {n_sh / t_ours / 1e6:8.2f} M shingles/s")
    print(f"  datasketch update_batch (sha1)     {n_sh / t_ds / 1e6:8.2f} M shingles/s   ratio {t_ds / t_ours:6.1f}x")
    print(f"  datasketch update_batch (int hash) {n_sh / t_ds_int / 1e6:8.2f} M shingles/s   "
          f"ratio {t_ds_int / t_ours:6.1f}x")
    del ours

    # 2) near-duplicate removal end to end
    docs = [Document(t, "b", i) for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    st = NearDedup(threshold=threshold, num_perm=num_perm)
    kept_ours = len(st(copy.copy(docs)))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept_ds = 0
    for i, t in enumerate(texts):
        tok = tokens(t)
        n = min(5, len(tok))
        m = datasketch.MinHash(num_perm=num_perm)
        m.update_batch([" ".join(tok[j:j + n]).encode("utf-8") for j in range(len(tok) - n + 1)])
        cands = lsh.query(m)
        if not any(m.jaccard(sig) >= threshold for sig in (store[c] for c in cands)):
            lsh.insert(i, m)
            store[i] = m
            kept_ds += 1
    t_ds = time.perf_counter() - t0
    print(f"near-duplicate removal, {len(texts):,} documents ({size:.1f} MB; {len(planted)} planted copies, "
          f"{truly} of them with exact Jaccard >= {threshold}), threshold {threshold}:")
    print(f"  lmforge near_dedup     {size / t_ours:8.2f} MB/s  removed {len(texts) - kept_ours}")
    print(f"  datasketch MinHashLSH  {size / t_ds:8.2f} MB/s  removed {len(texts) - kept_ds}   "
          f"ratio {t_ds / t_ours:6.1f}x")


store: dict[int, object] = {}


def main() -> None:
    from lmforge.data.clean.pipeline import STAGES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--no-pipeline", action="store_true")
    args = ap.parse_args()
    if not CORPORA.is_dir():
        sys.exit(f"needs {CORPORA} (../shared is absent)")
    corpora = load(args.copies)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load1:.2f}; corpora (x{args.copies}): "
          + ", ".join(f"{k} {mb(v):.1f} MB / {len(v):,} docs" for k, v in corpora.items()))
    bench_stages(corpora, [s for s in args.stages.split(",") if s])
    if not args.no_pipeline:
        bench_pipeline(corpora)
    try:
        import datasketch  # noqa: F401
    except ImportError:
        print("datasketch not installed: no peer figures (pip install datasketch)")
        return
    bench_minhash(load(1))


if __name__ == "__main__":
    main()
