"""Pretraining: next-token prediction (causal LM) or prefix LM on a token stream, then the shared Trainer."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.assets import builtin_path
from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.losses import token_loss_sum
from lmforge.model import Decoder
from lmforge.model.decoder import segment_positions
from lmforge.train import distributed as D
from lmforge.train.batches import TokenWindows
from lmforge.train.config import OBJECTIVES, RunConfig
from lmforge.train.loop import Trainer


def resolve_path(spec: str) -> Path:
    if not spec:
        raise LMForgeError("data.path is not set: give --data.path (a prepared directory, a text file, or "
                           "builtin:tinyshakespeare) or a --recipe (see lmforge pretrain --list-recipes)")
    if spec.startswith("builtin:"):
        return builtin_path(spec, "data.path")
    path = Path(spec)
    if not path.exists():
        raise LMForgeError(f"data.path={spec!r}: no such file or directory")
    return path


def build_tokenizer(spec: str, text_path: Path, out: Path):
    """'char' (vocabulary from the corpus), 'train:KIND:VOCAB' (train on the corpus), or a tokenizer path.
    A tokenizer built for a run is saved in ``out/tokenizer`` and reused when the run resumes."""
    tok_dir = out / "tokenizer"
    if spec == "char":
        from lmforge.tokenizer.char import VOCAB_FILE, CharTokenizer

        if (tok_dir / VOCAB_FILE).exists():
            return CharTokenizer.load(str(tok_dir))
        tok = CharTokenizer.from_text(text_path.read_text(encoding="utf-8"))
        tok.save(str(tok_dir))
        return tok
    from lmforge.tokenizer import load_tokenizer

    if spec.startswith("train:"):
        from lmforge.tokenizer.train import train_tokenizer

        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise LMForgeError(f"data.tokenizer={spec!r}: expected train:KIND:VOCAB, e.g. train:bytelevel-bpe:1024")
        if (tok_dir / "tokenizer_config.json").exists():
            return load_tokenizer(str(tok_dir))
        return train_tokenizer([str(text_path)], vocab_size=int(parts[2]), kind=parts[1], output=str(tok_dir))
    if not spec:
        raise LMForgeError("data.tokenizer is empty: give a tokenizer path, 'char' or 'train:KIND:VOCAB'")
    return load_tokenizer(spec)


def load_tokens(run: RunConfig, out: Path):
    """(tokenizer, train tokens, val tokens) from a text file (split at the tail like nanoGPT) or prepared shards."""
    path = resolve_path(run.data.path)
    if path.is_dir():
        from lmforge.data.dataset import load_prepared

        tok, train, val = load_prepared(path)
        return tok, train, val
    from lmforge.tokenizer.train import check_text_file

    if not check_text_file(path):  # UTF-8 (else one line naming the file and line) and not empty
        raise LMForgeError(f"{path}: no text to train on (the file is empty or blank)")
    tok = build_tokenizer(run.data.tokenizer, path, out)
    text = path.read_text(encoding="utf-8")
    ids = np.asarray(tok.encode(text), dtype=np.uint16 if tok.vocab_size < 65536 else np.uint32)
    n_val = len(ids) - int(len(ids) * (1 - run.data.val_fraction))  # nanoGPT: train = int(n * 0.9)
    return tok, ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def build_model_config(model: dict[str, Any], vocab_size: int, block_size: int) -> ModelConfig:
    fields = dict(model)
    if "preset" in fields:
        from lmforge.presets import get_preset

        name = fields.pop("preset")
        fields.setdefault("vocab_size", vocab_size)
        fields.setdefault("block_size", block_size)
        return get_preset(name, **fields)
    fields.setdefault("vocab_size", vocab_size)
    fields.setdefault("block_size", block_size)
    fields.setdefault("name", fields.get("family", "custom"))
    return ModelConfig.from_dict(fields, source="model section")


def document_segments(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Segment ids for packed documents: EOS ends a document (and belongs to it)."""
    ends = (x == eos_id).long()
    return ends.cumsum(dim=1) - ends


def causal_loss(model, batch):
    logits = model(batch["input_ids"], **batch.get("model_kwargs", {}))
    return token_loss_sum(logits, batch["targets"])


def prefix_loss(model, batch):
    """Prefix LM: a random prefix per sequence is attended bidirectionally and not scored."""
    x, y = batch["input_ids"], batch["targets"].clone()
    B, T = x.shape
    g = torch.Generator().manual_seed(int(x[:, 0].sum()))  # deterministic given the batch
    prefix = torch.randint(1, T, (B,), generator=g).to(x.device)
    y[torch.arange(T, device=x.device)[None, :] < (prefix[:, None] - 1)] = -100
    logits = model(x, prefix_len=prefix, **batch.get("model_kwargs", {}))
    return token_loss_sum(logits, y)


