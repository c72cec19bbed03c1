"""Audit D of the model-use commands (generate, chat, quantize, convert): settings that did nothing or the wrong
thing, results that differed from what they should be. Each test failed before its fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import refused

SMOLLM2 = Path.home() / ".cache/lmforge/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def lmforge(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)


def one_line(r: subprocess.CompletedProcess, cmd: str, *words: str) -> str:
    """The refusal's one line on stderr, checked to name ``words``."""
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert err.count("\n") == 0 and err.startswith(f"lmforge {cmd}: error: "), err
    assert "Traceback" not in err and "ValueError" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_infinite_temperature_is_refused_naming_it(cmd):
    """--temperature inf sampled all tokens alike (random bytes, exit 0, on the lean runtime) or failed with
    'ValueError: temperature=inf' after the prompt or the chat's banner was printed."""
    r = refused(cmd, "--temperature", "inf", "--max-new-tokens", "4")
    one_line(r, cmd, "--temperature inf")
    assert r.stdout == ""


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_chat_repetition_penalty_must_be_finite(value):
    """--repetition-penalty inf was taken (logits of every token seen divided by inf or made -inf)."""
    one_line(refused("chat", "--repetition-penalty", value), "chat", f"--repetition-penalty {value}")


@pytest.mark.parametrize("flags", [["--bits", "8", "--calibration", "README.md"],
                                   ["--bits", "4", "--method", "rtn", "--calibration", "README.md"],
                                   ["--bits", "4", "--method", "rtn", "--calib-samples", "8"],
                                   ["--bits", "8", "--seed", "3"],
                                   ["--bits", "4", "--calibration", "README.md", "--seed", "3"]])
def test_quantize_calibration_flags_that_do_nothing_are_refused(flags, tmp_path):
    """Round to nearest read no --calibration text (the file was never opened, exit 0); --seed seeds only the text
    the model samples itself."""
    r = refused("quantize", *flags, "--output", tmp_path / "q")
    one_line(r, "quantize", flags[-2])
    assert not (tmp_path / "q").exists()


def test_quantize_calibration_of_a_q4_1_gguf_is_refused(tmp_path):
    """A Q4_1 GGUF is kept exactly (round to nearest) unless --method gptq: its --calibration text was never read."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} absent")
    r = refused("quantize", "--model", SMOLLM2, "--bits", "4", "--calibration", "README.md", "--output", tmp_path / "q")
    one_line(r, "quantize", "--calibration", "Q4_1", "--method gptq")
