"""Float32 products on the CPU through the faster of PyTorch's two libraries for them.

PyTorch's CPU wheel multiplies float32 matrices with MKL, and MKL runs its AVX-512 kernels only on Intel processors:
on other x86 processors (AMD's) it takes a slower path. oneDNN, which PyTorch also carries, does not: on a 2-core
AVX-512 EPYC a (1024 x 576) x (576 x 1536) product runs at 160-190 GFLOP/s through MKL and 410-445 through oneDNN,
near the cores' peak (``python benchmarks/bench_matmul.py``). Both compute in IEEE float32; only the order of the
sums differs.

``linear(x, w, b)`` is ``F.linear`` and ``matmul(a, b)`` is ``a @ b`` (2-D), through oneDNN where it is chosen, with
their gradients through it too; ``call(module, x)`` runs a plain ``nn.Linear`` (no hooks) that way and any other
module as it is. The choice: ``LMFORGE_FP32_GEMM=onednn|mkl``, else oneDNN on x86 processors that are not Intel's.
Products under ``MIN_MACS`` multiply-adds keep ``F.linear`` (oneDNN's fixed cost is ~12 us a call), as do other
dtypes and devices, autocast, ``torch.compile`` and tensor subclasses.

``packed_weights_in(model)``: within it, inference products (no gradients) of ``model``'s plain linear layers read a
copy of each weight in oneDNN's blocked layout, made once on entry, instead of oneDNN reordering the weight at every
call (here 1.06-1.12x at 1,024 rows, 1.09-1.24x at 256, 1.3-2.1x at 16-64 on SmolLM2's shapes:
``benchmarks/bench_matmul.py``; the evaluation scorer runs in it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

MIN_MACS = 1 << 20
_ENV = "LMFORGE_FP32_GEMM"
_PACKED = "_lmf_packed"  # attribute of an nn.Linear within packed_weights_in: (weight, its _version, packed copy)


def _cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... ('' where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() if platform.system() == "Windows" else ""


@functools.cache
def onednn_chosen() -> bool:
    """Whether float32 CPU products go through oneDNN in this process (decided once; see the module doc)."""
    want = os.environ.get(_ENV, "").strip().lower()
    if want not in ("", "auto", "onednn", "mkl"):
        raise ValueError(f"{_ENV}={want!r}: expected onednn, mkl or auto")
    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if want == "mkl" or not usable:
        return False
    if want == "onednn":
        return True
    x86 = platform.machine().lower() in ("x86_64", "amd64", "x64")
    vendor = _cpu_vendor()
    return x86 and bool(vendor) and "Intel" not in vendor


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if w.layout == torch.strided and not _dense(w):  # rows at another stride (a slice of a wider matrix): oneDNN's
        # reference kernel, ~400x slower (a packed weight of packed_weights_in is laid out by oneDNN itself)
        w = w.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _dense(w: torch.Tensor) -> bool:
    """Whether a 2-D weight is stored row-major or as the transpose of a row-major matrix, with no gaps."""
    (n, k), (s0, s1) = w.shape, w.stride()
    return (s1 == 1 and (s0 == k or n == 1)) or (s0 == 1 and (s1 == n or k == 1))


class _Linear(torch.autograd.Function):
    """``F.linear`` with the forward and both gradient products through oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn(g, w.t(), None)  # g @ w
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[1]:
                gw = _onednn(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # g2.T @ x2
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g2.sum(0)
        return gx, gw, gb


def _eligible(x: torch.Tensor, w: torch.Tensor, macs: int) -> bool:
    return (macs >= MIN_MACS and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.device.type == "cpu" and w.device.type == "cpu" and x.layout == torch.strided
            and type(x) in (torch.Tensor, nn.Parameter) and type(w) in (torch.Tensor, nn.Parameter)
            and onednn_chosen() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where chosen (see the module doc)."""
    if not _eligible(x, weight, x.numel() * weight.shape[0]) or (
            bias is not None and (bias.dtype != torch.float32 or type(bias) not in (torch.Tensor, nn.Parameter))):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Linear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N), either may be a transposed view."""
    return linear(a, b.t())


def _hooked(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


def call(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``; a plain ``nn.Linear`` without hooks runs through ``linear`` (or its packed weight, within
    ``packed_weights_in`` and without gradients)."""
    if type(mod) is nn.Linear and not _hooked(mod):
        w = mod.weight
        packed = mod.__dict__.get(_PACKED)
        if (packed is not None and packed[0] is w and packed[1] == w._version and not torch.is_grad_enabled()
                and _eligible(x, w, x.numel() * w.shape[0])):
            return _onednn(x, packed[2], mod.bias)
        return linear(x, w, mod.bias)
    return mod(x)


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@contextlib.contextmanager
def packed_weights_in(model: nn.Module, budget: int | None = None) -> Iterator[None]:
    """Within: inference products of ``model``'s plain float32 CPU ``nn.Linear`` layers (through ``call``, without
    gradients, where oneDNN is chosen) read a copy of the weight in oneDNN's blocked layout. The copies take the
    weights' memory again: layers are packed, largest first, while they fit ``budget`` bytes (default: a quarter of
    the available memory; where it cannot be read, none). A weight changed within is used as it is (its version is
    checked at each call). Nested within another, it leaves the layers the outer one packed as they are."""
    if budget is None:
        budget = _available_bytes() // 4
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
              and m.weight.device.type == "cpu" and m.weight.layout == torch.strided
              and (m.bias is None or m.bias.dtype == torch.float32)]
    if not onednn_chosen() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        layers = []
    copies: dict[int, torch.Tensor] = {}  # a weight shared by several layers (tied output layer) is packed once
    packed = []
    for m in sorted(layers, key=lambda m: -m.weight.numel()):
        if _PACKED in m.__dict__:  # packed by an enclosing packed_weights_in: left to it
            continue
        w = m.weight
        if id(w) not in copies:
            size = w.numel() * w.element_size()
            if size > budget:
                continue
            with torch.no_grad():
                copies[id(w)] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            budget -= size
        m.__dict__[_PACKED] = (w, w._version, copies[id(w)])
        packed.append(m)
    try:
        yield
    finally:
        for m in packed:
            m.__dict__.pop(_PACKED, None)
