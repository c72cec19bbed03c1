"""Loading a model with its tokenizer from any ``--model`` path (a checkpoint, a Hugging Face or PEFT directory,
a GGUF or llama2.c file), shared by the commands, the training stages, the pipeline and the evaluation harness."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.assets import STORIES260K, default_model
from lmforge.checkpoint import load_model
from lmforge.commands.args import check_vocab, find_tokenizer_files, find_tokenizer_path, read_template, take_model_ends
from lmforge.errors import LMForgeError
from lmforge.peft import is_adapter_dir, load_adapter, read_adapter_base
from lmforge.tokenizer import load_tokenizer
from lmforge.train import distributed as D


def load_model_and_tokenizer(model: str | None, tokenizer: str | None, device: str = "auto",
                             adapter: str | None = None):
    """(model, tokenizer) for any ``--model`` path; an adapter directory as ``--model`` loads its base (recorded in
    its adapter_config.json) with the adapter applied, as does ``adapter``."""
    path = Path(model) if model else STORIES260K
    if path.is_dir() and is_adapter_dir(path) and not (path / "config.json").is_file():
        base = read_adapter_base(path)
        if not base:
            raise LMForgeError(f"{path}: adapter without a base model path; pass the base as --model and this "
                               "directory as --adapter")
        own_tok = tokenizer or (str(path) if find_tokenizer_files(path) else None)
        m, tok = load_model_and_tokenizer(base, own_tok, device, adapter=str(path))
        read_template(path, tok)
        if adapter:  # an adapter on top of this one (a chain: DPO's adapter on the SFT adapter's model)
            _add_adapter(m, tok, adapter, path)
        return m, tok
    m = load_model(path)
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer_path(path, m.cfg.vocab_size)
    if tok_path is None:
        raise LMForgeError(f"{path}: no tokenizer found beside the model; pass --tokenizer PATH")
    tok = load_tokenizer(str(tok_path))
    read_template(path, tok)
    check_vocab(m.cfg, tok, str(path), str(tok_path))
    take_model_ends(m.cfg, tok)
    if adapter:
        _add_adapter(m, tok, adapter, path)
    return m.to(D.pick_device(device)), tok


def _add_adapter(m, tok, adapter: str, model_path: Path) -> None:
    base = read_adapter_base(adapter)
    if base and Path(base).exists() and Path(base).resolve() != model_path.resolve():  # (scored a model never made)
        print(f"warning: {adapter} was trained on {base}; applying it to {model_path}", file=sys.stderr)
    load_adapter(m, adapter)  # LoRA already in the model is merged into its weights first
    read_template(Path(adapter), tok)
    m.requires_grad_(False)


def start_fine_tuning(cfg: Any, stage: str) -> tuple[torch.device, D.Dist, Any, Any]:
    """The start of sft, dpo and reward: the launch checked (``train.distributed``), the device and processes set
    up, ``cfg.model`` defaulted to the bundled model and loaded on the CPU with its tokenizer, and the seed set for
    the fresh adapters and heads (the same run from the same seed). Returns (device, dist, model, tokenizer)."""
    D.check_mode(cfg.train.distributed, stage)
    device, dist = D.start(cfg.train.device)
    cfg.model = default_model(cfg.model)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer or None, "cpu")
    torch.manual_seed(cfg.train.seed)
    return device, dist, model, tok
