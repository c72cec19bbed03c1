"""Damaged files and mismatched inputs are refused with one line naming the file (issue 14, sections 3 and 6).

Every test runs the command a user runs (``python -m lmforge ...``) where there is one, and checks the exit status,
that stderr is exactly one line naming the file, and that nothing was silently changed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import refused

from lmforge.assets import STORIES260K, STORIES260K_TOKENIZER, TINYSHAKESPEARE
from lmforge.checkpoint import MANIFEST, load_checkpoint, load_model, save_checkpoint, write_manifest
from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.files import DirLock
from lmforge.model import Decoder

SMALL = ["--recipe", "baby-gpt-shakespeare", "--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2",
         "--train.batch_size", "2", "--data.block_size", "16", "--train.eval_iters", "1", "--eval-interval", "1000",
         "--train.log_interval", "1"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The verified-checksum cache goes to a temporary directory (subprocesses inherit the variable)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def lmforge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a failed command; it must contain every needle."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("lmforge "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def flip(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.fixture(scope="module")
def stories_ckpt(tmp_path_factory) -> Path:
    """stories260K as an lmforge checkpoint directory (with its tokenizer and MANIFEST.json)."""
    from lmforge.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("ckpt") / "stories"
    save_checkpoint(load_model(STORIES260K), d, load_tokenizer(str(STORIES260K_TOKENIZER)))
    return d


# ---- section 6: one line, traceback only with LMFORGE_DEBUG=1 --------------------------------------------------
def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback():
    code = ("import lmforge.commands.models as m\n"
            "def boom(args):\n    raise ValueError('boom\\nsecond line')\n"
            "m.run = boom\n"
            "from lmforge.cli import main\nmain(['models'])\n")
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_DEBUG"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = one_line(r, "ValueError: boom second line", "LMFORGE_DEBUG=1")
    assert line.startswith("lmforge models: error: ")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "LMFORGE_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and r.stderr.rstrip().endswith("the traceback)")


def test_usage_errors_are_one_line(capsys):
    from lmforge.cli import main

    for argv, msg in ((["eval", "--data", "x"], "lmforge eval: error: the following arguments are required: --task"),
                      (["scaling", "memory", "--model", "gpt2-small", "--zero", "5"],
                       "lmforge scaling memory: error: argument --zero: invalid choice: 5")):
        with pytest.raises(SystemExit) as e:  # argparse printed its usage block first
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(msg), err
        assert err.rstrip().endswith(f"(see {msg.split(': error')[0]} --help)")


# ---- checkpoints are verified on every load ----------------------------------------------------------------
def test_manifest_has_size_and_hash_and_a_good_checkpoint_generates(stories_ckpt):
    manifest = json.loads((stories_ckpt / MANIFEST).read_text())
    w = stories_ckpt / "model.safetensors"
    entry = manifest["model.safetensors"]
    assert entry["size"] == w.stat().st_size and len(entry["sha256"]) == 64
    assert "config.json" in manifest and MANIFEST not in manifest
    r = lmforge("generate", "--model", stories_ckpt, "--max-new-tokens", "8", "--seed", "1", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time"), r.stderr


def test_flipped_bytes_truncation_and_nan_weights_are_refused(stories_ckpt, tmp_path):
    flipped = tmp_path / "flipped"
    shutil.copytree(stories_ckpt, flipped)
    w = flipped / "model.safetensors"
    flip(w, w.stat().st_size // 2, bytes(64))  # 64 zero bytes in the middle: still a valid file, wrong weights
    one_line(refused("generate", "--model", flipped, "--max-new-tokens", "4"), str(flipped),
             "model.safetensors fails its checksum")

    short = tmp_path / "short"
    shutil.copytree(stories_ckpt, short)
    with open(short / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    one_line(refused("generate", "--model", short, "--max-new-tokens", "4"), "model.safetensors has 1,000 bytes")

    # 4,096 bytes of 0xFF put NaN in a weight; the manifest is updated, so only the finiteness check can catch it
    nan = tmp_path / "nan"
    shutil.copytree(stories_ckpt, nan)
    w = nan / "model.safetensors"
    flip(w, w.stat().st_size // 2, b"\xff" * 4096)
    write_manifest(nan)
    one_line(refused("generate", "--model", nan, "--max-new-tokens", "4"), str(w), "NaN or infinite")
    (nan / MANIFEST).unlink()  # a checkpoint without a manifest is still checked for non-finite weights
    one_line(refused("generate", "--model", nan, "--max-new-tokens", "4"), "NaN or infinite")

    # a training checkpoint is always written with its manifest: removing it no longer skips the checksums
    (flipped / "trainer_state.json").write_text("{}")
    (flipped / MANIFEST).unlink()
    one_line(refused("generate", "--model", flipped, "--max-new-tokens", "4"), str(flipped),
             "damaged checkpoint: no MANIFEST.json (incomplete)")


@pytest.mark.parametrize("runtime", ["torch", "lean"])
def test_a_damaged_quantized_directory_is_refused(tmp_path, runtime):
    """`lmforge quantize` writes MANIFEST.json too, and both runtimes verify it: 64 flipped bytes in the middle of
    the int4 weights generated other text with exit status 0 before (only NaN scales were caught)."""
    from lmforge.infer import lean

    q = tmp_path / "q4"
    r = lmforge("quantize", "--bits", "4", "--method", "rtn", "--output", q)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((q / MANIFEST).read_text())
    assert {"config.json", "quantization.json", "model.safetensors"} <= set(manifest)
    if runtime == "lean" and lean.unsupported(q):
        pytest.skip(f"the lean runtime cannot run here: {lean.unsupported(q)}")
    gen = ("generate", "--model", q, "--max-new-tokens", "4", "--temperature", "0", "--runtime", runtime)
    assert lmforge(*gen).returncode == 0
    w = q / "model.safetensors"
    flip(w, w.stat().st_size // 2, bytes(64))
    one_line(refused(*gen), str(q), "damaged quantized directory", "model.safetensors fails its checksum")


def test_verification_is_cached_by_size_mtime_inode_and_ctime(stories_ckpt, tmp_path, monkeypatch):
    import lmforge.manifest as ck

    d = tmp_path / "c"
    shutil.copytree(stories_ckpt, d)
    hashed: list[str] = []
    real = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    first = load_checkpoint(d)
    assert "model.safetensors" in hashed
    hashed.clear()
    again = load_checkpoint(d)
    assert hashed == []  # nothing hashed a second time
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    w = d / "model.safetensors"
    st = w.stat()
    flip(w, st.st_size // 2, bytes(64))  # rewritten, and given its old mtime back: its ctime still tells
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(LMForgeError, match="model.safetensors fails its checksum"):
        load_checkpoint(d)


@pytest.mark.parametrize("entry,says", [
    ([1, 2], "the entry of model.safetensors is not a size and sha256"),
    (None, "the entry of model.safetensors is not a size and sha256"),
    ({"size": "abc", "sha256": "0" * 64}, "the entry of model.safetensors is not a size and sha256"),
    ({"size": 5}, "the entry of model.safetensors is not a size and sha256"),
])
def test_a_malformed_manifest_entry_is_refused_in_one_line(stories_ckpt, tmp_path, entry, says):
    d = tmp_path / "c"
    shutil.copytree(stories_ckpt, d)
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["model.safetensors"] = entry
    (d / MANIFEST).write_text(json.dumps(manifest))
    one_line(refused("generate", "--model", d, "--max-new-tokens", "4"), str(d), "MANIFEST.json", says)


@pytest.mark.parametrize("name", ["/etc/hostname", "../c/config.json", "sub/x", ".", ""])
def test_manifest_names_outside_the_checkpoint_are_refused(stories_ckpt, tmp_path, name):
    """A manifest lists the checkpoint's own files: a path elsewhere (hashed, and named in the error, before) is
    refused without being read."""
    import lmforge.manifest as ck

    d = tmp_path / "c"
    shutil.copytree(stories_ckpt, d)
    manifest = json.loads((d / MANIFEST).read_text())
    manifest[name] = "0" * 64
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LMForgeError, match="not a file of the checkpoint"):
        load_checkpoint(d)
    assert ck.plain_name("model.safetensors") and ck.plain_name("ckpt..x")


# ---- training checkpoints: refuse, move aside, fall back, clean up ------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_resume_refuses_damaged_runs_falls_back_past_a_malicious_optimizer_and_cleans_up(tmp_path):
    out = tmp_path / "run"
    r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "4", "--save-interval", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000004"]

    # a fresh run never overwrites an existing run's checkpoints
    one_line(refused("pretrain", *SMALL, "--out", out, "--max-iters", "2"), str(out), "already holds checkpoints",
             "--overwrite")

    # a malicious optimizer.pt (its hash updated) is refused in one line and the previous checkpoint is used
    newest = out / "ckpt-0000004"
    torch.save({"state": Evil()}, newest / "optimizer.pt")
    write_manifest(newest)
    leftover = out / ".tmp-ckpt-killed"  # what a kill -9 during a save leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "6", "--save-interval", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    assert "optimizer.pt: refused to load: it holds more than tensors" in r.stderr and "resumed from" in r.stderr
    assert "posix.system" in r.stderr and "weights_only" not in r.stderr  # (torch's advice to load it anyway)
    assert f"resumed from {out / 'ckpt-0000002'} at step 2" in r.stderr
    assert not leftover.exists()
    assert (out / "ckpt-0000004.damaged" / "optimizer.pt").is_file()  # kept, never deleted
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000004.damaged", "ckpt-0000006"] or \
        sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000004", "ckpt-0000004.damaged", "ckpt-0000006"]

    # every checkpoint damaged: --resume refuses and changes nothing
    ckpts = sorted(p for p in out.glob("ckpt-*") if p.name.count(".") == 0)
    for c in ckpts:
        w = c / "model.safetensors"
        flip(w, w.stat().st_size // 2, bytes(64))
    before = sorted(p.name for p in out.iterdir())
    one_line(refused("pretrain", *SMALL, "--out", out, "--max-iters", "8", "--resume"), "no usable checkpoint",
             "fails its checksum", "--resume-or-start")
    assert sorted(p.name for p in out.iterdir()) == before

    # --resume-or-start moves them aside (kept) and starts from scratch
    r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "2", "--resume-or-start")
    assert r.returncode == 0, r.stderr[-3000:]
    for c in ckpts:
        assert not c.exists() or c.name == "ckpt-0000002"
        assert any(p.name.startswith(c.name + ".damaged") for p in out.iterdir()), c
    assert json.loads((out / "ckpt-0000002" / "trainer_state.json").read_text())["step"] == 2
    from lmforge.train.state import verify

    assert verify(out / "ckpt-0000002") is None


HOLD_LOCK = """
import sys, time
from lmforge.files import DirLock
with DirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_in_the_same_out_is_refused_while_the_first_runs(tmp_path):
    """Two runs in one --out: the second (``--resume``, ``--overwrite``, the pipeline) is refused in one line naming
    the live process, before it touches anything: it used to delete the first one's checkpoint being saved
    (``.tmp-ckpt-*``), killing it. A holder killed with -9 leaves only a ``.lock`` file, which blocks nothing."""
    out = tmp_path / "run"
    out.mkdir()
    saving = out / ".tmp-ckpt-live"  # the first run's checkpoint being written
    saving.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in (["--resume"], ["--overwrite"], ["--resume-or-start"]):
            one_line(refused("pretrain", *SMALL, "--out", out, "--max-iters", "2", *flags), f"--out {out}",
                     f"in use by process {holder.pid}", "choose another --out")
        one_line(refused("sft", "--out", out, "--train.max_iters", "1", "--resume"), f"in use by process {holder.pid}")
        one_line(refused("pipeline", "--out", out), f"--out {out}", f"in use by process {holder.pid}")
        assert saving.is_dir() and sorted(p.name for p in out.iterdir()) == [".lock", ".tmp-ckpt-live"]
    finally:
        holder.kill()
        holder.wait()
    r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "2", "--resume")  # the killed holder blocks nothing
    assert r.returncode == 0, r.stderr[-2000:]
    assert not saving.exists() and (out / "ckpt-0000002").is_dir()


