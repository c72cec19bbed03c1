"""Feed-forward blocks: plain (GELU/ReLU/SiLU) and gated (SwiGLU, GeGLU, ReGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.matmul import call

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "reglu": F.relu,
}


class MLP(nn.Module):
    """fc2(act(fc1(x))); gated variants compute fc1 as one [gate | up] projection: fc2(act(gate) * up)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated
        hidden = cfg.hidden_size
        self.fc1 = nn.Linear(cfg.n_embd, hidden * (2 if self.gated else 1), bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(hidden, cfg.n_embd, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = call(self.fc1, x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return call(self.fc2, h)
