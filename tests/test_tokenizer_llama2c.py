"""llama2.c tokenizer.bin: ids equal a line-by-line transcription of run.c's encode and sentencepiece's on Llama 2's
vocabulary; exact round trips with byte fallback; the writer reproduces llama2.c's own export byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_impls import run_c_encode  # noqa: E402

from lmforge.assets import STORIES260K_TOKENIZER
from lmforge.errors import LMForgeError
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.llama2c import Llama2cTokenizer, write_llama2c_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA = SHARED / "tokenizers" / "llama2"
TEXTS = ["Hello world", "Once upon a time, there was a little girl named Lily.", "The year 2023 had 365 days.",
         "红楼梦 is a Chinese novel: 满纸荒唐言，一把辛酸泪。", "emoji 🤖🚀 and café", "tabs\tand  double  spaces",
         "x", "1234567890", "", " ", "   leading and trailing   ", "\n\nnew\r\nlines\n", "a\u00a0b\u3000c",
         "<s> and </s> and <unk> and <0x41> are text", "\x00nul", "日本語とEnglish混合テキスト 3.14159 -42",
         "Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧑‍🤝‍🧑"]
ALPHABET = list("ab cdeTH  \t\n\r0123456789,.!?'\"-<>s/") + list("红楼梦满纸荒唐言一把辛酸泪。，") + [
    "🤖", "🚀", "é", "ï", "\u2581", "\u00a0", "\u3000", "\x00", "<0x41>", "<s>", "</s>", "<unk>", " the"]
TEXT = st.lists(st.one_of(st.sampled_from(ALPHABET), st.characters(codec="utf-8")), max_size=60).map("".join)


@pytest.fixture(scope="module")
def tok512() -> Llama2cTokenizer:
    return load_tokenizer(str(STORIES260K_TOKENIZER))


@pytest.fixture(scope="module")
def llama():
    if not (LLAMA / "tokenizer.bin").exists():
        pytest.skip("../shared/data/tokenizers/llama2 not present")
    spm = pytest.importorskip("sentencepiece")
    return (Llama2cTokenizer.load(LLAMA / "tokenizer.bin"), Llama2cTokenizer.load(LLAMA / "tokenizer.bin", "python"),
            spm.SentencePieceProcessor(model_file=str(LLAMA / "tokenizer.model")))


def test_tok512_matches_run_c_and_round_trips_with_byte_fallback(tok512):
    assert isinstance(tok512, Llama2cTokenizer) and tok512.vocab_size == 512
    py = Llama2cTokenizer(tok512.pieces, tok512.scores, engine="python")
    for t in TEXTS:
        ids = tok512.encode(t)
        assert ids == py.encode(t) == run_c_encode(tok512, t), t
        assert tok512.decode(ids) == t
        assert tok512.decode([tok512.bos_id] + ids + [tok512.eos_id]) == t
        assert tok512.encode(t, bos=True, eos=True) == [1, *ids, 2]
    zh = "红楼梦"
    ids = tok512.encode(zh)
    assert ids[1:] == [b + 3 for b in zh.encode()]  # after the " " token: one byte token per UTF-8 byte
    assert tok512.decode(ids[:3]) == "\ufffd" and tok512.decode_bytes(ids[:3]) == zh.encode()[:2]


def test_tok512_round_trips_chinese_corpora(tok512):
    hlm = SHARED / "corpora" / "hongloumeng.txt"
    poems = SHARED / "corpora" / "chinese_poetry" / "tangshi300.json"
    if not hlm.exists() or not poems.exists():
        pytest.skip("../shared/data/corpora not present")
    texts = [hlm.read_text(encoding="utf-8")[:20_000]]
    texts += ["\n".join(p["paragraphs"]) for p in json.loads(poems.read_text(encoding="utf-8"))[:50]]
    for t in texts:
        assert tok512.decode(tok512.encode(t)) == t


def test_llama2_same_ids_as_sentencepiece_and_run_c(llama):
    tok, py, sp = llama
    assert tok.engine == "sentencepiece" and py.engine == "python"
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids == py.encode(t) == sp.encode(t) == run_c_encode(tok, t), t
        assert tok.decode(ids) == t == sp.decode(ids)
    # the one difference: sentencepiece reads U+2581 "▁" in the input as a space (it is its space symbol), while
    # run.c's vocabulary stores spaces as " " and has no "▁" piece, so it falls back to its 3 UTF-8 bytes.
    t = "a\u2581b"
    assert tok.encode(t) == run_c_encode(tok, t) == [tok.lookup[b" a"], 229, 153, 132, 29890]
    assert sp.encode(t) == sp.encode("a b") != tok.encode(t)
    assert tok.decode(tok.encode(t)) == t


def test_llama2_long_texts_same_ids_as_sentencepiece(llama):
    """Long texts are cut for sentencepiece at places no merge crosses; ids must not change."""
    tok, py, sp = llama
    corpora = SHARED / "corpora"
    if not corpora.exists():
        pytest.skip("../shared/data/corpora not present")
    texts = [(corpora / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000],
             (corpora / "hongloumeng.txt").read_text(encoding="utf-8")[:30_000],
             (corpora / "en" / "taylorswift.txt").read_text(encoding="utf-8")[:30_000] + " \u2581 " + "x  " * 200]
    for t in texts:
        ids = tok.encode(t)
        assert ids == py.encode(t)
        if "\u2581" not in t:
            assert ids == sp.encode(t)
        assert tok.decode(ids) == t


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT.map(lambda xs: "".join(xs[:30])))
def test_llama2_property_equal_to_run_c(llama, text):
    tok, py, sp = llama
    ids = tok.encode(text)
    assert ids == py.encode(text) == run_c_encode(tok, text)
    if "\u2581" not in text:
        assert ids == sp.encode(text)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT)
def test_tok512_property_round_trip(tok512, text):
    ids = tok512.encode(text)
    assert tok512.decode(ids) == text
    assert ids == run_c_encode(tok512, text)


def test_decode_like_run_c(tok512):
    """A piece after BOS drops its leading space (run.c), <0xXX> are raw bytes, BOS/EOS/<unk> print nothing."""
    the = tok512.lookup[b" the"]
    assert tok512.decode([1, the, the]) == "the the"
    assert tok512.decode([the, 1, the]) == "thethe"
    assert tok512.decode([0, 2]) == ""
    assert tok512.decode([3 + 0xE7, 3 + 0xBA, 3 + 0xA2]) == "红"
    assert tok512.token_bytes(the) == b" the" and tok512.token_bytes(3 + 0x41) == b"A"
    with pytest.raises(LMForgeError, match="outside the vocabulary"):
        tok512.decode([512])


def test_save_and_writer_reproduce_the_files(tok512, tmp_path):
    tok512.save(str(tmp_path))
    assert (tmp_path / "tokenizer.bin").read_bytes() == STORIES260K_TOKENIZER.read_bytes()
    meta = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (meta["kind"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == ("llama2c", 1, 2, None)
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, Llama2cTokenizer) and again.encode(TEXTS[3]) == tok512.encode(TEXTS[3])
    # str pieces are written as UTF-8
    write_llama2c_tokenizer(tmp_path / "t.bin", ["<unk>", "\n<s>\n", "\n</s>\n", " ", "é"], [0, 0, 0, -1, -2.5])
    t = Llama2cTokenizer.load(tmp_path / "t.bin")
    assert t.pieces[4] == "é".encode() and t.scores[4] == -2.5 and t.engine == "python"


def test_export_from_sentencepiece_equals_llama2c_export(tmp_path):
    """from_sentencepiece + write_llama2c_tokenizer reproduce llama2.c's tokenizer.py export byte for byte."""
    if not (LLAMA / "tokenizer.model").exists():
        pytest.skip("../shared/data/tokenizers/llama2 not present")
    pytest.importorskip("sentencepiece")
    tok = Llama2cTokenizer.from_sentencepiece(LLAMA / "tokenizer.model")
    write_llama2c_tokenizer(tmp_path / "tokenizer.bin", tok.pieces, tok.scores)
    assert (tmp_path / "tokenizer.bin").read_bytes() == (LLAMA / "tokenizer.bin").read_bytes()


def test_bad_files_give_one_line_errors(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\x07\x00")
    (tmp_path / "trunc.bin").write_bytes(STORIES260K_TOKENIZER.read_bytes()[:1001])
    for name in ("short.bin", "trunc.bin"):
        with pytest.raises(LMForgeError, match=name):
            load_tokenizer(str(tmp_path / name))
    with pytest.raises(LMForgeError, match="no such"):
        load_tokenizer(str(tmp_path / "missing.bin"))
