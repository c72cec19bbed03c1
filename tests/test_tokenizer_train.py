"""Tokenizer training (byte-level BPE, LLaMA-style BPE, char) and the `lmforge tokenizer` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmforge.assets import STORIES260K_TOKENIZER, TINYSHAKESPEARE
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer

TEXTS = ["ROMEO: wherefore art thou 1234?", "红楼梦 满纸荒唐言 🤖", " leading space", "tab\there\n\nnl", ""]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "c.txt"
    p.write_text(TINYSHAKESPEARE.read_text()[:200_000])
    return p


@pytest.mark.parametrize("kind", ["bytelevel-bpe", "llama-bpe", "char"])
def test_train_save_load_roundtrip(kind, corpus, tmp_path):
    tok = train_tokenizer([str(corpus)], 600, kind, str(tmp_path / kind))
    again = load_tokenizer(str(tmp_path / kind))
    assert again.vocab_size == tok.vocab_size
    texts = TEXTS if kind != "char" else ["ROMEO: wherefore art thou?"]
    for t in texts:
        assert again.encode(t) == tok.encode(t)
        assert again.decode(again.encode(t)) == t
    if kind == "llama-bpe":
        raw = again.tok.encode("in 2024 and 99").tokens  # digits split into single digits (or their bytes)
        assert [t for t in raw if t.strip("▁").isdigit() or t.startswith("<0x3")] == [
            t for t in raw if any(c.isdigit() for c in t)] and len([t for t in raw if "0x3" in t or t.isdigit()]) == 6
        assert again.bos_id == again.tok.token_to_id("<s>")
    if kind == "bytelevel-bpe":
        assert tok.vocab_size == 600
        assert again.fast is not None  # encoded by tiktoken from the same ranks: ids equal the tokenizers engine
        sample = TINYSHAKESPEARE.read_text()[-30_000:] + "红楼梦 满纸荒唐言 🤖\n\n  x\t1234 don't"
        assert again.encode(sample) == again.tok.encode(sample, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", ["bytelevel-bpe", "llama-bpe"])
def test_transformers_encodes_a_prompt_as_lmforge_does(kind, corpus, tmp_path):
    """A saved tokenizer (what `convert --to hf` writes too) read by AutoTokenizer gives a prompt the ids lmforge's
    prompts have: llama-bpe's with BOS first (its tokenizer.json had no post-processor: transformers left BOS out of
    every prompt of a model trained with it), byte-level BPE's without."""
    transformers = pytest.importorskip("transformers")
    train_tokenizer([str(corpus)], 600, kind, str(tmp_path / "t"))
    tok = load_tokenizer(str(tmp_path / "t"))
    tok.save(str(tmp_path / "again"))
    for d in ("t", "again"):
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / d))
        for t in TEXTS:
            assert hf(t).input_ids == tok.prompt_prefix() + tok.encode(t), (d, t)
    assert load_tokenizer(str(tmp_path / "again")).encode(TEXTS[0]) == tok.encode(TEXTS[0])  # read back alike
    assert (tok.prompt_prefix() != []) == (kind == "llama-bpe")


