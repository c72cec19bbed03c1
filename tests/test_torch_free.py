"""A process decoding with an int4 model loads its GGUF tokenizer, detokenizes incrementally and parses the
``--model`` arguments without importing torch (``import torch`` alone costs ~219 MB of resident memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Once upon a time, Lily saw a café 🤖 and said: hello hello!"

# Runs in a fresh interpreter; argv: the tokenizer paths. Prints one JSON line per tokenizer.
CHILD = r"""
import argparse, json, sys
from pathlib import Path
from types import SimpleNamespace

from lmforge.commands.args import add_model_args, check_vocab, find_tokenizer_path, read_template
from lmforge.infer.text import TextStream
from lmforge.tokenizer import load_tokenizer

text = sys.stdin.read()
p = argparse.ArgumentParser()
add_model_args(p)
for path in sys.argv[1:]:
    args = p.parse_args(["--model", path, "--device", "cpu"])
    tok_path = find_tokenizer_path(Path(args.model), 0)
    tok = load_tokenizer(str(tok_path))
    read_template(Path(path), tok)
    check_vocab(SimpleNamespace(vocab_size=tok.vocab_size, bos_id=None, eos_id=tok.eos_id), tok, "m", str(tok_path))
    ids = tok.encode(text)
    prompt = [tok.bos_id] if tok.bos_id is not None else []
    ts = TextStream(tok, prompt)
    streamed = "".join(ts.push(i) for i in ids) + ts.flush()
    stop = TextStream(tok, prompt, stop=["hello"])
    before_stop = "".join(stop.push(i) for i in ids if not stop.stopped)
    print(json.dumps({"kind": type(tok).__name__, "n": len(ids), "decoded": tok.decode(ids), "streamed": streamed,
                      "before_stop": before_stop, "template": tok.chat_template}))
print(json.dumps({"torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:5]}))
assert "torch" not in sys.modules
"""


def _bpe_metadata() -> dict:
    """A small byte-level BPE ("gpt2") vocabulary: the 256 byte symbols, a few merges and an end-of-text token."""
    from lmforge.interop.gguf import CONTROL, NORMAL, bytes_to_unicode

    b2u = bytes_to_unicode()
    merges = ["h e", "l l", "he ll", "hell o", "Ġ hello", "o n", "c e", "Ġ a", "a i", "Ġ t"]
    tokens = [b2u[b] for b in range(256)] + ["".join(m.split()) for m in merges] + ["<|endoftext|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [NORMAL] * (len(tokens) - 1) + [CONTROL],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": len(tokens) - 1}


def test_gguf_tokenizers_stream_and_model_args_without_torch(tmp_path):
    pytest.importorskip("gguf", reason="writing tokenizer.gguf needs the gguf package (pip install gguf)")
    pytest.importorskip("tokenizers", reason="GGUF byte-level BPE tokenizers need the tokenizers package")
    from lmforge.assets import STORIES260K_TOKENIZER
    from lmforge.interop.gguf import llama2c_tokenizer_metadata, tokenizer_from_metadata

    # what `lmforge quantize` writes beside an int4 model made from a .gguf: tokenizer.gguf + tokenizer_config.json
    spm = tokenizer_from_metadata(llama2c_tokenizer_metadata(STORIES260K_TOKENIZER), "stories260K")
    spm.save(str(tmp_path / "spm"))
    (tmp_path / "spm" / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    assert json.loads((tmp_path / "spm" / "tokenizer_config.json").read_text())["kind"] == "gguf"
    bpe = tokenizer_from_metadata(_bpe_metadata(), "bpe")
    bpe.save(str(tmp_path / "bpe"))
    paths = [str(tmp_path / "spm"), str(tmp_path / "bpe" / "tokenizer.gguf")]  # a directory, and a .gguf file

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", CHILD, *paths], input=TEXT, env=env, capture_output=True, text=True,
                       encoding="utf-8", timeout=300)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0, (r.stderr[-2000:], lines)
    *results, modules = lines
    assert modules == {"torch": []}
    assert [x["kind"] for x in results] == ["GGUFSPMTokenizer", "GGUFBPETokenizer"]
    for res, tok in zip(results, (spm, bpe)):
        assert res["n"] == len(tok.encode(TEXT)) and res["n"] > 0
        assert res["decoded"] == res["streamed"] == TEXT
        assert res["before_stop"] == TEXT[: TEXT.index("hello")]
    assert results[0]["template"] == "{{ messages }}"