def test_dir_lock_is_reentrant_within_a_process(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(LMForgeError, match=r"--out .*f: exists and is not a directory"), DirLock(tmp_path / "f"):
        pass
    with pytest.raises(LMForgeError, match=r"--out .*: cannot write there"), DirLock(tmp_path / "f" / "run"):
        pass
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(LMForgeError, match=r"dangling: a symbolic link to .*gone, which does not exist"), DirLock(
            tmp_path / "dangling"):
        pass

    with DirLock(tmp_path / "r"), DirLock(tmp_path / "r"):  # the command, then the Trainer inside it
        pass
    with DirLock(tmp_path / "r"):  # released: taken again
        r = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "r")], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0 and f"in use by process {os.getpid()}" in r.stderr


def test_a_refused_command_leaves_no_empty_out_behind(tmp_path):
    """A command refused after taking its --out's lock (a missing --model or --data) left a new directory holding only
    ``.lock``; the directories the lock made are removed again, an existing --out is kept."""
    for cmd in (["sft", "--model", str(tmp_path / "missing")], ["reward", "--data", str(tmp_path / "missing.json")]):
        out = tmp_path / "new" / "run"
        one_line(refused(*cmd, "--out", out), "missing")
        assert not (tmp_path / "new").exists()
    out = tmp_path / "kept"
    out.mkdir()
    one_line(refused("sft", "--model", str(tmp_path / "missing"), "--out", out), "missing")
    assert out.is_dir()
    with DirLock(tmp_path / "w"):  # a run that wrote something keeps its directory
        (tmp_path / "w" / "x").write_text("")
    assert (tmp_path / "w" / "x").exists()