@pytest.mark.parametrize("post", ["none", "no-bos", "bos", "config-says-no"])
def test_a_transformers_directory_is_prompted_as_transformers_does(post, corpus, tmp_path):
    """A tokenizer written by transformers is read with transformers' idea of BOS: SmolLM2's names a bos_token
    but its post-processor adds nothing, so its prompts have no BOS (lmforge put one in front of every prompt, eval
    question and served request). Saving it again through lmforge keeps that."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import processors

    train_tokenizer([str(corpus)], 600, "llama-bpe", str(tmp_path / "t"))
    raw = RawTokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    raw.post_processor = {"none": None, "no-bos": processors.TemplateProcessing(single="$A", pair="$A $B"),
                          "bos": processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 1)]),
                          "config-says-no": None}[post]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(tmp_path / "hf"))
    if post == "config-says-no":  # (transformers 5 goes by the post-processor alone)
        cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
        (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": post == "bos"}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    tok = load_tokenizer(str(tmp_path / "hf"))
    tok.save(str(tmp_path / "again"))
    for d in ("hf", "again"):
        tok = load_tokenizer(str(tmp_path / d))
        for t in TEXTS:
            assert tok.prompt_prefix() + tok.encode(t) == hf(t).input_ids, (d, t)
    assert tok.prompt_prefix() == ([1] if post == "bos" else [])
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "again")).unk_token == "<unk>"  # (was lost)


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_cli_train_encode_decode(corpus, tmp_path):
    r = cli("train", "--input", str(corpus), "--vocab-size", "500", "--kind", "bytelevel-bpe", "--output",
            str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith("bytelevel-bpe, 500 tokens"), r.stderr  # the size asked was reached
    (tmp_path / "tiny.txt").write_text("hello world\n")
    small = cli("train", "--input", str(tmp_path / "tiny.txt"), "--vocab-size", "1000000", "--kind", "bytelevel-bpe",
                "--output", str(tmp_path / "small"))
    assert small.returncode == 0 and "(--vocab-size 1,000,000 asked" in small.stderr, small.stderr
    text = "First Citizen: 你好!"
    enc = cli("encode", "--tokenizer", str(tmp_path / "t"), stdin=text)
    ids = json.loads(enc.stdout)
    assert ids == load_tokenizer(str(tmp_path / "t")).encode(text)
    dec = cli("decode", "--tokenizer", str(tmp_path / "t"), stdin=json.dumps(ids))
    assert dec.stdout == text
    enc2 = cli("encode", "--tokenizer", str(STORIES260K_TOKENIZER), stdin="Lily")
    assert json.loads(enc2.stdout) == load_tokenizer(str(STORIES260K_TOKENIZER)).encode("Lily")
    bad = cli("decode", "--tokenizer", str(tmp_path / "t"), stdin="[1, 2")
    assert bad.returncode == 1 and "not a JSON array" in bad.stderr
    missing = cli("train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--kind", "char",
                  "--output", str(tmp_path / "x"))
    assert missing.returncode == 1 and "nope.txt" in missing.stderr


def test_cli_encode_decode_refuse_bad_stdin_naming_it(tmp_path):
    """Invalid UTF-8 on stdin names stdin and the byte (was a UnicodeDecodeError naming nothing); decode refuses
    true/false (JSON booleans passed as ids 1/0) and names the first bad id; --input that is a device or a pipe is
    not "no such input file"."""
    tok = str(STORIES260K_TOKENIZER)
    r = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "encode", "--tokenizer", tok],
                       input=b"ab\xffc", capture_output=True, timeout=120)
    assert r.returncode == 1 and b"stdin: not UTF-8 text (byte 0xff at offset 2)" in r.stderr, r.stderr
    for stdin, needle in (("[true]", "got true"), ("[1, 2, 99999]", "got 99999"), ('{"a": 1}', 'got {"a": 1}')):
        r = cli("decode", "--tokenizer", tok, stdin=stdin)
        assert r.returncode == 1 and "stdin: expected a JSON array of integers in [0, 512)" in r.stderr, r.stderr
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("train", "--input", "/dev/zero", "--vocab-size", "300", "--kind", "bytelevel-bpe", "--output",
            str(tmp_path / "t"))
    assert r.returncode == 1 and "/dev/zero: not a regular file" in r.stderr, r.stderr
    r = cli("train", "--input", str(STORIES260K_TOKENIZER), "--kind", "char", "--output", str(tmp_path / "t"),
            "--vocab-size", "300", "--special-tokens", "")
    assert r.returncode == 1 and "--special-tokens: an empty or blank token" in r.stderr, r.stderr


def test_cli_decode_ends_its_line_on_a_terminal_and_is_exact_in_a_pipe():
    """`lmforge tokenizer decode` left the shell's prompt on the text's line; a pipe still gets the text exactly."""
    import os
    import pty

    tok = str(STORIES260K_TOKENIZER)
    ids = json.dumps(load_tokenizer(tok).encode("Lily"))
    main, sub = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "decode", "--tokenizer", tok],
                           input=ids.encode(), stdout=sub, stderr=subprocess.PIPE, timeout=120)
        os.close(sub)
        out = b""
        while True:
            try:
                chunk = os.read(main, 1024)
            except OSError:  # the terminal closed (EIO)
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
    assert r.returncode == 0, r.stderr
    assert out == b"Lily\r\n"  # (the terminal turns "\n" into "\r\n")
    assert cli("decode", "--tokenizer", tok, stdin=ids).stdout == "Lily"
