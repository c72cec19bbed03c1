"""P-tuning (Liu et al., "GPT Understands, Too"): virtual tokens produced by a prompt encoder (an MLP, or a
bidirectional LSTM followed by an MLP) over trainable input embeddings, placed at the input as prompt tuning does.

The encoder has PEFT's ``PromptEncoder`` shapes (``encoder_reparameterization_type`` MLP|LSTM,
``encoder_hidden_size``, ``encoder_num_layers`` and ``encoder_dropout`` for the LSTM). As PEFT does, the saved
adapter holds the encoder's output (``prompt_embeddings`` (n, n_embd), ``peft_type: P_TUNING``): a loaded adapter is
a fixed soft prompt (training resumes from lmforge's own checkpoints, which keep the encoder).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.peft.prompt import (
    SoftPrompt,
    check_free,
    check_peft_config,
    model_device,
    peft_config,
    positive,
    resolve,
    virtual_tokens,
)

PEFT_TYPE = "P_TUNING"  # adapter_config.json's peft_type
DEFAULTS: dict[str, Any] = {
    "num_virtual_tokens": 20,
    "encoder_reparameterization_type": "MLP",  # MLP | LSTM
    "encoder_hidden_size": None,  # default: the model width (PEFT: token_dim)
    "encoder_num_layers": 2,  # LSTM layers (PEFT ignores it for the MLP)
    "encoder_dropout": 0.0,  # LSTM dropout
}
SUGGESTED_LR = 1e-3  # PEFT's P-tuning examples
TYPES = ("MLP", "LSTM")


class PromptEncoder(nn.Module):
    """Trainable embeddings (n, d) mapped by an MLP or an LSTM+MLP: ``forward(B) -> (B, n, d)`` (the decoder's
    ``soft_prompt`` hook). The encoder's output does not depend on the batch: it is computed once and expanded."""

    def __init__(self, n: int, d: int, kind: str, hidden: int, lstm_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_tokens, self.kind, self.disabled = n, kind, False
        self.embedding = nn.Embedding(n, d)  # N(0, 1), as PEFT
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(d, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d))

    def adapter_params(self) -> list[str]:
        return [n for n, _ in self.named_parameters()]

    def embeddings(self) -> torch.Tensor:
        """The (n, d) virtual tokens: the encoder applied to its input embeddings."""
        h = self.embedding.weight[None]
        if self.kind == "LSTM":
            h = self.lstm_head(h)[0]
        return self.mlp_head(h)[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings()[None].expand(batch_size, -1, -1)


def apply(model: nn.Module, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put a P-tuning prompt encoder at the input of ``model`` (in place); the resolved options."""
    resolved = resolve(DEFAULTS, options, "ptuning")
    n = virtual_tokens(model, resolved)
    kind = str(resolved["encoder_reparameterization_type"]).upper()
    if kind not in TYPES:
        raise LMForgeError(f"peft.encoder_reparameterization_type must be MLP or LSTM, got {kind!r}")
    resolved["encoder_reparameterization_type"] = kind
    if resolved["encoder_hidden_size"] is None:
        resolved["encoder_hidden_size"] = model.cfg.n_embd
    hidden = positive(resolved, "encoder_hidden_size")
    check_free(model)
    enc = PromptEncoder(n, model.cfg.n_embd, kind, hidden, int(resolved["encoder_num_layers"]),
                        float(resolved["encoder_dropout"]))
    model.soft_prompt = enc.to(model_device(model))
    return resolved


def to_peft(model: nn.Module, resolved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config and tensors: the encoder's output as ``prompt_embeddings`` (the encoder is folded away)."""
    sp = model.soft_prompt
    with torch.no_grad():
        emb = sp.embeddings().detach().float().cpu().contiguous()
    fields = {k: resolved.get(k, DEFAULTS[k]) for k in DEFAULTS if k != "num_virtual_tokens"}
    if fields["encoder_hidden_size"] is None:
        fields["encoder_hidden_size"] = model.cfg.n_embd
    return peft_config(model, PEFT_TYPE, sp.n_tokens, **fields), {"prompt_embeddings": emb}


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Apply a PEFT P-tuning adapter: its saved virtual tokens become a fixed soft prompt."""
    emb = check_peft_config(model, config, PEFT_TYPE, tensors, model.cfg.n_embd)
    check_free(model)
    model.soft_prompt = SoftPrompt(emb).to(model_device(model))
    resolved = {k: config.get(k, v) for k, v in DEFAULTS.items()}
    resolved["num_virtual_tokens"] = emb.shape[0]
    return resolved
