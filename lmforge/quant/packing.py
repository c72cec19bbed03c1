"""The quantization formulas: int8 per channel, int4 group-wise packing, scale search and refit (no modules here).

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
  ``quantize_model`` then rounds every int4 layer's scales and zeros to float16 values (still float32 tensors, the
  levels kept; ``half_params``), as llama.cpp's Q4 blocks hold them: the C step reads them as float16. A layer that
  round to nearest keeps exactly (a GGUF's Q4_1 blocks) keeps its parameters.

The token embedding table is int8 with one scale per row (``QuantEmbedding``: ``wte.qweight`` int8 (V, D),
``wte.scales`` float32 (V,)) unless ``embedding=False``; a tied output projection is then an int8 ``QuantLinear``
computing with that same table, stored once. Biases and norms stay float32. Forward uses PyTorch's CPU kernels
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` (see ``COMPUTE_MODES``) or dequantize + matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
