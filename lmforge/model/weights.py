"""A Decoder from a state dict and the files of a model directory: the primitives every model reader and writer
(``lmforge.checkpoint``, ``lmforge.quant.io``, ``lmforge.interop``) builds on, so none of them imports another."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.files import public_modes
from lmforge.model.decoder import Decoder
from lmforge.model.positions import Rotary, alibi_slopes

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def model_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Parameters to save: tied output weights and non-persistent buffers are left out."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a fully written directory ``tmp`` to ``path`` with ordinary permissions (``public_modes``), replacing
    what was there with renames only."""
    public_modes(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the previous version back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """Refuse (one line naming ``source`` and the tensor) floating weights holding NaN or infinite values."""
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise LMForgeError(f"{source}: tensor {bad!r} holds NaN or infinite values (damaged weights)")


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str) -> Decoder:
    """A Decoder with ``sd`` loaded, checking names and shapes with one-line errors."""
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = model_state_dict(model)
    for k, v in expected.items():
        if k not in sd:
            raise LMForgeError(f"{source}: tensor {k!r} is missing from the weights")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise LMForgeError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)} but the config needs "
                               f"{tuple(v.shape)}; does the config match the weights?")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise LMForgeError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unused)")
    check_finite(sd, source)
    # assign: the loaded tensors become the parameters (no second copy of the weights in memory)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False,
                          assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    reinit_buffers(model)
    return model.eval()


def reinit_buffers(model: Decoder) -> None:
    """Non-persistent buffers (rotary tables, ALiBi slopes) are not in the weights: recompute them."""
    cfg = model.cfg
    if hasattr(model, "rotary"):
        r = Rotary(cfg.rotary_dim, cfg.block_size, cfg.rope_theta, cfg.rope_interleaved)
        model.rotary.cos, model.rotary.sin = r.cos, r.sin
    if hasattr(model, "alibi"):
        model.alibi = alibi_slopes(cfg.n_head)