def test_a_file_output_written_as_a_directory_is_refused(tmp_path):
    """``--output res/`` (a directory that does not exist yet) wrote a file named ``res``; refused in one line."""
    for cmd in (["eval", "--task", "perplexity", "--data", str(TINYSHAKESPEARE)],
                ["data", "clean", str(TINYSHAKESPEARE), "--report", str(tmp_path / "report.json")]):
        one_line(refused(*cmd, "--output", f"{tmp_path}/res/"), "res/: is a directory; --output names a file")
        assert not (tmp_path / "res").exists()


def test_negative_numbers_in_python_notation_are_flag_values():
    """``--temperature -1e-3`` was "expected one argument" (argparse knows -1 and -.5 as numbers, not -1e-3 or
    -inf): every form Python writes is a value now, and a flag's own range check answers it."""
    from lmforge.cli import parse_command

    for v in ("-1e-3", "-1E+2", "-2.", "-.5", "-3", "-inf", "-nan"):
        args = parse_command(["reward", "--margin", v, "--data", "d.json", "--out", "o"], strict=True)
        assert str(args.margin) == str(float(v)), v
        assert parse_command(["pretrain", "--train.lr", v], strict=True).overrides == ["--train.lr", v]
    one_line(refused("generate", "--temperature", "-1e-3"), "--temperature must be >= 0")
    r = lmforge("generate", "--temperature", "-e")  # not a number: still a missing value
    assert r.returncode == 2 and "--temperature: expected one argument" in r.stderr


def test_resume_with_another_data_stream_is_refused_and_nothing_moved_aside(tmp_path):
    """A checkpoint whose data stream has another shape (here the batch size; the number of processes is tested
    under torchrun) cannot be resumed, but it is not damaged: one line, and no checkpoint moved aside (an older one
    of the same run used to be resumed with the newer ones moved aside as ``.damaged``)."""
    out = tmp_path / "run"
    r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "4", "--save-interval", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    before = sorted(p.name for p in out.iterdir())
    for flag in ("--resume", "--resume-or-start"):
        r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "6", "--train.batch_size", "3", flag)
        # (found before anything loads: no "model ..." progress line first)
        one_line(r, str(out / "ckpt-0000004"), "cannot resume from it: its data stream has batch_size=2, this run's "
                 "has 3")
        assert sorted(p.name for p in out.iterdir()) == before


