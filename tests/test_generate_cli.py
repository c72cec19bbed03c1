"""`lmforge generate` from the command line on a tiny character-level checkpoint (no BOS, no EOS): an empty prompt
starts from a newline as nanoGPT's sample.py does, and a stop at the end of the model's context is said."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.checkpoint import save_checkpoint
from lmforge.model import Decoder
from lmforge.presets import get_preset
from lmforge.tokenizer.char import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    import torch

    tok = CharTokenizer.from_text(TEXT)
    assert tok.bos_id is None and tok.eos_id is None
    torch.manual_seed(0)
    cfg = get_preset("tiny-gpt2").replace(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_embd=32, n_head=2)
    d = tmp_path_factory.mktemp("char") / "ckpt-0000010"
    save_checkpoint(Decoder(cfg), d, tok)
    return d


def test_empty_prompt_of_a_char_model_starts_from_a_newline(char_ckpt):
    """README: a checkpoint is a loadable model, `lmforge generate --model runs/baby/ckpt-0002000` (no --prompt); it
    said "empty prompt and the tokenizer adds no BOS token" for the character-level baby GPT."""
    r = lmforge("generate", "--model", char_ckpt, "--max-new-tokens", "20", "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("\n") and out.endswith("\n") and len(out) == 1 + 20 + 1  # "\n", 20 characters, newline
    assert set(out) <= set(TEXT)
    assert "note:" not in r.stderr  # 21 of 64 positions: not at the context's end


def test_a_start_token_for_tokenizers_without_bos():
    from lmforge.commands.generate import _prompt, _start
    from lmforge.errors import LMForgeError

    class WithEos(CharTokenizer):
        eos_id = 0

    assert _start(CharTokenizer.from_text("ab\n")) == [0]  # "\n" sorts first
    assert _start(WithEos(["<eos>", "a", "b"])) == [0]  # no newline: EOS
    with pytest.raises(LMForgeError, match="give --prompt"):
        _prompt(CharTokenizer.from_text("ab"), "", 64, 4)


def test_a_stop_at_the_end_of_the_context_is_said(char_ckpt):
    r = lmforge("generate", "--model", char_ckpt, "--prompt", "First ", "--max-new-tokens", "60", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 64 + 1  # 6 prompt characters and 58 new ones fill the 64 positions
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert notes == ["note: stopped after 58 of 60 new tokens: the model's context of 64 positions is full "
                     "(6 of them the prompt's)"], r.stderr
    r = lmforge("generate", "--model", char_ckpt, "--prompt", "First ", "--max-new-tokens", "58", "--seed", "1")
    assert r.returncode == 0 and len(r.stdout) == 65 and "note:" not in r.stderr, r.stderr


def test_a_prompt_of_dash_is_read_from_stdin():
    """``--prompt -`` reads the prompt from standard input (echo's newline dropped), as `--prompt TEXT` gives it; it
    was the text "-"."""
    args = ("generate", "--temperature", "0", "--max-new-tokens", "12")
    piped = subprocess.run([sys.executable, "-m", "lmforge", *args, "--prompt", "-"], input="Once upon a time\n",
                           capture_output=True, text=True, timeout=300)
    given = lmforge(*args, "--prompt", "Once upon a time")
    assert piped.returncode == given.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and piped.stdout.startswith("Once upon a time")
    bad = subprocess.run([sys.executable, "-m", "lmforge", *args, "--prompt", "-"], input=b"Once \xff\n",
                         capture_output=True, timeout=300)
    assert bad.returncode != 0 and b"--prompt: not UTF-8 text (byte 0xff" in bad.stderr
