"""The one module-swapping helper: quantization (``QuantLinear``) and PEFT (LoRA, adapters) both replace submodules
of a model by name through these functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``; the empty name is the model itself."""
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at dotted ``name`` inside ``model``; returns the module it replaced."""
    parent, _, child = name.rpartition(".")
    owner = get_module(model, parent)
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old


def find_modules(model: nn.Module, predicate: Callable[[str, nn.Module], bool]) -> list[str]:
    """Dotted names of the submodules for which ``predicate(name, module)`` holds, in definition order."""
    return [n for n, m in model.named_modules() if n and predicate(n, m)]


def replace_modules(model: nn.Module, names: Iterable[str],
                    factory: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replace each named submodule by ``factory(name, old)``; returns {name: new module}."""
    out = {}
    for name in list(names):
        new = factory(name, get_module(model, name))
        set_module(model, name, new)
        out[name] = new
    return out
