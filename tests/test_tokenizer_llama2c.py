"""llama2.c tokenizer.bin: same ids as sentencepiece on Llama 2's vocabulary; exact round trips with byte fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.assets import STORIES260K_TOKENIZER
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.llama2c import Llama2cTokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXTS = ["Hello world", "Once upon a time, there was a little girl named Lily.", "The year 2023 had 365 days.",
         "红楼梦 is a Chinese novel: 满纸荒唐言，一把辛酸泪。", "emoji 🤖🚀 and café", "tabs\tand  double  spaces",
         "x", "1234567890"]


def test_roundtrip_with_byte_fallback_on_512_vocab():
    tok = load_tokenizer(str(STORIES260K_TOKENIZER))
    assert isinstance(tok, Llama2cTokenizer) and tok.vocab_size == 512
    for t in TEXTS:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert tok.decode([tok.bos_id] + ids) == t
    assert any(3 <= i < 259 for i in tok.encode("红楼梦"))  # Chinese falls back to bytes in this vocabulary


def test_save_writes_identical_file(tmp_path):
    tok = load_tokenizer(str(STORIES260K_TOKENIZER))
    tok.save(str(tmp_path))
    assert (tmp_path / "tokenizer.bin").read_bytes() == STORIES260K_TOKENIZER.read_bytes()
    assert load_tokenizer(str(tmp_path)).encode("Lily") == tok.encode("Lily")


def test_same_ids_as_sentencepiece_on_llama2_vocab():
    spm = pytest.importorskip("sentencepiece")
    if not (SHARED / "tokenizers" / "llama2" / "tokenizer.bin").exists():
        pytest.skip("../shared/data/tokenizers/llama2 not present")
    sp = spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizers" / "llama2" / "tokenizer.model"))
    tok = load_tokenizer(str(SHARED / "tokenizers" / "llama2" / "tokenizer.bin"))
    for t in TEXTS:
        if "  " in t or "\t" in t:
            continue  # run.c's encoder (which this reproduces) and sentencepiece differ on runs of whitespace
        assert tok.encode(t) == sp.encode(t), t
        assert tok.decode(tok.encode(t)) == t
