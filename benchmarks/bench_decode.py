"""Decode throughput on stories260K (fp32, CPU): lmforge vs transformers' ``generate`` with its KV cache, same
weights (converted with ``write_hf_dir``), same threads.

    python benchmarks/bench_decode.py [--tokens 256] [--rounds 3] [--threads 1]

Single stream: greedy from BOS, ``--tokens`` new tokens (EOS ignored on both sides), lmforge's ``stream`` vs
``model.generate(..., min_new_tokens=N)``. Batch 8: eight prompts of different lengths, lmforge's slot runner (the
server engine's decode: every row at its own length) and its left-padded ``generate_batch``, vs transformers'
left-padded batch ``generate``. The two sides alternate within each round; the best round of each is reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

from lmforge.assets import STORIES260K
from lmforge.infer.engine import SlotRunner
from lmforge.infer.generate import generate, generate_batch
from lmforge.infer.sampling import SamplingParams, TokenSampler, select
from lmforge.interop.hf import write_hf_dir
from lmforge.interop.llama2c import read_llama2c
from lmforge.loading import load_model_and_tokenizer

TEXTS = ["Once upon a time", "Tom had a big red ball and", "The cat", "Lily and her mom went to the park to play",
         "One day", "Sue saw a bird in the tree", "Ben", "The sun was hot and the children wanted to swim"]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def slot_batch(model, prompts, n):
    """Prefill each prompt into its slot, then n batched decode steps (the engine's loop without the thread)."""
    runner = SlotRunner(model, len(prompts), max(len(p) for p in prompts) + n)
    samplers = [TokenSampler(SamplingParams(temperature=0), p, model.cfg.vocab_size) for p in prompts]
    logits = torch.stack([runner.prefill(i, p) for i, p in enumerate(prompts)])
    outs = [[] for _ in prompts]
    for _ in range(n):
        toks = [c.token for c in select(logits, samplers)]
        for o, t in zip(outs, toks):
            o.append(t)
        logits = runner.decode(toks)
    return outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N = args.tokens
    model, tok = load_model_and_tokenizer(None, None, "cpu")
    model.eval()
    cfg, sd = read_llama2c(STORIES260K)
    tmp = Path(tempfile.mkdtemp())
    write_hf_dir(tmp, cfg, sd)
    hf = T.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    print(f"torch {torch.__version__}, transformers {T.__version__}, threads {torch.get_num_threads()}, fp32, "
          f"stories260K, {N} new tokens, best of {args.rounds} rounds")

    greedy = SamplingParams(temperature=0, max_new_tokens=N)
    bos = torch.tensor([[tok.bos_id]])
    hf_kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True, pad_token_id=0)

    def run_lm():
        return generate(model, [tok.bos_id], greedy)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(bos, **hf_kw)[0, 1:].tolist()

    prompts = [[tok.bos_id] + tok.encode(t) for t in TEXTS]
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])

    def run_hf_batch():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, **hf_kw)[:, P:].tolist()

    def run_lm_slots():
        return slot_batch(model, prompts, N)

    def run_lm_padded():
        return generate_batch(model, prompts, greedy)

    for fn in (run_lm, run_hf, run_hf_batch, run_lm_slots, run_lm_padded):  # warm up
        fn()
    a, b = run_lm(), run_hf()
    same = sum(x == y for x, y in zip(a, b))
    print(f"single stream: first {same} of {N} greedy tokens identical (lmforge vs transformers)")
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn, ntok in (("lm1", run_lm, N), ("hf1", run_hf, N), ("lm8", run_lm_slots, 8 * N),
                               ("lm8pad", run_lm_padded, 8 * N), ("hf8", run_hf_batch, 8 * N)):
            dt, _ = timed(fn)
            best[name] = max(best.get(name, 0.0), ntok / dt)
    print(f"single stream   transformers {best['hf1']:8.0f} tok/s   lmforge {best['lm1']:8.0f} tok/s   "
          f"ratio {best['lm1'] / best['hf1']:.2f}x")
    print(f"batch 8         transformers {best['hf8']:8.0f} tok/s   lmforge slots {best['lm8']:8.0f} tok/s   "
          f"ratio {best['lm8'] / best['hf8']:.2f}x")
    print(f"batch 8 padded  transformers {best['hf8']:8.0f} tok/s   lmforge generate_batch {best['lm8pad']:8.0f} tok/s"
          f"   ratio {best['lm8pad'] / best['hf8']:.2f}x")


if __name__ == "__main__":
    main()
