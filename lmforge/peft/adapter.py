"""Bottleneck adapters after attention and after the MLP of every block.

- serial (Houlsby et al., 2019): the sublayer output y goes through down-projection, nonlinearity, up-projection
  and a residual: y + s * up(act(down(y)));
- parallel (He et al., 2022): the adapter reads the sublayer's input h and is added to its output:
  y + s * up(act(down(h))).

The up-projection starts near zero, so a fresh adapter barely changes the model. The modules sit in the blocks'
``adapter_attn`` / ``adapter_mlp`` hooks (applied before the residual add and any post-norm). PEFT has no
bottleneck-adapter format: the files are PEFT's (``adapter_config.json`` with ``peft_type: "LMFORGE_ADAPTER"``, and
``adapter_model.safetensors``) with lmforge's parameter names (``blocks.0.adapter_attn.down.weight`` ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.model.mlp import ACTIVATIONS
from lmforge.peft.prompt import model_device, positive, resolve

PEFT_TYPE = "LMFORGE_ADAPTER"
DEFAULTS: dict[str, Any] = {
    "bottleneck_size": 64,
    "adapter_type": "serial",  # serial (Houlsby) | parallel (He et al.)
    "targets": "attn,mlp",  # after attention, after the MLP, or both
    "activation": "relu",
    "scaling": 1.0,  # s (He et al. scale the parallel adapter, e.g. by 4)
    "init_std": 1e-3,  # std of the up-projection's initial weights (its bias starts at zero)
}
SUGGESTED_LR = 1e-3
TYPES = ("serial", "parallel")
TARGETS = ("attn", "mlp")


class Bottleneck(nn.Module):
    """``forward(h, y) -> y + s * up(act(down(x)))`` with x = y (serial) or the sublayer input h (parallel)."""

    def __init__(self, dim: int, size: int, parallel: bool, activation: str, scaling: float,
                 init_std: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.zeros_(self.up.bias)
        self.parallel, self.scaling, self.activation = parallel, scaling, activation
        self.act = ACTIVATIONS[activation]
        self.disabled = False

    def adapter_params(self) -> list[str]:
        return ["down.weight", "down.bias", "up.weight", "up.bias"]

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return y
        x = h if self.parallel else y
        return y + self.scaling * self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(y.dtype)


def _targets(value: Any) -> list[str]:
    names = [t.strip() for t in (value.split(",") if isinstance(value, str) else value) if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise LMForgeError(f"peft.targets: {bad[0] if bad else value!r} is not one of attn, mlp")
    return names


def apply(model: nn.Module, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Insert bottleneck adapters into every block of ``model`` (in place); the resolved options."""
    resolved = resolve(DEFAULTS, options, "adapter")
    size = positive(resolved, "bottleneck_size")
    kind = str(resolved["adapter_type"]).lower()
    if kind not in TYPES:
        raise LMForgeError(f"peft.adapter_type must be serial or parallel, got {kind!r}")
    if resolved["activation"] not in ACTIVATIONS or resolved["activation"] in ("swiglu", "geglu", "reglu"):
        raise LMForgeError(f"peft.activation: unknown activation {resolved['activation']!r}")
    targets = _targets(resolved["targets"])
    resolved.update(adapter_type=kind, targets=",".join(targets), scaling=float(resolved["scaling"]),
                    init_std=float(resolved["init_std"]))
    if any(b.adapter_attn is not None or b.adapter_mlp is not None for b in model.blocks):
        raise LMForgeError("the model already has bottleneck adapters")
    device = model_device(model)
    for block in model.blocks:
        for t in targets:
            mod = Bottleneck(model.cfg.n_embd, size, kind == "parallel", resolved["activation"], resolved["scaling"],
                             resolved["init_std"])
            setattr(block, f"adapter_{t}", mod.to(device))
    return resolved


def to_peft(model: nn.Module, resolved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter files' contents: an lmforge-own config (PEFT's file layout) and tensors with lmforge names."""
    tensors = {}
    for i, block in enumerate(model.blocks):
        for t in TARGETS:
            mod = getattr(block, f"adapter_{t}")
            if mod is not None:
                for p in mod.adapter_params():
                    tensors[f"blocks.{i}.adapter_{t}.{p}"] = mod.get_parameter(p).detach().float().cpu().contiguous()
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "inference_mode": True,
              **{k: resolved.get(k, v) for k, v in DEFAULTS.items()}}
    return config, tensors


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Apply adapters described by ``config`` to ``model`` and load ``tensors`` (names as ``to_peft`` writes)."""
    if config.get("peft_type") != PEFT_TYPE:
        raise LMForgeError(f"adapter_config.json: peft_type {config.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    resolved = apply(model, {k: config[k] for k in DEFAULTS if k in config})
    own = {f"blocks.{i}.adapter_{t}.{p}": getattr(b, f"adapter_{t}")
           for i, b in enumerate(model.blocks) for t in _targets(resolved["targets"])
           for p in ("down.weight", "down.bias", "up.weight", "up.bias")}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise LMForgeError(f"adapter_model.safetensors: {what} for this model and adapter config")
    with torch.no_grad():
        for name, mod in own.items():
            p = mod.get_parameter(name.split(".", 3)[3])
            t = tensors[name]
            if t.shape != p.shape:
                raise LMForgeError(f"adapter_model.safetensors: {name} has shape {tuple(t.shape)}, expected "
                                   f"{tuple(p.shape)}")
            p.copy_(t)
    return resolved
