"""The lean runtime's float16 key/value cache (its default) against a float32 one (the PyTorch runtime's), in one
process: the same int4 directory loaded twice, decoding steps of 1 and 16 rows over a cache filled with random keys
and values to each length, and a prompt's prefill, timed alternately (best of the rounds).

    python benchmarks/bench_kv_cache.py --model INT4DIR [--rows 1 16] [--keys 100 300 500] [--rounds 5]
                                        [--prompt 1024]

INT4DIR: an int4 directory (``lmforge quantize --bits 4``; SmolLM2: ``bash scripts/fetch_smollm2.sh`` then
``lmforge quantize --model ~/.cache/lmforge/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --bits 4 --output INT4DIR``).
The cache is filled with random values rather than left untouched: untouched pages all map the zero page, which stays
in the CPU's cache and hides what attention reads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lmforge.infer.lean import LeanModel


def best(fns: dict, reps: int, rounds: int) -> dict:
    """Seconds per call of each function, best of ``rounds`` rounds in which they alternate."""
    out = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            out[k] = min(out[k], (time.perf_counter() - t) / reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--keys", type=int, nargs="+", default=[100, 300, 500])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens of the prefill timing")
    args = ap.parse_args()
    length = max(max(args.keys) + 1, args.prompt)
    models = {kv: LeanModel(args.model, length, slots=max(args.rows), kv_dtype=kv) for kv in ("float32", "float16")}
    if models["float16"].kv_dtype != np.float16:
        print("no float16 cache here (the library needs AVX512F and F16C): nothing to compare")
        return
    rng = np.random.default_rng(0)
    for m in models.values():
        for a in (m.k, m.v):
            a[:, :, :, : max(args.keys)] = rng.standard_normal(a[:, :, :, : max(args.keys)].shape, np.float32)
    print(f"{args.model}: float32 / float16 key/value cache, best of {args.rounds} alternating rounds")
    for n in args.rows:
        rows = list(range(n))
        line = []
        for keys in args.keys:
            tokens, pos = [100 + r for r in rows], [keys] * n
            t = best({kv: (lambda m=m, tokens=tokens, pos=pos, rows=rows: m.run(tokens, pos, rows, rows))
                      for kv, m in models.items()}, 10, args.rounds)
            line.append(f"{keys} keys {t['float32'] * 1e3:.2f}/{t['float16'] * 1e3:.2f} ms "
                        f"({t['float32'] / t['float16']:.2f}x)")
        print(f"{n:3d} rows, a decoding step: " + ", ".join(line))
    prompt = [int(t) for t in rng.integers(100, models["float32"].cfg.vocab_size, args.prompt)]

    def prefill(m: LeanModel) -> None:
        m.length = 0
        m.prefill(prompt)
    t = best({kv: (lambda m=m: prefill(m)) for kv, m in models.items()}, 1, min(args.rounds, 3))
    print(f"prefill of {args.prompt} tokens: {args.prompt / t['float32']:.0f} tokens/s with float32, "
          f"{args.prompt / t['float16']:.0f} with float16 ({t['float32'] / t['float16']:.2f}x)")


if __name__ == "__main__":
    main()