def glm_loss_fn(vocab: int, block_size: int, glm2d: bool):
    """GLM blank infilling on each window: spans -> [MASK]/[gMASK] (GLM-130B's 30/70 mix), part B generated
    autoregressively with 2D positions; the five special tokens take ids vocab..vocab+4."""
    import random

    from lmforge.data.infill import InfillTokens, collate, corrupt

    tok = InfillTokens(mask=vocab, gmask=vocab + 1, smask=vocab + 2, sop=vocab + 3, eop=vocab + 4)
    doc_len = int(block_size / 1.35)  # part B adds two tokens per span (<= 15 % of tokens are span starts)

    def loss_fn(model, batch):
        x = batch["input_ids"]
        rng = random.Random(int(x[:, :8].sum()) * 1_000_003 + int(x[:, -8:].sum()))  # deterministic per batch
        samples = [corrupt(row[:doc_len], tok, rng) for row in x.tolist()]
        b = {k: v.to(x.device) for k, v in collate(samples, pad_id=0).items()}
        pos = b["position_ids"] if glm2d else b["position_ids"][:, 0]
        logits = model(b["input_ids"], position_ids=pos, prefix_len=b["prefix_len"])
        return token_loss_sum(logits, b["targets"])

    return loss_fn


def run_pretrain(run: RunConfig, resume: bool = False) -> dict[str, Any]:
    out = Path(run.out)
    D.check_not_none(run.train.distributed)
    device, dist = D.start(run.train.device)
    if run.data.objective not in OBJECTIVES:
        raise LMForgeError(f"data.objective={run.data.objective!r}: allowed values are {list(OBJECTIVES)}")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier(dist)
    tok, train_ids, val_ids = load_tokens(run, out) if dist.main else (None, None, None)
    if dist.enabled:  # rank 0 tokenized (and maybe trained the tokenizer); the others load the result
        D.barrier(dist)
        if not dist.main:
            tok, train_ids, val_ids = load_tokens(run, out)
    extra = 5 if run.data.objective == "glm" else 0  # [MASK] [gMASK] [sMASK] [S] [E]
    cfg = build_model_config(run.model, tok.vocab_size + extra, run.data.block_size)
    # the special tokens are the tokenizer's unless the model section names them (a preset's are its family's:
    # LLaMA's bos 1 and eos 2 whatever the tokenizer, which a converted model then handed to transformers)
    cfg = replace(cfg, **{k: getattr(tok, k) for k in ("bos_id", "eos_id", "pad_id") if k not in run.model})
    if tok.vocab_size + extra > cfg.vocab_size:
        need = f"{tok.vocab_size}" + (" + 5 infilling tokens" if extra else "")
        raise LMForgeError(f"tokenizer has {need} tokens but model.vocab_size is {cfg.vocab_size}")
    if run.data.block_size > cfg.block_size:
        raise LMForgeError(f"data.block_size={run.data.block_size} exceeds the model's block_size {cfg.block_size}")
    torch.manual_seed(run.train.seed)
    model = Decoder(cfg)
    t = run.train
    windows = {}
    for split, ids, seed in (("train", train_ids, t.seed), ("validation", val_ids, t.seed + 1)):
        try:
            windows[split] = TokenWindows(ids, run.data.block_size, t.batch_size, seed=seed, rank=dist.rank,
                                          world=dist.world)
        except LMForgeError as e:  # too few tokens: name the data and the split
            raise LMForgeError(f"{run.data.path}: the {split} split has {e} (data.block_size)") from None
    train, val = windows["train"], windows["validation"]
    if dist.main:
        print(f"model {cfg.name}: {model.num_params():,} parameters; {len(train_ids):,} train / {len(val_ids):,} "
              f"val tokens; device {device}", file=sys.stderr)
    loss_fn = {"causal": causal_loss, "prefix": prefix_loss}.get(run.data.objective)
    if run.data.objective == "glm":
        loss_fn = glm_loss_fn(tok.vocab_size, run.data.block_size, cfg.position == "glm2d")
    if run.data.isolate_documents:
        if tok.eos_id is None:
            raise LMForgeError("data.isolate_documents needs a tokenizer with an EOS token")
        base_loss, eos = loss_fn, tok.eos_id

        def loss_fn(model, batch):
            seg = document_segments(batch["input_ids"], eos)
            kwargs = {"segment_ids": seg, "position_ids": segment_positions(seg)}
            return base_loss(model, {**batch, "model_kwargs": kwargs})

    trainer = Trainer(model, t, train, loss_fn, out, val_data=val, tokenizer=tok, run_config=run.to_dict(),
                      sample_fn=lambda m: sample_text(m, tok), device=device, dist=dist, stage="pretrain")
    try:
        return trainer.fit(resume=resume)
    finally:
        D.cleanup(dist)


def sample_text(model: Decoder, tok, n: int = 80) -> str:
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams

    start = [tok.bos_id] if tok.bos_id is not None else tok.encode("\n")[:1] or [0]
    was = model.training
    model.eval()
    ids = generate(model, start, SamplingParams(temperature=0.8, top_k=50, max_new_tokens=n, seed=0))
    model.train(was)
    return tok.decode([i for i in ids if i < tok.vocab_size])  # drop model-only special tokens (e.g. GLM's)
