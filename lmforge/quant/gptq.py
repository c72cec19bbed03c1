"""GPTQ int4 quantization of a whole decoder, block by block, on calibration data."""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmforge.model import KVCache
from lmforge.model.swap import set_module
from lmforge.quant.modules import QuantLinear
from lmforge.quant.packing import (
    _EPS,
    _group_params_nd,
    _round_levels,
    pack_int4,
    padded_k,
    refit_int4_params,
    search_int4_params,
)
from lmforge.quant_config import QuantConfig

# ---- GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's error over the columns not
# yet quantized using the inverse Hessian of the layer's inputs. Blocks are processed in order on the outputs of the
# already-quantized blocks, and inside a block in the order qkv, proj, fc1, fc2 ("true sequential"); columns go in
# order of decreasing activation energy ("act-order") with group scales fixed beforehand ("static groups"), so the
# result is stored in the plain int4 format above. On top of the paper: the static group scales come from an
# importance-weighted clipping search (``search_int4_params``, weights = the Hessian's diagonal), are then refitted
# to the levels GPTQ chose by least squares on the full Hessian (``refit_int4_params``) and GPTQ re-run with them;
# and each layer's target is corrected for the error its quantized inputs already carry (``gptq_model``).


@torch.no_grad()
def self_calibration(model: nn.Module, n_samples: int = 128, length: int = 256, seed: int = 0,
                     start_id: int | None = None, progress: bool = False) -> torch.Tensor:
    """Calibration token ids (n_samples, length) sampled from the model itself (temperature 1), starting at BOS."""
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


def gptq_model(model: nn.Module, qcfg: QuantConfig, calibration: torch.Tensor, progress: bool,
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
        it = tqdm(blocks, desc="gptq", unit="block", file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for block in it:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        order = sorted(names, key=lambda n: (["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] + [n]).index(n))
        fp_block = copy.deepcopy(block) if correct_inputs else None
        fp_out = None
        for name in order:
            lin = block.get_submodule(name)
            kin = lin.in_features
            stats: dict[str, Any] = {"h": torch.zeros(kin, kin), "c": torch.zeros(kin, kin), "n": 0, "fp": []}
            stop = name != order[-1]  # a forward ends once this layer has its input; the last one runs whole

            def acc(mod, inp, out, stats=stats, stop=stop):
                a = inp[0].reshape(-1, inp[0].shape[-1]).float().cpu()
                stats["h"] += 2 * a.t() @ a
                if stats["fp"]:
                    stats["c"] += 2 * (stats["fp"].pop(0) - a).t() @ a
                stats["n"] += a.shape[0]
                if stop:
                    raise _Stop

            def keep(mod, inp, out, stats=stats, stop=stop):
                stats["fp"].append(inp[0].reshape(-1, inp[0].shape[-1]).float().cpu())
                if stop:
                    raise _Stop

            h = lin.register_forward_hook(acc)
            hf = fp_block.get_submodule(name).register_forward_hook(keep) if fp_block is not None else None
            try:  # the float inputs first, then the quantized ones (acc pairs them up)
                if fp_block is not None:
                    try:
                        fp_out = fp_block(x_fp, *rest, **kwargs)  # (the last layer's: the float block's output)
                    except _Stop:
                        pass
                try:
                    block(x, *rest, **kwargs)
                except _Stop:
                    pass
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
            set_module(block, name, ql.to(lin.weight.device))
        x = block(x, *rest, **kwargs)
        if fp_out is not None:
            x_fp = fp_out
