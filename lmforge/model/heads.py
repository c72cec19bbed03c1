"""A scalar head on the one decoder: the value model (critic) of PPO and the reward model.

``ScalarHeadModel(decoder)`` maps every position's final hidden state to one number (``values``) and reads a
sequence's score at its last real token (``score``), from an attention mask, so right and left padding both work.
A reward model also stores a normalisation (``norm_gain * raw + norm_bias``; ``normalize`` sets it so the scores of
given sequences have mean 0 and std 1).

A saved reward/value model is an lmforge checkpoint directory (``config.json`` + ``model.safetensors`` + tokenizer
files, loadable by every ``--model``, which uses the LM part) plus ``value_head.safetensors`` and
``value_head.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint import load_model, replace_dir, save_checkpoint
from lmforge.errors import LMForgeError
from lmforge.model.decoder import Decoder

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: (B, T) mask -> (B, T), 0 on left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (right or left padding)."""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).amax(-1)
    if (last < 0).any():
        raise ValueError("every sequence needs at least one real token")
    return last


class ScalarHeadModel(nn.Module):
    """``decoder`` + a linear head (n_embd -> 1) initialised N(0, 1/sqrt(n_embd + 1)) with bias 0 (Stiennon et al.,
    InstructGPT). ``norm_gain``/``norm_bias`` buffers hold the reward normalisation (identity until ``normalize``)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder
        d = decoder.cfg.n_embd
        self.head = nn.Linear(d, 1)
        p = next(decoder.parameters())
        self.head.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(d + 1))
            nn.init.zeros_(self.head.bias)
        self.register_buffer("norm_gain", torch.ones((), device=p.device))
        self.register_buffer("norm_bias", torch.zeros((), device=p.device))

    @property
    def cfg(self):
        return self.decoder.cfg

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, d). With a mask, padding is hidden from attention and positions
        count only real tokens. Right padding needs neither: under the causal mask no real token sees the padding
        after it, and attention without a key mask runs the memory-efficient kernel (a reward model's step on 16 x
        512 tokens of SmolLM2 held 16.7 GB, mostly attention weights of the masked kernel)."""
        kw = {}
        if attention_mask is not None:
            m = attention_mask.bool()
            if not bool((m[:, 1:] & ~m[:, :-1]).any()):  # right-padded (or unpadded): no real token after padding
                return self.decoder.hidden_states(input_ids)
            kw = {"position_ids": positions_from_mask(attention_mask), "key_mask": m}
        return self.decoder.hidden_states(input_ids, **kw)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw head output at every position (B, T)."""
        return self.head(self.hidden(input_ids, attention_mask)).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              normalized: bool = True, rows: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One score per sequence (B,), read at its last real token; ``norm_gain * raw + norm_bias`` when
        ``normalized``. ``rows``: the same sequences with each prompt written once (``data.preference.shared_rows``;
        ``attention_mask`` then required), run as such; the last tokens are read through ``rows["index"]``."""
        raw = self.head(self.last_hidden(input_ids, attention_mask, rows)).squeeze(-1).float()
        return raw * self.norm_gain + self.norm_bias if normalized else raw

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    rows: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The final hidden state at each sequence's last real token (B, d): what the head reads (``score``)."""
        if rows is not None:
            h = self.decoder.hidden_states(rows["input_ids"], rows["position_ids"], branch_ids=rows["branch_ids"])
            at = rows["index"].gather(1, last_real_index(attention_mask)[:, None]).squeeze(1)
            return h.flatten(0, 1)[at]
        h = self.hidden(input_ids, attention_mask)
        return h[:, -1] if attention_mask is None else h[torch.arange(h.shape[0], device=h.device),
                                                         last_real_index(attention_mask)]

    forward = score

    @torch.no_grad()
    def normalize(self, raw_scores: torch.Tensor) -> bool:
        """Set norm_gain and norm_bias so that these raw scores map to mean 0 and std 1. Scores without a spread
        (one score, or all equal) are only centred (gain 1): returns False then."""
        x = raw_scores.float()
        if not torch.isfinite(x).all():
            raise LMForgeError("cannot normalise rewards: the model gives non-finite scores")
        mean = x.mean().item()
        std = x.std().item() if x.numel() > 1 else 0.0
        if not std > 0:
            self.norm_gain.fill_(1.0)
            self.norm_bias.fill_(-mean)
            return False
        self.norm_gain.fill_(1.0 / std)
        self.norm_bias.fill_(-mean / std)
        return True


def save_scalar_model(model: ScalarHeadModel, path: str | Path, tokenizer=None, kind: str = "reward",
                      extra: dict | None = None) -> Path:
    """Write the decoder as an lmforge checkpoint plus the head (``value_head.safetensors``) and a small json
    (``kind``: reward or value, the normalisation, ``extra``), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        inner = save_checkpoint(model.decoder, tmp / "ckpt", tokenizer)
        tensors = {"weight": model.head.weight.detach().float().contiguous(),
                   "bias": model.head.bias.detach().float().contiguous(),
                   "norm_gain": model.norm_gain.detach().float().reshape(1),
                   "norm_bias": model.norm_bias.detach().float().reshape(1)}
        save_file(tensors, str(inner / HEAD_WEIGHTS), metadata={"format": "pt"})
        meta = {"kind": kind, "n_embd": model.cfg.n_embd, "norm_gain": model.norm_gain.item(),
                "norm_bias": model.norm_bias.item(), **(extra or {})}
        (inner / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(inner, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_scalar_model_dir(path: str | Path) -> bool:
    return (Path(path) / HEAD_WEIGHTS).is_file()


def load_scalar_model(path: str | Path) -> ScalarHeadModel:
    """Load a directory written by ``save_scalar_model`` (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not is_scalar_model_dir(path):
        raise LMForgeError(f"{path}: not a reward/value model directory (no {HEAD_WEIGHTS})")
    decoder = load_model(path)
    try:
        sd = load_file(str(path / HEAD_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{path / HEAD_WEIGHTS}: cannot read safetensors: {e}") from None
    d = decoder.cfg.n_embd
    if tuple(sd.get("weight", torch.empty(0)).shape) != (1, d) or tuple(sd.get("bias", torch.empty(0)).shape) != (1,):
        raise LMForgeError(f"{path / HEAD_WEIGHTS}: expected tensors weight (1, {d}) and bias (1,) for this model")
    model = ScalarHeadModel(decoder)
    with torch.no_grad():
        model.head.weight.copy_(sd["weight"])
        model.head.bias.copy_(sd["bias"])
        if "norm_gain" in sd:
            model.norm_gain.fill_(sd["norm_gain"].item())
            model.norm_bias.fill_(sd["norm_bias"].item())
    return model.eval()


def read_head_config(path: str | Path) -> dict:
    """The json beside the head (kind, normalisation, what the training stage stored)."""
    p = Path(path) / HEAD_CONFIG
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{p}: cannot read: {e}") from None
