"""decode(encode(x)) == x for arbitrary Unicode text (CJK, emoji, whitespace runs, control characters, special-token
strings) on every tokenizer kind that promises it, and the fast encode paths give the reference engines' ids.

What each kind promises:
- bytelevel-bpe, GPT-2 files / .tiktoken, cl100k_base, llama2.c tokenizer.bin: lossless for any text (byte level or
  byte fallback; special-token strings in the text are text).
- llama-bpe and sentencepiece models with byte fallback and an identity normalizer (Llama 2): lossless for any text
  without U+2581 "▁", their space symbol; a "▁" in the text comes back as " ".
- char: lossless for text over its vocabulary; any other character is a one-line error.
- sentencepiece models with a normalizer and no byte fallback (sentencepiece's test_model: NFKC, extra whitespace
  removed, unknown characters -> <unk>, decoded as " ⁇ ") are not lossless: they promise decode(encode(x)) == x
  for text that is already normalized (here: lowercase ASCII words joined by single spaces), and whitespace runs
  collapse to one space.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.assets import STORIES260K_TOKENIZER, TINYSHAKESPEARE
from lmforge.errors import LMForgeError
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOK = SHARED / "tokenizers"
CORPORA = SHARED / "corpora"
PIECES = ["红楼梦", "满纸荒唐言，一把辛酸泪。", "日本語", "한국어", "🤖", "🧑‍🤝‍🧑", "👍🏽", "é", "e\u0301", "  ", "   ",
          "\t", "\n", "\r\n", "\n\n\n", "\u00a0", "\u3000", "\x00", "\x1b", "\x7f", "\u200b", "\ufeff", "<s>", "</s>",
          "<unk>", "<0x41>", "<|endoftext|>", "<|im_start|>", " the", "don't", "1234567890", "3.14", "Ⅻ", "①", "〇",
          "\U0010ffff", "\ue000"]
TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.text(st.characters(codec="utf-8"), max_size=8)),
                max_size=12).map("".join)
NO_SPACE_SYMBOL = TEXT.map(lambda s: s.replace("\u2581", ""))
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def need(path: Path):
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is not checked out)")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """bytelevel-bpe and llama-bpe trained on Shakespeare (+ 红楼梦 when present) with a small vocabulary."""
    d = tmp_path_factory.mktemp("tok")
    text = TINYSHAKESPEARE.read_text(encoding="utf-8")[:150_000]
    if (CORPORA / "hongloumeng.txt").exists():
        text += (CORPORA / "hongloumeng.txt").read_text(encoding="utf-8")[:30_000]
    (d / "c.txt").write_text(text, encoding="utf-8")
    return {k: train_tokenizer([str(d / "c.txt")], 1200, k, str(d / k)) for k in ("bytelevel-bpe", "llama-bpe")}


@FAST
@given(TEXT)
def test_bytelevel_bpe_lossless_and_same_ids_as_tokenizers(trained, text):
    tok = trained["bytelevel-bpe"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if "<|endoftext|>" not in text:  # tokenizers would read it as the special token; lmforge reads text as text
        assert ids == tok.tok.encode(text, add_special_tokens=False).ids


@FAST
@given(TEXT)
def test_llama_bpe_lossless_except_space_symbol_and_same_ids_as_tokenizers(trained, text):
    tok = trained["llama-bpe"]
    assert tok.words is not None  # the word-cache engine is in use
    ids = tok.encode(text)
    assert tok.decode(ids) == text.replace("\u2581", " ")
    if not any(s in text for s in ("<s>", "</s>", "<unk>", "<0x")):  # tokenizers reads its added tokens in text
        assert ids == tok.tok.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == ids  # the cache gives the same ids


def test_llama_bpe_special_strings_are_text(trained):
    tok = trained["llama-bpe"]
    for t in ("<s>", "a </s> b", "<unk><0x41>"):
        ids = tok.encode(t)
        assert tok.bos_id not in ids and tok.eos_id not in ids and tok.decode(ids) == t


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from(sorted(set(TINYSHAKESPEARE.read_text(encoding="utf-8")))), max_size=200))
def test_char_lossless_over_its_vocabulary(text):
    tok = char_tok()
    long = text * 3  # past the vectorized threshold as well
    assert tok.decode(tok.encode(text)) == text and tok.decode(tok.encode(long)) == long
    assert tok.encode(long) == [tok.stoi[c] for c in long]


def test_char_unknown_character_is_an_error():
    tok = char_tok()
    for t in ("红", "x" * 100 + "红", "\U0010ffff" * 70):
        with pytest.raises(LMForgeError, match="not in the"):
            tok.encode(t)


_CHAR = []


def char_tok():
    if not _CHAR:
        from lmforge.tokenizer.char import CharTokenizer

        _CHAR.append(CharTokenizer.from_text(TINYSHAKESPEARE.read_text(encoding="utf-8")))
    return _CHAR[0]


@pytest.fixture(scope="module")
def real():
    """The real tokenizers in ../shared that promise lossless round trips (name -> tokenizer)."""
    out = {}
    for name, rel in (("gpt2", "gpt2"), ("gpt2.tiktoken", "gpt2/gpt2.tiktoken"),
                      ("cl100k", "cl100k/cl100k_base.tiktoken"), ("llama2.bin", "llama2/tokenizer.bin")):
        if (TOK / rel).exists():
            out[name] = load_tokenizer(str(TOK / rel))
    out["tok512.bin"] = load_tokenizer(str(STORIES260K_TOKENIZER))
    return out


@FAST
@given(TEXT)
def test_real_byte_level_tokenizers_lossless(real, text):
    for name, tok in real.items():
        assert tok.decode(tok.encode(text)) == text, name


@FAST
@given(TEXT)
def test_llama2_sentencepiece_lossless_except_space_symbol(text):
    pytest.importorskip("sentencepiece")
    tok = llama2_spm()
    ids = tok.encode(text)
    assert ids == tok.sp.encode(text)
    assert tok.decode(ids) == text.replace("\u2581", " ")


_SPM = {}


def llama2_spm():
    if "t" not in _SPM:
        _SPM["t"] = load_tokenizer(str(need(TOK / "llama2" / "tokenizer.model")))
    return _SPM["t"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10), max_size=8).map(" ".join))
def test_normalizing_sentencepiece_promises(words):
    pytest.importorskip("sentencepiece")
    tok = load_tokenizer(str(need(TOK / "sentencepiece" / "test_model.model")))
    assert tok.decode(tok.encode(words)) == words  # already-normalized text over its characters survives
    assert tok.decode(tok.encode("  " + words.replace(" ", "   ") + " ")) == words  # extra whitespace removed


def chinese_lines() -> list[str]:
    hlm, poems = CORPORA / "hongloumeng.txt", CORPORA / "chinese_poetry"
    if not hlm.exists() or not poems.exists():
        pytest.skip("../shared/data/corpora (红楼梦, chinese_poetry) not present")
    lines = [x for x in hlm.read_text(encoding="utf-8")[:60_000].split("\n") if x]
    for name in ("tangshi300.json", "ci.song.0.json", "shijing.json", "lunyu.json"):
        if (poems / name).exists():
            for rec in json.loads((poems / name).read_text(encoding="utf-8"))[:100]:
                lines += rec.get("paragraphs") or rec.get("content") or []
    return lines


def test_chinese_corpora_round_trip(trained, real):
    lines = chinese_lines()
    text = "\n".join(lines)
    toks = {**trained, **real}
    if (TOK / "llama2" / "tokenizer.model").exists():
        toks["llama2.model"] = llama2_spm()
    for name, tok in toks.items():
        assert tok.decode(tok.encode(text)) == text, name
        for line in lines[:300]:
            assert tok.decode(tok.encode(line)) == line, (name, line)
    ll = trained["llama-bpe"]
    assert ll.encode(text) == ll.tok.encode(text, add_special_tokens=False).ids
    bl = trained["bytelevel-bpe"]
    assert bl.encode(text) == bl.tok.encode(text, add_special_tokens=False).ids
