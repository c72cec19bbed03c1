"""Float32 products of a decoding step: ``lmf_gemv`` (lmforge's C kernel, the weight read in place) against PyTorch's
``F.linear`` (MKL) on the same weights, for a range of row counts.

    python benchmarks/bench_gemv.py [--rows 1 4 16 64 128] [--layers 30] [--threads 2]

The weights are SmolLM2-135M's four linear shapes per layer (qkv 576->960, out 576->576, gate+up 576->3072, down
1536->576) for ``--layers`` layers (30: 425 MB, far beyond the CPU's caches, as in decoding); one pass runs every
product once; best of 10 passes, twice in turn. Each product is checked against F.linear first.
"""

from __future__ import annotations

import argparse

import torch
from bench_matmul import best  # (benchmarks/ is the script's directory)
from torch import nn

from lmforge.infer.native import GEMV_ROWS, gemv, library

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out) of one SmolLM2 layer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 4, 16, 64, 128])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    lib = library()
    if lib is None or not lib.lmf_gemv_ok(576):
        raise SystemExit("lmf_gemv does not apply here (no C compiler or no AVX512)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mods = [nn.Linear(k, n, bias=False).requires_grad_(False) for _ in range(args.layers) for k, n in SHAPES]
    mb = sum(m.weight.numel() for m in mods) * 4 / 2**20
    print(f"{len(mods)} products, {mb:.0f} MiB of float32 weights, {args.threads} threads; lmforge takes lmf_gemv "
          f"up to {GEMV_ROWS} rows")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k, _ in SHAPES}
        fns = [gemv(m, rows) for m in mods]
        for m, f in zip(mods[: len(SHAPES)], fns):
            x = xs[m.in_features]
            if not torch.allclose(f(x), torch.nn.functional.linear(x, m.weight), atol=1e-4, rtol=1e-4):
                raise SystemExit(f"lmf_gemv differs from F.linear at {rows} rows")

        def ours(fns=fns, xs=xs):
            for m, f in zip(mods, fns):
                f(xs[m.in_features])

        def theirs(xs=xs):
            for m in mods:
                torch.nn.functional.linear(xs[m.in_features], m.weight)

        a = b = float("inf")
        for _ in range(2):
            a, b = min(a, best(ours, 10)), min(b, best(theirs, 10))
        flops = 2 * rows * sum(m.weight.numel() for m in mods)
        print(f"{rows:4d} rows: lmf_gemv {a * 1e3:7.2f} ms ({flops / a / 1e9:5.0f} GFLOPS), F.linear "
              f"{b * 1e3:7.2f} ms ({flops / b / 1e9:5.0f} GFLOPS): {b / a:.2f}x")


if __name__ == "__main__":
    main()
