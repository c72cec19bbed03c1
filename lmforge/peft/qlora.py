"""QLoRA (Dettmers et al. 2023): the frozen base's linear layers in 4 bits (NF4, block 64, optionally double
quantized, as the paper; or lmforge's int4 group-wise format), LoRA in float32 on top. Gradients flow through the
dequantized base (recomputed in backward, see ``quant.modules.FrozenWeightGrad``); the base stays 4-bit in memory. The
embedding table and the output projection stay float, as in the paper's setup (bitsandbytes skips lm_head)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.model.swap import find_modules, replace_modules
from lmforge.peft import lora
from lmforge.quant.modules import QuantLinear
from lmforge.quant.nf4 import NF4Linear
from lmforge.quant_config import GROUP_SIZES

DEFAULTS: dict[str, Any] = {**lora.DEFAULTS, "quant": "nf4", "double_quant": True, "group_size": 64}
SUGGESTED_LR, SUGGESTED_LR_PARAMS = lora.SUGGESTED_LR, lora.SUGGESTED_LR_PARAMS  # only the base's storage differs
PEFT_TYPE = lora.PEFT_TYPE
QUANTS = ("nf4", "int4")


def resolve(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = {**DEFAULTS, **(options or {})}
    if opts["quant"] not in QUANTS:
        raise LMForgeError(f"peft.quant {opts['quant']!r}: allowed values are {list(QUANTS)}")
    opts["double_quant"] = lora._bool(opts["double_quant"], "double_quant")
    try:
        opts["group_size"] = int(opts["group_size"])
    except (TypeError, ValueError):
        raise LMForgeError(f"peft.group_size {opts['group_size']!r}: expected an integer") from None
    if opts["quant"] == "nf4" and opts["group_size"] != DEFAULTS["group_size"]:  # (it was ignored)
        raise LMForgeError(f"peft.group_size {opts['group_size']}: applies to --peft.quant int4 (nf4 quantizes "
                           "blocks of 64)")
    if opts["quant"] == "int4" and opts["group_size"] not in GROUP_SIZES:
        raise LMForgeError(f"peft.group_size {opts['group_size']}: allowed values are {list(GROUP_SIZES)}")
    lo = lora.resolve({k: v for k, v in opts.items() if k in lora.DEFAULTS})
    return {**opts, **lo}


@torch.no_grad()
def quantize_base(model: nn.Module, opts: dict[str, Any]) -> list[str]:
    """Replace the float linear layers of the blocks by 4-bit ones (in place); returns their names."""
    names = find_modules(model, lambda n, m: n.startswith("blocks.") and type(m) is nn.Linear)

    def make(_: str, lin: nn.Linear) -> nn.Module:
        if opts["quant"] == "nf4":
            return NF4Linear.from_linear(lin, opts["double_quant"])
        q = QuantLinear.from_linear(lin, 4, opts["group_size"], symmetric=False)
        q.compute = "dequant"  # exact and differentiable-through path for training
        return q

    replace_modules(model, names, make)
    return names


def apply(model: nn.Module, options: dict[str, Any] | None = None) -> dict[str, Any]:
    opts = resolve(options)
    quantize_base(model, opts)
    lora.apply(model, {k: v for k, v in opts.items() if k in lora.DEFAULTS})
    return opts


def to_peft(model: nn.Module, resolved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return lora.to_peft(model, resolved)


def from_peft(model: nn.Module, adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The base quantized as the adapter was trained (options saved by lmforge, else the defaults), then LoRA."""
    opts = resolve({k: v for k, v in (adapter_config.get("lmforge_options") or {}).items() if k in DEFAULTS})
    quantize_base(model, opts)
    return {**opts, **lora.from_peft(model, adapter_config, tensors)}
