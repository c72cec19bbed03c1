"""Real tokenizers from local files: GPT-2 (encoder.json + vocab.bpe, and .tiktoken), cl100k_base, Llama 2's
sentencepiece model; ids checked against independent implementations and published ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.tokenizer import load_tokenizer

TOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers"
CORPUS = ["Hello world", "The year 2023 had 365 days, didn't it?", "红楼梦 满纸荒唐言，一把辛酸泪。",
          "emoji 🤖🚀 café naïve", "tabs\tand  double  spaces\n\n  indented", "   ", "x", "<|endoftext|> is text here",
          "1234567890 3.14159 -42", "日本語とEnglish混合テキスト"]

pytestmark = pytest.mark.skipif(not TOK.exists(), reason="../shared/data/tokenizers not present")


def test_gpt2_files_match_hf_tokenizers_bpe_and_tiktoken_file():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ours = load_tokenizer(str(TOK / "gpt2"))
    same = load_tokenizer(str(TOK / "gpt2" / "gpt2.tiktoken"))
    ref = Tokenizer(models.BPE.from_file(str(TOK / "gpt2" / "encoder.json"), str(TOK / "gpt2" / "vocab.bpe")))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    assert ours.encode("Hello world") == [15496, 995]
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == same.encode(text) == ref.encode(text).ids, text
        assert ours.decode(ids) == text


def test_cl100k_published_ids_and_roundtrip():
    tok = load_tokenizer(str(TOK / "cl100k" / "cl100k_base.tiktoken"))
    assert tok.encode("hello world") == [15339, 1917] and tok.vocab_size == 100277 and tok.eos_id == 100257
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("1234567890")) == 4  # cl100k splits digits in groups of up to 3


def test_a_directory_of_tiktokens_own_rank_file_is_a_tokenizer(tmp_path):
    """``--tokenizer cl100k/`` (the directory of tiktoken's cl100k_base.tiktoken) said "no tokenizer files found";
    another rank file in a directory (a model's own, with special tokens of its own) is named in the error instead."""
    from lmforge.tokenizer.loader import NoTokenizerFiles

    tok = load_tokenizer(str(TOK / "cl100k"))
    assert tok.encode("hello world") == [15339, 1917] and tok.vocab_size == 100277 and tok.eos_id == 100257
    (tmp_path / "qwen.tiktoken").write_bytes((TOK / "cl100k" / "cl100k_base.tiktoken").read_bytes())
    with pytest.raises(NoTokenizerFiles, match=r"give a \.tiktoken file itself \(.*qwen\.tiktoken\)"):
        load_tokenizer(str(tmp_path))


def test_llama2_sentencepiece_matches_reference(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(TOK / "llama2" / "tokenizer.model"))
    tok = load_tokenizer(str(TOK / "llama2" / "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    for text in CORPUS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
    tok.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).encode(CORPUS[2]) == sp.encode(CORPUS[2])


def test_saved_tiktoken_reloads(tmp_path):
    tok = load_tokenizer(str(TOK / "gpt2"))
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert all(again.encode(t) == tok.encode(t) for t in CORPUS)
