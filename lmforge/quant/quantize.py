"""Quantizing a whole decoder in place: its linear layers become ``QuantLinear`` (through ``lmforge.model.swap``)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.infer.clib import REFINE_TOP
from lmforge.model.swap import replace_modules
from lmforge.quant.gptq import gptq_model, self_calibration
from lmforge.quant.modules import COMPUTE_MODES, QuantEmbedding, QuantLinear, tie_head
from lmforge.quant.nf4 import NF4Linear
from lmforge.quant_config import QuantConfig


def weight_count(model: nn.Module) -> int:
    """The model's number of weights whatever their storage: parameters, plus the elements of int8/int4/NF4 layers
    and embedding tables (frozen buffers, shared ones once). What "a 135M model" means for learning-rate rules."""
    n = sum(p.numel() for p in model.parameters())
    seen: set[int] = set()  # a tied output projection computes with the embedding table's tensors
    for m in model.modules():
        store = getattr(m, "qweight", None) if isinstance(m, (QuantLinear, QuantEmbedding)) else m.code \
            if isinstance(m, NF4Linear) else None
        if store is None or id(store) in seen:
            continue
        seen.add(id(store))
        n += m.num_embeddings * m.embedding_dim if isinstance(m, QuantEmbedding) else m.in_features * m.out_features
    return n


def quantizable_layers(model: nn.Module, lm_head: bool) -> list[str]:
    """Names of the decoder's linear layers: every ``nn.Linear`` inside the blocks, plus ``lm_head`` if asked."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    if lm_head:
        names.append("lm_head")
    return names


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
        gptq_model(model, qcfg, calibration, progress)
        for n in names:
            m = model.get_submodule(n)
            if n.startswith("blocks.") and isinstance(m, QuantLinear) and m.bits == 4:
                half_params(m)
        names = [n for n in names if not n.startswith("blocks.")]
    tied = qcfg.embedding and model.cfg.tie_embeddings

    def rtn(_, lin: nn.Linear) -> QuantLinear:
        q = QuantLinear.from_linear(lin, qcfg.bits, qcfg.group_size, qcfg.symmetric)
        if q.bits == 4 and not torch.equal(q.dequantize(), lin.weight.detach().float()):
            half_params(q)  # (a layer it keeps exactly, a GGUF's Q4_1 blocks, keeps its parameters as they are)
        return q

    replace_modules(model, [n for n in names if not (tied and n == "lm_head")], rtn)
    if qcfg.embedding:
        model.wte = QuantEmbedding.from_embedding(model.wte)
        if tied:
            tie_head(model)
    mark_head(model)
    model.quant_config = qcfg
    return model


def half_params(mod: QuantLinear) -> bool:
    """Round an int4 layer's group scales and zeros to float16 values (still float32 tensors), its levels kept, as
    llama.cpp's Q4 blocks keep them: the C step then reads them as float16, half the bytes (SmolLM2 int4, `lmforge
    generate`: 297-321 -> 311-354 tokens/s, 211 -> 199 MB peak; logits' KL to the unrounded layers 1.7e-6, the same
    greedy tokens). A layer with a value beyond float16's range keeps float32 (False)."""
    with torch.no_grad():
        s = mod.scales.half().float()
        z = None if mod.zeros is None else mod.zeros.half().float()
        if not s.isfinite().all() or (z is not None and not z.isfinite().all()):
            return False
        mod.scales.copy_(s)
        if z is not None:
            mod.zeros.copy_(z)
    return True


def mark_head(model: nn.Module) -> None:
    if isinstance(model.lm_head, QuantLinear):
        model.lm_head.refine_top = REFINE_TOP
        model.lm_head._decode = {}


def set_compute(model: nn.Module, mode: str) -> None:
    """Choose how every ``QuantLinear`` of ``model`` computes (one of ``COMPUTE_MODES``)."""
    if mode not in COMPUTE_MODES:
        raise LMForgeError(f"compute mode {mode!r}: allowed values are {list(COMPUTE_MODES)}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute = mode
