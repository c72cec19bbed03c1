"""Training checkpoints: written atomically, verified by checksum, resumed exactly.

A checkpoint is a directory ``ckpt-NNNNNNN/`` inside the run directory holding ``config.json`` and
``model.safetensors`` (so it is also an lmforge model checkpoint), the tokenizer files, ``optimizer.pt`` and
``rng.pt`` (tensors only: loaded with ``weights_only=True``), ``trainer_state.json`` and ``MANIFEST.json`` (sha256 of
every file); with ``train.ema_decay`` the model file holds the moving average and ``train_weights.safetensors`` the
raw weights training resumes from. It is built in a temporary directory and renamed into place, so a killed process
or a full disk never leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LMForgeError

CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
MANIFEST = "MANIFEST.json"
TRAIN_WEIGHTS = "train_weights.safetensors"  # raw weights, present when model.safetensors holds their EMA
EMA_WEIGHTS = "ema_weights.safetensors"  # a PEFT run's average of its trainable weights (its export holds them too)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": repr(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(ast.literal_eval(s["python"]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def save_training_checkpoint(run_dir: Path, step: int, model_sd: dict[str, torch.Tensor], model_cfg,
                             optimizer_sd: dict[str, Any], trainer_state: dict[str, Any], tokenizer=None,
                             train_sd: dict[str, torch.Tensor] | None = None,
                             export: Callable[[Path], None] | None = None, weights_name: str | None = None) -> Path:
    """Write ``run_dir/ckpt-{step}`` atomically and return its path. ``train_sd``: the raw training weights when
    ``model_sd`` holds their moving average (written as ``train_weights.safetensors``, used only to resume).
    ``export(dir)`` adds files (a chat template; a PEFT stage's adapter files). ``weights_name``: ``model_sd`` holds
    only the trainable weights and is stored under that name, with no config.json (the export makes the checkpoint
    loadable: adapter files and a reference to the base)."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=run_dir))
    try:
        if weights_name is None:
            model_cfg.save(tmp / "config.json")
        if export is not None:
            export(tmp)
        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / (weights_name or "model.safetensors")),
                  metadata={"format": "pt"})
        if train_sd is not None:
            save_file({k: v.contiguous() for k, v in train_sd.items()}, str(tmp / TRAIN_WEIGHTS),
                      metadata={"format": "pt"})
        torch.save(optimizer_sd, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for p in tmp.iterdir():  # flush file contents before the rename makes the checkpoint visible
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and its checksums match, else what is wrong."""
    m = ckpt / MANIFEST
    if not m.is_file():
        return "no MANIFEST.json (incomplete)"
    try:
        manifest = json.loads(m.read_text())
    except ValueError:
        return "MANIFEST.json is corrupt"
    for name, digest in manifest.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if _sha256(p) != digest:
            return f"{name} fails its checksum"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and passed over."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"skipping {ckpt}: {problem}")
    return None


def load_training_checkpoint(ckpt: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    problem = verify(ckpt)
    if problem:
        raise LMForgeError(f"{ckpt}: corrupt checkpoint: {problem}")
    train_weights = ckpt / TRAIN_WEIGHTS
    model_file = next((ckpt / n for n in ("model.safetensors", EMA_WEIGHTS) if (ckpt / n).is_file()), ckpt / "-")
    return {
        "model": load_file(str(model_file)) if model_file.is_file() else {},
        "train_model": load_file(str(train_weights)) if train_weights.is_file() else None,
        "optimizer": torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True),
        "rng": torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True),
        "trainer": json.loads((ckpt / "trainer_state.json").read_text()),
    }


def prune(run_dir: Path, keep_last: int, protect: set[str] = frozenset()) -> None:
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)
