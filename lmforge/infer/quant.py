"""Weight-only quantization of the decoder's linear layers: int8 per output channel, int4 group-wise.

Formats (what ``quantization.json`` documents and ``model.safetensors`` holds for each quantized layer ``L``):

* int8, symmetric, per output channel: ``L.qweight`` int8 (N, K), ``L.scales`` float32 (N,);
  ``s = max|W[n]| / 127``, ``q = clamp(round(W / s), -127, 127)``, ``W ~ q * s``.
* int4, group-wise (group size G along K; K is zero-padded up to Kp, a multiple of G):
  ``L.qweight`` uint8 (N, Kp/2) with two values per byte (column 2j in the low nibble, 2j+1 in the high one),
  ``L.scales`` float32 (N, Kp/G) and, when asymmetric, ``L.zeros`` float32 (N, Kp/G). Dequantized:
  ``W[n, k] ~ (q[n, k] - 8) * scales[n, k // G] + zeros[n, k // G]`` (zeros = 0 when symmetric), with
  symmetric ``s = max|W_g| / 7.5`` (levels -8..7) and asymmetric ``s = (max W_g - min W_g) / 15``,
  ``zero = min W_g + 8 s`` (levels min .. max, like llama.cpp's Q4_1). Every element is within ``s / 2``.
  Those are round to nearest (``method="rtn"``, ``quantize_int4``). GPTQ (the default of ``lmforge quantize``)
  stores the same format with searched scales: a scale may be negative (symmetric: the extra level -8 lands on
  the side of the group's largest magnitude, like llama.cpp's Q4_0) and groups may be clipped; see ``gptq_int4``.

The token embedding table is int8 with one scale per row (``QuantEmbedding``: ``wte.qweight`` int8 (V, D),
``wte.scales`` float32 (V,)) unless ``embedding=False``; a tied output projection is then an int8 ``QuantLinear``
computing with that same table, stored once. Biases and norms stay float32. Forward uses PyTorch's CPU kernels
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` (see ``COMPUTE_MODES``) or dequantize + matmul.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LMForgeError

QUANT_FILE = "quantization.json"
FORMAT = "lmforge-weight-only"
VERSION = 1
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")
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
# the top candidates of greedy decoding; the tail of the distribution keeps the fast values.
REFINE_TOP = 64
_DECODE_MODE: dict[tuple, str] = {}  # (bits, N, K, group, rows) -> the fastest mode, measured
_EPS = 1e-12


# ---- formulas -----------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 q (N, K), float32 scales (N,)): symmetric, one scale per output channel."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(_EPS)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 15], K even -> uint8 (N, K/2): column 2j low nibble, 2j+1 high nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K) values in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def padded_k(k: int, group_size: int) -> int:
    return math.ceil(k / group_size) * group_size


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, K) float -> (packed uint8 (N, Kp/2), scales (N, Kp/G), zeros (N, Kp/G) or None); see the module doc."""
    w = w.detach().float()
    n, k = w.shape
    kp = padded_k(k, group_size)
    if kp != k:
        w = F.pad(w, (0, kp - k))
    g = w.view(n, kp // group_size, group_size)
    scale, zeros = _group_params_nd(g, symmetric)
    if symmetric:
        return pack_int4((torch.round(g / scale[..., None]).clamp_(-8, 7) + 8).view(n, kp)), scale, None
    q = torch.round((g - g.amin(dim=-1, keepdim=True)) / scale[..., None]).clamp_(0, 15)
    return pack_int4(q.view(n, kp)), scale, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    in_features: int | None = None) -> torch.Tensor:
    """Inverse of ``quantize_int4`` up to rounding: float32 (N, K) (padding columns dropped)."""
    n, ng = scales.shape
    q = unpack_int4(packed).view(n, ng, -1).float() - 8
    w = q * scales[..., None]
    if zeros is not None:
        w = w + zeros[..., None]
    w = w.view(n, -1)
    return w if in_features is None else w[:, :in_features]


