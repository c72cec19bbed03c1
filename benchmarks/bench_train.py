"""Training throughput (forward + backward + clip + AdamW step): lmforge vs a plain loop over transformers' model of
the same shape and weights, same threads, one run. Prints tokens/s, the ratio and MFU against the measured fp32
matmul peak.

    python benchmarks/bench_train.py [--steps 6] [--rounds 3] [--compile]

Shapes: nanoGPT's baby GPT (4x128, block 64, batch 12, vocab 65) as GPT-2, and a stories15M-shaped LLaMA
(width 288, 6 layers, 6 heads, vocab 512, seq 256, batch 8).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import transformers as T

from lmforge.checkpoint import build_model
from lmforge.interop.hf import config_from_hf, state_dict_from_hf
from lmforge.train.loop import _peak_flops
from lmforge.train.metrics import model_flops_per_token
from lmforge.train.optim import make_optimizer

SHAPES = {
    "baby-gpt": (T.GPT2Config(vocab_size=65, n_positions=64, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0), 12, 64),
    "llama-15M-v512": (T.LlamaConfig(vocab_size=512, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                                     num_attention_heads=6, max_position_embeddings=256), 8, 256),
}


def hf_step(model, opt, x, y):
    logits = model(x).logits
    F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_step(model, opt, x, y):
    logits = model(x)
    F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(step, model, opt, x, y, n):
    t = time.perf_counter()
    for _ in range(n):
        step(model, opt, x, y)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time lmforge with torch.compile")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    a = ap.parse_args()
    peak = _peak_flops(torch.device("cpu"))
    print(f"torch {torch.__version__}, transformers {T.__version__}, {torch.get_num_threads()} threads, fp32; "
          f"measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    for name in a.shapes:
        hf_cfg, B, L = SHAPES[name]
        torch.manual_seed(0)
        hf = T.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").train()
        cfg, arch = config_from_hf(hf_cfg.to_dict())
        lm = build_model(cfg, state_dict_from_hf(hf.state_dict(), cfg, arch, name), name).train()
        variants = {"transformers": (hf_step, hf, torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)),
                    "lmforge": (lm_step, lm, make_optimizer(lm, 1e-4, 0.1, (0.9, 0.95), 1e-8))}
        if a.compile:
            variants["lmforge+compile"] = (lm_step, torch.compile(lm), variants["lmforge"][2])
        x = torch.randint(0, cfg.vocab_size, (B, L))
        y = torch.randint(0, cfg.vocab_size, (B, L))
        for step, m, opt in variants.values():  # warm up (and compile)
            for _ in range(2):
                step(m, opt, x, y)
        best = {k: float("inf") for k in variants}
        for _ in range(a.rounds):
            for k, (step, m, opt) in variants.items():
                best[k] = min(best[k], timed(step, m, opt, x, y, a.steps))
        flops = model_flops_per_token(lm)
        base = B * L / best["transformers"]
        for k, t in best.items():
            tps = B * L / t
            print(f"{name:15s} {k:16s} {tps:9.0f} tok/s  ratio {tps / base:5.2f}x  MFU {tps * flops / peak:5.1%}")


if __name__ == "__main__":
    main()
