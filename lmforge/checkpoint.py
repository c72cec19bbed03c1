"""lmforge checkpoints (a directory: config.json, model.safetensors, tokenizer files) and loading any model path.

Nothing here unpickles: weights are safetensors, or ``torch.load(weights_only=True)`` for legacy HF ``.bin``.
A checkpoint's ``MANIFEST.json`` (size and sha256 of every file) is checked on every load; a file already verified
with the same size, mtime, inode and ctime is not hashed again (the cache is ``~/.cache/lmforge/verified.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.interop.gguf import load_gguf_model
from lmforge.interop.hf import read_hf_dir
from lmforge.interop.llama2c import read_llama2c
from lmforge.model import Decoder
from lmforge.model.weights import CONFIG, WEIGHTS, build_model, model_state_dict, reinit_buffers, replace_dir
from lmforge.quant.io import load_quantized
from lmforge.quant_config import QUANT_FILE

MANIFEST = "MANIFEST.json"
# files of a training checkpoint that loading the model does not read (checked by --resume instead)
TRAINING_ONLY = frozenset({"optimizer.pt", "rng.pt", "trainer_state.json", "train_weights.safetensors"})


# ---- manifests: size + sha256 of every file, verified on load ------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """``MANIFEST.json``: {file name: {"size": bytes, "sha256": hex}} of every file in ``directory``."""
    entries = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
               for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=2) + "\n")


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "verified.json"


def _stat_key(path: Path) -> list[int]:
    """What a verified file must still have for its hash to be trusted again: size, mtime, inode and ctime (which
    no one can set back: a file rewritten and given its old mtime with ``touch -d`` or ``os.utime`` is hashed again)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _read_cache() -> dict[str, Any]:
    try:
        d = json.loads(_cache_path().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(digests: dict[str, str]) -> None:
    """Record files whose hash was just computed (best effort: a read-only cache directory is fine)."""
    cache = _read_cache()
    for name, digest in digests.items():
        try:
            cache[name] = [*_stat_key(Path(name)), digest]
        except OSError:
            continue
    if len(cache) > 4096:  # keep the newest entries only
        cache = dict(list(cache.items())[-2048:])
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _plain_name(name: str) -> bool:
    """A file name of the directory itself: no path separators, nothing absolute, not . or .."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def verify_manifest(directory: Path, required: bool = False, skip: frozenset[str] = frozenset()) -> str | None:
    """None if every file listed in ``directory/MANIFEST.json`` (except ``skip``) has its size and sha256, else what
    is wrong. A missing manifest is fine unless ``required``. Entries may be a bare sha256 (older training
    checkpoints)."""
    m = directory / MANIFEST
    if not m.is_file():
        return "no MANIFEST.json (incomplete)" if required else None
    try:
        manifest = json.loads(m.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError):
        return "MANIFEST.json is corrupt"
    cache = _read_cache()
    hashed: dict[str, str] = {}
    for name, entry in manifest.items():
        if name in skip:
            continue
        if not _plain_name(name):
            return f"MANIFEST.json names {name!r}, not a file of the checkpoint (corrupt)"
        digest, size = (entry, None) if isinstance(entry, str) else (
            entry.get("sha256"), entry.get("size")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
                and (size is None or (type(size) is int and size >= 0))):
            return f"MANIFEST.json: the entry of {name} is not a size and sha256 (corrupt)"
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        key = _stat_key(p)
        if size is not None and key[0] != size:
            return f"{name} has {key[0]:,} bytes, its manifest says {size:,} (truncated or damaged)"
        full = str(p.resolve())
        if cache.get(full) == [*key, digest]:
            continue
        if sha256_file(p) != digest:
            return f"{name} fails its checksum (damaged)"
        hashed[full] = digest
    if hashed:
        _remember(hashed)
    return None


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
    problem = verify_manifest(path, skip=TRAINING_ONLY)
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
