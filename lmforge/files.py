"""File-system helpers shared by every writer of outputs (no torch: data tools import this too)."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import LMForgeError


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_modes(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the permissions of what the user creates
    (0666/0777 minus the umask): ``mkdtemp`` makes directories private and safetensors writes files 0600, which
    left model directories unreadable to another user (a server's account, a shared cache)."""
    mask = current_umask()
    if path.is_dir():
        for d, _, files in os.walk(path):
            os.chmod(d, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(d, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def check_output(out: Path, overwrite: bool, sources: list[Path], flag: str) -> None:
    """Before any work: refuse (one line) an output that would replace what is being read (the same path, or a
    directory holding it), and an existing non-empty output unless ``overwrite``."""
    target = out.resolve()
    for src in sources:
        if src is not None and src.exists() and (target == src.resolve() or target in src.resolve().parents):
            raise LMForgeError(f"{flag} {out}: it would replace {src}, which is being read; write elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LMForgeError(f"{flag} {out}: exists; pass --overwrite to replace it")
