"""Training checkpoints: written atomically, verified by checksum, resumed exactly.

A checkpoint is a directory ``ckpt-NNNNNNN/`` inside the run directory holding ``config.json`` and
``model.safetensors`` (so it is also an lmforge model checkpoint), the tokenizer files, ``optimizer.pt`` and
``rng.pt`` (tensors only: loaded with ``weights_only=True``), ``trainer_state.json`` and ``MANIFEST.json`` (size and
sha256 of every file); with ``train.ema_decay`` the model file holds the moving average and
``train_weights.safetensors`` the raw weights training resumes from. It is built in a temporary directory
(``.tmp-ckpt-*``, removed at the next start if a kill left one) and renamed into place, so a killed process or a
full disk never leaves a half-written checkpoint that resume would pick up.

Damaged checkpoints (a failed checksum, a file that does not load) are never deleted: they are renamed
``ckpt-N.damaged`` (no longer seen as checkpoints) when training goes on without them, and left untouched when the
run refuses to continue (``--resume`` with no usable checkpoint).
"""

from __future__ import annotations

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
from lmforge.files import MODEL_FILES, public_modes
from lmforge.manifest import MANIFEST, verify_manifest, write_manifest
from lmforge.model.weights import check_finite
from lmforge.train.batches import StreamMismatch, check_stream
from lmforge.train.distributed import launched_world

CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
TMP_PREFIX = ".tmp-ckpt-"
TRAIN_WEIGHTS = "train_weights.safetensors"  # raw weights, present when model.safetensors holds their EMA
EMA_WEIGHTS = "ema_weights.safetensors"  # a PEFT run's average of its trainable weights (its export holds them too)
__all__ = ["EMA_WEIGHTS", "MANIFEST", "TRAIN_WEIGHTS", "NoUsableCheckpoint", "clean_partial_saves",
           "latest_checkpoint", "list_checkpoints", "load_training_checkpoint", "move_aside", "prepare_run_dir",
           "prune", "save_training_checkpoint", "usable", "verify", "check_processes"]


class NoUsableCheckpoint(LMForgeError):
    """A run directory holds checkpoints but none verifies and loads."""

    def __init__(self, run_dir: Path, problems: list[tuple[Path, str]]) -> None:
        newest, why = problems[0]
        more = f" and {len(problems) - 1} older one(s)" if len(problems) > 1 else ""
        super().__init__(f"{run_dir}: no usable checkpoint to resume from ({newest.name}: {why}{more}); nothing "
                         "was changed: pass --resume-or-start to move them aside and start from scratch")


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
                             export: Callable[[Path], None] | None = None, weights_name: str | None = None,
                             rng: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/ckpt-{step}`` atomically and return its path. ``train_sd``: the raw training weights when
    ``model_sd`` holds their moving average (written as ``train_weights.safetensors``, used only to resume).
    ``export(dir)`` adds files (a chat template; a PEFT stage's adapter files). ``weights_name``: ``model_sd`` holds
    only the trainable weights and is stored under that name, with no config.json (the export makes the checkpoint
    loadable: adapter files and a reference to the base). ``rng``: the random generators' state to store (default:
    this process's; a run of several processes stores the others' under ``"ranks"``)."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=run_dir))
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
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        write_manifest(tmp)
        public_modes(tmp)
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
    """None if the checkpoint is complete and every file has the size and checksum of its manifest, else what is
    wrong."""
    return verify_manifest(ckpt, required=True)


