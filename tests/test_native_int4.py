"""The C step's int4 products with integer dot products (``lmf_int4``) and its work shared among OpenMP threads
(attention of many rows, the int4 and int8-head products): against independent formulas, the same numbers at any row
count and thread count, and a prefill of an int4 model through the C step."""

from __future__ import annotations

import copy
import ctypes
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from slot_decode import decode_against_full_forward

from lmforge.infer import clib, native
from lmforge.infer.engine import SlotRunner
from lmforge.model import Decoder
from lmforge.presets import get_preset
from lmforge.quant import QuantConfig, QuantLinear, quantize_model
from lmforge.quant.packing import unpack_int4

LIB = native.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler here: decoding keeps the PyTorch step")
vnni = pytest.mark.skipif(LIB is None or not LIB.lmf_vnni_ok(), reason="no AVX512-VNNI here: lmf_int4 does not apply")


def _reference(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x (R, padded K) @ W^T as lmf_int4 defines it, in float64: each block of 32 inputs as two int8 parts
    x ~ d (c + f / 254), d = max|x| / 127, c = round(x / d), f = round((x - d c) 254 / d) (ties to even); the integer
    dot products with the levels q - 8, scaled by the weight's group scale and d / 254, plus each group's zero times
    the sum of its inputs."""
    R, K = x.shape
    N, G = mod.out_features, mod.group_size
    xb = x.view(R, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    inv2 = torch.where(amax > 0, 254.0 * 127.0 / amax, torch.zeros_like(amax))
    c = torch.round(xb * inv)  # float32 products, as the kernel computes them
    f = torch.round((xb.double() - (amax / 127.0).double() * c.double()).float() * inv2)
    parts = 254 * c.double() + f.double()
    d = (amax / 127.0 / 254.0).double()
    lv = unpack_int4(mod.qweight).double().view(N, K // 32, 32) - 8
    s = mod.scales.double().repeat_interleave(G // 32, dim=1)  # (N, K / 32): each block's group scale
    y = torch.einsum("rbk,nbk->rnb", parts, lv) * d.view(R, 1, K // 32) * s[None]
    if mod.zeros is not None:
        z = mod.zeros.double().repeat_interleave(G // 32, dim=1)
        y = y + z[None] * xb.double().sum(-1)[:, None, :]
    return y.sum(-1)


@vnni
@pytest.mark.parametrize("n_out,k,group,symmetric", [(200, 576, 32, False), (96, 200, 64, True),
                                                     (48, 320, 128, False)])
def test_int4_products_equal_the_formula(n_out, k, group, symmetric):
    """Outputs not a multiple of 16 (padded), inputs padded to the group size, groups of 32 to 128, with and without
    zeros; rows in chunks of 8, 4, 3, 2 and 1; every row the same at any row count (a prefill computes what decoding
    computes); close to the float product of the dequantized weight."""
    torch.manual_seed(0)
    mod = QuantLinear.from_linear(torch.nn.Linear(k, n_out, bias=False), 4, group, symmetric=symmetric)
    kp = mod.qweight.shape[1] * 2
    x = torch.randn(15, k) * torch.rand(15, 1) * 3
    x[3, : min(k, 64)] = 0  # blocks of zeros: scale 0
    xp = F.pad(x, (0, kp - k))
    want = _reference(mod, xp)
    rows = {}
    for r in (15, 13, 7, 3, 1):
        got = native.int4(mod, r)(xp[:r].contiguous())[:, :n_out]
        assert torch.allclose(got.double(), want[:r], rtol=1e-5, atol=1e-5 * want.abs().max().item())
        rows[r] = got.clone()
    assert all(torch.equal(rows[15][:r], rows[r]) for r in (13, 7, 3, 1))
    dense = x @ mod.dequantize().t()  # the float product of the dequantized weight, to 1e-4 (bfloat16: 3e-3)
    assert (rows[15] - dense).norm() / dense.norm() < 1e-4


@vnni
def _quantized_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lmf_int4's quantized activations of x (rows, K) float32 as the formula gives them, in float32 arithmetic: per
    block of 32 inputs, m = max|x|, d = m / 127, c = rint(x 127 / m), f = rint(fl(x - d c) 32258 / m) (x - d c one
    fused multiply-add: exact in float64, then rounded once); the bytes c[0:32], f[0:32]; the floats d / 254,
    8 (d / 254) (254 sum c + sum f) and sum x (pairs x_i + x_{16+i}, then halves of 8, 4, 2 and 1 lanes added)."""
    f32 = np.float32
    rows, K = x.shape
    xq = np.zeros((rows, K // 32, 64), np.int8)
    xs = np.zeros((rows, K // 32, 3), f32)
    for r in range(rows):
        for b in range(K // 32):
            v = x[r, 32 * b:32 * b + 32].astype(f32)
            m = f32(np.abs(v).max())
            d = f32(m / f32(127))
            inv, inv2 = (f32(f32(127) / m), f32(f32(32258) / m)) if m > 0 else (f32(0), f32(0))
            c = np.clip(np.rint(v * inv), -128, 127).astype(np.int32)
            rest = (v.astype(np.float64) - np.float64(d) * c).astype(f32)
            fine = np.clip(np.rint(rest * inv2), -128, 127).astype(np.int32)
            xq[r, b] = np.concatenate([c, fine]).astype(np.int8)
            p0 = f32(d / f32(254))
            t = v[:16] + v[16:]
            for w in (8, 4, 2, 1):
                t = t[:w] + t[w:2 * w]
            xs[r, b] = [p0, f32(f32(8) * p0) * f32(254 * int(c.sum()) + int(fine.sum())), t[0]]
    return xq, xs


@vnni
@pytest.mark.parametrize("k", [32, 160, 512, 576, 1056, 1536])
def test_int4_activations_are_quantized_as_the_formula_says_bit_for_bit(two_threads, k):
    """The int8 parts and scales lmf_int4 leaves in its scratch, for 1, 3 and 16 rows (on one thread and shared among
    two), equal the formula's in float32 bit for bit: blocks of zeros, tiny and huge values, a block whose largest value
    is negative, block counts from 1 to 48 (not multiples of 16)."""
    torch.manual_seed(0)
    mod = QuantLinear.from_linear(torch.nn.Linear(k, 64, bias=False), 4, 32)
    x = torch.randn(16, k) * torch.rand(16, 1) * 3
    x[1, :32] = 0
    x[2, :64] *= 1e-30
    x[3, 32:64] *= 1e20
    x[4, :32] = -x[4, :32].abs()
    want = _quantized_activations(x.numpy())
    for on in (False, True):
        _parallel(on)
        for rows in (1, 3, 16):
            buffers = native.int4_buffers(rows, 64, k)
            native.int4(mod, rows, buffers)(x[:rows].contiguous())
            xq = buffers[1][: 2 * rows * k].view(rows, k // 32, 64).numpy()
            xs = buffers[2][: rows * k // 32 * 3].view(rows, k // 32, 3).numpy()
            assert np.array_equal(xq, want[0][:rows]), (on, rows)
            assert np.array_equal(xs.view(np.int32), want[1][:rows].view(np.int32)), (on, rows)


def test_int4_layout_is_built_once_and_follows_a_new_weight():
    torch.manual_seed(0)
    mod = QuantLinear.from_linear(torch.nn.Linear(64, 32), 4, 32)
    x = torch.randn(2, 64)
    first = native.int4(mod, 2)
    built = mod.__dict__["_lmforge_int4"]
    native.int4(mod, 3)
    assert mod.__dict__["_lmforge_int4"] is built
    mod.set_weight(torch.randn(32, 64))  # a new weight: the old product is stale, a new one reads the new layout
    with pytest.raises(native.Stale):
        first(x)
    got = native.int4(mod, 2)(x)
    assert mod.__dict__["_lmforge_int4"] is not built
    assert torch.allclose(got.double(), _reference(mod, x), rtol=1e-5, atol=1e-5)


def _int4_model(block_size: int = 64, group: int = 32, symmetric: bool = True, **kw) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(get_preset("tiny-llama", block_size=block_size, vocab_size=97, **kw)).eval().requires_grad_(False)
    if kw:  # weights of a trained model's scale, so that a wrong product shows
        for p in model.parameters():
            p.mul_(3.0)
    quantize_model(model, QuantConfig(bits=4, group_size=group, symmetric=symmetric, embedding=False))
    return model


@vnni
def test_an_int4_model_prefills_through_the_c_step_and_decodes_without_trials(monkeypatch):
    """Every product of the blocks is lmf_int4: short prompts prefill through the C step (the decoder is not called)
    with the logits and cache a decoding step would give, and the C step is kept from the first step without timed
    trials of the PyTorch step (which would build PyTorch's packed copy of every weight)."""
    monkeypatch.delenv("LMFORGE_NATIVE", raising=False)
    model = _int4_model()
    prompts = {0: [5, 6, 7, 8, 9], 2: [3, 4]}
    runner = SlotRunner(model, 4, 64)
    calls, orig = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **k: calls.append(1) or orig(*a, **k))
    got = runner.prefill_many(list(prompts), list(prompts.values()))
    assert calls == [] and 8 in runner._native and runner.lens[:3] == [5, 0, 2]
    stepwise = SlotRunner(model, 4, 64)  # the same prompts one token per decoding step (slot 2 in the last two)
    for i in range(5):  # (a row per given slot)
        want = stepwise.decode([prompts[0][i], None, prompts[2][i - 3] if i >= 3 else None, None])
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    for slot, ids in prompts.items():
        assert torch.allclose(runner.k[:, slot, :, : len(ids)], stepwise.k[:, slot, :, : len(ids)], atol=1e-6)
    plans = dict(runner._path)
    assert plans and all(p == (True, torch.get_num_threads()) for p in plans.values())
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod is not model.lm_head:
            assert not mod._kernel  # no PyTorch kernel layout built


@vnni
@pytest.mark.parametrize("shape", [{}, dict(head_dim=12, group=64, symmetric=False)])
def test_int4_model_decoding_equals_its_float_weights(shape, monkeypatch):
    """Decoding an int4 model (the C step, lmf_int4) gives the logits of its dequantized float32 weights (a copy's
    forward with ``compute="dequant"``) to 1e-4 of their scale. Second shape: the attention output (4 heads of 12) is
    narrower than the embedding (64) but both are padded to one group of 64, with zero points: the padding columns of
    each product's input must stay zero (stale ones gave 40% errors). Its weights are three times larger, and so is
    the activations' rounding: 1e-3."""
    monkeypatch.setenv("LMFORGE_NATIVE", "1")
    model = _int4_model(**shape)
    reference = copy.deepcopy(model)
    for mod in reference.modules():
        if isinstance(mod, QuantLinear):
            mod.compute = "dequant"
    runner = SlotRunner(model, 4, 64)
    seqs = {0: [5, 6, 7, 8, 9, 10, 11], 1: [3], 3: [40, 41, 42, 43]}
    for _, got, want in decode_against_full_forward(runner, reference, seqs, 5):
        assert (got - want).abs().max().item() <= (1e-3 if shape else 1e-4) * want.abs().max().item()
    assert "_lmforge_int4" in model.blocks[0].mlp.fc1.__dict__


def _parallel(on: bool) -> None:
    ctypes.c_int.in_dll(LIB, "lmf_parallel_ok").value = int(on)


def _runs() -> int:
    """Calls so far that shared their work among threads."""
    return ctypes.c_long.in_dll(LIB, "lmf_parallel_runs").value


@pytest.fixture
def two_threads():
    before, flag = torch.get_num_threads(), ctypes.c_int.in_dll(LIB, "lmf_parallel_ok").value
    if not LIB.lmf_openmp() or not flag:
        pytest.skip("this build keeps its work on the calling thread (no single OpenMP runtime)")
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
    _parallel(bool(flag))


def _compiler_has_openmp(tmp_path) -> bool:
    src = tmp_path / "omp.c"
    src.write_text("#include <omp.h>\nint f(void) { return omp_get_max_threads(); }\n")
    cc = clib._compiler()
    return cc is not None and subprocess.run([cc, "-fopenmp", "-shared", "-fPIC", "-o", str(tmp_path / "omp.so"),
                                              str(src)], capture_output=True).returncode == 0


def test_the_library_shares_pytorchs_openmp_runtime(tmp_path):
    """Where the compiler has OpenMP the library is built with it, and calls the libgomp PyTorch's kernels use (one
    pool of threads), whatever other runtimes other packages bring (scikit-learn's own libgomp here); a runtime of
    its own would keep the work on its calling thread."""
    if not LIB.lmf_openmp():
        assert not _compiler_has_openmp(tmp_path), "native.c did not build with -fopenmp here"
        pytest.skip("no OpenMP in this compiler")
    assert clib.shares_torch_openmp(LIB) and ctypes.c_int.in_dll(LIB, "lmf_parallel_ok").value == 1

    class Other:
        def lmf_openmp(self):
            return LIB.lmf_openmp() + 16  # another runtime's function
    assert not clib.shares_torch_openmp(Other())


def test_whether_to_share_work_is_decided_again_when_pytorch_comes():
    """The library loaded in a process without PyTorch uses its own pool; importing ``lmforge.infer.native`` (which
    imports PyTorch) decides again: here, as if PyTorch's pool were another runtime, the C code keeps to its
    calling thread."""
    code = ("import ctypes, sys\nfrom lmforge.infer import clib\nlib = clib.library()\n"
            "assert lib is not None and 'torch' not in sys.modules\n"
            "before = ctypes.c_int.in_dll(lib, 'lmf_parallel_ok').value\n"
            "clib.shares_torch_openmp = lambda lib: False\nimport lmforge.infer.native\n"
            "print(before, ctypes.c_int.in_dll(lib, 'lmf_parallel_ok').value)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.split() == [str(int(bool(LIB.lmf_openmp()))), "0"]


def test_whole_step_shares_its_rows_among_threads(two_threads, monkeypatch):
    """A small model's whole step (one lmf_step call) of several rows is shared among the threads, each taking its
    rows through every layer (one parallel region a step; attention alone is below ATTN_PARALLEL_WORK here, so one
    thread computed it all before): a prefill of several prompts (a prompt's rows stay in one thread, in order) and
    16 decoding rows at different positions give the same logits and cache bit for bit as one thread, equal to full
    forwards. One row stays on the calling thread."""
    monkeypatch.setenv("LMFORGE_NATIVE", "1")
    torch.manual_seed(0)
    model = Decoder(get_preset("tiny-llama", block_size=128, vocab_size=97, n_embd=64, n_head=4, n_kv_head=2,
                               intermediate_size=128)).eval().requires_grad_(False)
    prompts = {s: [(s + 3 * i + 1) % 97 for i in range(3 + 2 * s)] for s in range(16)}
    out = {}
    for on in (False, True):
        _parallel(on)
        runner = SlotRunner(model, 16, 128)
        first = runner.prefill_many(list(prompts), list(prompts.values()))
        assert runner._native_step(16).whole
        before = _runs()
        steps = [runner.decode([(s + i) % 97 for s in range(16)]) for i in range(3)]
        assert _runs() - before == (3 if on else 0)  # one region a step, none inside it
        before = _runs()
        runner.decode([5])
        assert _runs() == before
        out[on] = (first, *steps, runner.k[:, :16].clone(), runner.v[:, :16].clone())
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))
    for s in (0, 7, 15):
        ids = prompts[s] + [(s + i) % 97 for i in range(3)]
        with torch.no_grad():
            want = model(torch.tensor([ids]))[0, -1]
        assert torch.allclose(out[True][3][s], want, atol=5e-5, rtol=1e-5)


def test_attention_shared_among_threads_computes_what_one_thread_does(two_threads, monkeypatch):
    """Attention of many rows over long contexts (above ATTN_PARALLEL_WORK) runs on two threads: a prefill of several
    prompts through the C step (every row's key and value written first, then the rows attend in halves of the work,
    here cut inside the second prompt) and decoding rows at 400 keys give the same logits and cache bit for bit as one
    thread, equal to full forwards."""
    monkeypatch.setenv("LMFORGE_NATIVE", "1")
    monkeypatch.setattr(native, "SMALL_PRODUCTS", 0)  # products between the C calls: attention is its own call
    torch.manual_seed(0)
    model = Decoder(get_preset("tiny-llama", block_size=512, vocab_size=97, n_embd=128, n_head=2, n_kv_head=1,
                               intermediate_size=160)).eval().requires_grad_(False)
    short = {0: [(7 * i) % 97 for i in range(100)], 1: [(5 * i) % 97 for i in range(90)],
             3: [(3 * i) % 97 for i in range(40)]}
    long = {s: [(s + 3 * i) % 97 for i in range(400)] for s in range(4)}  # the decoder's prefill (> 256 rows)
    out = {}
    for on in (False, True):
        _parallel(on)
        runner = SlotRunner(model, 4, 512)
        before = _runs()
        first = runner.prefill_many(list(short), list(short.values()))
        assert (_runs() - before == model.cfg.n_layer) == on and 256 in runner._native  # 230 rows, padded
        k, v = runner.k[:, :4].clone(), runner.v[:, :4].clone()
        runner.prefill_many(list(long), list(long.values()))
        before = _runs()
        steps = [runner.decode([(i + 1) % 97, 2, 5, 3]) for i in range(3)]
        assert (_runs() - before >= model.cfg.n_layer) == on  # (steps also try one thread: a plan's trials)
        out[on] = (first, k, v, *steps, runner.k[:, :4].clone(), runner.v[:, :4].clone())
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))
    for ids, got in zip(short.values(), out[True][0]):
        with torch.no_grad():
            want = model(torch.tensor([ids]))[0, -1]
        assert torch.allclose(got, want, atol=5e-5, rtol=1e-5)
    with torch.no_grad():
        want = model(torch.tensor([long[2] + [5, 5, 5]]))[0, -1]
    assert torch.allclose(out[True][-3][2], want, atol=5e-5, rtol=1e-5)


@vnni
@pytest.mark.parametrize("rows", [1, 3, 13, 16])
def test_int4_products_shared_among_threads_compute_what_one_thread_does(two_threads, rows):
    """Outputs and the rows' quantized activations (each thread quantizes a part of the rows, before any output is
    computed) shared among the threads: the same products bit for bit as one thread."""
    torch.manual_seed(0)
    mod = QuantLinear.from_linear(torch.nn.Linear(256, 512), 4, 32)
    x = torch.randn(rows, 256) * torch.rand(rows, 1) * 3
    got = {}
    for on in (False, True):
        _parallel(on)
        before = _runs()
        got[on] = native.int4(mod, rows)(x).clone()
        assert _runs() - before == on
    assert torch.equal(got[False], got[True])


@pytest.mark.parametrize("rows", [1, 3, 13])
def test_int8_head_shared_among_threads_computes_what_one_thread_does(two_threads, rows):
    """lmf_head_vnni of several rows on two threads (each quantizing a part of the rows first): the same approximate
    logits bit for bit as one thread."""
    torch.manual_seed(0)
    N, K = 6000, 64
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales, bias = torch.rand(N) / 50, torch.randn(N)
    qi = q.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous()
    qsum = (q.view(N // 16, 16, K // 32, 32).sum(-1, dtype=torch.int32) * 128).permute(0, 2, 1).contiguous()
    x = torch.randn(rows, K) * torch.rand(rows, 1) * 3
    xq, xs = torch.zeros(rows * K, dtype=torch.uint8), torch.zeros(rows * K // 32)
    got = {}
    for on in (False, True):
        _parallel(on)
        out = torch.zeros(rows, N)
        args = clib._VnniArgs(n=rows, N=N, K=K, qi=qi.data_ptr(), qsum=qsum.data_ptr(), scales=scales.data_ptr(),
                              bias=bias.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), xq=xq.data_ptr(),
                              xs=xs.data_ptr())
        before = _runs()
        LIB.lmf_head_vnni(ctypes.byref(args))
        assert _runs() - before == on
        got[on] = out
    assert torch.equal(got[False], got[True])


def test_top_candidates_of_many_rows_recomputed_on_several_threads(two_threads):
    """lmf_head_refine (after lmf_head_vnni) shares its rows among the threads: the same logits bit for bit as one
    thread; each row's REFINE candidates are its largest approximate logits, recomputed from the int8 rows exactly."""
    torch.manual_seed(0)
    n, N, K, k = 13, 6000, 64, 24  # (rows x vocabulary above INT4_PARALLEL_WORK: shared)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales, bias, x = torch.rand(N) / 50, torch.randn(N), torch.randn(n, K)
    approx = torch.randn(n, N) * 3
    approx[2, 500:520] = 20.0  # ties at the top
    idx = torch.zeros(k, dtype=torch.int32)
    got = {}
    for on in (False, True):
        _parallel(on)
        out = approx.clone()
        args = clib._HeadArgs(n=n, N=N, K=K, k=k, y_stride=N, q=q.data_ptr(), scales=scales.data_ptr(),
                              bias=bias.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), idx=idx.data_ptr())
        before = _runs()
        LIB.lmf_head_refine(ctypes.byref(args), None)
        assert _runs() - before == on
        got[on] = out
    assert torch.equal(got[False], got[True])
    exact = (x.double() @ (q.double() * scales.double()[:, None]).t() + bias.double()).float()
    for r in range(n):
        changed = (got[True][r] != approx[r]).nonzero().flatten()
        top = approx[r].topk(k).indices
        assert set(changed.tolist()) <= set(top.tolist()) and len(changed) >= k - 1
        assert torch.allclose(got[True][r, top], exact[r, top], rtol=1e-5, atol=1e-5)


def _attention(y: torch.Tensor, pos: list[int], slot: list[int], nh: int, nkv: int, hd: int, M: int, k, v,
               half: bool) -> torch.Tensor:
    """lmf_attention of the rows y (n, (nh + 2 nkv) hd) at pos/slot over the cache k, v (no rotation, no bias)."""
    n = len(pos)
    out = torch.zeros(n, nh * hd)
    floats = (nh + 2 * nkv) * hd + nh // nkv * (M + hd) + (2 * M * hd if half else 0)
    tmp = torch.zeros(floats)
    p, s = torch.tensor(pos, dtype=torch.int32), torch.tensor(slot, dtype=torch.int32)
    a = clib._AttnArgs(n=n, nh=nh, nkv=nkv, hd=hd, rd=0, interleaved=0, max_len=M, y_bf=0, out_bf=0,
                       y_stride=y.shape[1], out_stride=nh * hd, scale=hd ** -0.5, pos=p.data_ptr(), slot=s.data_ptr(),
                       cos=None, sin=None, bias=None, k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
                       tmp=tmp.data_ptr(), kv_half=int(half))
    LIB.lmf_attention(ctypes.byref(a), ctypes.c_void_p(y.data_ptr()))
    return out


@pytest.mark.parametrize("hd", [64, 8])
def test_a_float16_cache_keeps_rounded_keys_and_attends_as_float32_over_them(two_threads, hd):
    """``kv_half``: each key and value is written to the cache rounded to float16 (as NumPy rounds: nearest, ties to
    even; subnormals kept; beyond float16's range clamped to +-65504), and attention over it equals attention over a
    float32 cache holding the same rounded values bit for bit: one prompt's rows (attending over a float32 copy of
    its slot's keys), two prompts' rows together (rows of one slot cut between the threads), then a decoding step of
    three slots, on one thread and on two (the same), for heads of 64 (read by attend) and of 8 channels (converted
    first)."""
    if not LIB.lmf_kv_half_ok():
        pytest.skip("no float16 cache here (AVX512F and F16C)")
    torch.manual_seed(0)
    nh, nkv, M = 4, 2, 256
    width = (nh + 2 * nkv) * hd
    calls = [([0] * 120, list(range(120))), ([1] * 150 + [2] * 3, list(range(150)) + [0, 1, 2]),
             ([0, 1, 2], [120, 150, 3])]
    ys = [torch.randn(len(pos), width) * 2 for _, pos in calls]
    ys[0][:3, nh * hd] = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 3e-6])  # ties to even; a subnormal
    ys[0][3:5, nh * hd + 1] = torch.tensor([1e5, -1e6])  # beyond float16: clamped, not infinite
    results = {}
    for on in (False, True):
        _parallel(on)
        for half in (False, True):
            dtype = torch.float16 if half else torch.float32
            k, v = torch.zeros(3, nkv, M, hd, dtype=dtype), torch.zeros(3, nkv, M, hd, dtype=dtype)
            outs = []
            for y, (slot, pos) in zip(ys, calls):
                y = y.clone()
                if not half:  # the float32 cache gets the values the float16 one keeps
                    y[:, nh * hd:] = y[:, nh * hd:].clamp(-65504, 65504).half().float()
                before = _runs()
                outs.append(_attention(y, pos, slot, nh, nkv, hd, M, k, v, half))
                assert (_runs() - before == 1) == (on and len(pos) > 3)
            results[on, half] = (*outs, k.float(), v.float())
    assert all(torch.equal(a, b) for a, b in zip(results[False, True], results[True, True]))
    assert all(torch.equal(a, b) for a, b in zip(results[True, False], results[True, True]))
    k16 = results[True, True][-2]
    for y, (slots, pos) in zip(ys, calls):
        for r, (s, t) in enumerate(zip(slots, pos)):
            g = y[r, nh * hd:(nh + nkv) * hd].clamp(-65504, 65504).numpy().astype(np.float16).astype(np.float32)
            assert torch.equal(k16[s, :, t].reshape(-1), torch.from_numpy(g)), (s, t)
    assert k16[0, 0, 0, 0] == 1.0 and k16[0, 0, 1, 0] == 1 + 4 * 2.0 ** -11 and 0 < k16[0, 0, 2, 0] < 2.0 ** -14
    assert k16[0, 0, 3, 1] == 65504 and k16[0, 0, 4, 1] == -65504 and results[True, True][0].isfinite().all()


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (4, 2, 32), (8, 4, 8)])
def test_a_lone_row_over_a_long_context_shares_its_heads_among_threads(two_threads, half, nh, nkv, hd):
    """A lone decoding row (fewer rows than threads) over a long context shares its kv heads among the threads
    (heads_shared), each head whole on one thread: the same output and cache bit for bit as one thread, equal to
    softmax attention in float64; a short context stays on the calling thread."""
    if half and not LIB.lmf_kv_half_ok():
        pytest.skip("no float16 cache here (AVX512F and F16C)")
    torch.manual_seed(0)
    M, width = 1024, (nh + 2 * nkv) * hd
    dtype = torch.float16 if half else torch.float32
    cache = torch.randn(2, 2, nkv, M, hd).to(dtype)  # keys and values of 2 slots
    results = {}
    for on in (False, True):
        _parallel(on)
        k, v = cache[0].clone(), cache[1].clone()
        outs = []
        for t, slot, shared in ((900, 1, True), (5, 0, False)):
            y = torch.randn(1, width, generator=torch.Generator().manual_seed(t))
            before = _runs()
            outs.append(_attention(y, [t], [slot], nh, nkv, hd, M, k, v, half))
            assert _runs() - before == (on and shared), t
        results[on] = (*outs, k, v, y)
    assert all(torch.equal(a, b) for a, b in zip(results[False][:4], results[True][:4]))
    out, k, v = results[True][0], results[True][2].double(), results[True][3].double()
    y = torch.randn(1, width, generator=torch.Generator().manual_seed(900)).double()
    q = y[0, : nh * hd].view(nkv, nh // nkv, hd)
    assert torch.equal(k[1, :, 900], y[0, nh * hd:(nh + nkv) * hd].to(dtype).double().view(nkv, hd))
    w = torch.softmax(torch.einsum("grd,gtd->grt", q, k[1, :, :901]) * hd ** -0.5, -1)
    want = torch.einsum("grt,gtd->grd", w, v[1, :, :901]).reshape(-1)
    assert torch.allclose(out[0].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hd", [8, 64])
def test_attention_weights_below_e_to_the_minus_64_of_the_top_are_zero(hd):
    """Softmax weights of keys scoring more than 64 below the top key are exactly 0 (EXP_FLOOR): next to the top's
    weight they are nothing in float32, and they (or their products with values) would be subnormal floats, on which
    every multiply takes a microcode assist (stories260K's attention took 5x as long). Keys 70 below the top with
    values of 1e30 add nothing (the exact softmax would add 0.4 from each); keys 20 below with values of 1e8 do count.
    Heads of 8 (attend8) and of 64 channels, blocks of 16 keys and the rest."""
    torch.manual_seed(0)
    nh, nkv, M, t = 2, 1, 64, 40
    k, v = torch.zeros(1, nkv, M, hd), torch.randn(1, nkv, M, hd)
    gap = torch.full((t + 1,), -5.0)
    gap[0], gap[3:30:4], gap[5:40:9] = 0.0, -70.0, -20.0
    v[0, 0, : t + 1][gap == -70.0] = 1e30
    v[0, 0, : t + 1][gap == -20.0] = 1e8
    y = torch.zeros(1, (nh + 2 * nkv) * hd)
    y[0, 0] = y[0, hd] = hd ** 0.5  # both query heads: score of key j = its first channel (scale hd^-0.5)
    k[0, 0, :t, 0] = gap[:t]
    y[0, nh * hd], y[0, (nh + nkv) * hd:] = gap[t], v[0, 0, t]  # the row's own key and value, written by the call
    out = _attention(y, [t], [0], nh, nkv, hd, M, k, v, half=False).view(nh, hd).double()
    w = torch.exp(gap.double())
    vals = v[0, 0, : t + 1].double()
    kept = torch.where(gap < -64, 0.0, w)
    want = (kept / kept.sum()) @ vals
    assert torch.allclose(out, want.expand(nh, hd), rtol=1e-5, atol=1e-5)
    exact = (w / w.sum()) @ vals
    assert ((exact - want).abs() > 1).all()  # (the floor is what makes the difference here)


@pytest.mark.parametrize("act,kind", [(0, 1), (2, 2)])
def test_norms_and_activations_of_many_rows_shared_among_threads(two_threads, act, kind):
    """lmf_add_norm (residual + bias added, then RMSNorm or LayerNorm) and lmf_activation (gated SiLU, GELU) of 16
    rows share their rows among the threads: the same outputs and residual stream bit for bit as one thread, equal
    to the formulas; 2 rows stay on the calling thread."""
    torch.manual_seed(0)
    d, f, eps = 576, 1536, 1e-5
    w, b, yb = torch.randn(d), torch.randn(d), torch.randn(d)
    x0, y = torch.randn(16, d), torch.randn(16, 640)  # y: 640 columns a row, d of them used
    up, ab = torch.randn(16, 2 * f + 16), torch.randn(2 * f)
    got = {}
    for n, on in ((16, False), (16, True), (2, True)):
        _parallel(on)
        x, out, tmp = x0.clone(), torch.zeros(16, d), torch.zeros(d)
        na = clib._NormArgs(n=n, d=d, kind=kind, y_bf=0, out_bf=0, y_stride=640, out_stride=d, eps=eps,
                            x=x.data_ptr(), y_bias=yb.data_ptr(), w=w.data_ptr(), b=b.data_ptr() if kind == 2 else None,
                            out=out.data_ptr(), tmp=tmp.data_ptr())
        h, t2 = torch.zeros(16, f), torch.zeros(2 * f)
        aa = clib._ActArgs(n=n, f=f, gated=1, act=act, y_bf=0, out_bf=0, y_stride=2 * f + 16, out_stride=f,
                           bias=ab.data_ptr(), out=h.data_ptr(), tmp=t2.data_ptr())
        runs = ctypes.c_long.in_dll(LIB, "lmf_rows_runs")
        before = runs.value
        LIB.lmf_add_norm(ctypes.byref(na), ctypes.c_void_p(y.data_ptr()))
        LIB.lmf_activation(ctypes.byref(aa), ctypes.c_void_p(up.data_ptr()))
        assert runs.value - before == (2 if on and n == 16 else 0)
        got[n, on] = (x[:n], out[:n], h[:n])
    assert all(torch.equal(a, c) for a, c in zip(got[16, False], got[16, True]))
    assert all(torch.equal(a, c[:2]) for a, c in zip(got[2, True], got[16, True]))
    x, out, h = got[16, True]
    res = x0 + y[:, :d] + yb
    norm = F.rms_norm(res, (d,), w, eps) if kind == 1 else F.layer_norm(res, (d,), w, b, eps)
    z = up[:, : 2 * f] + ab
    gate = F.silu(z[:, :f]) if act == 0 else F.gelu(z[:, :f], approximate="tanh")
    assert torch.allclose(x, res, atol=1e-6) and torch.allclose(out, norm, atol=1e-4, rtol=1e-4)
    assert torch.allclose(h, gate * z[:, f:], atol=1e-4, rtol=1e-4)


@vnni
@pytest.mark.parametrize("symmetric", [False, True])
def test_float16_scales_and_zeros_give_the_same_products(symmetric):
    """Scales and zeros that are all float16 values (a GGUF's Q4_1 weights) are laid out as float16, half the bytes,
    and the products equal those from the float32 layout bit for bit, at 1, 9 and 16 rows (VNNI and, where present,
    AMX tiles); one value that is not a float16 keeps the layer float32."""
    torch.manual_seed(0)
    mod = QuantLinear.from_linear(torch.nn.Linear(576, 200, bias=False), 4, 32, symmetric=symmetric)
    with torch.no_grad():
        mod.scales.copy_(mod.scales.half().float())
        if mod.zeros is not None:
            mod.zeros.copy_(mod.zeros.half().float())
    w, s, z, half = native._int4_layout(mod)
    assert half and s.dtype == torch.float16 and (z is None or z.dtype == torch.float16)
    x = torch.randn(16, 576)
    want = _reference(mod, x)
    for rows in (1, 9, 16):
        got = native.int4(mod, rows)(x[:rows].contiguous())[:, :200].clone()
        out, xq, xs = native.int4_buffers(rows, w.shape[0] * 16, 576)
        s32, z32 = s.float(), None if z is None else z.float()  # the float32 layout of the same values
        args = clib._Int4Args(n=rows, N=w.shape[0] * 16, K=576, G=32, x_stride=576, out_stride=w.shape[0] * 16,
                              w=w.data_ptr(), scales=s32.data_ptr(), zeros=native._addr(z32), x=x.data_ptr(),
                              out=out.data_ptr(), xq=xq.data_ptr(), xs=xs.data_ptr(), half=0)
        LIB.lmf_int4(ctypes.byref(args))
        assert torch.equal(got, out[: rows * w.shape[0] * 16].view(rows, -1)[:, :200])
        assert torch.allclose(got.double(), want[:rows], rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with torch.no_grad():
        mod.scales[3, 2] += 1e-6  # not a float16 value: the layer stays float32
    assert native._int4_layout(mod)[3] is False
