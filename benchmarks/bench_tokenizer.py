"""Encode MB/s of every tokenizer kind lmforge supports against the peers that give identical ids (tokenizers,
sentencepiece, tiktoken, llama2.c's reference encode), on the same corpora in one run.

    python benchmarks/bench_tokenizer.py [--vocab 8192] [--reps 5] [--zh-chars 300000]

Corpora: tinyshakespeare ("en") and, when ../shared is present, 红楼梦 + Tang poems + Song ci ("zh"). Before any
timing, every peer's ids on the whole corpus are asserted equal to lmforge's (a peer that cannot give the same ids
is not listed). Each figure is the median of --reps runs; lmforge's tokenizer is reloaded before every run, so its
word caches start cold. The ratio is lmforge / the fastest peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lmforge.assets import STORIES260K_TOKENIZER, TINYSHAKESPEARE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_impls import run_c_encode  # noqa: E402  (llama2.c's encode, transcribed)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOK = SHARED / "tokenizers"


def corpora(zh_chars: int) -> dict[str, str]:
    out = {"en": TINYSHAKESPEARE.read_text(encoding="utf-8")}
    c = SHARED / "corpora"
    if (c / "hongloumeng.txt").exists():
        zh = (c / "hongloumeng.txt").read_text(encoding="utf-8")[:zh_chars]
        for name in ("tangshi300.json", "ci.song.0.json"):
            f = c / "chinese_poetry" / name
            if f.exists():
                zh += "\n" + "\n".join("\n".join(p["paragraphs"]) for p in json.loads(f.read_text(encoding="utf-8")))
        out["zh"] = zh
    return out


def timed(fn, text: str) -> float:
    t = time.perf_counter()
    fn(text)
    return time.perf_counter() - t


def run(kind: str, make_ours, peers: dict, texts: dict[str, str], reps: int, rows: list, per_line: bool = False):
    """Assert identical ids, then time lmforge (fresh tokenizer per run) and each peer; print one line per corpus."""
    for cname, text in texts.items():
        if per_line:  # slow reference encoders: the same lines for everyone, one encode call per line
            wrap = lambda f: (lambda t: [f(x) for x in t.split("\n")])  # noqa: E731
        else:
            wrap = lambda f: f  # noqa: E731
        ours = wrap(make_ours().encode)
        ids = ours(text)
        for name, fn in peers.items():
            assert wrap(fn)(text) == ids, f"{kind} [{cname}]: {name} gives different ids"
        n = len(text.encode("utf-8")) / 1e6
        t_ours = statistics.median(timed(wrap(make_ours().encode), text) for _ in range(reps))
        rates = {name: n / statistics.median(timed(wrap(fn), text) for _ in range(reps)) for name, fn in peers.items()}
        r = n / t_ours
        best = max(rates, key=rates.get)
        ratio = r / rates[best]
        rows.append((kind, cname, ratio, best))
        peer_txt = " | ".join(f"{k} {v:7.2f}" for k, v in rates.items())
        print(f"{kind:<28} {cname:<3} {n:5.2f} MB  lmforge {r:7.2f} MB/s | {peer_txt} | x{ratio:.2f} vs {best}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--zh-chars", type=int, default=300_000)
    a = ap.parse_args()
    import sentencepiece as spm
    import tiktoken
    import tiktoken_ext.openai_public as op
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.hf import _byte_decoder
    from lmforge.tokenizer.train import train_tokenizer

    texts = corpora(a.zh_chars)
    print("corpora: " + ", ".join(f"{k} {len(v.encode()) / 1e6:.2f} MB" for k, v in texts.items())
          + f"; median of {a.reps} runs; MB/s of UTF-8 input")
    rows: list = []

    def tk(enc):  # a tiktoken Encoding as a plain-text encoder
        return enc.encode_ordinary

    def hf(tok):
        return lambda s: tok.encode(s, add_special_tokens=False).ids

    with tempfile.TemporaryDirectory() as tmp:
        both = Path(tmp) / "train.txt"
        both.write_text("\n".join(texts.values()), encoding="utf-8")
        for kind in ("bytelevel-bpe", "llama-bpe", "char"):
            train_tokenizer([str(both)], a.vocab, kind, f"{tmp}/{kind}")
        # byte-level BPE: the same tokenizer.json in tokenizers, and its ranks in tiktoken
        raw = Tokenizer.from_file(f"{tmp}/bytelevel-bpe/tokenizer.json")
        dec = _byte_decoder()
        added = {t.content for t in raw.get_added_tokens_decoder().values()}
        ranks = {bytes(dec[c] for c in s): i for s, i in raw.get_vocab().items() if s not in added}
        tt = tiktoken.Encoding("peer", pat_str=op.r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
        run("bytelevel-bpe (trained)", lambda: load_tokenizer(f"{tmp}/bytelevel-bpe"),
            {"tokenizers": hf(raw), "tiktoken": tk(tt)}, texts, a.reps, rows)
        # llama-style BPE: tiktoken and sentencepiece cannot reproduce its ids (char-level BPE with byte fallback)
        raw = Tokenizer.from_file(f"{tmp}/llama-bpe/tokenizer.json")
        run("llama-bpe (trained)", lambda: load_tokenizer(f"{tmp}/llama-bpe"), {"tokenizers": hf(raw)}, texts,
            a.reps, rows)
        # char: a merge-free tokenizers BPE over the same characters
        chars = json.loads(Path(f"{tmp}/char/char_vocab.json").read_text(encoding="utf-8"))
        raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        run("char (trained)", lambda: load_tokenizer(f"{tmp}/char"), {"tokenizers": hf(raw)}, texts, a.reps, rows)

    if (TOK / "gpt2").exists():
        ranks = load_tiktoken_bpe(str(TOK / "gpt2" / "gpt2.tiktoken"))
        tt = tiktoken.Encoding("gpt2-peer", pat_str=op.r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
        raw = Tokenizer(models.BPE.from_file(str(TOK / "gpt2" / "encoder.json"), str(TOK / "gpt2" / "vocab.bpe")))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        run("gpt2 encoder.json+vocab.bpe", lambda: load_tokenizer(str(TOK / "gpt2")),
            {"tiktoken": tk(tt), "tokenizers": hf(raw)}, texts, a.reps, rows)
        run("gpt2.tiktoken", lambda: load_tokenizer(str(TOK / "gpt2" / "gpt2.tiktoken")), {"tiktoken": tk(tt)},
            texts, a.reps, rows)
    cl = TOK / "cl100k" / "cl100k_base.tiktoken"
    if cl.exists():
        orig = op.load_tiktoken_bpe
        op.load_tiktoken_bpe = lambda *x, **k: load_tiktoken_bpe(str(cl))
        try:
            p = op.cl100k_base()
        finally:
            op.load_tiktoken_bpe = orig
        tt = tiktoken.Encoding("cl100k-peer", **{k: v for k, v in p.items() if k != "name"})
        ours = load_tokenizer(str(cl))
        run("cl100k_base.tiktoken", lambda: ours, {"tiktoken": tk(tt)}, texts, a.reps, rows)
    ll = TOK / "llama2"
    if (ll / "tokenizer.model").exists():
        sp = spm.SentencePieceProcessor(model_file=str(ll / "tokenizer.model"))
        run("llama2 tokenizer.model", lambda: load_tokenizer(str(ll / "tokenizer.model")),
            {"sentencepiece": sp.encode}, texts, a.reps, rows)
        if (ll / "tokenizer.bin").exists():
            run("llama2.c llama2 tokenizer.bin", lambda: load_tokenizer(str(ll / "tokenizer.bin")),
                {"sentencepiece": sp.encode}, texts, a.reps, rows)
    ja = TOK / "sentencepiece" / "test_ja_model.model"
    if ja.exists():
        sp = spm.SentencePieceProcessor(model_file=str(ja))
        run("sentencepiece unigram (ja)", lambda: load_tokenizer(str(ja)), {"sentencepiece": sp.encode}, texts,
            a.reps, rows)
    # stories260K's tok512.bin has no .model: against llama2.c's encode (run.c, transcribed) on short lines
    ref = load_tokenizer(str(STORIES260K_TOKENIZER))
    small = {k: "\n".join([x for x in v.split("\n") if len(x) <= 80][:400]) for k, v in texts.items()}
    run("llama2.c tok512.bin", lambda: load_tokenizer(str(STORIES260K_TOKENIZER)),
        {"llama2.c reference": lambda s: run_c_encode(ref, s)}, small, max(1, a.reps // 2), rows, per_line=True)

    slower = [f"{k} [{c}] x{r:.2f} vs {b}" for k, c, r, b in rows if r < 1.0]
    print("slower than the fastest peer: " + ("; ".join(slower) if slower else "none"))


if __name__ == "__main__":
    main()