def test_trainer_resume_refuses_when_no_checkpoint_loads(tmp_path):
    """The library path (Trainer.fit(resume=True)) refuses too, leaving the damaged checkpoint in place."""
    script = Path(__file__).parent / "train_script.py"
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(script), str(run), "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for c in run.glob("ckpt-*"):
        torch.save({"state": Evil()}, c / "optimizer.pt")
        write_manifest(c)
    names = sorted(p.name for p in run.glob("ckpt-*"))
    r = subprocess.run([sys.executable, str(script), str(run), "6", "--resume"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "NoUsableCheckpoint" in r.stderr and "optimizer.pt" in r.stderr
    assert sorted(p.name for p in run.glob("ckpt-*")) == names


# ---- model and tokenizer must belong together --------------------------------------------------------------
class FakeTok:
    def __init__(self, n: int) -> None:
        self.vocab_size = n


def test_vocab_is_checked_both_ways():
    from lmforge.commands.args import check_vocab

    def cfg(**kw):
        return ModelConfig(n_layer=1, n_embd=16, n_head=2, multiple_of=16, **kw)

    check_vocab(cfg(vocab_size=50304, bos_id=50256, eos_id=50256), FakeTok(50257), "m", "t")  # nanoGPT's padding
    check_vocab(cfg(vocab_size=151936, eos_id=151643), FakeTok(151665), "m", "t")  # Qwen2's padding
    check_vocab(cfg(vocab_size=50432), FakeTok(50277), "m", "t")  # GPT-NeoX's padding
    with pytest.raises(LMForgeError, match="49,152.*would have no text"):
        check_vocab(cfg(vocab_size=49152), FakeTok(32000), "m", "t")  # SmolLM2 with a LLaMA tokenizer
    with pytest.raises(LMForgeError, match="tokenizer has 65 tokens but the model m has 512"):
        check_vocab(cfg(vocab_size=512), FakeTok(65), "m", "t")
    with pytest.raises(LMForgeError, match="only 512"):
        check_vocab(cfg(vocab_size=512), FakeTok(32000), "m", "t")
    with pytest.raises(LMForgeError, match="BOS token 80, outside the tokenizer's 65 tokens"):
        check_vocab(cfg(vocab_size=100, bos_id=80), FakeTok(65), "m", "t")


def test_generate_refuses_a_tokenizer_that_does_not_fit_the_model(tmp_path):
    from lmforge.tokenizer.train import train_tokenizer

    train_tokenizer([str(TINYSHAKESPEARE)], 65, "char", str(tmp_path / "chars"))
    one_line(refused("generate", "--tokenizer", tmp_path / "chars", "--max-new-tokens", "50"), str(tmp_path / "chars"),
             "65 tokens", "512")
    llama = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.bin"
    if llama.is_file():
        one_line(refused("generate", "--tokenizer", llama, "--max-new-tokens", "5"), "32,000 tokens")


# ---- absurd configs refused before allocation; tables and caches sized by the context used -------------------
@pytest.mark.parametrize("field,value,needle", [
    ("norm_eps", -1.0, "norm_eps=-1.0"), ("norm_eps", 0.0, "norm_eps=0.0"), ("norm_eps", math.nan, "norm_eps=nan"),
    ("n_layer", 100_000, "n_layer=100000"), ("block_size", 10**9, "block_size=1000000000"),
    ("dropout", 1.5, "dropout=1.5"), ("rope_theta", -2.0, "rope_theta"), ("vocab_size", 0, "vocab_size=0"),
    ("n_embd", 1 << 18, "n_embd"), ("rotary_fraction", 2.0, "rotary_fraction"),
])
def test_config_ranges_are_validated(field, value, needle):
    with pytest.raises(LMForgeError, match=needle.replace("(", r"\(")):
        ModelConfig(**{"n_layer": 1, "n_embd": 16, "n_head": 2, field: value})


def test_too_many_parameters_refused_before_allocation():
    from lmforge.presets import get_preset

    with pytest.raises(LMForgeError, match="parameters"):
        ModelConfig(n_layer=1024, n_embd=1 << 17, n_head=1024)
    with pytest.raises(LMForgeError, match="learned position table"):
        ModelConfig(n_layer=1, n_embd=16, n_head=2, position="learned", block_size=1 << 21)
    ModelConfig(n_layer=1, n_embd=16, n_head=2, position="rope", block_size=1 << 21)  # rotary tables grow on use
    assert 500e9 < get_preset("palm-540b").approx_params() < 600e9


def test_bad_config_in_a_checkpoint_is_one_line(stories_ckpt, tmp_path):
    for field, value in (("norm_eps", -1), ("n_layer", 100_000), ("block_size", 10**9)):
        d = tmp_path / field
        shutil.copytree(stories_ckpt, d)
        c = json.loads((d / "config.json").read_text())
        c[field] = value
        (d / "config.json").write_text(json.dumps(c))
        (d / MANIFEST).unlink()
        with pytest.raises(LMForgeError, match=f"{d / 'config.json'}: config field {field}={value}"):
            load_model(d)
    one_line(refused("generate", "--model", tmp_path / "norm_eps", "--max-new-tokens", "4"), "norm_eps=-1")


@pytest.mark.parametrize("field,value,says", [
    ("num_hidden_layers", 100_000, "field num_hidden_layers=100000: must be an integer in [1, 1,024]"),
    ("max_position_embeddings", 50_000_000, "field max_position_embeddings=50000000: must be an integer"),
    ("rms_norm_eps", -1.0, "field rms_norm_eps=-1.0: must be a finite number in (0, 1]"),
])
def test_bad_config_in_a_hugging_face_directory_is_named_as_its_file_names_it(tmp_path, field, value, says):
    """A transformers config.json out of range: the line names the file and its own field (num_hidden_layers), not
    lmforge's name for it (n_layer), and nothing past config.json is read."""
    hf = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 172,
          "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": True, field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    err = one_line(refused("generate", "--model", tmp_path, "--max-new-tokens", "4"))
    assert f"{tmp_path / 'config.json'}: {says}" in err, err


def test_bad_config_in_a_gguf_is_named_as_its_metadata_names_it():
    from lmforge.interop.gguf import config_from_gguf

    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 8,
            "llama.block_count": np.uint32(100_000), "llama.context_length": 512, "llama.feed_forward_length": 172,
            "llama.vocab_size": 512}
    with pytest.raises(LMForgeError, match=r"^m\.gguf: field llama\.block_count=100000: must be an integer in"):
        config_from_gguf(meta, {"token_embd.weight"}, "m.gguf")


def test_rotary_tables_grow_with_the_context_used():
    from lmforge.model.positions import EAGER_POSITIONS, Rotary

    r = Rotary(8, 1 << 22, 10000.0)
    assert r.cos.shape[0] == EAGER_POSITIONS  # not 4M positions
    pos = torch.tensor([[3, 40_000, 70_001]])
    cos, sin = r(pos)
    assert EAGER_POSITIONS < r.cos.shape[0] < 1 << 22
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).double() / 8))
    ang = pos[0].double()[:, None] * inv[None]  # independent formula: halves layout (f0..f3, f0..f3)
    ref_cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    ref_sin = torch.cat([ang.sin(), ang.sin()], -1).float()
    assert torch.allclose(cos[0, 0], ref_cos, atol=2e-3) and torch.allclose(sin[0, 0], ref_sin, atol=2e-3)
    small = Rotary(8, 128, 10000.0)
    assert small.cos.shape[0] == 128


