"""Forward+backward throughput of lmforge's decoder vs transformers on the same config and weights, same threads.

    python benchmarks/bench_model.py [--rounds 5] [--iters 5]

Prints tokens/s of both and the ratio (lmforge / transformers) for:
  - a stories15M-shaped LLaMA (width 288, 6 layers, 6 heads, vocab 32000, seq 256, batch 8)
  - nanoGPT's baby GPT (4 layers, 4 heads, width 128, block 64, batch 12, vocab 65), as transformers' GPT-2
The two models alternate within each round so both see the same machine load.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import transformers as T

from lmforge.checkpoint import build_model
from lmforge.interop.hf import config_from_hf, state_dict_from_hf

SHAPES = {
    "stories15M-llama": (T.LlamaConfig(vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                                       num_attention_heads=6, max_position_embeddings=256), 8, 256),
    "baby-gpt": (T.GPT2Config(vocab_size=65, n_positions=64, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0), 12, 64),
}


def step_hf(model, x, y):
    logits = model(x).logits
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()


def step_lm(model, x, y):
    loss = model.loss(x, y)
    loss.backward()


def time_it(fn, model, x, y, iters):
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    for _ in range(iters):
        fn(model, x, y)
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {T.__version__}, threads {torch.get_num_threads()}, fp32, eager")
    for name in args.shapes:
        hf_cfg, B, L = SHAPES[name]
        torch.manual_seed(0)
        hf = T.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").train()
        cfg, arch = config_from_hf(hf_cfg.to_dict())
        lm = build_model(cfg, state_dict_from_hf(hf.state_dict(), cfg, arch, name), name).train()
        x = torch.randint(0, cfg.vocab_size, (B, L))
        y = torch.randint(0, cfg.vocab_size, (B, L))
        for _ in range(2):  # warm up both
            step_hf(hf, x, y)
            step_lm(lm, x, y)
        t_hf, t_lm = [], []
        for _ in range(args.rounds):
            t_hf.append(time_it(step_hf, hf, x, y, args.iters))
            t_lm.append(time_it(step_lm, lm, x, y, args.iters))
        tok = B * L
        best_hf, best_lm = tok / min(t_hf), tok / min(t_lm)
        print(f"{name:18s} transformers {best_hf:9.0f} tok/s   lmforge {best_lm:9.0f} tok/s   "
              f"ratio {best_lm / best_hf:.2f}x   (best of {args.rounds} rounds x {args.iters} iters, B={B}, T={L})")


if __name__ == "__main__":
    main()
