"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes of ``num_virtual_tokens`` positions in every layer.

The prefixes sit in the decoder's ``kv_prefix`` hook: every layer attends to them before the real tokens, which take
positions n.. (as transformers numbers them when PEFT passes the prefix as ``past_key_values``); with a KV cache they
occupy its start. Keys are used as given (no rotary applied to them, as for any cached key).

Layout (PEFT's): a flat (n, n_layer * 2 * token_dim) tensor, token_dim = kv_heads * head_dim, viewed as
(n, n_layer * 2, kv_heads, head_dim); entry 2l holds layer l's keys and 2l + 1 its values. With
``prefix_projection`` the flat tensor is an MLP (Linear, Tanh, Linear; ``encoder_hidden_size``) of trainable
(n, token_dim) embeddings during training; saving folds the MLP away and stores the flat prefix (PEFT's
``prompt_embeddings``), which is also what a loaded adapter holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.model.cache import KVCache
from lmforge.peft.prompt import (
    check_free,
    check_peft_config,
    model_device,
    model_dtype,
    peft_config,
    positive,
    resolve,
    virtual_tokens,
)

PEFT_TYPE = "PREFIX_TUNING"  # adapter_config.json's peft_type
DEFAULTS: dict[str, Any] = {
    "num_virtual_tokens": 20,
    "prefix_projection": False,  # reparameterise by an MLP during training
    "encoder_hidden_size": None,  # the MLP's width (default: the model width)
    "init": "vocab",  # vocab: keys/values of random vocabulary tokens (Li & Liang's real activations) | random
}
SUGGESTED_LR = 1e-2  # PEFT's prefix-tuning examples
INITS = ("vocab", "random")


class KVPrefix(nn.Module):
    """Per-layer key/value prefixes: ``forward(B) -> (k, v)``, each (n_layer, B, kv_heads, n, head_dim) (the
    decoder's ``kv_prefix`` hook)."""

    def __init__(self, n_layer: int, kv_heads: int, head_dim: int, n: int, flat: torch.Tensor | None = None,
                 projection_hidden: int | None = None) -> None:
        super().__init__()
        self.n_layer, self.kv_heads, self.head_dim, self.n_tokens = n_layer, kv_heads, head_dim, n
        self.disabled = False
        token_dim = kv_heads * head_dim
        self.width = n_layer * 2 * token_dim
        self.projection = projection_hidden is not None
        if self.projection:
            self.embedding = nn.Parameter(torch.randn(n, token_dim))  # nn.Embedding's N(0, 1), as PEFT
            self.transform = nn.Sequential(nn.Linear(token_dim, projection_hidden), nn.Tanh(),
                                           nn.Linear(projection_hidden, self.width))
        else:
            self.embedding = nn.Parameter(flat.detach().clone().float() if flat is not None
                                          else torch.randn(n, self.width))

    def adapter_params(self) -> list[str]:
        return [n for n, _ in self.named_parameters()]

    def flat(self) -> torch.Tensor:
        """The (n, n_layer * 2 * token_dim) prefix (PEFT's ``prompt_embeddings``)."""
        return self.transform(self.embedding) if self.projection else self.embedding

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.flat().view(self.n_tokens, 2 * self.n_layer, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        shape = (self.n_layer, batch_size, self.kv_heads, self.n_tokens, self.head_dim)
        return f[0::2, None].expand(shape), f[1::2, None].expand(shape)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP reparameterisation by the prefix it computes (the forward stays the same)."""
        if self.projection:
            self.embedding = nn.Parameter(self.flat().detach().clone())
            del self.transform
            self.projection = False


@torch.no_grad()
def vocab_prefix(model: nn.Module, n: int) -> torch.Tensor:
    """The flat prefix of the keys/values the model computes for n random vocabulary tokens."""
    cfg = model.cfg
    device = model_device(model)
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)
    cache = KVCache(cfg, 1, n, device=device, dtype=model_dtype(model))
    was_training = model.training
    model.eval()
    try:
        model.hidden_states(ids, cache=cache)
    finally:
        model.train(was_training)
    kv = torch.stack([cache.k[:, 0], cache.v[:, 0]], dim=1).float()  # (L, 2, H, n, hd)
    return kv.reshape(2 * cfg.n_layer, cfg.kv_heads, n, cfg.head_size).permute(2, 0, 1, 3).reshape(n, -1)


def apply(model: nn.Module, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Give every layer of ``model`` trainable key/value prefixes (in place); the resolved options."""
    resolved = resolve(DEFAULTS, options, "prefix")
    n = virtual_tokens(model, resolved)
    if resolved["init"] not in INITS:
        raise LMForgeError(f"peft.init must be one of {', '.join(INITS)}, got {resolved['init']!r}")
    cfg = model.cfg
    if cfg.position == "glm2d":
        raise LMForgeError("prefix tuning does not support GLM's 2D positions")
    check_free(model)
    hidden = None
    if resolved["prefix_projection"]:
        if resolved["encoder_hidden_size"] is None:
            resolved["encoder_hidden_size"] = cfg.n_embd
        hidden = positive(resolved, "encoder_hidden_size")
    flat = vocab_prefix(model, n) if resolved["init"] == "vocab" and hidden is None else None
    prefix = KVPrefix(cfg.n_layer, cfg.kv_heads, cfg.head_size, n, flat, hidden)
    model.kv_prefix = prefix.to(model_device(model))
    return resolved


def to_peft(model: nn.Module, resolved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config and tensors: the flat prefix as ``prompt_embeddings`` (an MLP reparameterisation is folded)."""
    cfg, kp = model.cfg, model.kv_prefix
    with torch.no_grad():
        flat = kp.flat().detach().float().cpu().contiguous()
    hidden = resolved.get("encoder_hidden_size") or cfg.n_embd
    fields = {"prefix_projection": bool(resolved.get("prefix_projection", False)), "encoder_hidden_size": hidden}
    config = peft_config(model, PEFT_TYPE, kp.n_tokens, **fields)
    if cfg.kv_heads != cfg.n_head:  # grouped-query: PEFT provisions the prefix for the key/value heads
        config.update(num_attention_heads=cfg.kv_heads, token_dim=cfg.kv_heads * cfg.head_size)
    elif cfg.head_size * cfg.n_head != cfg.n_embd:
        config.update(token_dim=cfg.n_head * cfg.head_size)
    return config, {"prompt_embeddings": flat}


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Apply a PEFT prefix-tuning adapter to ``model``: the saved flat prefix (any projection already folded)."""
    cfg = model.cfg
    heads = int(config.get("num_attention_heads") or cfg.kv_heads)
    token_dim = int(config.get("token_dim") or cfg.kv_heads * cfg.head_size)
    if heads != cfg.kv_heads or token_dim != cfg.kv_heads * cfg.head_size:
        raise LMForgeError(f"adapter_config.json: prefix of {heads} heads x {token_dim // max(heads, 1)} dims; the "
                           f"model has {cfg.kv_heads} key/value heads x {cfg.head_size}")
    if int(config.get("num_layers") or cfg.n_layer) != cfg.n_layer:
        raise LMForgeError(f"adapter_config.json: num_layers {config.get('num_layers')}, the model has {cfg.n_layer}")
    flat = check_peft_config(model, config, PEFT_TYPE, tensors, cfg.n_layer * 2 * token_dim)
    check_free(model)
    prefix = KVPrefix(cfg.n_layer, cfg.kv_heads, cfg.head_size, flat.shape[0], flat)
    model.kv_prefix = prefix.to(model_device(model))
    return {"num_virtual_tokens": flat.shape[0], "prefix_projection": bool(config.get("prefix_projection", False)),
            "encoder_hidden_size": config.get("encoder_hidden_size"), "init": "vocab"}