# ---- scale search (llama.cpp's make_qx_quants / make_qkx2_quants, AWQ-style clipping): for each group, try a grid of
# scales (clipping the range or not, and for symmetric groups putting the extra level -8 on the side of the largest
# magnitude by allowing a negative scale), round, refit the scale (and offset) by importance-weighted least squares
# with the levels fixed, and keep the candidate with the smallest weighted error sum_k h_k (w_k - w^_k)^2.


def _fit_scale(g: torch.Tensor, lv: torch.Tensor, h: torch.Tensor, symmetric: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares (scale, offset) for fixed levels lv (values -8..7) of groups g (..., G), weights h."""
    if symmetric:
        sl2 = (h * lv * lv).sum(-1)
        s = (h * lv * g).sum(-1) / sl2.clamp_min(_EPS)
        return s, torch.zeros_like(s)
    sw, sl, sl2 = h.sum(-1).expand(lv.shape[:-1]), (h * lv).sum(-1), (h * lv * lv).sum(-1)
    sg, slg = (h * g).sum(-1), (h * lv * g).sum(-1)
    det = sw * sl2 - sl * sl
    ok = det.abs() > _EPS * sw * sl2.clamp_min(_EPS)
    s = torch.where(ok, (sw * slg - sl * sg) / torch.where(ok, det, 1.0), 0.0)
    z = torch.where(ok, (sg - sl * s) / sw.clamp_min(_EPS), 0.0)
    return s, z


def search_int4_params(w: torch.Tensor, importance: torch.Tensor | None, group_size: int, symmetric: bool,
                       n_grid: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scales, zeros) (N, Kp/G) for w (N, K) minimizing the importance-weighted squared rounding error.

    ``importance`` (K,) or (N, K) weighs the columns (e.g. the diagonal of the layer's Hessian, the mean squared
    input activation); None weighs them equally. The candidates include plain round to nearest (``quantize_int4``'s
    scales), so the returned parameters never have a larger weighted error than it.
    """
    w = w.detach().float()
    n, k = w.shape
    kp = padded_k(k, group_size)
    h = torch.ones(k) if importance is None else importance.detach().float().clamp_min(0)
    h = h.expand(n, k) if h.dim() == 1 else h
    h = h + 1e-6 * h.mean().clamp_min(_EPS)  # no all-zero weights (dead inputs): keep the fits defined
    if kp != k:
        w, h = F.pad(w, (0, kp - k)), F.pad(h, (0, kp - k))
    g = w.view(n, kp // group_size, group_size)
    hw = h.view_as(g)
    best_s, best_z = _group_params_nd(g, symmetric)
    best_e = _weighted_err(g, hw, best_s, best_z)
    if symmetric:
        amax = g.abs().amax(-1)
        m = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed largest magnitude
        m = torch.where(amax > 0, m, torch.ones_like(m))
        cands = [(m / -(8 + 0.1 * i), None) for i in range(-n_grid // 2, n_grid // 2 + 1)]
        cands += [(m / (7 + 0.1 * i), None) for i in range(-n_grid // 2, n_grid // 2 + 1)]
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        cands = [((hi - lo).clamp_min(_EPS) / (15 + 0.1 * i), lo) for i in range(-n_grid // 2, n_grid // 2 + 1)]
    for s, lo in cands:
        s = torch.where(s.abs() > _EPS, s, torch.full_like(s, _EPS))
        if symmetric:
            lv = torch.round(g / s[..., None]).clamp_(-8, 7)
        else:
            lv = torch.round((g - lo[..., None]) / s[..., None]).clamp_(0, 15) - 8
        s2, z2 = _fit_scale(g, lv, hw, symmetric)
        s2 = torch.where(s2.abs() > _EPS, s2, s)
        if not symmetric:
            z2 = torch.where(s2 == s, lo + 8 * s, z2)
        e = _weighted_err(g, hw, s2, z2)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s, best_z = torch.where(better, s2, best_s), torch.where(better, z2, best_z)
    return best_s, best_z


def _group_params_nd(g: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int4``'s round-to-nearest scales and zeros for groups g (..., G)."""
    if symmetric:
        s = (g.abs().amax(-1) / 7.5).clamp_min(_EPS)
        return s, torch.zeros_like(s)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15.0).clamp_min(_EPS)
    return s, lo + 8 * s


def _round_levels(g: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Nearest levels -8..7 of groups g (..., G) for scales s and zeros z (...)."""
    return torch.round((g - z[..., None]) / s[..., None]).clamp_(-8, 7)


def _weighted_err(g: torch.Tensor, h: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    lv = _round_levels(g, s, z)
    return (h * (g - lv * s[..., None] - z[..., None]) ** 2).sum(-1)


def refit_int4_params(w: torch.Tensor, levels: torch.Tensor, hessian: torch.Tensor, group_size: int,
                      symmetric: bool, prev: tuple[torch.Tensor, torch.Tensor], ridge: float = 1e-4
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """With the integer levels fixed, the group scales (and zeros) minimizing each row's output error
    (w - w^) H (w - w^)^T: a small least-squares system per row (Kp/G unknowns, 2 Kp/G asymmetric).

    w (N, Kp) and levels (N, Kp) (values -8..7), hessian (Kp, Kp); ``prev`` (scales, zeros) is the ridge's anchor.
    """
    n, kp = w.shape
    ng = kp // group_size
    h = hessian.float()
    lam = ridge * torch.diag(h).mean().clamp_min(_EPS) * group_size
    h4 = h.view(ng, group_size, ng, group_size)
    hw = w @ h  # (N, Kp)
    s0, z0 = prev
    out_s, out_z = torch.empty_like(s0), torch.empty_like(z0)
    gg = h4.sum((1, 3))  # (ng, ng): sum of H over group pairs (the zeros' block)
    eye = torch.eye(ng if symmetric else 2 * ng)
    for r0 in range(0, n, 64):
        lv = levels[r0 : r0 + 64].view(-1, ng, group_size)
        rows = lv.shape[0]
        # t[a, r, b, j] = sum_i lv[r, a, i] H[a, i, b, j]
        t = torch.bmm(lv.transpose(0, 1), h4.reshape(ng, group_size, kp))  # (ng, rows, Kp)
        t = t.view(ng, rows, ng, group_size)
        lhl = torch.einsum("arbj,rbj->rab", t, lv)
        b_s = (lv * hw[r0 : r0 + 64].view(rows, ng, group_size)).sum(-1)
        if symmetric:
            m, rhs, th0 = lhl, b_s, s0[r0 : r0 + 64]
        else:
            lhg = t.sum(-1).permute(1, 0, 2)  # (rows, a, b): sum_i,j lv_i H_ij over group pairs, lv side a
            m = torch.cat((torch.cat((lhl, lhg), 2), torch.cat((lhg.transpose(1, 2), gg.expand(rows, ng, ng)), 2)), 1)
            b_z = hw[r0 : r0 + 64].view(rows, ng, group_size).sum(-1)
            rhs, th0 = torch.cat((b_s, b_z), 1), torch.cat((s0[r0 : r0 + 64], z0[r0 : r0 + 64]), 1)
        th = torch.linalg.solve(m.double() + lam * eye, (rhs + lam * th0).double().unsqueeze(-1)).squeeze(-1).float()
        out_s[r0 : r0 + 64] = th[:, :ng]
        out_z[r0 : r0 + 64] = 0 if symmetric else th[:, ng:]
    return out_s, out_z


# ---- the layer ----------------------------------------------------------------------------------


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
        self._kernel: dict[str, Any] | None = None
        self._decode: dict[int, Any] = {}  # auto mode, float32 CPU input of n rows -> a specialised function
        self.refine_top = 0  # see REFINE_TOP (set on output projections)

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int | None = None,
                    symmetric: bool = True) -> QuantLinear:
        m = cls(lin.in_features, lin.out_features, bits, group_size, symmetric, lin.bias is not None)
        m.set_weight(lin.weight)
        if lin.bias is not None:
            m.bias = lin.bias.detach().float().clone()
        return m

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
                        self.compute = mode
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
                self.compute = "auto"
            _DECODE_MODE[key] = min(best, key=best.get)
        return _DECODE_MODE[key]

    def _int8_bf16_kernel(self) -> dict[str, Any]:
        if self._kernel is None:
            k_pad = -self.in_features % 32
            q = F.pad(self.qweight, (0, k_pad)) if k_pad else self.qweight
            self._kernel = {"q": q.contiguous(), "s": self.scales.bfloat16(), "k": self.in_features + k_pad}
        return self._kernel

    def _int4_kernel(self) -> dict[str, Any]:
        """The weight in ``_weight_int4pack_mm_for_cpu``'s layout (N padded to a multiple of 16)."""
        if self._kernel is None:
            n, ng = self.scales.shape
            n_pad = -n % 16
            q = unpack_int4(self.qweight).to(torch.int32)
            scales, zeros = self.scales, self.zeros if self.zeros is not None else torch.zeros_like(self.scales)
            if n_pad:
                q = F.pad(q, (0, 0, 0, n_pad), value=8)
                scales, zeros = F.pad(scales, (0, 0, 0, n_pad)), F.pad(zeros, (0, 0, 0, n_pad))
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
            sz = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()  # (ng, N, 2)
            self._kernel = {"packed": packed, "sz": sz, "sz_bf16": sz.bfloat16()}
        return self._kernel

    def _packed_mm(self, mode: str):
        """The packed kernel of ``mode`` ("float32" or "bfloat16") as a function: (R, K) input -> (R, N) output in
        the kernel's dtype, bias not added. The layouts are built here, once."""
        n = self.out_features
        if self.bits == 8:
            if mode == "float32":
                q, sc = self.qweight, self.scales
                return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.float32).contiguous(), q, sc)
            kern = self._int8_bf16_kernel()  # the bfloat16 kernel needs K % 16 == 0 (it crashes otherwise)
            q, sc, pad = kern["q"], kern["s"], kern["k"] - self.in_features

            def mm8(x):
                xb = x.to(torch.bfloat16).contiguous()
                return torch.ops.aten._weight_int8pack_mm(F.pad(xb, (0, pad)) if pad else xb, q, sc)
            return mm8
        kern = self._int4_kernel()
        packed, g = kern["packed"], self.group_size
        sz, dt = (kern["sz_bf16"], torch.bfloat16) if mode == "bfloat16" else (kern["sz"], torch.float32)
        pad = self.qweight.shape[1] * 2 - self.in_features

        def mm4(x):
            xd = x.to(dt).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(F.pad(xd, (0, pad)) if pad else xd, packed, g, sz)
            return y[:, :n] if y.shape[1] != n else y
        return mm4

    def _decode_fn(self, rows: int):
        """``forward`` for (rows, K) float32 CPU input in auto mode, with the choices made once (decoding calls
        this layer once per token: the Python around a small kernel costs as much as the kernel)."""
        mode = self._mode(torch.empty(rows, self.in_features))
        if mode == "dequant":
            return lambda x: self._forward(x, "dequant")
        mm, bias = self._packed_mm(mode), self.bias
        if mode == "bfloat16" and self.refine_top:
            if bias is None:
                return lambda x: self._refine(x, mm(x).to(torch.float32))
            return lambda x: self._refine(x, torch.add(bias, mm(x).to(torch.float32)))
        if bias is None:
            return lambda x: mm(x).to(torch.float32)
        return lambda x: torch.add(bias, mm(x).to(torch.float32))

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
                outs.append(F.linear(x, self.qweight[i:j].to(x.dtype)) * self.scales[i:j].to(x.dtype))
            else:
                zeros = self.zeros[i:j] if self.zeros is not None else None
                w = dequantize_int4(self.qweight[i:j], self.scales[i:j], zeros, k)
                outs.append(F.linear(x, w.to(x.dtype)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "auto" and x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu":
            fn = self._decode.get(x.shape[0])
            if fn is None and x.shape[0] <= DECODE_ROWS:
                fn = self._decode[x.shape[0]] = self._decode_fn(x.shape[0])
            if fn is not None:
                return fn(x)
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


# ---- whole models -------------------------------------------------------------------------------


@dataclass
class QuantConfig:
    bits: int = 8
    group_size: int | None = None  # int4 only
    symmetric: bool = True
    lm_head: bool = False  # also quantize an untied output projection
    embedding: bool = True  # int8 token embedding table; a tied output projection shares it (int8 whatever bits is)
    method: str = "rtn"  # "rtn": round to nearest; "gptq": error-compensating GPTQ on calibration data (int4)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LMForgeError(f"--method {self.method!r}: allowed values are {list(METHODS)}")
        if self.method == "gptq" and self.bits != 4:
            raise LMForgeError("--method gptq: GPTQ is implemented for --bits 4; int8 uses round to nearest")
        if self.bits not in (4, 8):
            raise LMForgeError(f"--bits {self.bits}: allowed values are 8 and 4")
        if self.bits == 8:
            if not self.symmetric:
                raise LMForgeError("--asymmetric: int8 is symmetric per channel; asymmetric is for --bits 4")
            if self.group_size is not None:
                raise LMForgeError("--group-size: int8 uses one scale per output channel; groups are for --bits 4")
        elif self.group_size not in GROUP_SIZES:
            raise LMForgeError(f"--group-size {self.group_size}: allowed values are {list(GROUP_SIZES)}")


def quantizable_layers(model: nn.Module, lm_head: bool) -> list[str]:
    """Names of the decoder's linear layers: every ``nn.Linear`` inside the blocks, plus ``lm_head`` if asked."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    if lm_head:
        names.append("lm_head")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, qcfg: QuantConfig, calibration: torch.Tensor | None = None,
                   progress: bool = False) -> nn.Module:
    """Replace the linear layers of ``model`` (in place) by ``QuantLinear``; returns the model.

    ``method="gptq"`` needs ``calibration`` token ids (B, T); without them the model writes its own
    (``self_calibration``). The lm_head, if quantized, is rounded to nearest in both methods.
    """
    qcfg.validate()
    names = quantizable_layers(model, qcfg.lm_head)
    for name in names:
        if isinstance(model.get_submodule(name), QuantLinear):
            raise LMForgeError(f"{name}: the model is already quantized")
    if qcfg.method == "gptq":
        if calibration is None:
            calibration = self_calibration(model)
        _gptq_model(model, qcfg, calibration, progress)
        names = [n for n in names if not n.startswith("blocks.")]
    tied = qcfg.embedding and model.cfg.tie_embeddings
    for name in names:
        if not (tied and name == "lm_head"):
            lin = model.get_submodule(name)
            _set_module(model, name, QuantLinear.from_linear(lin, qcfg.bits, qcfg.group_size, qcfg.symmetric))
    if qcfg.embedding:
        model.wte = QuantEmbedding.from_embedding(model.wte)
        if tied:
            tie_head(model)
    _mark_head(model)
    model.quant_config = qcfg
    return model


def _mark_head(model: nn.Module) -> None:
    if isinstance(model.lm_head, QuantLinear):
        model.lm_head.refine_top = REFINE_TOP
        model.lm_head._decode = {}


# ---- GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's error over the columns not
# yet quantized using the inverse Hessian of the layer's inputs. Blocks are processed in order on the outputs of the
# already-quantized blocks, and inside a block in the order qkv, proj, fc1, fc2 ("true sequential"); columns go in
# order of decreasing activation energy ("act-order") with group scales fixed beforehand ("static groups"), so the
# result is stored in the plain int4 format above. On top of the paper: the static group scales come from an
# importance-weighted clipping search (``search_int4_params``, weights = the Hessian's diagonal), are then refitted
# to the levels GPTQ chose by least squares on the full Hessian (``refit_int4_params``) and GPTQ re-run with them;
# and each layer's target is corrected for the error its quantized inputs already carry (``_gptq_model``).


@torch.no_grad()
def self_calibration(model: nn.Module, n_samples: int = 128, length: int = 256, seed: int = 0,
                     start_id: int | None = None, progress: bool = False) -> torch.Tensor:
    """Calibration token ids (n_samples, length) sampled from the model itself (temperature 1), starting at BOS."""
    import sys

    from tqdm import tqdm

    from lmforge.model import KVCache

    cfg = model.cfg
    length = min(length, cfg.block_size)
    start = start_id if start_id is not None else (cfg.bos_id if cfg.bos_id is not None else 0)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    cache = KVCache(cfg, n_samples, length, device=device)
    x = torch.full((n_samples, 1), start, dtype=torch.long, device=device)
    out = [x]
    for _ in tqdm(range(length - 1), desc="calibration", unit="token", disable=not progress, file=sys.stderr,
                  mininterval=1.0 if sys.stderr.isatty() else 30.0):
        probs = torch.softmax(model(x, cache=cache)[:, -1].float(), dim=-1)
        x = torch.multinomial(probs.cpu(), 1, generator=gen).to(device)
        out.append(x)
    return torch.cat(out, dim=1)


class _Stop(Exception):
    pass


@torch.no_grad()
def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int, symmetric: bool, block: int = 128,
              damp: float = 0.01, act_order: bool = True, search: bool = True, refine: int = 2
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ for one layer: w (N, K), hessian = 2 X^T X / n (K, K) -> (packed, scales, zeros) like quantize_int4.

    ``search``: group scales from ``search_int4_params`` weighted by the Hessian's diagonal (else the min/max
    formula). ``refine``: rounds of refitting the scales to the GPTQ levels (``refit_int4_params``) and re-running
    GPTQ with them; the pass with the smallest output error tr((W - W^) H (W - W^)^T) is kept.
    """
    w = w.detach().float().clone()
    n, k = w.shape
    kp = padded_k(k, group_size)
    h = hessian.float().clone()
    if kp != k:
        w, h = F.pad(w, (0, kp - k)), F.pad(h, (0, kp - k, 0, kp - k))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    ng = kp // group_size
    if search:
        scales, zeros = search_int4_params(w, torch.diag(h) * ~dead, group_size, symmetric)
    else:
        scales, zeros = _group_params_nd(w.view(n, ng, group_size), symmetric)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(kp)
    hd = h[perm][:, perm]
    hd += damp * torch.mean(torch.diag(hd)) * torch.eye(kp)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    except RuntimeError:  # not positive definite even after damping: round to nearest with the chosen scales
        lv = _round_levels(w.view(n, ng, group_size), scales, zeros).view(n, kp)
        return pack_int4(lv + 8), scales, None if symmetric else zeros
    best = None
    for it in range(refine + 1):
        lv = _gptq_levels(w, hinv, perm, scales, zeros, group_size, block)
        d = w - (lv.view(n, ng, group_size) * scales[..., None] + zeros[..., None]).view(n, kp)
        err = float(((d @ h) * d).sum())
        if best is None or err < best[0]:
            best = (err, lv, scales, zeros)
        if it < refine:
            scales, zeros = refit_int4_params(w, lv, h, group_size, symmetric, (scales, zeros))
    _, lv, scales, zeros = best
    return pack_int4(lv + 8), scales, None if symmetric else zeros


def _gptq_levels(w: torch.Tensor, hinv: torch.Tensor, perm: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, block: int) -> torch.Tensor:
    """One GPTQ pass over the columns in order ``perm`` with fixed group scales: levels -8..7 (N, Kp), float."""
    n, kp = w.shape
    w = w[:, perm].clone()
    groups = perm // group_size
    q = torch.empty(n, kp)
    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        w1, err1, hi = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(groups[i1 + i])
            s, z = scales[:, g], zeros[:, g]
            qi = torch.round((w1[:, i] - z) / s).clamp_(-8, 7)
            q[:, i1 + i] = qi
            e = (w1[:, i] - (qi * s + z)) / hi[i, i]
            w1[:, i:] -= e[:, None] * hi[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out


def _gptq_model(model: nn.Module, qcfg: QuantConfig, calibration: torch.Tensor, progress: bool,
                correct_inputs: float = 1.0, damp: float = 0.01, **gptq_kw) -> None:
    """Quantize the blocks in order with GPTQ. ``correct_inputs`` (0..1): how much of the error the layer's input
    already carries (from the quantized layers before it) GPTQ compensates: the target becomes
    W' = W + a W (X - X^) X^T (X^ X^T + damp)^-1, the weight whose outputs on the quantized inputs X^ best match the
    float model's W X (error-propagation-aware calibration, as in GPTAQ / "asymmetric calibration")."""
    captured: dict[str, Any] = {}

    def grab(mod, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    hook = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(calibration.to(next(model.parameters()).device))
    except _Stop:
        pass
    finally:
        hook.remove()
    x, rest, kwargs = captured["args"][0], captured["args"][1:], captured["kwargs"]
    x_fp = x
    blocks = list(model.blocks)
    it = blocks
    if progress:
        import sys

        from tqdm import tqdm

        it = tqdm(blocks, desc="gptq", unit="block", file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for block in it:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        order = sorted(names, key=lambda n: (["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] + [n]).index(n))
        fp_block = copy.deepcopy(block) if correct_inputs else None
        for name in order:
            lin = block.get_submodule(name)
            kin = lin.in_features
            stats: dict[str, Any] = {"h": torch.zeros(kin, kin), "c": torch.zeros(kin, kin), "n": 0, "fp": []}

            def acc(mod, inp, out, stats=stats):
                a = inp[0].reshape(-1, inp[0].shape[-1]).float().cpu()
                stats["h"] += 2 * a.t() @ a
                if stats["fp"]:
                    stats["c"] += 2 * (stats["fp"].pop(0) - a).t() @ a
                stats["n"] += a.shape[0]

            def keep(mod, inp, out, stats=stats):
                stats["fp"].append(inp[0].reshape(-1, inp[0].shape[-1]).float().cpu())

            h = lin.register_forward_hook(acc)
            hf = fp_block.get_submodule(name).register_forward_hook(keep) if fp_block is not None else None
            try:  # the float inputs first, then the quantized ones (acc pairs them up)
                if fp_block is not None:
                    fp_block(x_fp, *rest, **kwargs)
                block(x, *rest, **kwargs)
            finally:
                h.remove()
                if hf is not None:
                    hf.remove()
            nrm = max(stats["n"], 1)
            hess = stats["h"] / nrm
            w = lin.weight.detach().float().cpu()
            if fp_block is not None and correct_inputs:
                reg = hess + damp * torch.diag(hess).mean().clamp_min(_EPS) * torch.eye(kin)
                w = w + correct_inputs * torch.linalg.solve(reg, (w @ (stats["c"] / nrm)).t()).t()
            ql = QuantLinear(lin.in_features, lin.out_features, 4, qcfg.group_size, qcfg.symmetric,
                             lin.bias is not None)
            packed, scales, zeros = gptq_int4(w, hess, qcfg.group_size, qcfg.symmetric, damp=damp, **gptq_kw)
            ql.qweight, ql.scales = packed, scales
            if zeros is not None:
                ql.zeros = zeros
            if lin.bias is not None:
                ql.bias = lin.bias.detach().float().clone()
            _set_module(block, name, ql.to(lin.weight.device))
        x = block(x, *rest, **kwargs)
        if fp_block is not None:
            x_fp = fp_block(x_fp, *rest, **kwargs)


def set_compute(model: nn.Module, mode: str) -> None:
    """Choose how every ``QuantLinear`` of ``model`` computes (one of ``COMPUTE_MODES``)."""
    if mode not in COMPUTE_MODES:
        raise LMForgeError(f"compute mode {mode!r}: allowed values are {list(COMPUTE_MODES)}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute = mode


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings and not isinstance(model.lm_head, QuantLinear):
        sd.pop("lm_head.weight", None)
    if head_is_tied(model):  # stored once, as the embedding table
        sd.pop("lm_head.qweight"), sd.pop("lm_head.scales")
    return sd


def save_quantized(model: nn.Module, path: str | Path, tokenizer=None, extra_files: list[Path] | None = None) -> Path:
    """Write config.json + quantization.json + model.safetensors (+ tokenizer files) into ``path`` atomically."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import CONFIG, WEIGHTS, replace_dir

    qcfg: QuantConfig | None = getattr(model, "quant_config", None)
    if qcfg is None:
        raise LMForgeError("save_quantized: the model is not quantized (run quantize_model first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.cfg.save(tmp / CONFIG)
        layers = [n for n, m in model.named_modules()
                  if isinstance(m, QuantLinear) and not (n == "lm_head" and head_is_tied(model))]
        meta = {"format": FORMAT, "version": VERSION, **asdict(qcfg), "layers": layers,
                "dequantize": "int8: w = q * scale[n]; int4: w = (q - 8) * scale[n, k // G] + zero[n, k // G]",
                "embedding_format": "int8, one scale per row (wte.qweight, wte.scales); a tied lm_head uses it",
                "int4_packing": "two per byte along K, even column in the low nibble; K zero-padded to G"}
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(quantized_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt", "lmforge": FORMAT})
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        for f in extra_files or []:
            if not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_quant_config(path: Path) -> tuple[QuantConfig, list[str]]:
    f = path / QUANT_FILE
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{f}: cannot read: {e}") from None
    if d.get("format") != FORMAT:
        raise LMForgeError(f"{f}: field format={d.get('format')!r}: expected {FORMAT!r}")
    if d.get("version") != VERSION:
        raise LMForgeError(f"{f}: field version={d.get('version')!r}: this lmforge reads version {VERSION}")
    try:
        qcfg = QuantConfig(bits=d["bits"], group_size=d.get("group_size"), symmetric=d.get("symmetric", True),
                           lm_head=d.get("lm_head", False), embedding=d.get("embedding", False))
        layers = list(d["layers"])
    except KeyError as e:
        raise LMForgeError(f"{f}: missing field {e.args[0]!r}") from None
    qcfg.validate()
    return qcfg, layers


def load_quantized(path: str | Path, compute: str | None = None):
    """Load a directory written by ``save_quantized`` (``lmforge quantize``) into a Decoder with QuantLinear layers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmforge.checkpoint import CONFIG, WEIGHTS, _reinit_buffers
    from lmforge.config import ModelConfig
    from lmforge.model import Decoder

    path = Path(path)
    cfg = ModelConfig.load(path / CONFIG)
    qcfg, layers = read_quant_config(path)
    try:
        sd = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{path / WEIGHTS}: cannot read safetensors: {e}") from None
    with torch.device("meta"):
        model = Decoder(cfg)
    for name in layers:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise LMForgeError(f"{path / QUANT_FILE}: layer {name!r} does not exist in this config") from None
        if not isinstance(lin, nn.Linear):
            raise LMForgeError(f"{path / QUANT_FILE}: layer {name!r} is not a linear layer")
        _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, qcfg.bits, qcfg.group_size,
                                             qcfg.symmetric, lin.bias is not None, device="meta"))
    if qcfg.embedding:
        model.wte = QuantEmbedding(cfg.vocab_size, cfg.n_embd, device="meta")
    tied_quant = qcfg.embedding and cfg.tie_embeddings
    if tied_quant:
        tie_head(model)
    tied_float = cfg.tie_embeddings and "lm_head" not in layers and not tied_quant
    shared = {"lm_head.weight"} if tied_float else {"lm_head.qweight", "lm_head.scales"} if tied_quant else set()
    expected = {k: v for k, v in model.state_dict().items() if k not in shared}
    for k, v in expected.items():
        if k not in sd:
            raise LMForgeError(f"{path / WEIGHTS}: tensor {k!r} is missing")
        if tuple(sd[k].shape) != tuple(v.shape) or sd[k].dtype != v.dtype:
            raise LMForgeError(f"{path / WEIGHTS}: tensor {k!r} is {sd[k].dtype} {tuple(sd[k].shape)}; the config "
                               f"and quantization.json need {v.dtype} {tuple(v.shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise LMForgeError(f"{path / WEIGHTS}: unexpected tensor {extra[0]!r} ({len(extra)} unused)")
    # assign: the loaded tensors become the buffers (no meta-device allocation, see positions.py). safetensors hands
    # out tensors at any 8-byte offset; PyTorch's packed kernels crash on those: each gets an aligned copy, one at a
    # time (every loaded tensor has its own storage, so the peak is one tensor more than the weights).
    for k in sd:
        if sd[k].data_ptr() % 64:
            sd[k] = sd[k].clone()
    model.load_state_dict(sd, strict=False, assign=True)
    if tied_float:
        model.lm_head.weight = model.wte.weight
    if tied_quant:
        tie_head(model)
    _mark_head(model)
    _reinit_buffers(model)
    model.quant_config = qcfg
    if compute is not None:
        set_compute(model, compute)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` stores (float or quantized; tied weights once)."""
    return sum(t.numel() * t.element_size() for t in quantized_state_dict(model).values())
