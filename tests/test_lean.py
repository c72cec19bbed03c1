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

from lmforge.checkpoint import load_model, write_manifest
from lmforge.infer import lean, lean_sampling
from lmforge.infer.engine import SlotRunner
from lmforge.model import Decoder
from lmforge.presets import get_preset
from lmforge.quant import QuantConfig, QuantLinear, quantize_model, save_quantized

ROOT = Path(__file__).resolve().parents[1]


def _int4_dir(tmp_path: Path, preset: str, group: int, symmetric: bool, tied: bool = True, tokenizer=None,
              half: bool = False, **kw) -> Path:
    """An int4 directory of a random tiny model (the output projection tied to the int8 embedding table, as
    SmolLM2's and Qwen2's are; an untied one is int4 in such a directory, which stays with PyTorch). ``half``: every
    int4 scale and zero a float16 value, as ``quantize_model`` and a GGUF's Q4_1 weights give them (both paths lay
    them out as float16); else moved off float16's values (float32, as directories quantized before it hold them)."""
    torch.manual_seed(0)
    cfg = get_preset(preset, block_size=96, tie_embeddings=tied, **{"vocab_size": 128, **kw})
    model = Decoder(cfg).eval().requires_grad_(False)
    for p in model.parameters():  # weights of a trained model's scale, so logits spread
        p.mul_(3.0)
    quantize_model(model, QuantConfig(bits=4, group_size=group, symmetric=symmetric, lm_head=not tied))
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.bits == 4:
            for t in (mod.scales, mod.zeros):
                if t is not None:
                    t.copy_(t.half().float() if half else t * (1 + 2.0 ** -14))
    out = tmp_path / f"{preset}-g{group}{'-half' if half else ''}"
    save_quantized(model, out, tokenizer)
    if not tied:
        return out
    why = lean.unsupported(out)
    if why:
        pytest.skip(f"no decoding without PyTorch here: {why}")
    return out


CASES = [("tiny-llama", 32, False), ("tiny-qwen", 128, True)]  # qwen: qkv biases, fc2's K padded to 384


@pytest.mark.parametrize("preset,group,symmetric,half,kv",
                         [(*c, False, "float32") for c in CASES] + [("tiny-llama", 32, False, True, "float32")]
                         + [(*c, False, "float16") for c in CASES])
def test_logits_and_tokens_equal_the_pytorch_decoding_path(tmp_path, preset, group, symmetric, half, kv):
    """The same directory through PyTorch's SlotRunner (the C step with PyTorch tensors): a 70-token prompt (two
    prefill chunks) and 20 greedy steps give the same top logits (the output projection recomputes its top candidates
    exactly in both) and the same tokens; with float16 scales and zeros too. The float16 key/value cache (the
    default) gives top logits within 2e-3 of the largest and the same tokens here."""
    path = _int4_dir(tmp_path, preset, group, symmetric, half=half)
    model = load_model(path).requires_grad_(False)
    prompt = [int(t) for t in torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(1))]
    runner = SlotRunner(model, 1, 96)
    ours = lean.LeanModel(path, max_len=96, kv_dtype=kv)
    assert all(blk[3].half == half for blk in ours._blocks) and ours.k.dtype == np.dtype(kv)
    tol = 1e-4 if kv == "float32" else 2e-3
    want = runner.prefill(0, prompt)
    got = ours.prefill(prompt)
    for step in range(20):
        w = want.reshape(-1).numpy()
        top = np.argsort(-w)[:16]
        assert np.allclose(got[top], w[top], rtol=tol, atol=tol * np.abs(w).max()), step
        assert int(np.argmax(got)) == int(np.argmax(w))
        t = int(np.argmax(w))
        want, got = runner.decode([t]), ours.step([t])
    assert ours.length == 90


def test_narrow_attention_output_padded_like_the_embedding(tmp_path):
    """4 heads of 12 (48 columns) and a 64-wide embedding, both one group of 64 with zero points: the logits of each
    position are those of the directory's dequantized weights through the full PyTorch forward (the padding columns
    of the attention output's buffer stay zero; stale ones gave 40% errors)."""
    from lmforge.quant import QuantLinear

    path = _int4_dir(tmp_path, "tiny-llama", 64, False, head_dim=12)
    model = load_model(path).requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.compute = "dequant"
    prompt = [int(t) for t in torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(1))]
    want = model(torch.tensor([prompt]))[0]
    ours = lean.LeanModel(path, max_len=96, kv_dtype="float32")  # (float16 keys move these logits by 1e-3)
    got = [ours.prefill(prompt[:4]).copy()] + [ours.step([t]).copy() for t in prompt[4:]]  # (one buffer)
    for i, g in enumerate(got):
        w = want[3 + i].numpy()
        top = np.argsort(-w)[:16]
        assert np.abs(g[top] - w[top]).max() <= 1e-3 * np.abs(w).max(), i


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
        drawn = {lean_sampling.sample(logits, 0.7, rng=rng, **kw) for _ in range(400)}
        assert drawn <= allowed and len(drawn) > 1, kw
    assert lean_sampling.sample(logits, 0.0, 0, 1.0, 0.0, rng) == int(np.argmax(logits))


