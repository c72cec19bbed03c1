"""The int4 and int8-head products on AMX tiles (``lmf_int4`` and ``lmf_head_vnni`` from AMX_MIN_ROWS rows): the
same numbers as the AVX512-VNNI kernels, bit for bit, at every row count (16-row tiles, remainders, prefill chunks),
with and without zero points, for groups of 32 to 128 and odd and even block counts; and the kernels' own formula."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_native_int4 import _reference

from lmforge.infer import native
from lmforge.infer.clib import _VnniArgs
from lmforge.quant import QuantLinear

LIB = native.library()
AMX = None if LIB is None else ctypes.c_int.in_dll(LIB, "lmf_amx")
pytestmark = pytest.mark.skipif(AMX is None or not AMX.value,
                                reason="no AMX tiles here (CPU, OS or LMFORGE_AMX=0): the VNNI kernels serve every row")


def _both(run):
    """run() with the tiles, then on AVX512-VNNI alone (the flag restored after)."""
    try:
        got = run().clone()
        AMX.value = 0
        return got, run().clone()
    finally:
        AMX.value = 1


@pytest.mark.parametrize("n_out,k,group,symmetric", [(200, 576, 32, False), (96, 1536, 64, True),
                                                     (48, 320, 128, False), (576, 1536, 32, False)])
def test_int4_products_on_tiles_equal_the_vnni_kernel_bit_for_bit(n_out, k, group, symmetric):
    torch.manual_seed(0)
    mod = QuantLinear.from_linear(torch.nn.Linear(k, n_out, bias=False), 4, group, symmetric=symmetric)
    kp = mod.qweight.shape[1] * 2
    x = torch.randn(64, k) * torch.rand(64, 1) * 3
    x[5, : min(k, 64)] = 0  # blocks of zeros: scale 0
    xp = F.pad(x, (0, kp - k)).contiguous()
    want = _reference(mod, xp)
    for rows in (5, 7, 8, 9, 16, 17, 21, 40, 64):
        tiles, vnni = _both(lambda rows=rows: native.int4(mod, rows)(xp[:rows].contiguous())[:, :n_out])
        assert torch.equal(tiles, vnni), rows
        assert torch.allclose(tiles.double(), want[:rows], rtol=1e-5, atol=1e-5 * want.abs().max().item())
    one = native.int4(mod, 1)(xp[:1].contiguous())[:, :n_out]  # one row (VNNI) is row 0 of any tile
    assert torch.equal(one, tiles[:1])


@pytest.mark.parametrize("rows,K", [(5, 576), (8, 576), (16, 576), (19, 320), (64, 96)])
def test_int8_head_on_tiles_equals_the_vnni_kernel_bit_for_bit(rows, K):
    """lmf_head_vnni's approximate logits (int8 weight, activations int8 per group of 32 shifted to unsigned) through
    the tiles and through VNNI; both against the formula in float64."""
    torch.manual_seed(0)
    N = 320
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales, bias = torch.rand(N) / 50, torch.randn(N)
    qi = q.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous()
    qsum = (q.view(N // 16, 16, K // 32, 32).sum(-1, dtype=torch.int32) * 128).permute(0, 2, 1).contiguous()
    x = torch.randn(rows, K) * 2
    x[1, :32] = 0
    out = torch.zeros(rows, N)
    xq, xs = torch.zeros(rows * K, dtype=torch.uint8), torch.zeros(rows * K // 32)
    args = _VnniArgs(n=rows, N=N, K=K, qi=qi.data_ptr(), qsum=qsum.data_ptr(), scales=scales.data_ptr(),
                     bias=bias.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), xq=xq.data_ptr(), xs=xs.data_ptr())

    def run():
        out.zero_()
        LIB.lmf_head_vnni(ctypes.byref(args))
        return out

    tiles, vnni = _both(run)
    assert torch.equal(tiles, vnni)
    xb = x.double().view(rows, K // 32, 32)  # the formula: x ~ s round(x / s), s = max|x| / 127 per group
    s = xb.abs().amax(-1, keepdim=True) / 127
    xr = torch.where(s > 0, torch.round(xb / torch.where(s > 0, s, 1)), 0) * s
    want = xr.view(rows, K) @ q.double().t() * scales.double() + bias.double()
    assert torch.allclose(tiles.double(), want, rtol=1e-5, atol=1e-4)


def test_tiles_taken_in_turn_with_pytorchs_bfloat16_products():
    """PyTorch's oneDNN runs bfloat16 products on the same tiles and threads and releases them after: the kernels
    configure their tiles for each call and release them too (a configuration kept per thread from the last call met
    released tiles here: SIGILL)."""
    code = """
import torch
from lmforge.infer import native
from lmforge.quant import QuantLinear
torch.manual_seed(0)
mod = QuantLinear.from_linear(torch.nn.Linear(576, 256, bias=False), 4, 32)
x = torch.randn(16, 576)
product = native.int4(mod, 16)
want = product(x).clone()
a, b = torch.randn(256, 512, dtype=torch.bfloat16), torch.randn(512, 256, dtype=torch.bfloat16)
for _ in range(3):
    y = a @ b
    assert torch.equal(product(x), want)
assert torch.allclose(y.float(), a.float() @ b.float(), rtol=0.05, atol=0.5)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
