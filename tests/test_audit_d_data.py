"""Audit D: `lmforge tokenizer train|encode|decode` and `lmforge data clean|prepare` used carelessly (CRLF files,
inputs inside outputs, settings that do nothing); each test fails without its fix."""

from __future__ import annotations

from cli_run import refused

from lmforge.data.prepare import prepare
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer


def test_char_tokenizer_keeps_carriage_returns(tmp_path):
    """A char vocabulary trained on a CRLF file holds "\\r" (it was read with newlines translated: encoding the
    same file, or preparing it, failed with "character '\\r' is not in the vocabulary")."""
    f = tmp_path / "crlf.txt"
    text = "hello world\r\nsecond line\r\nold mac\rend\r\n"
    f.write_bytes(text.encode())
    train_tokenizer([str(f)], 10, "char", str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.decode(tok.encode(text)) == text
    idx = prepare([str(f)], str(tmp_path / "tok"), str(tmp_path / "data"), val_fraction=0, workers=1, progress=False)
    assert idx["splits"]["train"]["tokens"] == len(text)


def test_char_tokenizer_refuses_special_tokens(tmp_path):
    """--special-tokens with --kind char did nothing (the vocabulary is the text's characters): refused."""
    f = tmp_path / "a.txt"
    f.write_text("some text\n")
    r = refused("tokenizer", "train", "--input", f, "--vocab-size", 10, "--kind", "char", "--output", tmp_path / "t",
                "--special-tokens", "<|im_start|>")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--special-tokens" in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()
