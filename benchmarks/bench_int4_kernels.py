"""The C step's int4 products and int8 head on AMX tiles against the AVX512-VNNI kernels, in one process: the same
weights and inputs, the kernel switched by ``lmf_amx`` between alternating timings (best of the rounds), and a
decoding step of the whole model and a prompt's prefill with each.

    python benchmarks/bench_int4_kernels.py --model INT4DIR [--rows 1 8 16 64] [--rounds 5] [--prompt 1024]

INT4DIR: an int4 directory (``lmforge quantize --bits 4``; SmolLM2: ``bash scripts/fetch_smollm2.sh`` then
``lmforge quantize --model ~/.cache/lmforge/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --bits 4 --output INT4DIR``).
Without AMX (CPU or OS) it says so and stops: the VNNI kernels are all there is.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np

from lmforge.infer.lean import LeanModel


def best(fn, reps: int, rounds: int, amx: ctypes.c_int) -> dict[int, float]:
    """Seconds per call of fn with the tiles (1) and without (0), best of ``rounds`` alternating rounds."""
    out = {0: float("inf"), 1: float("inf")}
    for _ in range(rounds):
        for on in (1, 0):
            amx.value = on
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            out[on] = min(out[on], (time.perf_counter() - t) / reps)
    amx.value = 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens of the prefill timing")
    args = ap.parse_args()
    m = LeanModel(args.model, max(2048, args.prompt + 1), slots=max(args.rows))
    amx = ctypes.c_int.in_dll(m.lib, "lmf_amx")
    if not amx.value:
        print("no AMX tiles here (CPU, OS or LMFORGE_AMX=0): nothing to compare")
        return
    rng = np.random.default_rng(0)
    blk = m._blocks[len(m._blocks) // 2]
    products = {"qkv": (blk[3], blk[2]), "proj": (blk[6], blk[5]), "fc1": (blk[9], blk[8]), "fc2": (blk[12], blk[11])}
    print(f"{args.model}: AMX tiles vs AVX512-VNNI, best of {args.rounds} alternating rounds")
    for n in args.rows:
        m._set_rows(n)
        line = []
        for name, (a, x) in products.items():
            x[:n] = rng.standard_normal((n, x.shape[1]), dtype=np.float32)
            a.x = x.ctypes.data
            t = best(lambda a=a: m.lib.lmf_int4(ctypes.byref(a)), 50, args.rounds, amx)
            line.append(f"{name} {t[1] * 1e6:.1f}/{t[0] * 1e6:.1f}")
        m.final[:n] = rng.standard_normal((n, m.final.shape[1]), dtype=np.float32)
        m.vnni.n = n
        t = best(lambda: m.lib.lmf_head_vnni(ctypes.byref(m.vnni)), 10, args.rounds, amx)
        line.append(f"head {t[1] * 1e6:.0f}/{t[0] * 1e6:.0f}")
        rows = list(range(n))
        step = best(lambda rows=rows: m.run([100 + r for r in rows], [50] * len(rows), rows, rows), 10, args.rounds,
                    amx)
        print(f"{n:3d} rows, us tiles/VNNI: " + ", ".join(line) +
              f"; whole step {step[1] * 1e3:.2f}/{step[0] * 1e3:.2f} ms ({step[0] / step[1]:.2f}x)")
    prompt = [int(t) for t in rng.integers(100, m.cfg.vocab_size, args.prompt)]

    def prefill() -> None:
        m.length = 0
        m.prefill(prompt)
    t = best(prefill, 1, min(args.rounds, 3), amx)
    print(f"prefill of {args.prompt} tokens: {args.prompt / t[1]:.0f} tokens/s with tiles, {args.prompt / t[0]:.0f} "
          f"with VNNI ({t[0] / t[1]:.2f}x)")


if __name__ == "__main__":
    main()
