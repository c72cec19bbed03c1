"""lmforge checkpoints (a directory: config.json, model.safetensors, tokenizer files) and loading any model path.

Nothing here unpickles: weights are safetensors, or ``torch.load(weights_only=True)`` for legacy HF ``.bin``.
A checkpoint's ``MANIFEST.json`` (size and sha256 of every file; ``lmforge.manifest``) is checked on every load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.interop.gguf import load_gguf_model
from lmforge.interop.hf import read_hf_dir
from lmforge.interop.llama2c import read_llama2c
from lmforge.manifest import MANIFEST, sha256_file, verify_manifest, write_manifest
from lmforge.model import Decoder
from lmforge.model.weights import CONFIG, WEIGHTS, build_model, model_state_dict, reinit_buffers, replace_dir
from lmforge.quant.io import load_quantized
from lmforge.quant_config import QUANT_FILE

# files of a training checkpoint that loading the model does not read (checked by --resume instead)
TRAINING_ONLY = frozenset({"optimizer.pt", "rng.pt", "trainer_state.json", "train_weights.safetensors"})


# re-exported: the primitives live in lmforge.model.weights (every reader and writer shares them)
__all__ = ["CONFIG", "MANIFEST", "WEIGHTS", "build_model", "is_lmforge_dir", "load_checkpoint", "load_model",
           "model_state_dict", "reinit_buffers", "replace_dir", "save_checkpoint", "sha256_file", "verify_manifest",
           "write_manifest"]


def is_lmforge_dir(path: Path) -> bool:
    if not (path / CONFIG).is_file():
        return False
    try:
        d = json.loads((path / CONFIG).read_text())
    except ValueError:
        return False
    return "n_layer" in d and "norm_placement" in d


def save_checkpoint(model: Decoder, path: str | Path, tokenizer=None) -> Path:
    """Write an lmforge checkpoint directory atomically (a temp dir beside it, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.cfg.save(tmp / CONFIG)
        save_file(model_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        write_manifest(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path) -> Decoder:
    path = Path(path)
    # a training checkpoint is always written with its manifest: one without it was tampered with or cut short
    problem = verify_manifest(path, required=(path / "trainer_state.json").is_file(), skip=TRAINING_ONLY)
    if problem:
        raise LMForgeError(f"{path}: damaged checkpoint: {problem}")
    cfg = ModelConfig.load(path / CONFIG)
    try:
        sd = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{path / WEIGHTS}: cannot read safetensors: {e}") from None
    return build_model(cfg, sd, str(path / WEIGHTS))


def load_model(path: str | Path) -> Decoder:
    """Load an lmforge checkpoint, a Hugging Face checkpoint directory or a llama2.c ``.bin``."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / QUANT_FILE).is_file():  # lmforge quantize output
            return load_quantized(path)
        if is_lmforge_dir(path):
            return load_checkpoint(path)
        if (path / CONFIG).is_file():
            cfg, sd = read_hf_dir(path)
            return build_model(cfg, sd, str(path))
        raise LMForgeError(f"{path}: not a checkpoint directory (no config.json)")
    if path.suffix == ".bin":
        cfg, sd = read_llama2c(path)
        return build_model(cfg, sd, str(path))
    if path.suffix == ".gguf":
        return load_gguf_model(path)
    raise LMForgeError(f"{path}: unknown model format (expected a checkpoint directory, a llama2.c .bin or a .gguf)")
