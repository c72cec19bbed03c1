"""Prompt tuning (Lester et al., 2021): trainable soft tokens prepended to the input embeddings, nothing else.

The soft tokens sit in the decoder's ``soft_prompt`` hook: they take positions 0..n-1 and the real tokens follow, as
transformers numbers them when PEFT prepends ``inputs_embeds``; outputs cover the real tokens only. PEFT's format:
``adapter_config.json`` (``peft_type: PROMPT_TUNING``) + ``prompt_embeddings`` (n, n_embd) in
``adapter_model.safetensors``. This module also holds what the prompt-learning methods (prompt, P-tuning, prefix)
share: option resolution and the PEFT config fields.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmforge.errors import LMForgeError

PEFT_TYPE = "PROMPT_TUNING"  # adapter_config.json's peft_type
DEFAULTS: dict[str, Any] = {
    "num_virtual_tokens": 20,
    "prompt_tuning_init": "SAMPLE_VOCAB",  # TEXT | SAMPLE_VOCAB | RANDOM (PEFT's names)
    "prompt_tuning_init_text": None,  # with TEXT: tokenized, repeated or cut to num_virtual_tokens
    "tokenizer_name_or_path": None,  # with TEXT: a tokenizer lmforge loads (the model's, by default the caller's)
}
SUGGESTED_LR = 3e-2  # PEFT's prompt-tuning examples; soft tokens need a large rate (Lester et al. used 0.3)
INITS = ("TEXT", "SAMPLE_VOCAB", "RANDOM")


class SoftPrompt(nn.Module):
    """Fixed-size trainable soft tokens: ``forward(B) -> (B, n, n_embd)`` (the decoder's ``soft_prompt`` hook)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())
        self.n_tokens = init.shape[0]
        self.disabled = False

    def adapter_params(self) -> list[str]:
        return ["weight"]

    def embeddings(self) -> torch.Tensor:
        """The (n, n_embd) soft tokens (what PEFT saves as ``prompt_embeddings``)."""
        return self.weight

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings()[None].expand(batch_size, -1, -1)


# ---- shared by the prompt-learning methods -----------------------------------------------------------------------
# ranges of the numeric options of the adapter and virtual-token methods: (least, below) with None for unbounded
# (they reached PyTorch as "normal expects std >= 0.0" or "num_layers must be greater than zero", naming no option)
RANGES: dict[str, tuple[float | None, float | None]] = {
    "num_virtual_tokens": (1, None), "bottleneck_size": (1, None), "encoder_hidden_size": (1, None),
    "encoder_num_layers": (1, None), "encoder_dropout": (0, 1), "init_std": (0, None),
}


def resolve(defaults: dict[str, Any], options: dict[str, Any] | None, method: str) -> dict[str, Any]:
    """``defaults`` updated by ``options`` (values from the command line may be strings: converted to the default's
    type); an unknown name, a non-finite number, a fraction for an integer or a value out of its range is a
    one-line error naming ``peft.KEY``."""
    out = dict(defaults)
    for k, v in (options or {}).items():
        if k not in defaults:
            raise LMForgeError(f"unknown option peft.{k} for --peft {method} (known: {', '.join(sorted(defaults))})")
        v = _convert(v, defaults[k], k)
        if isinstance(v, float) and not math.isfinite(v):
            raise LMForgeError(f"peft.{k} {v}: must be a finite number")
        if isinstance(defaults[k], int) and not isinstance(defaults[k], bool) and isinstance(v, float):
            if not v.is_integer():
                raise LMForgeError(f"peft.{k} {v}: expected an integer")
            v = int(v)
        lo, below = RANGES.get(k, (None, None))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                lo is not None and v < lo or below is not None and v >= below):
            raise LMForgeError(f"peft.{k} {v}: must be {f'in [{lo}, {below})' if below is not None else f'>= {lo}'}")
        out[k] = v
    return out


def virtual_tokens(model: nn.Module, resolved: dict[str, Any]) -> int:
    """``peft.num_virtual_tokens``, which must leave room for text in the model's context."""
    n = positive(resolved, "num_virtual_tokens")
    if n >= model.cfg.block_size:
        raise LMForgeError(f"peft.num_virtual_tokens {n}: must be less than the model's context of "
                           f"{model.cfg.block_size} positions (the virtual tokens take positions of it)")
    return n


def _convert(value: Any, default: Any, key: str) -> Any:
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        if isinstance(value, str) and default is None and value.lower() in ("none", "null"):
            return None
        if isinstance(value, str) and default is None and value.lstrip("-").isdigit():
            return int(value)
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise LMForgeError(f"peft.{key}: expected {type(default).__name__}, got {value!r}") from None
    return value


def check_free(model: nn.Module) -> None:
    """One prompt-learning method at a time (as PEFT): the decoder's virtual-token hooks must be empty."""
    if getattr(model, "kv_prefix", None) is not None or getattr(model, "soft_prompt", None) is not None:
        raise LMForgeError("the model already has prefix/prompt tuning applied (one virtual-token method at a time)")


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes (its first floating parameter or buffer: quantized layers hold integer buffers)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def positive(resolved: dict[str, Any], key: str) -> int:
    n = resolved[key]
    if not isinstance(n, int) or n <= 0:
        raise LMForgeError(f"peft.{key} must be a positive integer, got {n!r}")
    return n


