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


def test_convert_overwrite_of_an_hf_directory_keeps_none_of_its_files(tmp_path):
    """--to hf --overwrite wrote its files into the existing directory: the previous model's chat_template.jinja,
    tokenizer.gguf and weight shards stayed, so stories260K chatted in SmolLM2's template (lmforge and transformers)."""
    from lmforge.assets import STORIES260K

    out = tmp_path / "hf"
    assert refused("convert", "--from", "llama2c", STORIES260K, "--to", "hf", out).returncode == 0
    stale = ["chat_template.jinja", "tokenizer.gguf", "model-00001-of-00002.safetensors"]
    for name in stale:
        (out / name).write_text("{{ messages }}")
    r = refused("convert", "--from", "llama2c", STORIES260K, "--to", "hf", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not [n for n in stale if (out / n).exists()]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left beside it


@pytest.mark.parametrize("dst", ["newdir/", "existing"])
def test_convert_to_llama2c_refuses_a_directory(dst, tmp_path):
    """--to llama2c newdir/ wrote a file named newdir; an existing directory failed with 'DIR.tmp: Is a directory'
    (or 'exists; pass --overwrite'), leaving DIR.tmp behind."""
    from lmforge.assets import STORIES260K

    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "config.json").write_text("{}")
    r = refused("convert", "--from", "llama2c", STORIES260K, "--to", "llama2c", f"{tmp_path}/{dst}", "--overwrite")
    one_line(r, "convert", "is a directory", "--to llama2c writes a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_convert_to_hf_refuses_a_file(tmp_path):
    """An existing file as the destination of a directory format: 'afile: File exists' after the work."""
    from lmforge.assets import STORIES260K

    (tmp_path / "afile").write_text("x")
    r = refused("convert", "--from", "llama2c", STORIES260K, "--to", "hf", tmp_path / "afile", "--overwrite")
    one_line(r, "convert", "is a file", "--to hf writes a directory")
    assert (tmp_path / "afile").read_text() == "x"


def test_hf_weights_are_the_files_transformers_loads(tmp_path):
    """Every *.safetensors of a directory was read as the model's: Mistral's consolidated.safetensors (its own names
    for the same weights) was refused as 'unexpected tensor', a stale shard's tensors mixed in; transformers reads
    model.safetensors, else the shards its index names."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from lmforge.assets import STORIES260K
    from lmforge.interop.hf import read_hf_dir

    d = tmp_path / "hf"
    assert refused("convert", "--from", "llama2c", STORIES260K, "--to", "hf", d).returncode == 0
    _, want = read_hf_dir(d)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(d / "consolidated.safetensors"))
    save_file({"model.layers.99.mlp.up_proj.weight": torch.zeros(2, 2)}, str(d / "model-00002-of-00002.safetensors"))
    cfg, sd = read_hf_dir(d)
    assert sd.keys() == want.keys()
    # sharded: the index's files only, and a shard it names that is absent is said
    sd0 = load_file(str(d / "model.safetensors"))
    keys = sorted(sd0)
    save_file({k: sd0[k] for k in keys[:5]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd0[k] for k in keys[5:]}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors").unlink()
    names = {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    assert read_hf_dir(d)[1].keys() == want.keys()
    (d / "model-00002-of-00002.safetensors").unlink()
    one_line(refused("generate", "--model", d), "generate", "model.safetensors.index.json",
             "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_a_temperature_that_overflows_the_logits_is_refused(cmd):
    """--temperature 1e-40 (or 5e-324) made the logits divided by it inf: NaN probabilities, '\ufffd' x N with exit
    0 on PyTorch, an IndexError on the lean runtime."""
    r = refused(cmd, "--temperature", "1e-40", "--max-new-tokens", "4")
    one_line(r, cmd, "--temperature 1e-40", "give 0")
    assert r.stdout == ""


@pytest.mark.parametrize("fmt", ["hf", "llama2c", "lmforge"])
def test_convert_names_a_gguf_source_as_one(fmt, tmp_path):
    """A .gguf as src was 'not an lmforge checkpoint directory', 'a Hugging Face checkpoint is a directory' or
    'not a llama2.c model file (implausible header: dim=1179993927 ...)': now it says convert reads no GGUF and what
    does."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    r = refused("convert", "--from", fmt, tmp_path / "m.gguf", "--to", "hf", tmp_path / "out")
    one_line(r, "convert", "a GGUF file", "lmforge quantize --model")


def test_convert_of_a_quantized_model_refused_for_llama2c_in_one_line(tmp_path):
    """The 'written dequantized' note came before the llama2.c refusal (two lines on stderr)."""
    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import Decoder
    from lmforge.presets import get_preset
    from lmforge.tokenizer.char import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh \n")
    torch.manual_seed(0)
    cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_embd=32, n_head=2,
                                           rope_theta=100000.0)
    save_checkpoint(Decoder(cfg), tmp_path / "m", tok)
    assert refused("quantize", "--model", tmp_path / "m", "--bits", "8", "--output", tmp_path / "q").returncode == 0
    r = refused("convert", "--from", "lmforge", tmp_path / "q", "--to", "llama2c", tmp_path / "q.bin")
    one_line(r, "convert", "rope_theta")