@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_top_p_over_a_large_vocabulary_keeps_the_smallest_set_reaching_it(scale):
    """A 49,152-token vocabulary: nearly flat logits (top-p needs thousands of tokens, more than the first sorted
    candidates) and peaked ones give the distribution a full sort gives."""
    logits = np.random.default_rng(2).normal(size=49152).astype(np.float32) * scale
    got = lean_sampling.distribution(logits, 0.8, 0, 0.9, 0.0)
    z = logits.astype(np.float64) / 0.8
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    want = np.zeros_like(p)
    want[order[before < 0.9]] = p[order[before < 0.9]]
    want /= want.sum()
    assert (got > 0).sum() == (want > 0).sum() > 1 and np.allclose(got, want, rtol=1e-9, atol=1e-15)


def _generate(args: list[str], env_extra: dict | None = None, command: str = "generate",
              stdin: str | None = None) -> subprocess.CompletedProcess:
    """`lmforge generate ARGS` (or another command) in a fresh interpreter, reporting on stderr whether torch was
    imported."""
    code = (f"import runpy, sys\nsys.argv = ['lmforge', '{command}'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('lmforge', run_name='__main__')\nexcept SystemExit as e:\n"
            "    code = e.code\nelse:\n    code = 0\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300,
                          input=stdin)


def _stories_int4(tmp_path: Path) -> Path:
    """stories260K (a trained model: its text is words) as an int4 directory with its tokenizer."""
    from lmforge.assets import STORIES260K
    from lmforge.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = load_model(STORIES260K)
    cfg = model.cfg
    if cfg.n_embd % 32 or cfg.vocab_size % 16:
        pytest.skip("stories260K's widths do not fit the int4 kernel")
    quantize_model(model, QuantConfig(bits=4, group_size=32, symmetric=False))
    out = tmp_path / "int4"
    save_quantized(model, out, load_tokenizer(str(STORIES260K.parent / "tok512.bin")))
    why = lean.unsupported(out)
    if why:
        pytest.skip(f"no decoding without PyTorch here: {why}")
    return out


def test_chat_takes_it_by_default_without_torch_and_replies_what_pytorch_replies(tmp_path):
    """`lmforge chat --model INT4DIR`: three turns (the cache kept between them) without importing torch, the
    replies PyTorch's path gives (greedy); a repetition penalty needs PyTorch (``--runtime lean`` says so)."""
    out = _stories_int4(tmp_path)
    turns = "Tell me about a dog.\nWhat did he eat?\nAnd then?\n"
    args = ["--model", str(out), "--temperature", "0", "--max-new-tokens", "30"]
    ours = _generate(args, command="chat", stdin=turns)
    theirs = _generate(args + ["--runtime", "torch"], command="chat", stdin=turns)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr[-2000:] + theirs.stderr[-2000:]
    assert "TORCH False" in ours.stderr and "TORCH True" in theirs.stderr
    assert ours.stdout == theirs.stdout and len(set(ours.stdout.split())) > 10
    r = _generate(args + ["--runtime", "lean", "--repetition-penalty", "1.2"], command="chat", stdin=turns)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "repetition-penalty" in r.stderr


