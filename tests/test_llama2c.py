"""The bundled stories260K through the llama2.c importer: exact greedy ids, byte-exact export, CLI contracts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.assets import STORIES260K, STORIES260K_TOKENIZER
from lmforge.checkpoint import build_model, load_model
from lmforge.errors import LMForgeError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.llama2c import read_llama2c, write_llama2c

FIXTURES = Path(__file__).parent / "fixtures" / "stories260K"
EXPECTED_IDS = [int(t) for t in (FIXTURES / "expected_greedy_200_ids.txt").read_text().split()]
EXPECTED_TEXT = (FIXTURES / "expected_greedy_200.txt").read_text()


def lmforge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES260K)


def test_header_and_size(model):
    cfg = model.cfg
    assert (cfg.n_embd, cfg.hidden_size, cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.vocab_size, cfg.block_size) == (
        64, 172, 5, 8, 4, 512, 512)
    assert cfg.tie_embeddings
    assert model.num_params() == (STORIES260K.stat().st_size - 28) // 4 - 512 * 8 // 2 * 2  # minus freq tables


def test_greedy_200_from_bos_matches_llama2c(model):
    assert generate(model, [1], SamplingParams(temperature=0.0, max_new_tokens=200)) == EXPECTED_IDS


def test_export_is_byte_identical(tmp_path):
    cfg, sd = read_llama2c(STORIES260K)
    write_llama2c(tmp_path / "out.bin", cfg, sd)
    assert (tmp_path / "out.bin").read_bytes() == STORIES260K.read_bytes()


def test_untied_classifier_roundtrip(tmp_path, model):
    cfg, sd = read_llama2c(STORIES260K)
    cfg = cfg.replace(tie_embeddings=False)
    sd = dict(sd, **{"lm_head.weight": torch.randn(512, 64)})
    write_llama2c(tmp_path / "untied.bin", cfg, sd)
    cfg2, sd2 = read_llama2c(tmp_path / "untied.bin")
    assert not cfg2.tie_embeddings and torch.equal(sd2["lm_head.weight"], sd["lm_head.weight"])
    m = build_model(cfg2, sd2, "untied")
    x = torch.tensor([[1, 403, 407]])
    assert torch.equal(m(x)[..., :], torch.nn.functional.linear(m.hidden_states(x), sd["lm_head.weight"]))


def test_truncated_and_garbage_files_fail_with_one_line(tmp_path):
    raw = STORIES260K.read_bytes()
    (tmp_path / "short.bin").write_bytes(raw[:-100])
    with pytest.raises(LMForgeError, match="truncated"):
        load_model(tmp_path / "short.bin")
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(LMForgeError, match="not a llama2.c model"):
        load_model(tmp_path / "junk.bin")
    r = lmforge("generate", "--model", str(tmp_path / "short.bin"), "--max-new-tokens", "2")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "short.bin" in r.stderr


def test_cli_generate_greedy_prints_expected_story():
    r = lmforge("generate", "--temperature", "0", "--max-new-tokens", "200")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == EXPECTED_TEXT.strip()
    # the speed line: overall rate first (benchmarks/bench_serve.py reads it), then the first token's wait apart
    speed = [ln for ln in r.stderr.splitlines() if ln.startswith("achieved tok/s:")]
    assert len(speed) == 1 and re.fullmatch(r"achieved tok/s: [\d.]+ \((\d+) tokens; first token after [\d.]+ s, "
                                            r"then [\d.]+ tok/s\)", speed[0]), r.stderr


def test_cli_generate_prompt_and_seed_are_reproducible():
    args = ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "30", "--seed", "7",
            "--temperature", "0.8", "--top-k", "40", "--top-p", "0.95"]
    a, b = lmforge(*args), lmforge(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("Once upon a time")
    assert len(a.stdout) > len("Once upon a time") + 10


def test_cli_convert_roundtrip_llama2c_lmforge_hf(tmp_path):
    ck, hf, back = tmp_path / "ck", tmp_path / "hf", tmp_path / "back" / "model.bin"
    for src_fmt, src, dst_fmt, dst in [("llama2c", STORIES260K, "lmforge", ck), ("lmforge", ck, "hf", hf),
                                       ("hf", hf, "llama2c", back)]:
        extra = ["--tokenizer", str(STORIES260K_TOKENIZER)] if src_fmt == "hf" else []
        r = lmforge("convert", "--from", src_fmt, str(src), "--to", dst_fmt, str(dst), *extra)
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr, r.stderr
    assert back.read_bytes() == STORIES260K.read_bytes()
    assert (back.parent / "tokenizer.bin").read_bytes() == STORIES260K_TOKENIZER.read_bytes()
    r = lmforge("generate", "--model", str(ck), "--temperature", "0", "--max-new-tokens", "200")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == EXPECTED_TEXT.strip()


def test_cli_convert_to_llama2c_says_what_the_file_cannot_carry(tmp_path):
    """llama2.c's run.c fixes RMSNorm's eps at 1e-5 and reads only its own tokenizer.bin: a tiny-llama (eps 1e-6)
    with a byte-level BPE tokenizer was written without a word about either."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import Decoder
    from lmforge.presets import get_preset
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "c.txt").write_text("Once upon a time there was a cat. " * 200)
    tok = train_tokenizer([str(tmp_path / "c.txt")], 300, "bytelevel-bpe", str(tmp_path / "tok"))
    cfg = get_preset("tiny-llama", vocab_size=tok.vocab_size, n_layer=1, block_size=32)
    assert cfg.norm_eps == 1e-6
    save_checkpoint(Decoder(cfg), tmp_path / "ck", tok)
    r = lmforge("convert", "--from", "lmforge", str(tmp_path / "ck"), "--to", "llama2c", str(tmp_path / "m.bin"))
    assert r.returncode == 0, r.stderr
    assert "eps 1e-05, this model with 1e-06" in r.stderr and "has no llama2.c form" in r.stderr, r.stderr
    assert (tmp_path / "m.bin").is_file() and not (tmp_path / "tokenizer.bin").exists()