def test_huge_block_size_model_decodes_with_caches_sized_by_max_len(monkeypatch):
    import lmforge.model.cache as cache_mod
    from lmforge.infer.engine import SlotRunner
    from lmforge.model import KVCache
    from lmforge.model.cache import kv_cache_len

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=1 << 22, n_layer=1, n_embd=16, n_head=2, multiple_of=16)
    model = Decoder(cfg).eval()
    assert model.rotary.cos.shape[0] <= 1 << 15
    runner = SlotRunner(model, 2, 48)
    runner.prefill(1, [1, 2, 3])  # the cache is allocated as it is used, never past max_len
    assert runner.max_len == 48 and runner.k.shape[1::2] == (2, 48)
    ref = Decoder(cfg.replace(block_size=64)).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, 64, (1, 20))
    assert torch.allclose(model(x), ref(x), atol=1e-6)
    assert KVCache(cfg, 1, 32).k.shape[3] == 32
    monkeypatch.setattr(cache_mod, "device_memory", lambda device: 1 << 30)  # a 1 GiB machine
    per_pos = 2 * 1 * 4 * 2 * 8 * 4
    assert kv_cache_len(cfg, 4) == min(cfg.block_size, (1 << 29) // per_pos)  # the default is capped to fit
    # (the numbers to lower, not a flag: --max-len was named to self-instruct and rejection-sample, which have none)
    with pytest.raises(LMForgeError, match=r"^a key/value cache of 4,194,304 positions x 4 sequences needs 2.0 GiB, "
                                           r"more than 0.5 GiB: at most 1 such sequences fit at once, or 4 of at "
                                           r"most 1,048,576 positions each$"):
        kv_cache_len(cfg, 4, 1 << 22)


# ---- data prepare of one large file, and pretrain on an empty split ---------------------------------------
def test_prepare_single_file_falls_back_to_tail_split_and_pretrain_refuses_an_empty_split(tmp_path):
    text = tmp_path / "shakespeare.txt"
    text.write_text(TINYSHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    from lmforge.tokenizer.train import train_tokenizer

    train_tokenizer([str(TINYSHAKESPEARE)], 65, "char", str(tmp_path / "tok"))
    r = lmforge("data", "prepare", text, "--tokenizer", tmp_path / "tok", "--output", tmp_path / "data",
                "--val-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    n = 40_000
    assert index["split_fallback"] == "tail"
    assert index["splits"]["train"]["tokens"] == int(n * 0.9) and index["splits"]["val"]["tokens"] == n - int(n * 0.9)
    from lmforge.tokenizer import load_tokenizer

    ids = np.concatenate([np.fromfile(tmp_path / "data" / f"{s}.bin", dtype="<u2") for s in ("train", "val")])
    assert ids.tolist() == load_tokenizer(str(tmp_path / "tok")).encode(text.read_text(encoding="utf-8"))
    r = lmforge("pretrain", *SMALL, "--data.path", tmp_path / "data", "--out", tmp_path / "run", "--max-iters", "1")
    assert r.returncode == 0, r.stderr[-2000:]

    r = lmforge("data", "prepare", text, "--tokenizer", tmp_path / "tok", "--output", tmp_path / "noval",
                "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    one_line(refused("pretrain", *SMALL, "--data.path", tmp_path / "noval", "--out", tmp_path / "run2"),
             str(tmp_path / "noval" / "val.bin"), "0 tokens")
    empty = tmp_path / "empty.txt"  # one line, not a note about a split fallback before it
    empty.write_text("")
    r = lmforge("data", "prepare", empty, "--tokenizer", tmp_path / "tok", "--output", tmp_path / "e")
    r.stderr = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("tokenize:"))  # (its progress bar)
    one_line(r, str(empty), "no tokens for the train split (the input is empty)")


# ---- convert an HF directory without tokenizer files -------------------------------------------------------
def test_convert_hf_weights_only(tmp_path):
    from lmforge.interop.hf import write_hf_dir

    model = load_model(STORIES260K)
    write_hf_dir(tmp_path / "hf", model.cfg, dict(model.state_dict()))
    assert not any("token" in p.name for p in (tmp_path / "hf").iterdir())
    r = lmforge("convert", "--from", "hf", tmp_path / "hf", "--to", "lmforge", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "no tokenizer" in r.stderr and "weights only" in r.stderr
    back = load_model(tmp_path / "out")
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    one_line(refused("convert", "--from", "hf", tmp_path / "hf", "--to", "lmforge", tmp_path / "o2", "--tokenizer",
                     tmp_path / "hf"), "no tokenizer files found")


def test_convert_a_quantized_model_writes_its_dequantized_weights(tmp_path):
    """`lmforge quantize` output converts to the float formats (it failed: "tensor 'wte.weight' is missing"): the
    weights are written dequantized, and a Hugging Face load computes what the quantized model computes exactly."""
    import transformers

    from lmforge.quant import set_compute

    r = lmforge("quantize", "--bits", "8", "--output", tmp_path / "q8")
    assert r.returncode == 0, r.stderr
    r = lmforge("convert", "--from", "lmforge", tmp_path / "q8", "--to", "hf", tmp_path / "hf")
    assert r.returncode == 0 and "written dequantized" in r.stderr, r.stderr[-2000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    q = load_model(tmp_path / "q8").eval()
    set_compute(q, "dequant")
    x = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, q(x), atol=1e-4)


def test_quantize_and_convert_never_replace_their_source_nor_an_output_without_overwrite(tmp_path):
    """`quantize --model D --output D` replaced the float model by its quantized copy, and both commands replaced
    any existing output silently (the data commands and training refuse without --overwrite)."""
    r = lmforge("convert", "--from", "llama2c", STORIES260K, "--to", "lmforge", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    one_line(refused("quantize", "--model", tmp_path / "m", "--bits", "8", "--output", tmp_path / "m",
                     "--overwrite"), "which is being read")
    one_line(refused("convert", "--from", "lmforge", tmp_path / "m", "--to", "hf", tmp_path), "which is being read")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    (tmp_path / "q").mkdir()  # an empty directory is fine (the pipeline makes its stage directories first)
    assert lmforge("quantize", "--model", tmp_path / "m", "--bits", "8", "--output", tmp_path / "q").returncode == 0
    one_line(refused("quantize", "--model", tmp_path / "m", "--bits", "8", "--output", tmp_path / "q"),
             "exists; pass --overwrite")
    assert lmforge("quantize", "--model", tmp_path / "m", "--bits", "8", "--output", tmp_path / "q",
                   "--overwrite").returncode == 0
    one_line(refused("convert", "--from", "lmforge", tmp_path / "m", "--to", "hf", tmp_path / "q"),
             "exists; pass --overwrite")


@pytest.mark.parametrize("flag,value,says", [
    ("--train.eval_interval", "0", "train.eval_interval=0: must be >= 1"),  # was ZeroDivisionError
    ("--train.grad_accum", "0", "train.grad_accum=0: must be >= 1"),  # was five NaN rollbacks
    ("--train.lr", "-1", "train.lr=-1.0: must be a finite number >= 0"),  # was torch's ValueError
    ("--train.warmup_iters", "-5", "train.warmup_iters=-5: must be >= 0"),  # was accepted
    ("--train.weight_decay", "-1", "train.weight_decay=-1.0: must be a finite number >= 0"),  # was accepted
    ("--train.beta2", "1", "train.beta2=1.0: must be in [0, 1)"),
])
def test_train_settings_out_of_range_are_one_line_before_anything_loads(tmp_path, flag, value, says):
    line = one_line(refused("pretrain", "--recipe", "baby-gpt-shakespeare", "--out", tmp_path / "r", flag, value),
                    says, "(recipe baby-gpt-shakespeare)")
    assert not (tmp_path / "r").exists(), line


# ---- one line instead of a traceback -------------------------------------------------------------------------
def test_truncated_gguf_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_gguf import _write_stories_gguf

    full = tmp_path / "full.gguf"
    _write_stories_gguf(full)
    data = full.read_bytes()
    for cut in (10, 35, 105, 3003, len(data) // 2, len(data) - 10):  # 35, 105: IndexError inside the gguf reader
        t = tmp_path / f"t{cut}.gguf"
        t.write_bytes(data[:cut])
        with pytest.raises(LMForgeError, match=f"{t}: not a readable GGUF file"):
            load_model(t)
    one_line(refused("generate", "--model", tmp_path / "t35.gguf", "--max-new-tokens", "2"), str(tmp_path / "t35.gguf"),
             "truncated or damaged")


def test_tokenizer_train_refuses_bad_inputs_and_outputs(tmp_path):
    from lmforge.tokenizer.train import train_tokenizer

    good = tmp_path / "good.txt"
    good.write_text("hello world, the quick brown fox\n" * 50)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"text line\nsecond\n" + bytes(range(128, 256)) * 4)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\t\n")

    def train(*args):
        return lmforge("tokenizer", "train", "--kind", "bytelevel-bpe", *args)

    one_line(train("--input", good, binary, "--vocab-size", "300", "--output", tmp_path / "t1"),
             f"{binary}:3: not UTF-8")
    one_line(train("--input", empty, "--vocab-size", "300", "--output", tmp_path / "t2"), str(empty), "no text")
    with pytest.raises(LMForgeError, match="no text"):
        train_tokenizer([str(blank)], 300, "bytelevel-bpe", str(tmp_path / "t2"))
    one_line(train("--input", good, "--vocab-size", "0", "--output", tmp_path / "t3"), "--vocab-size 0")
    for kind in ("bytelevel-bpe", "llama-bpe", "char"):
        for v in (0, -5):
            with pytest.raises(LMForgeError, match=f"--vocab-size {v}"):
                train_tokenizer([str(good)], v, kind, str(tmp_path / "t3"))
    with pytest.raises(LMForgeError, match="--vocab-size 100: must be in"):
        train_tokenizer([str(good)], 100, "bytelevel-bpe", str(tmp_path / "t3"))  # fewer than the 256 bytes
    assert not (tmp_path / "t3").exists()
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    one_line(train("--input", good, "--vocab-size", "300", "--output", existing), str(existing), "not a directory")
    assert existing.read_text() == "{}"
    ro = unwritable_dir(tmp_path)
    one_line(train("--input", good, "--vocab-size", "300", "--output", ro / "tok"), str(ro / "tok"))
    r = train("--input", good, "--vocab-size", "300", "--output", tmp_path / "ok")
    assert r.returncode == 0 and (tmp_path / "ok" / "tokenizer.json").is_file(), r.stderr
    # an output that holds something (a tokenizer, a run) is not written over without --overwrite
    before = (tmp_path / "ok" / "tokenizer.json").read_bytes()
    one_line(train("--input", good, "--vocab-size", "290", "--output", tmp_path / "ok"), str(tmp_path / "ok"),
             "not empty (holds tokenizer.json, tokenizer_config.json)", "--overwrite")
    assert (tmp_path / "ok" / "tokenizer.json").read_bytes() == before
    r = lmforge("tokenizer", "train", "--kind", "char", "--input", good, "--vocab-size", "10", "--output",
                tmp_path / "ok", "--overwrite")
    assert r.returncode == 0 and "a char tokenizer has a token per character" in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["char_vocab.json", "tokenizer_config.json"]
    one_line(train("--input", tmp_path / "ok", "--vocab-size", "300", "--output", tmp_path / "t4"),
             f"{tmp_path / 'ok'}: is a directory")


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write in: chmod 0555, or (as root, who ignores modes) /sys."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    probe = Path("/sys/lmforge-write-probe")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    pytest.skip("no directory here refuses writes by root")


def test_data_clean_outputs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document number {i} has an email a{i}@example.com in it."}) + "\n"
                           for i in range(5)))

    def clean(*args):
        return lmforge("data", "clean", src, "--stages", "pii", "--quiet", *args)

    outdir = tmp_path / "outdir"
    outdir.mkdir()
    one_line(clean("--output", outdir, "--report", tmp_path / "r.json"), str(outdir), "is a directory")
    assert not (tmp_path / "r.json").exists()
    r = clean("--output", tmp_path / "new" / "o.jsonl", "--report", tmp_path / "new2" / "r.json")
    assert r.returncode == 0 and (tmp_path / "new" / "o.jsonl").is_file() and (tmp_path / "new2" / "r.json").is_file()
    one_line(clean("--output", src / "o.jsonl", "--report", tmp_path / "r.json"), f"{src / 'o.jsonl'}: cannot write",
             f"{src} is a file, not a directory")  # (mkdir says only "File exists")
    one_line(clean("--output", src / "a" / "o.jsonl", "--report", tmp_path / "r.json"), f"{src} is a file, not a")
    ro = unwritable_dir(tmp_path)
    one_line(clean("--output", ro / "o.jsonl", "--report", tmp_path / "r.json"), str(ro / "o.jsonl"), "cannot write")
    one_line(clean("--output", tmp_path / "o.jsonl", "--report", ro / "r.json"), str(ro / "r.json"), "cannot write")
    assert not (tmp_path / "o.jsonl").exists()

    old = os.umask(0o022)
    try:
        out = tmp_path / "o.jsonl"
        out.write_text("precious\n")
        out.chmod(0o644)
        one_line(clean("--output", out, "--report", tmp_path / "r.json"), str(out), "--overwrite")
        assert out.read_text() == "precious\n"
        report = tmp_path / "report.json"  # an existing report is replaced only with --overwrite too
        report.write_text("precious\n")
        one_line(clean("--output", tmp_path / "o2.jsonl", "--report", report), f"{report}: exists", "--overwrite")
        assert report.read_text() == "precious\n" and not (tmp_path / "o2.jsonl").exists()
        r = clean("--output", out, "--report", tmp_path / "r.json", "--overwrite")
        assert r.returncode == 0, r.stderr
        assert "<EMAIL>" in out.read_text()
        assert (out.stat().st_mode & 0o777) == 0o644 and ((tmp_path / "r.json").stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_data_prepare_into_unwritable_or_missing_directories(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("Once upon a time there was a cat. " * 20)
    ro = unwritable_dir(tmp_path)
    one_line(refused("data", "prepare", text, "--tokenizer", STORIES260K_TOKENIZER, "--output", ro / "data"),
             str(ro / "data"), "cannot write")
    r = lmforge("data", "prepare", text, "--tokenizer", STORIES260K_TOKENIZER, "--output", tmp_path / "new" / "data")
    assert r.returncode == 0 and (tmp_path / "new" / "data" / "index.json").is_file(), r.stderr


def test_convert_to_llama2c_never_replaces_a_tokenizer_bin_beside_it(tmp_path):
    """llama2.c reads tokenizer.bin beside the model: an existing one was replaced without --overwrite."""
    (tmp_path / "tokenizer.bin").write_text("mine\n")
    one_line(refused("convert", "--from", "llama2c", "--to", "llama2c", STORIES260K, tmp_path / "m.bin"),
             f"{tmp_path / 'tokenizer.bin'}: exists; pass --overwrite")
    assert (tmp_path / "tokenizer.bin").read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "tokenizer.bin"]
    r = lmforge("convert", "--from", "llama2c", "--to", "llama2c", STORIES260K, tmp_path / "m.bin", "--overwrite")
    assert r.returncode == 0 and (tmp_path / "tokenizer.bin").stat().st_size > 1000, r.stderr


def test_an_output_directory_that_cannot_be_replaced_is_refused_before_any_work(tmp_path):
    """An existing (empty) output directory that cannot be renamed (immutable here; a mount point likewise) is
    refused before tokenizing or converting (``data prepare`` failed at the very end with "Operation not permitted"
    and no flag named)."""
    out = tmp_path / "imm"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        text = tmp_path / "a.txt"
        text.write_text("Once upon a time there was a cat. " * 20)
        one_line(refused("data", "prepare", text, "--tokenizer", STORIES260K_TOKENIZER, "--output", out),
                 f"--output {out}: cannot be replaced")
        one_line(refused("convert", "--from", "llama2c", STORIES260K, "--to", "lmforge", out),
                 f"destination {out}: cannot be replaced")
        assert not list(tmp_path.glob(".imm*"))
    finally:
        subprocess.run(["chattr", "-i", str(out)])


def test_a_broken_template_file_is_refused_at_start_naming_it(tmp_path):
    """``--template FILE`` is read and parsed before anything loads: a syntax error names the file and line (the
    server started, then answered every chat request 500); a binary file, one with no Jinja in it, a directory and a
    missing file each get their own line (a UnicodeDecodeError, the whole of /etc/passwd quoted, "not a built-in")."""
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ bos_token }}\n{% for m in messages %}\n{% for x in %}\n")
    blob = tmp_path / "t.bin"
    blob.write_bytes(bytes(range(128, 256)))
    prose = tmp_path / "prose.txt"
    prose.write_text("root:x:0:0:root:/root:/bin/bash\n" * 40)
    cases = [(bad, [str(bad), "cannot parse (line 3)"]), (blob, [str(blob), "not UTF-8"]),
             (prose, [str(prose), "not a Jinja chat template"]), (tmp_path, [str(tmp_path), "is a directory"]),
             (tmp_path / "missing.jinja", ["missing.jinja: no such file"])]
    for i, (path, needles) in enumerate(cases):  # (the server with each: the same check, at the same place)
        for cmd in ("serve", "chat") if i == 0 else ("chat",):
            line = one_line(lmforge(cmd, "--template", path, "--port", "0") if cmd == "serve" else
                            lmforge(cmd, "--template", path), *needles)
            assert len(line) < 300, line


def test_pretrain_on_a_text_file_that_cannot_train_names_it(tmp_path):
    """``--data.path`` a binary, an empty or a too-short text file: one line naming the file (and the line, or the
    split and the block size), not a UnicodeDecodeError, "vocab_size=0" or an unnamed token count."""
    blob, empty, short = tmp_path / "bin.dat", tmp_path / "empty.txt", tmp_path / "hw.txt"
    blob.write_bytes(b"ok\n" + bytes(range(128, 256)) * 8)
    empty.write_text("\n\n")
    short.write_text("hello world\n")
    for path, needles in [(blob, [f"{blob}:2: not UTF-8"]), (empty, [str(empty), "no text to train on"]),
                          (short, [str(short), "the train split has only", "need at least block_size+1"])]:
        one_line(refused("pretrain", *SMALL, "--data.path", path, "--out", tmp_path / "run", "--max-iters", "1"),
                 *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA runs --device cuda")
def test_device_cuda_without_cuda_is_one_line():
    """(was: AssertionError "Torch not compiled with CUDA enabled")"""
    one_line(refused("generate", "--device", "cuda", "--max-new-tokens", "2"), "--device cuda: no CUDA device here")


def test_an_api_key_no_client_could_send_is_refused_at_start():
    """A non-ASCII key made every request 401 (the right key included); an empty one let every request in."""
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}
    one_line(lmforge("serve", "--port", "0", env={**env, "LMFORGE_API_KEY": "ключ"}), "must be printable ASCII")
    one_line(lmforge("serve", "--port", "0", "--api-key", "two words", env=env), "must be printable ASCII")
    one_line(lmforge("serve", "--port", "0", env={**env, "LMFORGE_API_KEY": ""}), "is empty")


def test_a_seed_beyond_64_bits_is_refused_by_argparse(tmp_path):
    """(was: "ValueError: Overflow when unpacking long long" once sampling began, OverflowError in data prepare)"""
    big = str(2**80)
    for cmd in (["generate", "--max-new-tokens", "2"], ["data", "prepare", str(TINYSHAKESPEARE), "--tokenizer",
                                                          str(STORIES260K_TOKENIZER), "--output", str(tmp_path / "d")]):
        r = lmforge(*cmd, "--seed", big)
        assert r.returncode == 2 and f"argument --seed: {big}: must be in [0, 2**63 - 1]" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "d").exists()


