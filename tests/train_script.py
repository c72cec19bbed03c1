"""A tiny training run driven by the shared Trainer, for subprocess tests (kill/resume, torchrun equivalence).

    python tests/train_script.py OUT MAX_ITERS [--resume] [--kill-at STEP] [--distributed ddp|fsdp] [--ema DECAY]
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.model import Decoder
from lmforge.stages.pretrain import causal_loss
from lmforge.train import distributed as D
from lmforge.train.batches import TokenWindows
from lmforge.train.config import TrainConfig
from lmforge.train.loop import Trainer


def tokens(n: int = 5000, vocab: int = 61) -> np.ndarray:
    rng = np.random.default_rng(0)  # a learnable stream: noisy repeats of a short pattern
    base = np.tile(np.arange(vocab), n // vocab + 1)[:n]
    noise = rng.integers(0, vocab, n)
    return np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("max_iters", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--distributed", default="auto")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--save-interval", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist = D.init(torch.device("cpu"))
    cfg = ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, multiple_of=16,
                      dropout=a.dropout)
    torch.manual_seed(0)
    model = Decoder(cfg)
    t = TrainConfig(max_iters=a.max_iters, batch_size=a.batch_size, lr=3e-3, warmup_iters=3, eval_interval=5,
                    eval_iters=2, log_interval=1, save_interval=a.save_interval, keep_last=10,
                    distributed=a.distributed, spike_guard=False, seed=5, ema_decay=a.ema)
    data = tokens()
    train = TokenWindows(data[:4000], 16, a.batch_size, seed=1, rank=dist.rank, world=dist.world)
    val = TokenWindows(data[4000:], 16, a.batch_size, seed=2, rank=dist.rank, world=dist.world)

    def loss_fn(m, batch):
        if trainer.step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return causal_loss(m, batch)

    trainer = Trainer(model, t, train, loss_fn, a.out, val_data=val, dist=dist)
    trainer.fit(resume=a.resume)
    D.cleanup(dist)


if __name__ == "__main__":
    main()