def peft_config(model: nn.Module, peft_type: str, n_tokens: int, **fields: Any) -> dict[str, Any]:
    """The fields PEFT's prompt-learning configs share, as ``_prepare_prompt_learning_config`` fills them on the
    transformers export of the base (``num_attention_heads``/``token_dim`` are the key/value heads for prefix
    tuning with grouped-query attention)."""
    cfg = model.cfg
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "num_virtual_tokens": n_tokens,
        "token_dim": cfg.n_embd,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_head,
        "num_layers": cfg.n_layer,
        **fields,
    }


def check_peft_config(model: nn.Module, config: dict[str, Any], peft_type: str, tensors: dict[str, torch.Tensor],
                      width: int) -> torch.Tensor:
    """The ``prompt_embeddings`` tensor of a PEFT prompt-learning adapter, checked against ``model``."""
    if config.get("peft_type") != peft_type:
        raise LMForgeError(f"adapter_config.json: peft_type {config.get('peft_type')!r}, expected {peft_type!r}")
    if config.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise LMForgeError(f"adapter_config.json: task_type {config.get('task_type')!r}; lmforge loads CAUSAL_LM")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise LMForgeError("adapter_config.json: num_transformer_submodules must be 1 for a decoder-only model")
    if "prompt_embeddings" not in tensors:
        raise LMForgeError("adapter_model.safetensors: no 'prompt_embeddings' tensor")
    emb = tensors["prompt_embeddings"]
    n = int(config.get("num_virtual_tokens") or emb.shape[0])
    if tuple(emb.shape) != (n, width):
        raise LMForgeError(f"adapter_model.safetensors: prompt_embeddings has shape {tuple(emb.shape)}, the model "
                           f"needs ({n}, {width})")
    return emb


# ---- prompt tuning -----------------------------------------------------------------------------------------------
def init_embeddings(model: nn.Module, n: int, init: str, text: str | None, tokenizer) -> torch.Tensor:
    """(n, n_embd) initial soft tokens: rows of the word embeddings of ``text`` (repeated or cut to n, as PEFT does),
    of random vocabulary ids, or N(0, 1) (``nn.Embedding``'s init, PEFT's RANDOM)."""
    cfg, device = model.cfg, model_device(model)

    def rows(ids: torch.Tensor) -> torch.Tensor:  # through the module: a quantized table has no ``weight``
        with torch.no_grad():
            return model.wte(ids.to(device)).float().clone()

    if init == "RANDOM":
        return torch.randn(n, cfg.n_embd, device=device)
    if init == "SAMPLE_VOCAB":
        return rows(torch.randint(0, cfg.vocab_size, (n,)))
    if not text:
        raise LMForgeError("peft.prompt_tuning_init TEXT needs peft.prompt_tuning_init_text")
    if tokenizer is None:
        raise LMForgeError("peft.prompt_tuning_init TEXT needs a tokenizer (peft.tokenizer_name_or_path)")
    ids = tokenizer.encode(text)
    if not ids:
        raise LMForgeError("peft.prompt_tuning_init_text tokenizes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return rows(torch.tensor(ids))


def _tokenizer(resolved: dict[str, Any], tokenizer):
    if tokenizer is not None or resolved["prompt_tuning_init"] != "TEXT" or not resolved["tokenizer_name_or_path"]:
        return tokenizer
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(str(resolved["tokenizer_name_or_path"]))


def apply(model: nn.Module, options: dict[str, Any] | None = None, tokenizer=None) -> dict[str, Any]:
    """Put ``num_virtual_tokens`` soft tokens at the input of ``model`` (in place); the resolved options.
    ``tokenizer`` (a loaded lmforge tokenizer) serves TEXT initialisation when no path is given."""
    resolved = resolve(DEFAULTS, options, "prompt")
    n = virtual_tokens(model, resolved)
    init = str(resolved["prompt_tuning_init"]).upper()
    if init not in INITS:
        raise LMForgeError(f"peft.prompt_tuning_init must be one of {', '.join(INITS)}, got {init!r}")
    resolved["prompt_tuning_init"] = init
    check_free(model)
    emb = init_embeddings(model, n, init, resolved["prompt_tuning_init_text"], _tokenizer(resolved, tokenizer))
    model.soft_prompt = SoftPrompt(emb).to(model_device(model))
    return resolved


def to_peft(model: nn.Module, resolved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``adapter_config.json`` fields and tensors for the prompt-tuned ``model``."""
    init = resolved.get("prompt_tuning_init", "RANDOM")
    text, tok = resolved.get("prompt_tuning_init_text"), resolved.get("tokenizer_name_or_path")
    if init == "TEXT" and not (text and tok):  # PEFT's config insists on both for TEXT; the weights are what count
        init = "RANDOM"
    fields = {"prompt_tuning_init": init, "prompt_tuning_init_text": text if init == "TEXT" else None,
              "tokenizer_name_or_path": tok if init == "TEXT" else None}
    sp = model.soft_prompt
    config = peft_config(model, PEFT_TYPE, sp.n_tokens, **fields)
    return config, {"prompt_embeddings": sp.embeddings().detach().float().cpu().contiguous()}


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Apply a PEFT prompt-tuning adapter (config + tensors) to ``model``; the resolved options."""
    emb = check_peft_config(model, config, PEFT_TYPE, tensors, model.cfg.n_embd)
    check_free(model)
    model.soft_prompt = SoftPrompt(emb).to(model_device(model))
    init = str(config.get("prompt_tuning_init") or "RANDOM").upper()
    return {"num_virtual_tokens": emb.shape[0], "prompt_tuning_init": init if init in INITS else "RANDOM",
            "prompt_tuning_init_text": config.get("prompt_tuning_init_text"),
            "tokenizer_name_or_path": config.get("tokenizer_name_or_path")}