def test_chat_seed_is_the_sessions_without_torch(tmp_path):
    """`lmforge chat --seed` on the lean runtime seeds the session as on PyTorch's: the same message after /reset
    gets a reply of its own, and the same session repeats itself."""
    out = _stories_int4(tmp_path)
    args = ["--model", str(out), "--temperature", "1", "--max-new-tokens", "20", "--template", "plain", "--seed", "3"]
    stdin = "Tell me about a dog.\n/reset\nTell me about a dog.\n/exit\n"
    runs = [_generate(args, command="chat", stdin=stdin) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert "TORCH False" in runs[0].stderr
    first, second = runs[0].stdout.splitlines()[:2]
    assert first != second and runs[0].stdout == runs[1].stdout


def test_chat_keeps_the_conversation_in_the_cache(tmp_path):
    """A second turn runs only the positions after the prefix it shares with the cached conversation."""
    import argparse

    from lmforge.commands.chat import _Lean

    out = _stories_int4(tmp_path)
    args = argparse.Namespace(model=str(out), tokenizer=None, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                              seed=None)
    session = _Lean(args, "plain")
    from lmforge.infer.chat import encode_chat

    first = encode_chat(session.tok, "plain", [{"role": "user", "content": "Hi."}])
    rows = []
    step = session.model.step
    session.model.step = lambda tokens, last=True: rows.append(len(tokens)) or step(tokens, last)
    "".join(session.reply(first, 20))
    assert rows[0] == len(first) and session.cached[: len(first)] == first
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": session.text.strip()},
               {"role": "user", "content": "More."}]
    second = encode_chat(session.tok, "plain", history)
    shared = next(i for i, (a, b) in enumerate(zip(session.cached + [-1], second)) if a != b)
    rows.clear()
    "".join(session.reply(second, 20))
    assert shared > len(first) // 2 and rows[0] == len(second) - shared


