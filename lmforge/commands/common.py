"""Helpers shared by the commands (torch-free): --resume/--overwrite and the run directory's lock, one-line reports.
Loading a model with its tokenizer is ``lmforge.loading``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lmforge.commands.args import (  # torch-free helpers that moved there; still importable from here
    add_model_args,  # noqa: F401
    max_vocab_padding,  # noqa: F401
)
from lmforge.errors import LMForgeError
from lmforge.files import DirLock

T = TypeVar("T")


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """--resume, --resume-or-start and --overwrite, shared by every training command."""
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest usable checkpoint in --out (none yet: start); refuses when "
                   "every checkpoint is damaged")
    p.add_argument("--resume-or-start", action="store_true",
                   help="like --resume, but when no checkpoint is usable move the damaged ones aside "
                   "(ckpt-N.damaged) and start from scratch")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch in an --out that already holds checkpoints (deleted; damaged ones are "
                   "moved aside) or a model without checkpoints (its files deleted); with --resume: only when none is "
                   "usable")


def is_main_process() -> bool:
    """True except in the non-first processes of a torchrun launch."""
    return os.environ.get("RANK", "0") == "0"


def report(msg: str) -> None:
    """A line on stderr from the first process only."""
    if is_main_process():
        print(msg, file=sys.stderr)


class Planned(Exception):
    """Raised by ``train_in`` when the command was only to check its settings (``args.plan_only``, set by the
    pipeline's flag check): the config was read and checked, nothing else was done."""


def train_in(args, out: str | Path, train: Callable[[bool], T], stream: dict | None = None) -> T:
    """Run ``train(resuming)`` in the run directory ``out``: its lock held by the first process for the whole run (a
    second run in the same ``--out`` is refused before it touches anything), --resume/--overwrite applied first
    (``stream``: data-stream settings a checkpoint resumed must share, checked before anything loads)."""
    if getattr(args, "plan_only", False):
        raise Planned
    with DirLock(out) if is_main_process() else contextlib.nullcontext():
        return train(resolve_resume(args, out, stream))


def resolve_resume(args, out: str | Path, stream: dict | None = None) -> bool:
    """Prepare a run directory for --resume/--resume-or-start/--overwrite; True if training resumes from it."""
    from lmforge.train.state import prepare_run_dir

    model = getattr(args, "model", None)
    if isinstance(model, str) and Path(model).exists():  # (it replaced the model it had read)
        m, o = Path(model).resolve(), Path(out).resolve()
        if m == o or o in m.parents:
            raise LMForgeError(f"--out {out}: it would replace {model}, the model being trained from; write elsewhere")
    resume = args.resume or args.resume_or_start
    resuming = prepare_run_dir(Path(out), resume, args.resume_or_start or args.overwrite, is_main_process(),
                               report, stream, replace_model=args.overwrite)
    if resume and not resuming:
        report(f"no checkpoint to resume from in {out}: starting from scratch")
    return resuming