def test_chat_template_failures_are_said_at_start(tmp_path):
    """A template that refuses a system message (Gemma's, Mistral's: raise_exception) gave 'error: ValueError: chat
    template jinja: System role not supported' naming neither --system nor the file; one that cannot render failed
    after the banner, at the first message ({{ 1 / 0 }}: 'ZeroDivisionError: division by zero')."""
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                 "supported') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    one_line(refused("chat", "--template", t, "--system", "be nice"), "chat", "--system", str(t),
             "System role not supported")
    t.write_text("{% for m in messages %}{{ m['content'] }}{{ 1 / 0 }}{% endfor %}")
    r = refused("chat", "--template", t)
    one_line(r, "chat", f"--template {t}", "division by zero")
    assert r.stdout == ""


def test_chat_goes_on_after_a_message_its_template_refuses(tmp_path, monkeypatch):
    """The template's raise_exception for one message ended the chat with a ValueError; now that message is not
    sent, said in one line, and the next one is answered."""
    import io

    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no such words') }}"
                 "{% endif %}{{ m['content'] }}\n{% endfor %}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a forbidden word\nOnce upon a time\n"))
    r = refused("chat", "--template", t, "--max-new-tokens", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "no such words; not sent" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stdout.splitlines()) == 1 and r.stdout.strip()  # one reply, to the second message