def test_hf_export_keeps_the_users_umask(stories_ckpt, tmp_path):
    """(model.safetensors came out 0600, the other files 0644)"""
    old = os.umask(0o022)
    try:
        r = lmforge("convert", "--from", "lmforge", "--to", "hf", stories_ckpt, tmp_path / "hf")
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_a_malformed_trainer_state_is_damage_and_the_run_resumes_from_the_one_before(tmp_path):
    """trainer_state.json of [] or a step of "abc" (its manifest updated) gave an AttributeError/TypeError naming
    nothing, with no fall back; now it is damage like any other: moved aside, named, the older checkpoint used."""
    out = tmp_path / "run"
    r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "4", "--save-interval", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    state = out / "ckpt-0000004" / "trainer_state.json"
    good = json.loads(state.read_text())
    for bad in ([], {**good, "step": "abc"}):
        state.write_text(json.dumps(bad))
        write_manifest(state.parent)
        with pytest.raises(LMForgeError, match="ckpt-0000004: damaged checkpoint: trainer_state.json"):
            from lmforge.train.state import load_training_checkpoint

            load_training_checkpoint(state.parent)
    r = lmforge("pretrain", *SMALL, "--out", out, "--max-iters", "6", "--save-interval", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainer_state.json: field 'step'" in r.stderr and f"resumed from {out / 'ckpt-0000002'}" in r.stderr
    assert (out / "ckpt-0000004.damaged").is_dir()


def test_quantize_and_convert_refuse_a_tokenizer_that_is_not_the_models(tmp_path):
    """(both wrote a directory `generate` then refused; GPTQ calibrated with the wrong tokenizer)"""
    from lmforge.tokenizer.train import train_tokenizer

    train_tokenizer([str(TINYSHAKESPEARE)], 65, "char", str(tmp_path / "chars"))
    for cmd in (["quantize", "--model", STORIES260K, "--bits", "4", "--method", "rtn", "--output", tmp_path / "q"],
                ["convert", "--from", "llama2c", "--to", "lmforge", STORIES260K, tmp_path / "q"]):
        one_line(refused(*cmd, "--tokenizer", tmp_path / "chars"), str(tmp_path / "chars"), "65 tokens",
                 "not the model's tokenizer")
        assert not (tmp_path / "q").exists()


def test_prepared_data_with_ids_beyond_the_vocabulary_or_files_outside_it_is_refused(tmp_path):
    """0xFFFF written into train.bin made pretrain die with "IndexError: index out of range in self" when a bad
    batch was drawn (or never, if none was); index.json could name a split file outside the dataset."""
    from lmforge.tokenizer.train import train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text(TINYSHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    train_tokenizer([str(TINYSHAKESPEARE)], 65, "char", str(tmp_path / "tok"))
    r = lmforge("data", "prepare", text, "--tokenizer", tmp_path / "tok", "--output", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "d", bad)
    flip(bad / "train.bin", 2000, b"\xff\xff")
    one_line(refused("pretrain", *SMALL, "--data.path", bad, "--out", tmp_path / "run", "--max-iters", "1"),
             str(bad / "train.bin"), "token id 65,535 (first bad one at token 1,000)", "damaged data")
    escape = tmp_path / "escape"
    shutil.copytree(tmp_path / "d", escape)
    index = json.loads((escape / "index.json").read_text())
    index["splits"]["train"]["file"] = "../d/train.bin"
    (escape / "index.json").write_text(json.dumps(index))
    one_line(refused("pretrain", *SMALL, "--data.path", escape, "--out", tmp_path / "run2", "--max-iters", "1"),
             "index.json", "'../d/train.bin' is not a file of the dataset")


def test_prompts_that_are_not_utf8_or_too_long_are_refused_naming_the_flag(tmp_path):
    """Bytes that are not UTF-8 in --prompt or on chat's stdin failed in the tokenizer ("Unable to cast Python
    instance ... to C++ type"); a prompt longer than the context was a ValueError naming no flag, after the prompt
    was echoed; a --system message filling the context answered every message "message too long"."""
    r = subprocess.run([sys.executable.encode(), b"-m", b"lmforge", b"generate", b"--prompt", b"caf\xe9"],
                       capture_output=True, text=True, timeout=300)
    one_line(r, "--prompt: not UTF-8 text (byte 0xe9 at character 3)")
    r = lmforge("generate", "--prompt", "word " * 1000)
    one_line(r, "--prompt:", "leave no room in the model's context of 512")
    assert r.stdout == ""
    r = subprocess.run([sys.executable, "-m", "lmforge", "chat", "--max-new-tokens", "4"], input=b"caf\xe9\nOnce\n",
                       capture_output=True, timeout=300)
    assert r.returncode == 0 and b"message: not UTF-8 text (byte 0xe9 at character 3); not sent" in r.stderr
    assert r.stdout.strip(), r.stderr  # the next message was answered
    one_line(lmforge("chat", "--system", "word " * 1000), "--system:", "fills the model's context of 512")


def test_builtin_data_names_work_in_every_command(tmp_path):
    """``builtin:NAME`` worked in pretrain and pipeline files but not in sft/dpo/ppo ("cannot read: No such file")."""
    r = lmforge("sft", "--data", "builtin:stories_instruct", "--max-iters", "1", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr[-2000:]
    from lmforge.data.io import iter_records
    from lmforge.data.preference import read_prompts

    assert next(iter_records("builtin:stories_preferences"))[1] and read_prompts("builtin:stories_prompts")
    one_line(refused("dpo", "--data", "builtin:nope", "--out", tmp_path / "d"), "no built-in file 'nope'")


def test_a_misspelt_flag_is_named_before_the_required_ones():
    """`--vocab-sise 300` said "the following arguments are required: --vocab-size" (argparse checks those first),
    never naming the typo; abbreviations argparse accepts stay accepted."""
    r = refused("tokenizer", "train", "--input", "x.txt", "--vocab-sise", "300", "--output", "o")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and lines[-1] == ("lmforge tokenizer train: error: unrecognized arguments: --vocab-sise "
                                               "(did you mean --vocab-size?) (see lmforge tokenizer train --help)")
    r = refused("generate", "--max-new-token", "-3")  # an abbreviation: refused for its value, not its name
    assert r.returncode != 0 and "max-new-tokens" in r.stderr and "unrecognized" not in r.stderr, r.stderr
