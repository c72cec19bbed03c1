"""The quantized modules: ``QuantLinear`` (int8 / int4, PyTorch's packed CPU kernels or dequantize + matmul) and
``QuantEmbedding`` (int8 rows); see ``lmforge.quant.packing`` for the formats."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.matmul import linear
from lmforge.memory import release_free_memory
from lmforge.quant.packing import dequantize_int4, dequantize_int8, padded_k, quantize_int4, quantize_int8, unpack_int4

# float32:  PyTorch's packed kernels with float32 activations (matches dequantize + F.linear to ~1e-6);
# bfloat16: the same kernels with bfloat16 activations and output (fast on AVX512 CPUs, ~3e-3 relative error);
# dequant:  dequantize the weight on each call, then F.linear (int8: scale after the matmul);
# auto:     for up to DECODE_ROWS rows (decoding, batched or not) the fastest of the modes, timed once per layer shape
#           and power-of-two row count (float32 only at 1-2 rows, where it can win); dequant for more rows (prefill,
#           scoring: exact); dequant off the CPU. On AVX512 CPUs that is the bfloat16 kernel almost everywhere.
COMPUTE_MODES = ("auto", "float32", "bfloat16", "dequant")
DECODE_ROWS = 64
# An output projection (``refine_top`` set) recomputes its REFINE_TOP largest outputs per row exactly after a
# bfloat16 kernel: that kernel rounds its output to bfloat16 (logits near 25 to steps of 0.125), which ties and swaps
# the top candidates of greedy decoding; the tail of the distribution keeps the fast values. (REFINE_TOP lives with
# the C helpers, which a process without PyTorch also uses.)
_DECODE_MODE: dict[tuple, str] = {}  # (bits, N, K, group, rows) -> the fastest mode, measured
# The packed kernels as plain functions: called through ``torch.ops.aten`` each call costs ~1 us more (overload
# resolution), and decoding SmolLM2 calls them 121 times a token.
_INT4_MM = getattr(torch, "_weight_int4pack_mm_for_cpu", None) or torch.ops.aten._weight_int4pack_mm_for_cpu
_INT8_MM = getattr(torch, "_weight_int8pack_mm", None) or torch.ops.aten._weight_int8pack_mm

class FrozenWeightGrad(torch.autograd.Function):
    """y = mod(x) for a frozen quantized layer ``mod`` (with ``dequantize()``), differentiable in x: the backward pass
    dequantizes the weight again instead of keeping a float copy from the forward (QLoRA's memory saving: only the
    4-bit weight lives between forward and backward). The packed CPU kernels have no derivative of their own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: nn.Module) -> torch.Tensor:  # noqa: D102
        ctx.mod = mod
        with torch.no_grad():
            return mod(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return linear(grad, ctx.mod.dequantize().to(grad.dtype).t()), None


def _default_compute() -> str:
    mode = os.environ.get("LMFORGE_QUANT_COMPUTE", "auto")
    if mode not in COMPUTE_MODES:
        raise LMForgeError(f"LMFORGE_QUANT_COMPUTE={mode!r}: allowed values are {list(COMPUTE_MODES)}")
    return mode


class QuantLinear(nn.Module):
    """A drop-in for ``nn.Linear`` holding an int8 or int4 weight (see the module doc for the format)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 symmetric: bool = True, bias: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise LMForgeError(f"bits={bits}: weight-only quantization supports 8 and 4")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.compute = _default_compute()
        n, k = out_features, in_features
        if bits == 8:
            self.group_size = None
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(n, device=device))
            self.zeros = None
        else:
            if group_size is None or group_size <= 0 or group_size % 2:
                raise LMForgeError(f"group_size={group_size}: int4 needs a positive even group size (32/64/128)")
            self.group_size = group_size
            kp = padded_k(k, group_size)
            self.register_buffer("qweight", torch.zeros(n, kp // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(n, kp // group_size, device=device))
            if symmetric:
                self.zeros = None
            else:
                self.register_buffer("zeros", torch.zeros(n, kp // group_size, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(n, device=device))
        else:
            self.bias = None
        self._kernel: dict[Any, Any] | None = None  # see _kernels
        self._decode: dict[int, Any] = {}  # auto mode, float32 CPU input of n rows -> a specialised function
        self.refine_top = 0  # see REFINE_TOP (set on output projections)

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int | None = None,
                    symmetric: bool = True) -> QuantLinear:
        m = cls(lin.in_features, lin.out_features, bits, group_size, symmetric, lin.bias is not None)
        m.set_weight(lin.weight)
        if lin.bias is not None:
            m.bias = lin.bias.detach().float().clone()
        return m.train(lin.training)

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        if self.bits == 8:
            self.qweight, self.scales = quantize_int8(w)
        else:
            self.qweight, self.scales, zeros = quantize_int4(w, self.group_size, self.symmetric)
            if zeros is not None:
                self.zeros = zeros
        self._kernel, self._decode = None, {}

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) this layer computes with."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.in_features)

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" + (f", group_size={self.group_size}" if self.bits == 4 else ", per-channel")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"symmetric={self.symmetric}, bias={self.bias is not None}, compute={self.compute}")

    @property
    def compute(self) -> str:
        """How this layer computes (one of ``COMPUTE_MODES``)."""
        return self._compute

    @compute.setter
    def compute(self, mode: str) -> None:  # the functions made for the old mode (``_decode``) no longer apply
        self._compute, self._decode = mode, {}

    def _apply(self, fn, recurse=True):  # moving or casting the module invalidates the kernel layout
        self._kernel, self._decode = None, {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel, self._decode = None, {}
        return super()._load_from_state_dict(*args, **kwargs)

    # ---- forward ------------------------------------------------------------------------------
    def _mode(self, x: torch.Tensor) -> str:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return "dequant"
        mode = self.compute
        if mode == "auto":
            rows = x.numel() // max(x.shape[-1], 1)
            mode = "dequant" if rows > DECODE_ROWS else self._fastest_mode(1 << max(rows - 1, 0).bit_length())
        if x.dtype == torch.bfloat16 and mode == "float32":
            mode = "bfloat16"
        return mode

    def _fastest_mode(self, rows: int) -> str:
        """The fastest way to compute ``rows`` rows with this layer's shape here, timed once per process. The packed
        kernels with bfloat16 activations (~3e-3 relative error, far below the quantization's own) are several
        times faster than the exact paths on CPUs with AVX512 and can be slower elsewhere: measured, not assumed."""
        key = (self.bits, self.out_features, self.in_features, self.group_size, rows)
        if key not in _DECODE_MODE:
            x = torch.full((rows, self.in_features), 0.01)  # no draw from the global RNG (seeded sampling)
            modes = ("bfloat16", "dequant", "float32") if rows <= 2 else ("bfloat16", "dequant")
            best: dict[str, float] = {}
            try:
                with torch.no_grad():
                    for mode in modes:
                        self._compute = mode
                        self(x)  # builds the kernel's weight layout
                        t = time.perf_counter()
                        self(x)
                        best[mode] = time.perf_counter() - t
                        if best[mode] < 2 * min(best.values()):  # a contender: time it twice more
                            for _ in range(2):
                                t = time.perf_counter()
                                self(x)
                                best[mode] = min(best[mode], time.perf_counter() - t)
            finally:
                self._compute = "auto"
            _DECODE_MODE[key] = min(best, key=best.get)
            if self.bits == 4 and self._kernel is not None and _DECODE_MODE[key] != "float32":
                self._kernel.pop(torch.float32, None)  # timed, not chosen: half the packed weight's size
            release_free_memory()  # the timed calls' temporaries (dequantized slices of the weight)
        return _DECODE_MODE[key]

    def _kernels(self) -> dict[Any, Any]:
        """The weight layouts built for the kernels so far (dropped when the weight changes)."""
        if self._kernel is None:
            self._kernel = {}
        return self._kernel

    def _int8_bf16_kernel(self) -> dict[str, Any]:
        kern = self._kernels()
        if "q" not in kern:
            k_pad = -self.in_features % 32
            q = F.pad(self.qweight, (0, k_pad)) if k_pad else self.qweight
            kern.update(q=q.contiguous(), s=self.scales.bfloat16(), k=self.in_features + k_pad)
        return kern

    def _int8_split_mm(self):
        """x @ W^T for an int8 output projection through the int4 kernel, about 1.6x faster than the int8 one for
        one row on AVX512: each weight is split into two 4-bit halves, q + 128 = 16 a + b, laid side by side along K
        (groups with scale 16 s and zero 0 for a, scale s and zero 8 s for b, so (a - 8) 16 s + (b - 8) s + 8 s
        = q s exactly) and the input is repeated: x_ @ [A | B]^T. The same bfloat16 scales and output rounding as
        the int8 kernel; the top entries are recomputed exactly (``refine_top``). The scale is one per row, so the
        groups are as long as K allows (128, 64 or 32 columns): fewer scales to read (SmolLM2's head: groups of 64,
        7 % faster than 32)."""
        kern = self._kernels()
        if "split" not in kern:
            n, k = self.out_features, self.in_features
            n_pad = -n % 16
            packed = torch.empty(n + n_pad, k, dtype=torch.uint8, device=self.qweight.device)  # (N, 2K / 2)
            for i in range(0, n, 1024):  # in slices of rows (the layout is blocked by 64 rows): small temporaries,
                u = self.qweight[i : i + 1024].to(torch.int32) + 128  # handed back after each slice (they piled up:
                q = torch.cat([u >> 4, u & 15], dim=1)  # +124 MB resident for 28 MB of layout)
                if i + 1024 >= n and n_pad:
                    q = F.pad(q, (0, 0, 0, n_pad), value=8)
                packed[i : i + q.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
                del u, q
                release_free_memory()
            g = next(g for g in (128, 64, 32) if k % g == 0)  # a group never straddles the two halves
            s = self.scales.to(torch.float32)[:, None].expand(n, k // g)
            scales, zeros = torch.cat([16 * s, s], dim=1), torch.cat([torch.zeros_like(s), 8 * s], dim=1)
            if n_pad:
                scales, zeros = F.pad(scales, (0, 0, 0, n_pad)), F.pad(zeros, (0, 0, 0, n_pad))
            sz = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().bfloat16()
            kern.update(split=packed, split_sz=sz, split_group=g)
            del s, scales, zeros
            release_free_memory()
        packed, sz, g, n = kern["split"], kern["split_sz"], kern["split_group"], self.out_features

        def mm8s(x):
            xb = x.bfloat16()
            y = _INT4_MM(torch.cat([xb, xb], dim=1), packed, g, sz)
            return y[:, :n] if y.shape[1] != n else y
        return mm8s

    def _int4_kernel(self, dtype: torch.dtype) -> dict[str, Any]:
        """The weight in ``_weight_int4pack_mm_for_cpu``'s layout (N padded to a multiple of 16), with the scales and
        zeros (ng, N, 2) in ``dtype`` (each dtype built when first used: decoding needs only bfloat16's)."""
        kern = self._kernels()
        if "packed" not in kern:
            n_pad = -self.out_features % 16
            q = unpack_int4(self.qweight).to(torch.int32)
            if n_pad:
                q = F.pad(q, (0, 0, 0, n_pad), value=8)
            kern.update(packed=torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2), n_pad=n_pad)
            del q
            release_free_memory()
        if dtype not in kern:
            n_pad = kern["n_pad"]
            scales, zeros = self.scales, self.zeros if self.zeros is not None else torch.zeros_like(self.scales)
            if n_pad:
                scales, zeros = F.pad(scales, (0, 0, 0, n_pad)), F.pad(zeros, (0, 0, 0, n_pad))
            kern[dtype] = torch.stack((scales, zeros), dim=-1).transpose(0, 1).to(dtype).contiguous()  # (ng, N, 2)
            del scales, zeros
            release_free_memory()
        return kern

    def kernel(self, mode: str):
        """The packed kernel of ``mode`` ("float32" or "bfloat16") as (fn, input dtype, padded K): fn takes a
        contiguous (R, padded K) input of that dtype (padding columns zero) and returns (R, >= N) in it (int4 pads N
        to a multiple of 16), bias not added. The layouts are built here, once. ``_packed_mm`` wraps it for any
        input; the C decode step (``lmforge.infer.native``) writes such inputs itself."""
        if self.bits == 8:
            if mode == "float32":
                q, sc = self.qweight, self.scales
                return (lambda x: _INT8_MM(x, q, sc)), torch.float32, self.in_features
            kern = self._int8_bf16_kernel()  # the bfloat16 kernel needs K % 16 == 0 (it crashes otherwise)
            q, sc = kern["q"], kern["s"]
            return (lambda x: _INT8_MM(x, q, sc)), torch.bfloat16, kern["k"]
        dt = torch.bfloat16 if mode == "bfloat16" else torch.float32
        kern = self._int4_kernel(dt)
        packed, g, sz = kern["packed"], self.group_size, kern[dt]
        return (lambda x: _INT4_MM(x, packed, g, sz)), dt, self.qweight.shape[1] * 2

    def _packed_mm(self, mode: str):
        """The packed kernel of ``mode`` as a function: (R, K) input -> (R, N) output in the kernel's dtype, bias not
        added."""
        if self.bits == 8 and mode != "float32" and self.refine_top and self.in_features % 32 == 0:
            return self._int8_split_mm()
        fn, dt, kp = self.kernel(mode)
        n, pad = self.out_features, kp - self.in_features

        def mm(x):  # x.bfloat16() / x.float(): about 1 us faster than x.to(dtype) per call
            xd = (x.bfloat16() if dt is torch.bfloat16 else x.float()).contiguous()
            y = fn(F.pad(xd, (0, pad)) if pad else xd)
            return y[:, :n] if y.shape[1] != n else y
        return mm

    def _decode_fn(self, rows: int):
        """``forward`` for (rows, K) float32 CPU input in auto mode, with the choices made once (decoding calls
        this layer once per token: the Python around a small kernel costs as much as the kernel)."""
        mode = self._mode(torch.empty(rows, self.in_features))
        if mode == "dequant":
            return lambda x: self._forward(x, "dequant")
        mm, bias = self._packed_mm(mode), self.bias
        if mode == "bfloat16" and self.refine_top:
            if bias is None:
                return lambda x: self._refine(x, mm(x).float())
            return lambda x: self._refine(x, torch.add(bias, mm(x).float()))
        if bias is None:
            return lambda x: mm(x).float()
        return lambda x: torch.add(bias, mm(x).float())

    def _refine(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (R, N) from a bfloat16 kernel, bias included: its ``refine_top`` largest entries per row recomputed
        exactly from x (R, K) and the dequantized rows they belong to."""
        r, k = x.shape[0], min(self.refine_top, self.out_features)
        idx = y.topk(k, dim=1, sorted=False).indices  # (R, k)
        flat = idx.reshape(-1)
        if self.bits == 8:
            w = dequantize_int8(self.qweight[flat], self.scales[flat])
        else:
            zeros = self.zeros[flat] if self.zeros is not None else None
            w = dequantize_int4(self.qweight[flat], self.scales[flat], zeros, self.in_features)
        exact = torch.bmm(w.view(r, k, -1), x.to(torch.float32).reshape(r, -1, 1)).view(r, k)
        if self.bias is not None:
            exact += self.bias[idx]
        return y.scatter(1, idx, exact)

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T with W dequantized about 2^20 elements at a time: small temporaries whatever the layer's size
        (a 49152 x 576 output projection would otherwise allocate 113 MB per call)."""
        n, k = self.out_features, self.in_features
        step = max(16, (1 << 20) // k)
        outs = []
        for i in range(0, n, step):
            j = min(i + step, n)
            if self.bits == 8:  # the per-channel scale commutes with the matmul
                outs.append(linear(x, self.qweight[i:j].to(x.dtype)) * self.scales[i:j].to(x.dtype))
            else:
                zeros = self.zeros[i:j] if self.zeros is not None else None
                w = dequantize_int4(self.qweight[i:j], self.scales[i:j], zeros, k)
                outs.append(linear(x, w.to(x.dtype)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # training something upstream (LoRA, QLoRA)
            return FrozenWeightGrad.apply(x, self)
        if self.compute == "auto" and x.dtype == torch.float32 and x.device.type == "cpu":
            rows = x.numel() // self.in_features  # (B, T, K) decoding steps too: B*T rows
            fn = self._decode.get(rows)
            if fn is None and rows <= DECODE_ROWS:
                fn = self._decode[rows] = self._decode_fn(rows)
            if fn is not None:
                return fn(x) if x.dim() == 2 else fn(x.reshape(rows, -1)).view(*x.shape[:-1], self.out_features)
        return self._forward(x, self._mode(x))

    def _forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        shape = x.shape
        if mode == "dequant":
            y = self._dequant_matmul(x)
        else:
            y = self._packed_mm(mode)(x.reshape(-1, shape[-1]))
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if mode == "bfloat16" and self.refine_top and y.dtype == torch.float32:
            y = self._refine(x.reshape(-1, shape[-1]), y.reshape(-1, self.out_features)).view(y.shape)
        return y


class QuantEmbedding(nn.Module):
    """A drop-in for ``nn.Embedding`` holding an int8 table, one symmetric scale per row (token): the int8 format of
    ``QuantLinear`` with the vocabulary as output channels, so a tied output projection shares it (``tie_head``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> QuantEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim)
        m.qweight, m.scales = quantize_int8(emb.weight)
        return m

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


def tie_head(model: nn.Module) -> None:
    """Make ``model.lm_head`` an int8 ``QuantLinear`` computing with the int8 table of ``model.wte`` (same tensors)."""
    emb, old = model.wte, model.lm_head
    head = QuantLinear(emb.embedding_dim, emb.num_embeddings, 8, bias=old.bias is not None, device="meta")
    head.qweight, head.scales = emb.qweight, emb.scales
    if old.bias is not None:
        head.bias = old.bias.detach().float().clone()
    model.lm_head = head


def head_is_tied(model: nn.Module) -> bool:
    """Whether ``model.lm_head`` computes with the int8 table of ``model.wte`` (see ``tie_head``)."""
    return isinstance(model.lm_head, QuantLinear) and isinstance(model.wte, QuantEmbedding) \
        and model.lm_head.qweight is model.wte.qweight