def test_generate_takes_it_by_default_without_torch_and_prints_what_pytorch_prints(tmp_path):
    """`lmforge generate --model INT4DIR` decodes without importing torch and prints the text the PyTorch path prints
    (greedy), with the same last line, with its float16 key/value cache and with ``--kv-cache-dtype float32``;
    ``--runtime torch`` keeps PyTorch, and refuses a float16 cache with one line."""
    out = _stories_int4(tmp_path)
    args = ["--model", str(out), "--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "40"]
    ours, theirs = _generate(args), _generate(args + ["--runtime", "torch"])
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert "TORCH False" in ours.stderr and "TORCH True" in theirs.stderr
    assert ours.stdout == theirs.stdout and ours.stdout.startswith("Once upon a time") and len(ours.stdout) > 60
    assert ours.stderr.splitlines()[-2].startswith("achieved tok/s: ")
    exact = _generate(args + ["--kv-cache-dtype", "float32"])  # PyTorch's numbers (the default cache: float16)
    assert exact.returncode == 0 and exact.stdout == theirs.stdout, exact.stderr[-2000:]
    r = _generate(args + ["--runtime", "torch", "--kv-cache-dtype", "float16"])
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--kv-cache-dtype float16" in r.stderr
    sampled = _generate(args[:-4] + ["--max-new-tokens", "30", "--seed", "3"])
    again = _generate(args[:-4] + ["--max-new-tokens", "30", "--seed", "3"])
    assert sampled.returncode == 0 and sampled.stdout == again.stdout  # a seed repeats itself


def test_lean_runtime_refuses_what_it_cannot_run_and_damaged_files(tmp_path):
    """``--runtime lean`` on a float checkpoint: one line naming the reason. Damaged directories through `lmforge
    generate` itself: a non-finite scale, a truncated file, a quantization.json that does not describe the file (its
    ``symmetric`` flipped either way) or is malformed: exit 1, one line naming the file, no traceback."""
    from lmforge.assets import STORIES260K
    from lmforge.tokenizer import load_tokenizer

    r = _generate(["--model", str(STORIES260K), "--runtime", "lean", "--max-new-tokens", "4"])
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--runtime lean" in r.stderr
    assert "lmforge quantize --model MODEL --bits 4" in r.stderr  # (how to make one)
    untied = _int4_dir(tmp_path / "untied", "tiny-llama", 32, False, tied=False)
    assert lean.unsupported(untied) == "an untied output projection"
    tok = load_tokenizer(str(STORIES260K.parent / "tok512.bin"))
    damaged = []

    def copy(name: str, sym: bool = False) -> Path:
        path = _int4_dir(tmp_path / name, "tiny-llama", 32, sym, vocab_size=512, tokenizer=tok)
        damaged.append(path)
        return path

    ok = copy("ok")
    r = _generate(["--model", str(ok), "--max-new-tokens", "4"])
    assert r.returncode == 0 and "TORCH False" in r.stderr, r.stderr[-2000:]
    for runtime in ("auto", "torch"):  # a draft of an int4 model is refused on either runtime, not ignored
        r = _generate(["--model", str(ok), "--max-new-tokens", "4", "--draft", "int4", "--runtime", runtime])
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("TORCH")]
        assert r.returncode == 1 and len(lines) == 1 and "error: --draft int4: " in lines[0], r.stderr
    raw = bytearray((ok / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    b, _ = json.loads(raw[8 : 8 + n])["blocks.0.attn.qkv.scales"]["data_offsets"]
    nan = bytearray(raw)
    nan[8 + n + b : 8 + n + b + 4] = np.array([np.nan], np.float32).tobytes()
    (copy("nan") / "model.safetensors").write_bytes(bytes(nan))
    (copy("truncated") / "model.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    for name, sym, key, value in [("asym-said-sym", False, "symmetric", True),
                                  ("sym-said-asym", True, "symmetric", False),
                                  ("group-null", False, "group_size", None), ("group-list", False, "group_size", [32])]:
        path = copy(name, sym)
        q = json.loads((path / "quantization.json").read_text())
        q[key] = value
        (path / "quantization.json").write_text(json.dumps(q))
    want = {"nan": "non-finite", "truncated": "truncated", "asym-said-sym": "unexpected tensor",
            "sym-said-asym": "is missing", "group-null": "group_size", "group-list": "group_size"}
    for path in damaged[1:]:  # the manifest refuses each (test_robust); updated, so each check is tested itself
        write_manifest(path)
        r = _generate(["--model", str(path), "--max-new-tokens", "4"])
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("TORCH")]
        name = path.parent.name
        assert r.returncode == 1 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert len(lines) == 1 and str(path) in lines[0] and want[name] in lines[0], (name, lines)


def test_rotary_tables_are_pytorchs():
    """The cos/sin tables equal ``lmforge.model.positions.Rotary``'s to a float32 rounding (numpy's float32 pow had
    put angles 2.4e-4 apart by position 8,192)."""
    from lmforge.model.positions import Rotary

    for theta, dim, interleaved in [(10000.0, 64, False), (100000.0, 64, True), (500000.0, 128, False),
                                    (10000.0, 12, False)]:
        ref = Rotary(dim, 8192, theta, interleaved)
        ref.ensure(8192)
        cos, sin = lean._rotary(dim, 8192, theta, interleaved)
        assert np.abs(cos - ref.cos.numpy()).max() <= 2e-7 and np.abs(sin - ref.sin.numpy()).max() <= 2e-7


def test_a_failed_read_does_not_hide_its_error(tmp_path):
    """A tensor missing from the file: the error says so (closing the mapping while a view of it lives on does not
    raise over it)."""
    path = _int4_dir(tmp_path, "tiny-llama", 32, False)
    wf = lean.SafetensorsMap(path / "model.safetensors")
    view = wf.get("wte.qweight", "I8", (128, 64))
    with pytest.raises(lean.LMForgeError, match="missing"):
        try:
            wf.get("nothing", "F32", (1,))
        finally:
            wf.close()
    assert view.sum() is not None  # still readable: unmapped with its last view


def _lean_tokens(path: Path, prompt: list[int], n: int, kv: str = "float16") -> list[int]:
    """Greedy tokens of one sequence alone through ``LeanModel``."""
    return list(lean.generate(lean.LeanModel(path, max_len=96, kv_dtype=kv), prompt, n, temperature=0.0))


@pytest.mark.parametrize("kv", ["float16", "float32"])
def test_engine_batches_sequences_as_each_decodes_alone_and_as_pytorch_does(tmp_path, kv):
    """``LeanEngine`` (what `lmforge serve` runs for an int4 directory): seven greedy requests of 1 to 70 prompt
    tokens over three slots (prompts prefilled together, packed into calls; slots reused as requests end) give each
    the tokens it gets decoding alone (the C step's rows are independent) and, with a float32 key/value cache, the
    tokens of PyTorch's engine on the same directory (with the default float16 cache, here too)."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.params import SamplingParams

    path = _int4_dir(tmp_path, "tiny-llama", 32, False)
    g = torch.Generator().manual_seed(2)
    prompts = [[int(t) for t in torch.randint(0, 128, (n,), generator=g)] for n in (1, 5, 70, 12, 3, 40, 2)]
    engine = lean.LeanEngine(path, max_batch=3, max_len=96, kv_dtype=kv)
    theirs = Engine(load_model(path).requires_grad_(False), max_batch=3, max_len=96)
    try:
        got = [r.token_ids for r in _all(engine, prompts, SamplingParams(temperature=0, max_new_tokens=16))]
        want = [r.token_ids for r in _all(theirs, prompts, SamplingParams(temperature=0, max_new_tokens=16))]
    finally:
        engine.close()
        theirs.close()
    assert engine.prefill_batches >= 1 and engine.max_active == 3
    assert got == [_lean_tokens(path, p, 16, kv) for p in prompts]
    assert got == want and all(len(t) == 16 for t in got)


def _all(engine, prompts: list[list[int]], params) -> list:
    reqs = engine.submit_group([(p, params, i) for i, p in enumerate(prompts)])
    for r in reqs:
        r.result()
    return reqs


def test_engine_samples_with_a_seed_reports_logprobs_and_frees_pages_when_idle(tmp_path):
    """Sampled requests with a seed repeat themselves, log-probabilities are reported, and an idle engine whose cache
    held far more positions than the next request needs gives the cache's pages back."""
    from lmforge.infer.params import SamplingParams

    path = _int4_dir(tmp_path, "tiny-llama", 32, False)
    engine = lean.LeanEngine(path, max_batch=2, max_len=96)
    try:
        p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, seed=7, logprobs=True, top_logprobs=2)
        a = engine.submit(list(range(3, 83)), p).result()
        assert len(a) == 16 and engine.model.top == 95  # 80 prompt positions, 15 more written (the context: 96)
        b = engine.submit([1, 2], p).result()
        assert engine.model.top == 21  # forgotten before the short request, which wrote 21
    finally:
        engine.close()
    assert [s.token for s in a] != [s.token for s in b]
    c = lean.LeanEngine(path, max_batch=2, max_len=96)
    try:
        assert [s.token for s in c.submit(list(range(3, 83)), p).result()] == [s.token for s in a]
    finally:
        c.close()
    assert all(s.logprob <= 0 and len(s.top_logprobs) == 2 for s in a)


