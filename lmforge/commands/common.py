"""Helpers shared by commands that take ``--model``: loading a model with its tokenizer, choosing a device."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lmforge.errors import LMForgeError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="lmforge checkpoint dir (also `lmforge quantize` output), Hugging Face dir, "
                                   "llama2.c .bin or GGUF file (default: the bundled stories260K)")
    p.add_argument("--tokenizer", help="tokenizer path (default: found with the model)")
    p.add_argument("--adapter", help="a PEFT adapter directory (lmforge sft --peft output, or PEFT's "
                                     "adapter_config.json + adapter_model.safetensors) applied to --model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")


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
                   "moved aside); with --resume: only when none is usable")


def is_main_process() -> bool:
    """True except in the non-first processes of a torchrun launch."""
    return os.environ.get("RANK", "0") == "0"


def report(msg: str) -> None:
    """A line on stderr from the first process only."""
    if is_main_process():
        print(msg, file=sys.stderr)


def resolve_resume(args, out: str | Path) -> bool:
    """Prepare a run directory for --resume/--resume-or-start/--overwrite; True if training resumes from it."""
    from lmforge.train.state import prepare_run_dir

    resume = args.resume or args.resume_or_start
    resuming = prepare_run_dir(Path(out), resume, args.resume_or_start or args.overwrite, is_main_process(),
                               report)
    if resume and not resuming:
        report(f"no checkpoint to resume from in {out}: starting from scratch")
    return resuming


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LMForgeError(f"--device {name!r}: {e}") from None


def find_tokenizer_path(model_path: Path, vocab_size: int) -> Path | None:
    """Tokenizer beside a model: the checkpoint dir itself, or llama2.c's tokenizer.bin / tok{vocab}.bin."""
    if model_path.is_dir() or model_path.suffix == ".gguf":  # GGUF files carry their tokenizer
        return model_path
    for name in ("tokenizer.bin", f"tok{vocab_size}.bin", "tokenizer.model"):
        if (model_path.parent / name).exists():
            return model_path.parent / name
    return None


def load_model_and_tokenizer(model: str | None, tokenizer: str | None, device: str = "auto",
                             adapter: str | None = None):
    """(model, tokenizer) for any ``--model`` path; an adapter directory as ``--model`` loads its base (recorded in
    its adapter_config.json) with the adapter applied, as does ``adapter``."""
    from lmforge.assets import STORIES260K
    from lmforge.checkpoint import load_model
    from lmforge.peft import is_adapter_dir, read_adapter_base
    from lmforge.tokenizer import load_tokenizer

    path = Path(model) if model else STORIES260K
    if path.is_dir() and is_adapter_dir(path) and not (path / "config.json").is_file():
        base = read_adapter_base(path)
        if not base:
            raise LMForgeError(f"{path}: adapter without a base model path; pass the base as --model and this "
                               "directory as --adapter")
        own_tok = tokenizer or (str(path) if find_tokenizer_files(path) else None)
        m, tok = load_model_and_tokenizer(base, own_tok, device, adapter=str(path))
        _read_template(path, tok)
        if adapter:  # an adapter on top of this one (a chain: DPO's adapter on the SFT adapter's model)
            _add_adapter(m, tok, adapter)
        return m, tok
    m = load_model(path)
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer_path(path, m.cfg.vocab_size)
    if tok_path is None:
        raise LMForgeError(f"{path}: no tokenizer found beside the model; pass --tokenizer PATH")
    tok = load_tokenizer(str(tok_path))
    _read_template(path, tok)
    check_vocab(m.cfg, tok, str(path), str(tok_path))
    if adapter:
        _add_adapter(m, tok, adapter)
    return m.to(pick_device(device)), tok


def _add_adapter(m, tok, adapter: str) -> None:
    from lmforge.peft import load_adapter

    load_adapter(m, adapter)  # LoRA already in the model is merged into its weights first
    _read_template(Path(adapter), tok)
    m.requires_grad_(False)


def find_tokenizer_files(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer_config.json", "tokenizer.bin", "tokenizer.model"))


def _read_template(path: Path, tok) -> None:
    """The chat template a fine-tuned model (or adapter) was trained with, saved beside it."""
    template = path / "chat_template.jinja"
    if path.is_dir() and template.is_file():
        tok.chat_template = template.read_text(encoding="utf-8")


def max_vocab_padding(tok_vocab: int) -> int:
    """How many more rows a model's embedding may have than its tokenizer has ids: checkpoints round the vocabulary
    up for speed (GPT-2 50,257 -> 50,304, GPT-NeoX 50,277 -> 50,432, Qwen2 151,665 -> 151,936): up to 128 rows or
    1/256 of the vocabulary, whichever is more."""
    return max(128, tok_vocab // 256)


def check_vocab(cfg, tok, model_src: str, tok_src: str) -> None:
    """Refuse a tokenizer that does not belong to the model, both ways: every tokenizer id must be a row of the
    model, the model's vocabulary may exceed the tokenizer's only by padding (else it would generate ids that have
    no text), and the model's BOS/EOS ids must be tokens of the tokenizer."""
    if tok.vocab_size > cfg.vocab_size:
        raise LMForgeError(f"{tok_src}: tokenizer has {tok.vocab_size:,} tokens but the model {model_src} only "
                           f"{cfg.vocab_size:,}: not the model's tokenizer")
    if cfg.vocab_size - tok.vocab_size > max_vocab_padding(tok.vocab_size):
        raise LMForgeError(f"{tok_src}: tokenizer has {tok.vocab_size:,} tokens but the model {model_src} has "
                           f"{cfg.vocab_size:,} (ids {tok.vocab_size:,}..{cfg.vocab_size - 1:,} would have no text): "
                           "not the model's tokenizer")
    for name in ("bos_id", "eos_id"):
        i = getattr(cfg, name)
        if i is not None and not 0 <= i < tok.vocab_size:
            raise LMForgeError(f"{tok_src}: the model {model_src} has {name.replace('_id', '').upper()} token {i}, "
                               f"outside the tokenizer's {tok.vocab_size:,} tokens: not the model's tokenizer")