def test_quantize_refuses_a_file_as_output(tmp_path):
    """--output FILE --overwrite replaced the file with a directory and left .FILE.old-PID behind."""
    (tmp_path / "f").write_text("x")
    r = refused("quantize", "--bits", "8", "--output", tmp_path / "f", "--overwrite")
    one_line(r, "quantize", "is a file", "writes a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("cmd", ["convert", "quantize"])
def test_an_output_path_that_is_not_utf8_is_refused_before_the_work(cmd, tmp_path):
    """A non-UTF-8 output path failed after the conversion with 'UnicodeEncodeError: ... surrogates not allowed'
    (the tokenizer library's save)."""
    import os

    from lmforge.assets import STORIES260K

    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff")
    args = (["convert", "--from", "llama2c", STORIES260K, "--to", "hf", out] if cmd == "convert"
            else ["quantize", "--bits", "8", "--output", out])
    one_line(refused(*args), cmd, "not UTF-8", "\\xff")
    assert list(tmp_path.iterdir()) == []


def test_quantize_lm_head_of_a_tied_model_is_refused(tmp_path):
    """--lm-head on stories260K (tied head, int8 embedding table) did nothing: the head computes with the table's
    int8 copy."""
    r = refused("quantize", "--bits", "8", "--lm-head", "--output", tmp_path / "q")
    one_line(r, "quantize", "--lm-head", "tied")
    assert not (tmp_path / "q").exists()


def test_convert_to_llama2c_never_replaces_the_sources_tokenizer_bin(tmp_path):
    """--to llama2c SRC/m.bin --overwrite wrote its tokenizer.bin over the one inside the source directory (an
    input); one with the same bytes is left as it is."""
    import struct

    from lmforge.assets import STORIES260K

    src = tmp_path / "lm"
    assert refused("convert", "--from", "llama2c", STORIES260K, "--to", "lmforge", src).returncode == 0
    mine = (src / "tokenizer.bin").read_bytes()
    other = tmp_path / "other" / "tokenizer.bin"  # the same pieces, another score for the first: other bytes
    other.parent.mkdir()
    other.write_bytes(mine[:4] + struct.pack("<f", -123.0) + mine[8:])
    r = refused("convert", "--from", "lmforge", src, "--to", "llama2c", src / "m.bin", "--overwrite",
                "--tokenizer", other)
    one_line(r, "convert", str(src / "tokenizer.bin"), "being read")
    assert (src / "tokenizer.bin").read_bytes() == mine and not (src / "m.bin").exists()
    r = refused("convert", "--from", "lmforge", src, "--to", "llama2c", src / "m.bin")  # the same bytes
    assert r.returncode == 0 and (src / "m.bin").is_file() and "warning" not in r.stderr, r.stderr
    assert (src / "tokenizer.bin").read_bytes() == mine


def test_convert_names_the_format_a_source_plainly_is(tmp_path):
    """--from llama2c DIR said 'cannot read: [Errno 21] Is a directory', --from hf FILE.bin 'a Hugging Face checkpoint
    is a directory', --from hf LMFORGE_DIR 'unknown architecture model_type=None': now the format it is."""
    from lmforge.assets import STORIES260K

    lm, hf = tmp_path / "lm", tmp_path / "hf"
    for fmt, out in (("lmforge", lm), ("hf", hf)):
        assert refused("convert", "--from", "llama2c", STORIES260K, "--to", fmt, out).returncode == 0
    for src, wrong, right in ((lm, "llama2c", "lmforge"), (lm, "hf", "lmforge"), (hf, "llama2c", "hf"),
                              (hf, "lmforge", "hf"), (STORIES260K, "hf", "llama2c")):
        one_line(refused("convert", "--from", wrong, src, "--to", "hf", tmp_path / "x"), "convert", f"--from {right}")


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_kv_cache_dtype_says_why_the_lean_runtime_does_not_apply(cmd, tmp_path):
    """On an int4 directory the lean runtime cannot run (a float embedding table), --kv-cache-dtype was refused as
    'a choice of the lean runtime (an int4 directory on a CPU)': the directory is one."""
    q = tmp_path / "q"
    r = refused("quantize", "--bits", "4", "--method", "rtn", "--float-embedding", "--output", q)
    assert r.returncode == 0, r.stderr
    one_line(refused(cmd, "--model", q, "--kv-cache-dtype", "float32"), cmd, "--kv-cache-dtype float32",
             "not int4 with an int8 embedding table")


def test_an_exported_directory_resaved_by_transformers_loads(tmp_path):
    """transformers' save_pretrained of an exported GGUF-tokenizer directory keeps lmforge's "kind": "gguf" in
    tokenizer_config.json but not tokenizer.gguf: generate and chat refused it ('tokenizer.gguf: no such file'); its
    tokenizer.json is the same tokenizer."""
    import json

    from lmforge.assets import STORIES260K

    d = tmp_path / "hf"
    assert refused("convert", "--from", "llama2c", STORIES260K, "--to", "hf", d).returncode == 0
    want = refused("generate", "--model", d, "--prompt", "Once upon", "--max-new-tokens", "12", "--temperature", "0")
    assert want.returncode == 0 and want.stdout.startswith("Once upon "), want.stderr
    meta = json.loads((d / "tokenizer_config.json").read_text())
    meta.update(kind="gguf", file="tokenizer.gguf")  # as save_pretrained leaves a SmolLM2 export
    (d / "tokenizer_config.json").write_text(json.dumps(meta))
    (d / "tokenizer.bin").unlink()
    r = refused("generate", "--model", d, "--prompt", "Once upon", "--max-new-tokens", "12", "--temperature", "0")
    assert r.returncode == 0 and r.stdout == want.stdout, r.stderr


@pytest.mark.parametrize("args", [["convert", "--from", "llama2c", "STORIES", "--to", "hf"],
                                  ["convert", "--from", "llama2c", "STORIES", "--to", "lmforge"],
                                  ["quantize", "--bits", "8", "--output"]])
def test_the_current_directory_as_output_is_refused(args, tmp_path, monkeypatch):
    """An output of '.' (a model directory, with --overwrite) failed with "ValueError: PosixPath('.') has an empty
    name"; '../here' replaced the directory the shell stands in."""
    from lmforge.assets import STORIES260K

    d = tmp_path / "here"
    assert refused("convert", "--from", "llama2c", STORIES260K, "--to", "hf", d).returncode == 0
    before = sorted(p.name for p in d.iterdir())
    monkeypatch.chdir(d)
    for out in (".", "../here"):
        r = refused(*[STORIES260K if a == "STORIES" else a for a in args], out, "--overwrite")
        one_line(r, args[0], "the current directory")
    assert sorted(p.name for p in d.iterdir()) == before


def test_quantize_says_when_the_calibration_text_is_short(tmp_path, capsys):
    """--calibration text holding fewer --calib-len sequences than --calib-samples calibrated on those without a
    word."""
    from types import SimpleNamespace

    from lmforge.assets import STORIES260K
    from lmforge.checkpoint import load_model
    from lmforge.commands.quantize import _calibration_ids
    from lmforge.tokenizer import load_tokenizer

    model = load_model(STORIES260K)
    tok = load_tokenizer(str(STORIES260K.parent / "tok512.bin"))
    text = tmp_path / "c.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    args = SimpleNamespace(calibration=str(text), calib_len=64, calib_samples=128)
    ids = _calibration_ids(args, tok, model)
    assert 0 < ids.shape[0] < 128
    assert f"{ids.shape[0]} sequences of 64 of the 128 asked" in capsys.readouterr().err


def test_quantize_reads_the_calibration_file_before_the_model(tmp_path, monkeypatch):
    """A missing --calibration file was said only after the model was loaded (seconds for a GGUF)."""
    import lmforge.checkpoint

    def no_load(*a, **k):
        raise AssertionError("the model was loaded first")

    monkeypatch.setattr(lmforge.checkpoint, "load_model", no_load)
    r = refused("quantize", "--bits", "4", "--calibration", tmp_path / "none.txt", "--output", tmp_path / "q")
    one_line(r, "quantize", "--calibration", "none.txt")


def test_chat_says_when_a_reply_is_cut_by_the_context(monkeypatch):
    """A reply cut short because the conversation filled the context ended without a word (generate says it)."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(" ".join(["the dog ran"] * 90) + "\n"))
    r = refused("chat", "--max-new-tokens", "256", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "note: the reply stopped after" in r.stderr and "context of 512 is full" in r.stderr
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\n"))
    assert "note:" not in refused("chat", "--max-new-tokens", "8", "--temperature", "0").stderr


@pytest.mark.parametrize("value", ["", "  "])
def test_chat_empty_system_is_refused(value):
    """--system '' was dropped without a word: SmolLM2's template then put in its own default system message, where
    transformers renders the empty one the user gave."""
    one_line(refused("chat", "--system", value), "chat", "--system", "empty")


def test_sampling_params_refuse_a_temperature_that_overflows():
    """SamplingParams.check (the engine's, so serve answers 400) took temperature=1e-40: the logits divided by it
    overflowed to NaN probabilities."""
    from lmforge.infer.params import SamplingParams

    with pytest.raises(ValueError, match="temperature=1e-40: below 1e-20"):
        SamplingParams(temperature=1e-40).check()
    SamplingParams(temperature=1e-20).check()