def checkpoint_step(ckpt: Path) -> int:
    """The step of a ``ckpt-NNNNNNN`` directory."""
    return int(CKPT_RE.match(ckpt.name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and passed over."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"skipping {ckpt}: {problem}")
    return None


def _load_pt(path: Path) -> Any:
    """A tensors-only ``.pt`` file; anything else (pickled objects, a damaged file) is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code in the file, RuntimeError/EOFError for damage
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if lines and lines[0].startswith("Weights only load failed"):  # torch's advice to load it anyway: not ours
            what = next((ln for ln in lines[1:] if "GLOBAL" in ln or "Unsupported" in ln), lines[-1])
            raise LMForgeError(f"{path}: refused to load: it holds more than tensors ({what[:200]}), which could "
                               "run code") from None
        first = lines[0] if lines else type(e).__name__
        raise LMForgeError(f"{path}: refused to load ({type(e).__name__}: {first[:200]})") from None


# what Trainer.restore reads from trainer_state.json, and the types it needs
_TRAINER_FIELDS = {"step": int, "best_val": (int, float), "recent": list, "rollbacks": int, "train_data": dict}


def _trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json, refused as damage (naming it and the field) unless it holds what a resume reads."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{path.parent}: damaged checkpoint: {path.name}: {' '.join(str(e).split())}") from None
    if not isinstance(state, dict):
        raise LMForgeError(f"{path.parent}: damaged checkpoint: {path.name} is not a JSON object")
    for k, kind in _TRAINER_FIELDS.items():
        if k not in state or isinstance(state[k], bool) or not isinstance(state[k], kind):
            raise LMForgeError(f"{path.parent}: damaged checkpoint: {path.name}: field {k!r} is missing or of the "
                               "wrong type")
    return state


def load_training_checkpoint(ckpt: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problem = verify(ckpt)
    if problem:
        raise LMForgeError(f"{ckpt}: damaged checkpoint: {problem}")
    train_weights = ckpt / TRAIN_WEIGHTS
    model_file = next((ckpt / n for n in ("model.safetensors", EMA_WEIGHTS) if (ckpt / n).is_file()), None)
    try:
        model = load_file(str(model_file)) if model_file is not None else {}
        train_model = load_file(str(train_weights)) if train_weights.is_file() else None
    except (SafetensorError, OSError, ValueError) as e:
        raise LMForgeError(f"{ckpt}: damaged checkpoint: {' '.join(str(e).split())}") from None
    for f, sd in ((model_file, model), (train_weights, train_model)):  # (resuming a run that diverged repeated
        if sd:  # its divergence; an adapter's checkpoint has no model file)
            check_finite(sd, f"{ckpt}: damaged checkpoint: {f.name}")
    trainer = _trainer_state(ckpt / "trainer_state.json")
    return {"model": model, "train_model": train_model, "optimizer": _load_pt(ckpt / "optimizer.pt"),
            "rng": _load_pt(ckpt / "rng.pt"), "trainer": trainer}


def check_processes(ckpt: Path, stream: dict[str, Any] | None = None) -> None:
    """Refuse, before anything loads, to resume ``ckpt`` with another number of processes than wrote it (each
    process's share of the data stream depends on it), or another of the ``stream`` settings a command knows
    before loading (its batch size); the Trainer checks the rest of the stream's shape."""
    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text()).get("train_data") or {}
    except (OSError, ValueError):
        return  # (reported as damage by the load itself)
    try:
        check_stream(saved, {"world": launched_world(), **(stream or {})})
    except StreamMismatch as e:
        raise LMForgeError(f"{ckpt}: cannot resume from it: {e}") from None


def usable(ckpt: Path) -> str | None:
    """None if ``ckpt`` verifies and every file loads (a trial load, discarded), else what is wrong."""
    try:
        load_training_checkpoint(ckpt)
    except LMForgeError as e:
        return str(e).removeprefix(f"{ckpt}: ")
    return None


def move_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to ``ckpt-N.damaged`` (``-2``, ``-3``... if taken): kept, no longer listed."""
    dest = ckpt.with_name(ckpt.name + ".damaged")
    k = 2
    while dest.exists():
        dest, k = ckpt.with_name(f"{ckpt.name}.damaged-{k}"), k + 1
    os.replace(ckpt, dest)
    return dest


def clean_partial_saves(run_dir: Path, warn=print) -> list[Path]:
    """Remove ``.tmp-ckpt-*`` directories a process killed while saving left behind (never complete checkpoints)."""
    removed = []
    if run_dir.is_dir():
        for p in sorted(run_dir.glob(TMP_PREFIX + "*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
                warn(f"removed {p}: an unfinished checkpoint save (the process was killed while writing it)")
    return removed


def prepare_run_dir(run_dir: Path, resume: bool, start_over: bool, main: bool = True, warn=print,
                    stream: dict[str, Any] | None = None, replace_model: bool | None = None) -> bool:
    """Decide, before training, whether a run in ``run_dir`` resumes (True) or starts from scratch (False).

    ``resume``: continue from the newest usable checkpoint (a run directory without checkpoints starts fresh); if
    there are checkpoints but none is usable, refuse (NoUsableCheckpoint) unless ``start_over``, which moves them
    aside. Without ``resume``, existing checkpoints are refused unless ``start_over``: good ones are then deleted,
    damaged ones moved aside. A directory holding a model but no checkpoint (not a run of ours) is replaced only with
    ``replace_model`` (--overwrite; default: ``start_over``). Only the ``main`` process changes files; the others reach
    the same decision."""
    replace_model = start_over if replace_model is None else replace_model
    if main:
        clean_partial_saves(run_dir, warn)
    ckpts = list_checkpoints(run_dir)
    held = [n for n in MODEL_FILES if (run_dir / n).is_file()]
    if not ckpts:
        if held and not replace_model:  # a model of its own (a quantized one was left unloadable beside new weights)
            raise LMForgeError(f"{run_dir}: already holds a model ({', '.join(held)}) and no checkpoint to resume "
                               "from; pass --overwrite to replace it, or choose another --out")
        if held and main:
            remove_model_files(run_dir)
        return False
    if resume:
        problems = []
        for ckpt in reversed(ckpts):
            problem = usable(ckpt)
            if problem is None:
                check_processes(ckpt, stream)
                return True  # the trainer resumes from it and moves the damaged newer ones aside
            problems.append((ckpt, problem))
        if not start_over:
            raise NoUsableCheckpoint(run_dir, problems)
    elif not start_over:
        raise LMForgeError(f"{run_dir}: already holds checkpoints (newest {ckpts[-1].name}); pass --resume to "
                           "continue from it, or --overwrite to start from scratch")
    reasons = dict(problems) if resume else {}
    for ckpt in ckpts:
        problem = reasons[ckpt] if resume else verify(ckpt)
        if main and problem is None:
            shutil.rmtree(ckpt)
        elif main:
            warn(f"moved {ckpt} ({problem}) to {move_aside(ckpt)}; starting from scratch")
    if main and (run_dir / "best").is_file():
        (run_dir / "best").unlink()
    if main:
        remove_model_files(run_dir)
    return False


def remove_model_files(run_dir: Path) -> None:
    """A run started over removes the previous model's files, so that nothing of it is left beside the new one."""
    for n in MODEL_FILES:
        if (run_dir / n).is_file():
            (run_dir / n).unlink()


def prune(run_dir: Path, keep_last: int, protect: set[str] = frozenset()) -> None:
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)