def test_a_failing_cache_release_does_not_stop_the_engine(tmp_path):
    """An error while the idle engine gives its cache back (in its thread, outside any request) is reported and the
    requests are still served (it used to end the engine's thread: every request then waited forever)."""
    from lmforge.infer.batching import Request
    from lmforge.infer.params import SamplingParams

    path = _int4_dir(tmp_path, "tiny-llama", 32, False)
    engine = lean.LeanEngine(path, max_batch=2, max_len=96)

    def broken(positions: int) -> None:
        raise OSError("madvise failed")

    engine.runner.idle = broken
    try:
        for _ in range(2):  # (read with a timeout: without the fix the request's end never comes)
            req = engine.submit([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5))
            events = [req._q.get(timeout=60)[1] for _ in range(6)]
            assert events[-1] is Request.DONE and len(req.token_ids) == 5
    finally:
        engine.close()


def _serve(args: list[str]) -> tuple[subprocess.Popen, int, str]:
    """`lmforge serve ARGS` on a free port: the process, the port and its first line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--port", str(port), *args],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, port, proc.stderr.readline()


def _post(port: int, path: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_serve_takes_it_by_default_without_torch_and_answers_what_pytorch_answers(tmp_path):
    """`lmforge serve --model INT4DIR` runs in a process that never loads PyTorch's library and answers a chat and a
    completion (greedy) as `lmforge serve --runtime torch` does; ``--runtime lean`` refuses a float checkpoint with
    one line, and `serve`/`chat` with PyTorch refuse a ``--kv-cache-dtype`` with one line."""
    out = _stories_int4(tmp_path)
    chat = {"model": "int4", "messages": [{"role": "user", "content": "Tell me about a dog."}], "max_tokens": 30,
            "temperature": 0}
    completion = {"model": "int4", "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}
    answers = {}
    for runtime in ("auto", "torch"):
        proc, port, line = _serve(["--model", str(out), "--runtime", runtime])
        try:
            assert "serving" in line, line + proc.stderr.read()[-2000:]
            assert ("lean runtime" if runtime == "auto" else "torch runtime") in line, line
            maps = Path(f"/proc/{proc.pid}/maps")
            if maps.exists():
                assert ("libtorch" in maps.read_text()) == (runtime == "torch")
            answers[runtime] = (_post(port, "/v1/chat/completions", chat)["choices"][0]["message"]["content"],
                                _post(port, "/v1/completions", completion)["choices"][0]["text"])
        finally:
            proc.terminate()
            proc.wait(10)
    assert answers["auto"] == answers["torch"] and len(answers["auto"][1].split()) > 4
    bad = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--runtime", "lean"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 1 and "--runtime lean" in bad.stderr and "Traceback" not in bad.stderr
    for command in ("serve", "chat"):  # a cache dtype is the lean runtime's choice: one line from PyTorch's
        bad = subprocess.run([sys.executable, "-m", "lmforge", command, "--runtime", "torch", "--kv-cache-dtype",
                              "float32"], capture_output=True, text=True, timeout=120, input="",
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert bad.returncode == 1 and "--kv-cache-dtype float32" in bad.stderr and "Traceback" not in bad.stderr


def test_an_error_while_admitting_fails_the_waiting_requests_not_the_engine(tmp_path):
    """An error in the engine's admission bookkeeping (here the cache budget's arithmetic) fails the requests that
    were waiting, with the error, and the engine serves the next ones (it used to end the engine's thread)."""
    from lmforge.infer.batching import Request
    from lmforge.infer.params import SamplingParams

    path = _int4_dir(tmp_path, "tiny-llama", 32, False)
    engine = lean.LeanEngine(path, max_batch=2, max_len=96, kv_budget=1 << 30)
    real, calls = engine.runner.cache_bytes, []

    def broken(slots: int, length: int) -> int:
        calls.append(slots)
        if len(calls) == 1:
            raise ArithmeticError("budget arithmetic failed")
        return real(slots, length)

    engine.runner.cache_bytes = broken
    params = SamplingParams(temperature=0, max_new_tokens=80)
    try:
        first = engine.submit([1, 2, 3], params)  # alone: admitted without the budget's arithmetic
        second = engine.submit([4, 5], params)  # next to it (80 tokens take longer than this): the arithmetic fails
        assert second._q.get(timeout=60)[1] is Request.DONE and "budget arithmetic failed" in second.error
        assert not second.token_ids
        while first._q.get(timeout=60)[1] is not Request.DONE:
            pass
        assert len(first.token_ids) == 80 and first.error is None
        third, fourth = engine.submit([6, 7], params), engine.submit([8], params)  # the engine goes on
        for req in (third, fourth):
            while req._q.get(timeout=60)[1] is not Request.DONE:
                pass
            assert len(req.token_ids) == 80 and req.error is None
    finally:
        engine.close()


@pytest.mark.parametrize("runtime", ["lean", "torch"])
def test_engine_scores_the_prompt_when_asked(tmp_path, runtime):
    """``prompt_logprobs`` (what `/v1/completions` asks with ``echo`` and ``logprobs``): before its first token a
    request reports every prompt token's log-probability under the model (the first: None) and the top alternatives,
    as a full forward of the model gives them; the tokens it then generates are those it generates without them, and
    ``max_new_tokens=0`` gives the scores alone. Prompts longer than one call of the C step are scored across calls."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.params import SamplingParams
    from lmforge.infer.sequence import PromptScores

    path = _int4_dir(tmp_path, "tiny-llama", 32, False)
    if runtime == "lean":  # the reference: one token at a time through the C step alone (its rows are independent)
        engine = lean.LeanEngine(path, max_batch=2, max_len=96)

        def log_softmax(ids):
            m = lean.LeanModel(path, max_len=96)
            return torch.log_softmax(torch.tensor(np.stack([m.step([t]).copy() for t in ids])).double(), -1)
    else:  # a float model's full forward
        torch.manual_seed(0)
        model = Decoder(get_preset("tiny-llama", block_size=96, vocab_size=128)).eval().requires_grad_(False)
        engine = Engine(model, max_batch=2, max_len=96)

        def log_softmax(ids):
            return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    g = torch.Generator().manual_seed(3)
    try:
        for n, new in ((1, 4), (9, 4), (70, 3), (12, 0)):
            ids = [int(t) for t in torch.randint(0, 128, (n,), generator=g)]
            plain = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=new)).result()
            items = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=new, prompt_logprobs=2)).result()
            assert isinstance(items[0], PromptScores) and not any(isinstance(i, PromptScores) for i in items[1:])
            assert [s.token for s in items[1:]] == [s.token for s in plain] and len(plain) == new
            with torch.no_grad():
                logp = log_softmax(ids)
            steps = items[0].steps
            assert [s.token for s in steps] == ids and steps[0].logprob is None and steps[0].top_logprobs is None
            want = [float(logp[i - 1, t]) for i, t in enumerate(ids) if i]
            assert [s.logprob for s in steps[1:]] == pytest.approx(want, abs=1e-4)
            for i, s in enumerate(steps[1:]):
                assert [t for t, _ in s.top_logprobs] == logp[i].topk(2).indices.tolist()
    finally:
        engine.close()
