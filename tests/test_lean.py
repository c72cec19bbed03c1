"""Decoding an int4 directory without PyTorch (``lmforge.infer.lean``): the logits and tokens of the PyTorch decoding
path on the same directory (both run the C step), `lmforge generate` taking it by default without importing torch,
and damaged directories refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.infer import lean
from lmforge.infer.engine import SlotRunner
from lmforge.model import Decoder
from lmforge.presets import get_preset
from lmforge.quant import QuantConfig, quantize_model, save_quantized

ROOT = Path(__file__).resolve().parents[1]


def _int4_dir(tmp_path: Path, preset: str, group: int, symmetric: bool, tied: bool = True) -> Path:
    """An int4 directory of a random tiny model (the output projection tied to the int8 embedding table, as
    SmolLM2's and Qwen2's are; an untied one is int4 in such a directory, which stays with PyTorch)."""
    torch.manual_seed(0)
    cfg = get_preset(preset, block_size=96, vocab_size=128, tie_embeddings=tied)
    model = Decoder(cfg).eval().requires_grad_(False)
    for p in model.parameters():  # weights of a trained model's scale, so logits spread
        p.mul_(3.0)
    quantize_model(model, QuantConfig(bits=4, group_size=group, symmetric=symmetric, lm_head=not tied))
    out = tmp_path / f"{preset}-g{group}"
    save_quantized(model, out)
    if not tied:
        return out
    why = lean.unsupported(out)
    if why:
        pytest.skip(f"no decoding without PyTorch here: {why}")
    return out


CASES = [("tiny-llama", 32, False), ("tiny-qwen", 128, True)]  # qwen: qkv biases, fc2's K padded to 384


@pytest.mark.parametrize("preset,group,symmetric", CASES)
def test_logits_and_tokens_equal_the_pytorch_decoding_path(tmp_path, preset, group, symmetric):
    """The same directory through PyTorch's SlotRunner (the C step with PyTorch tensors): a 70-token prompt (two
    prefill chunks) and 20 greedy steps give the same top logits (the output projection recomputes its top candidates
    exactly in both) and the same tokens."""
    path = _int4_dir(tmp_path, preset, group, symmetric)
    model = load_model(path).requires_grad_(False)
    prompt = [int(t) for t in torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(1))]
    runner = SlotRunner(model, 1, 96)
    ours = lean.LeanModel(path, max_len=96)
    want = runner.prefill(0, prompt)
    got = ours.prefill(prompt)
    for step in range(20):
        w = want.reshape(-1).numpy()
        top = np.argsort(-w)[:16]
        assert np.allclose(got[top], w[top], rtol=1e-4, atol=1e-4 * np.abs(w).max()), step
        assert int(np.argmax(got)) == int(np.argmax(w))
        t = int(np.argmax(w))
        want, got = runner.decode([t]), ours.step([t])
    assert ours.length == 90


def test_sampling_matches_the_pytorch_distribution():
    """top-k, top-p and min-p keep the tokens ``lmforge.infer.sampling.sample`` keeps: every draw is among them, and
    temperature 0 is the argmax."""
    from lmforge.infer.sampling import SamplingParams, sample

    logits = np.random.default_rng(0).normal(size=64).astype(np.float32) * 3
    rng = np.random.default_rng(1)
    for kw in [dict(top_k=5, top_p=1.0, min_p=0.0), dict(top_k=0, top_p=0.5, min_p=0.0),
               dict(top_k=0, top_p=1.0, min_p=0.2)]:
        p = SamplingParams(temperature=0.7, **kw)
        allowed = set()
        for s in range(400):  # PyTorch's support of the distribution
            allowed.add(int(sample(torch.tensor(logits)[None], p, torch.Generator().manual_seed(s))))
        drawn = {lean.sample(logits, 0.7, rng=rng, **kw) for _ in range(400)}
        assert drawn <= allowed and len(drawn) > 1, kw
    assert lean.sample(logits, 0.0, 0, 1.0, 0.0, rng) == int(np.argmax(logits))


@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_top_p_over_a_large_vocabulary_keeps_the_smallest_set_reaching_it(scale):
    """A 49,152-token vocabulary: nearly flat logits (top-p needs thousands of tokens, more than the first sorted
    candidates) and peaked ones give the distribution a full sort gives."""
    logits = np.random.default_rng(2).normal(size=49152).astype(np.float32) * scale
    got = lean.distribution(logits, 0.8, 0, 0.9, 0.0)
    z = logits.astype(np.float64) / 0.8
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    want = np.zeros_like(p)
    want[order[before < 0.9]] = p[order[before < 0.9]]
    want /= want.sum()
    assert (got > 0).sum() == (want > 0).sum() > 1 and np.allclose(got, want, rtol=1e-9, atol=1e-15)


def _generate(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`lmforge generate ARGS` in a fresh interpreter, reporting on stderr whether torch was imported."""
    code = ("import runpy, sys\nsys.argv = ['lmforge', 'generate'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('lmforge', run_name='__main__')\nexcept SystemExit as e:\n"
            "    code = e.code\nelse:\n    code = 0\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_generate_takes_it_by_default_without_torch_and_prints_what_pytorch_prints(tmp_path):
    """`lmforge generate --model INT4DIR` decodes without importing torch and prints the text the PyTorch path prints
    (greedy), with the same last line; ``--runtime torch`` keeps PyTorch."""
    torch.manual_seed(0)
    from lmforge.assets import STORIES260K

    model = load_model(STORIES260K)  # a trained model: its text is words
    cfg = model.cfg
    if cfg.n_embd % 32 or cfg.vocab_size % 16:
        pytest.skip("stories260K's widths do not fit the int4 kernel")
    quantize_model(model, QuantConfig(bits=4, group_size=32, symmetric=False))
    out = tmp_path / "int4"
    from lmforge.tokenizer import load_tokenizer

    save_quantized(model, out, load_tokenizer(str(STORIES260K.parent / "tok512.bin")))
    why = lean.unsupported(out)
    if why:
        pytest.skip(f"no decoding without PyTorch here: {why}")
    args = ["--model", str(out), "--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "40"]
    ours, theirs = _generate(args), _generate(args + ["--runtime", "torch"])
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert "TORCH False" in ours.stderr and "TORCH True" in theirs.stderr
    assert ours.stdout == theirs.stdout and ours.stdout.startswith("Once upon a time") and len(ours.stdout) > 60
    assert ours.stderr.splitlines()[-2].startswith("achieved tok/s: ")
    sampled = _generate(args[:-4] + ["--max-new-tokens", "30", "--seed", "3"])
    again = _generate(args[:-4] + ["--max-new-tokens", "30", "--seed", "3"])
    assert sampled.returncode == 0 and sampled.stdout == again.stdout  # a seed repeats itself


def test_lean_runtime_refuses_what_it_cannot_run_and_damaged_files(tmp_path):
    """``--runtime lean`` on a float checkpoint: one line naming the reason. A non-finite scale or a truncated file:
    one line naming the file, exit 1, no traceback."""
    from lmforge.assets import STORIES260K

    r = _generate(["--model", str(STORIES260K), "--runtime", "lean", "--max-new-tokens", "4"])
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--runtime lean" in r.stderr
    untied = _int4_dir(tmp_path / "untied", "tiny-llama", 32, False, tied=False)
    assert lean.unsupported(untied) == "an untied output projection"
    path = _int4_dir(tmp_path, "tiny-llama", 32, False)
    raw = bytearray((path / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    b, _ = header["blocks.0.attn.qkv.scales"]["data_offsets"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw[8 + n + b : 8 + n + b + 4] = np.array([np.nan], np.float32).tobytes()
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(lean.LMForgeError, match="non-finite"):
        lean.LeanModel(bad)
    (bad / "model.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(lean.LMForgeError, match="truncated"):
        lean.LeanModel(bad)
