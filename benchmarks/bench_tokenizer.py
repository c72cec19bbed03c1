"""Tokenizer training time and encode MB/s: lmforge vs `tokenizers`, `sentencepiece` and `tiktoken`, same corpus and
vocabulary size, one run. For each kind lmforge supports, the peers giving identical ids are marked "same ids".

    python benchmarks/bench_tokenizer.py [--corpus FILE] [--vocab 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lmforge.assets import TINYSHAKESPEARE

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def mbps(fn, text: str, reps: int = 3) -> tuple[float, list[int]]:
    best, ids = float("inf"), []
    for _ in range(reps):
        t = time.perf_counter()
        ids = fn(text)
        best = min(best, time.perf_counter() - t)
    return len(text.encode()) / best / 1e6, ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(TINYSHAKESPEARE))
    ap.add_argument("--vocab", type=int, default=4096)
    a = ap.parse_args()
    text = Path(a.corpus).read_text(encoding="utf-8")
    print(f"corpus {a.corpus} ({len(text.encode()) / 1e6:.2f} MB), vocab {a.vocab}")
    import sentencepiece as spm
    import tiktoken
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.train import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # byte-level BPE: lmforge (trained with tokenizers, encoded with tiktoken) vs tokenizers itself
        t = time.perf_counter()
        ours = train_tokenizer([a.corpus], a.vocab, "bytelevel-bpe", f"{tmp}/bl")
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train([a.corpus], trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=["<|endoftext|>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                  show_progress=False))
        t_hf = time.perf_counter() - t
        r_ours, ids_ours = mbps(ours.encode, text)
        r_hf, ids_hf = mbps(lambda s: hf.encode(s, add_special_tokens=False).ids, text)
        enc = ours.fast
        r_tt, ids_tt = mbps(enc.encode_ordinary, text)
        print("bytelevel-bpe")
        print(f"  train: lmforge {t_ours:.2f} s, tokenizers {t_hf:.2f} s")
        print(f"  encode: lmforge {r_ours:.2f} MB/s | tokenizers {r_hf:.2f} MB/s (same ids: {ids_hf == ids_ours}) | "
              f"tiktoken {r_tt:.2f} MB/s (same ids: {ids_tt == ids_ours}) | lmforge / fastest peer "
              f"{r_ours / max(r_hf, r_tt):.2f}x")
        # llama-style BPE (byte fallback): lmforge (tokenizers engine) vs sentencepiece BPE on the same corpus
        t = time.perf_counter()
        llama = train_tokenizer([a.corpus], a.vocab, "llama-bpe", f"{tmp}/ll")
        t_ll = time.perf_counter() - t
        t = time.perf_counter()
        spm.SentencePieceTrainer.train(input=a.corpus, model_prefix=f"{tmp}/sp", vocab_size=a.vocab, model_type="bpe",
                                       byte_fallback=True, split_digits=True, minloglevel=2)
        t_sp = time.perf_counter() - t
        sp = spm.SentencePieceProcessor(model_file=f"{tmp}/sp.model")
        r_ll, _ = mbps(llama.encode, text)
        r_sp, _ = mbps(sp.encode, text)
        print("llama-bpe (no peer gives the same ids: sentencepiece learns a different vocabulary)")
        print(f"  train: lmforge {t_ll:.2f} s, sentencepiece {t_sp:.2f} s; encode: lmforge {r_ll:.2f} MB/s, "
              f"sentencepiece {r_sp:.2f} MB/s")
    # real rank files: lmforge (tiktoken engine) vs tiktoken built directly
    cl = SHARED / "tokenizers" / "cl100k" / "cl100k_base.tiktoken"
    if cl.exists():
        import tiktoken_ext.openai_public as op
        from tiktoken.load import load_tiktoken_bpe

        ours = load_tokenizer(str(cl))
        ranks = load_tiktoken_bpe(str(cl))
        orig = op.load_tiktoken_bpe
        op.load_tiktoken_bpe = lambda *x, **k: ranks
        params = op.cl100k_base()
        op.load_tiktoken_bpe = orig
        ref = tiktoken.Encoding("cl100k_base", **{k: v for k, v in params.items() if k != "name"})
        r_o, i_o = mbps(ours.encode, text)
        r_r, i_r = mbps(ref.encode_ordinary, text)
        print(f"cl100k_base: lmforge {r_o:.2f} MB/s, tiktoken {r_r:.2f} MB/s (same ids: {i_o == i_r}), "
              f"ratio {r_o / r_r:.2f}x")
    lt = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
    if lt.exists():
        ours = load_tokenizer(str(lt))
        ref = spm.SentencePieceProcessor(model_file=str(lt))
        r_o, i_o = mbps(ours.encode, text)
        r_r, i_r = mbps(ref.encode, text)
        print(f"llama2 tokenizer.model: lmforge {r_o:.2f} MB/s, sentencepiece {r_r:.2f} MB/s (same ids: "
              f"{i_o == i_r}), ratio {r_o / r_r:.2f}x")


if __name__ == "__main__":
    main()
