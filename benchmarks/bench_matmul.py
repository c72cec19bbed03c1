"""Float32 products on this CPU: PyTorch's default (MKL) against lmforge.matmul (oneDNN where it is chosen).

    python benchmarks/bench_matmul.py                 # SmolLM2-135M's shapes, 1,024 rows, forward and backward
    python benchmarks/bench_matmul.py --rows 16 256   # other row counts

Prints GFLOP/s of ``F.linear`` and of ``lmforge.matmul.linear`` on the same tensors in the same run, forward and
the two gradient products, and which library lmforge chose here (``LMFORGE_FP32_GEMM`` overrides the choice); then
inference forwards of an ``nn.Linear`` through ``matmul.call`` with and without ``packed_weights_in`` (the weight
in oneDNN's blocked layout, as the evaluation scorer runs them).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmforge import matmul as M

SHAPES = {"qkv": (576, 960), "proj": (576, 576), "fc1": (576, 3072), "fc2": (1536, 576), "head": (576, 49152)}


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1024])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"lmforge.matmul chose {'oneDNN' if M.onednn_chosen() else 'MKL (F.linear)'}; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'product':<8}{'rows':>6}  {'pass':<9}{'F.linear':>10}{'lmforge':>10}{'ratio':>8}   (GFLOP/s)")
    tot = {"F.linear": 0.0, "lmforge": 0.0}
    for rows in args.rows:
        for name, (k, n) in SHAPES.items():
            x = torch.randn(rows, k)
            w = torch.randn(n, k)
            g = torch.randn(rows, n)
            flops = 2 * rows * k * n
            cases = {"forward": (lambda x=x, w=w: F.linear(x, w), lambda x=x, w=w: M.linear(x, w)),
                     "grad x": (lambda g=g, w=w: g @ w, lambda g=g, w=w: M.matmul(g, w)),
                     "grad w": (lambda g=g, x=x: g.t() @ x, lambda g=g, x=x: M.matmul(g.t(), x))}
            for what, (ref, ours) in cases.items():
                t_ref, t_ours = best(ref, args.reps), best(ours, args.reps)
                tot["F.linear"] += t_ref
                tot["lmforge"] += t_ours
                print(f"{name:<8}{rows:>6}  {what:<9}{flops / t_ref / 1e9:>10.0f}{flops / t_ours / 1e9:>10.0f}"
                      f"{t_ref / t_ours:>7.2f}x")
    print(f"all products: F.linear {tot['F.linear'] * 1e3:.1f} ms, lmforge {tot['lmforge'] * 1e3:.1f} ms "
          f"({tot['F.linear'] / tot['lmforge']:.2f}x)")
    print(f"\n{'product':<8}{'rows':>6}  {'inference':<9}{'plain':>10}{'packed':>10}{'ratio':>8}   (GFLOP/s)")
    for rows in sorted({*args.rows, 16, 64, 256}):
        for name, (k, n) in SHAPES.items():
            lin = torch.nn.Linear(k, n, bias=False)
            x = torch.randn(rows, k)
            flops = 2 * rows * k * n
            with torch.inference_mode():
                t_plain = best(lambda lin=lin, x=x: M.call(lin, x), args.reps)
                with M.packed_weights_in(lin):
                    t_packed = best(lambda lin=lin, x=x: M.call(lin, x), args.reps)
            print(f"{name:<8}{rows:>6}  {'forward':<9}{flops / t_plain / 1e9:>10.0f}{flops / t_packed / 1e9:>10.0f}"
                  f"{t_plain / t_packed:>7.2f}x")


if __name__ == "__main__":
    main()
