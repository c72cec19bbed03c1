"""The adapter protocol every PEFT method follows (as torchtune's ``modules/peft``).

An adapter module (a LoRA linear, a bottleneck adapter, a prefix/prompt encoder) implements ``adapter_params()``:
the names of its own trainable parameters, relative to the module. Everything else is built on that:
``get_adapter_params`` collects them model-wide, ``set_trainable_params`` freezes the rest, ``adapter_state_dict``
keeps only them (adapter-only checkpoints), and ``disable_adapter`` turns every adapter off so that the base model
serves as the frozen reference in DPO/PPO without a second copy of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class AdapterModule(Protocol):
    """A module holding adapter weights. ``disabled = True`` makes its forward equal the base model's."""

    disabled: bool

    def adapter_params(self) -> list[str]:
        """Names of this module's adapter parameters (relative to the module, e.g. ``["lora_a.weight", ...]``)."""
        ...


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterModule)}


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """{full dotted name: parameter} of every adapter parameter in ``model``."""
    out: dict[str, nn.Parameter] = {}
    for name, mod in adapter_modules(model).items():
        for p in mod.adapter_params():
            full = f"{name}.{p}" if name else p
            out[full] = mod.get_parameter(p)
    return out


def set_trainable_params(model: nn.Module, trainable: dict[str, nn.Parameter] | None = None) -> None:
    """``requires_grad`` only for ``trainable`` (default: the adapter parameters); everything else frozen."""
    trainable = get_adapter_params(model) if trainable is None else trainable
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (detached), keyed by their full names: what a PEFT checkpoint stores."""
    return {k: p.detach() for k, p in get_adapter_params(model).items()}


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every adapter is off and ``model`` computes the base model (the DPO/PPO reference)."""
    mods = list(adapter_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total
