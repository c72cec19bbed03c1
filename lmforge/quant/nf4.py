"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, "QLoRA"), block size 64, with optional double quantization.

Format of one weight W (N, K), flattened row-major and cut into blocks of 64 values (the tail zero-padded):
``code`` uint8 (ceil(N K / 64) * 32,) two 4-bit indices into ``NF4_CODE`` per byte (even element in the low nibble);
``absmax`` float32 per block, ``W ~ NF4_CODE[idx] * absmax[block]``. Double quantization stores the absmax values
as int8 instead, in blocks of 256 around their mean: ``absmax ~ dq_mean + q8 * dq_scale[block256]``
(``dq_scale = max |absmax - mean| / 127``; the paper uses 8-bit floats here, the saving is the same: 32 -> 8 bits per
64 weights, 4.127 bits per weight in all).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.matmul import linear
from lmforge.quant.modules import FrozenWeightGrad
from lmforge.quant.packing import pack_int4, unpack_int4

BLOCK = 64
DQ_BLOCK = 256
# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA paper, appendix E;
# bitsandbytes' create_normal_map(offset=0.9677083)). The test rebuilds them from the normal quantile function.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def quantize_nf4(w: torch.Tensor, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """(N, K) float -> the format's tensors: ``code`` and ``absmax`` (or ``absmax_q``, ``dq_scale``, ``dq_mean``)."""
    flat = w.detach().float().reshape(-1)
    nb = math.ceil(flat.numel() / BLOCK)
    blocks = F.pad(flat, (0, nb * BLOCK - flat.numel())).view(nb, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    normed = blocks / absmax[:, None]
    mid = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # nearest level: count the midpoints below
    idx = torch.bucketize(normed, mid)
    out = {"code": pack_int4(idx.view(1, -1)).view(-1)}
    if not double_quant:
        out["absmax"] = absmax
        return out
    mean = absmax.mean()
    nd = math.ceil(nb / DQ_BLOCK)
    c = F.pad(absmax - mean, (0, nd * DQ_BLOCK - nb)).view(nd, DQ_BLOCK)
    scale = (c.abs().amax(dim=1) / 127).clamp_min(1e-12)
    out["absmax_q"] = torch.round(c / scale[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)[:nb]
    out["dq_scale"], out["dq_mean"] = scale, mean.reshape(1)
    return out


def nf4_absmax(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-block absmax (float32), undoing double quantization if it was used."""
    if "absmax" in t:
        return t["absmax"]
    q = t["absmax_q"].float()
    scale = t["dq_scale"].repeat_interleave(DQ_BLOCK)[: q.numel()]
    return q * scale + t["dq_mean"]


def dequantize_nf4(t: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    idx = unpack_int4(t["code"].view(1, -1)).view(-1).long()
    absmax = nf4_absmax(t)
    w = NF4_CODE.to(absmax.device)[idx].view(-1, BLOCK) * absmax[:, None]
    return w.view(-1)[: shape[0] * shape[1]].view(shape)


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` stored in NF4 (see the module doc); computes with the dequantized float32 weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, double_quant: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.double_quant = in_features, out_features, double_quant
        nb = math.ceil(in_features * out_features / BLOCK)
        self.register_buffer("code", torch.zeros(nb * BLOCK // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(nb, dtype=torch.int8, device=device))
            self.register_buffer("dq_scale", torch.ones(math.ceil(nb / DQ_BLOCK), device=device))
            self.register_buffer("dq_mean", torch.zeros(1, device=device))
        else:
            self.register_buffer("absmax", torch.ones(nb, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, double_quant: bool = False) -> NF4Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, double_quant)
        for k, v in quantize_nf4(lin.weight, double_quant).items():
            setattr(m, k, v.to(lin.weight.device))
        if lin.bias is not None:
            m.bias = lin.bias.detach().float().clone()
        return m.train(lin.training)

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("code", "absmax_q", "dq_scale", "dq_mean") if self.double_quant else ("code", "absmax")
        return {k: getattr(self, k) for k in names}

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) this layer computes with."""
        return dequantize_nf4(self._tensors(), (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return FrozenWeightGrad.apply(x, self)
        w = self.dequantize().to(x.dtype)
        return linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, block={BLOCK}, "
                f"double_quant={self.double_quant}, bias={self.bias is not None}")
