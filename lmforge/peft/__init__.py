"""Parameter-efficient fine-tuning: one table of methods, each a module with ``DEFAULTS``, ``SUGGESTED_LR``,
``apply(model, options) -> resolved options`` and, where PEFT has a format for it, ``to_peft``/``from_peft``.
Adapters are saved as PEFT saves them (``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's key layout
for the transformers export of the base), so ``peft.PeftModel.from_pretrained`` reads lmforge's adapters and lmforge
reads PEFT's (``load_adapter``). lmforge's own resolved options ride in the safetensors metadata.

Methods without a PEFT format, and bases without a transformers equivalent, use lmforge's layout in the same two
files: ``adapter_config.json`` = {"peft_type": "LMFORGE", "lmforge_method", "lmforge_options",
"base_model_name_or_path"}, tensors keyed by their lmforge names (``peft.base.adapter_state_dict``); loading applies
the method with those options and loads the tensors by name."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.model.weights import replace_dir
from lmforge.peft import adapter, lora, prefix, prompt, ptuning, qlora
from lmforge.peft.base import adapter_modules, adapter_state_dict, get_adapter_params, set_trainable_params
from lmforge.peft.lora import merge_adapter, unmerge_adapter

METHODS: dict[str, ModuleType] = {
    "lora": lora,
    "qlora": qlora,
    "adapter": adapter,
    "prefix": prefix,
    "prompt": prompt,
    "ptuning": ptuning,
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LMFORGE_TYPE = "LMFORGE"
FORMATS = ("peft", "lmforge")

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "METHODS", "apply_peft", "is_adapter_dir", "load_adapter",
           "merge_adapter", "read_adapter", "read_adapter_base", "read_adapter_config", "save_adapter",
           "unmerge_adapter"]


def get_method(method: str) -> ModuleType:
    if method not in METHODS:
        raise LMForgeError(f"--peft {method!r}: allowed values are {sorted(METHODS)}")
    return METHODS[method]


def apply_peft(model: nn.Module, method: str, options: dict[str, Any] | None = None,
               tokenizer=None) -> dict[str, Any]:
    """Insert ``method`` into ``model`` (in place), freeze everything else; returns the fully resolved options.
    ``tokenizer`` serves methods initialised from text (prompt tuning's ``prompt_tuning_init_text``)."""
    mod = get_method(method)
    fold_adapters(model)
    for key in options or {}:
        if key not in mod.DEFAULTS:
            raise LMForgeError(f"peft.{key}: not an option of {method} (options: {', '.join(sorted(mod.DEFAULTS))})")
    if method == "prompt":
        resolved = mod.apply(model, dict(options or {}), tokenizer=tokenizer)
    else:
        resolved = mod.apply(model, dict(options or {}))
    set_trainable_params(model)
    return resolved


def fold_adapters(model: nn.Module) -> None:
    """Merge the LoRA adapters ``model`` already carries (an adapter directory loaded as the model, e.g. the output
    of ``lmforge sft --peft lora``) into its weights and put the plain layers back, so that new adapters start from
    the fine-tuned model and, disabled, give it as the reference. Adapters without weights to merge (prefix, prompt,
    bottleneck) are refused."""
    mods = adapter_modules(model)
    other = sorted({type(m).__name__ for m in mods.values() if not isinstance(m, lora.LoRALinear)})
    if other:
        raise LMForgeError(f"the model already carries {', '.join(other)} adapters, which cannot be merged into its "
                           "weights before new ones are added; start from its base model instead")
    if mods:
        lora.unwrap(model)


def adapter_files(model: nn.Module, resolved: dict[str, Any], method: str, fmt: str = "auto"
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(adapter_config, tensors, format used). ``auto``: PEFT's layout when the method and the base allow it."""
    mod = get_method(method)
    if fmt not in ("auto", *FORMATS):
        raise LMForgeError(f"--format {fmt!r}: allowed values are {list(FORMATS)}")
    if fmt in ("auto", "peft") and hasattr(mod, "to_peft"):
        try:
            config, tensors = mod.to_peft(model, resolved)
            return config, tensors, "peft"
        except LMForgeError:
            if fmt == "peft":
                raise
    elif fmt == "peft":
        raise LMForgeError(f"--format peft: PEFT has no format for {method}; use --format lmforge")
    config = {"peft_type": LMFORGE_TYPE, "lmforge_method": method,
              "lmforge_options": {k: v for k, v in resolved.items() if k != "method"}}
    return config, {k: v.float() for k, v in adapter_state_dict(model).items()}, "lmforge"


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None, resolved: dict[str, Any],
                 method: str | None = None, fmt: str = "auto") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically into ``out_dir``: PEFT's layout
    (``fmt="auto"`` falls back to lmforge's when PEFT has no format for the method or the base), or ``fmt``."""
    method = method or resolved.get("method") or "lora"
    config, tensors, _ = adapter_files(model, resolved, method, fmt)
    config["base_model_name_or_path"] = base_model
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        meta = {"format": "pt", "lmforge_method": method,
                "lmforge_options": json.dumps({k: v for k, v in resolved.items() if k != "method"})}
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_WEIGHTS).is_file()


def read_adapter(path: str | Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(method, adapter_config, tensors) of an adapter directory; lmforge's options are in config["lmforge_options"]."""
    p = Path(path)
    if not is_adapter_dir(p):
        raise LMForgeError(f"{p}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = read_adapter_config(p)
    try:
        with safe_open(str(p / ADAPTER_WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{p / ADAPTER_WEIGHTS}: cannot read safetensors: {e}") from None
    method = config.get("lmforge_method") or meta.get("lmforge_method")
    if method is None:
        ptype = config.get("peft_type")
        method = next((n for n, m in METHODS.items() if getattr(m, "PEFT_TYPE", None) == ptype), None)
        if method is None:
            raise LMForgeError(f"{p / ADAPTER_CONFIG}: peft_type={ptype!r} is not a method lmforge implements")
    if "lmforge_options" in meta and "lmforge_options" not in config:
        config["lmforge_options"] = json.loads(meta["lmforge_options"])
    return method, config, tensors


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """An adapter directory's ``adapter_config.json`` (a JSON object; else one line naming the file)."""
    f = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{f}: cannot read: {e}") from None
    if not isinstance(config, dict):
        raise LMForgeError(f"{f}: expected a JSON object of settings, got {type(config).__name__}")
    return config


def read_adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory names (``base_model_name_or_path``), if any."""
    return read_adapter_config(path).get("base_model_name_or_path")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Apply the method an adapter directory describes (lmforge- or PEFT-made) to ``model`` and load its weights;
    everything but the adapter is frozen. Returns the resolved options (with ``method``)."""
    method, config, tensors = read_adapter(adapter_dir)
    mod = get_method(method)
    fold_adapters(model)
    if config.get("peft_type") == LMFORGE_TYPE:
        resolved = mod.apply(model, dict(config.get("lmforge_options") or {}))
        params = get_adapter_params(model)
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or extra:
            raise LMForgeError(f"{Path(adapter_dir) / ADAPTER_WEIGHTS}: tensor {(missing or extra)[0]!r} is "
                               f"{'missing' if missing else 'unexpected'} for {method} with the saved options")
        with torch.no_grad():
            for k, p in params.items():
                if p.shape != tensors[k].shape:
                    raise LMForgeError(f"{Path(adapter_dir) / ADAPTER_WEIGHTS}: tensor {k!r} is "
                                       f"{tuple(tensors[k].shape)}, the model needs {tuple(p.shape)}")
                p.copy_(tensors[k])
    elif hasattr(mod, "from_peft"):
        try:
            resolved = mod.from_peft(model, config, tensors)
        except lora.NoHFLayout as e:  # most often: the adapter of another model (it said "cannot export")
            base = config.get("base_model_name_or_path")
            made = f" (it was made for {base})" if base else ""
            raise LMForgeError(f"{adapter_dir}: not an adapter for this base model{made}: {e}") from None
        except LMForgeError as e:  # the methods name their files alone: name them in the directory given
            msg = str(e)
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                if msg.startswith(name + ":"):
                    raise LMForgeError(f"{Path(adapter_dir) / name}{msg[len(name):]}") from None
            raise
    else:
        raise LMForgeError(f"{adapter_dir}: {method} adapters load from lmforge's layout only")
    set_trainable_params(model)
    return {**resolved, "method": method}
