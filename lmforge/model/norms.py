"""LayerNorm and RMSNorm, chosen by ``ModelConfig.norm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 like the LLaMA reference."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._w2: tuple[int, int, torch.Tensor] | None = None  # [w, w] for the one-position path, by weight version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            d = x.shape[-1]
            if x.dim() == 3 and x.shape[1] == 1 and x.device.type == "cpu" and not (
                    torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
                # a decoding step (one new position per sequence, no gradient): layer_norm([x, -x]) has mean 0 and
                # variance mean(x^2), i.e. it is x / sqrt(mean(x^2) + eps), in one fused CPU kernel where rms_norm
                # runs about 20 small ops (the step's norms took twice as long). Passes over whole sequences keep
                # rms_norm, so a scoring pass and a training pass compute the same numbers (PPO's ratio is 1).
                w = self.weight
                if w.is_inference():  # no version counter to tell an update: built each time (one more op)
                    w2 = torch.cat([w, w])
                else:
                    key = (w.data_ptr(), w._version)
                    if self._w2 is None or self._w2[:2] != key:
                        self._w2 = (*key, torch.cat([w.detach(), w.detach()]))
                    w2 = self._w2[2]
                return F.layer_norm(torch.cat([x, -x], -1), (2 * d,), w2, None, self.eps)[..., :d]
            return F.rms_norm(x, (d,), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return self.weight * y


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
