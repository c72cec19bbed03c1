"""Next-token sampling per decoding step: ``lmforge.infer.sampling.select`` against transformers' warpers (what
``generate(do_sample=True)`` runs each step: temperature, top-k, top-p, softmax, ``torch.multinomial``) on the same
logits, for stories260K's 512 tokens and SmolLM2's 49,152, one row and 16 (a step of 16 served requests).

    python benchmarks/bench_sampling.py [--repeats 200] [--threads 1]

SmolLM2's logits are its own after a prompt where scripts/fetch_smollm2.sh has fetched it (a peaked distribution, as
text gives), else random ones (said in the output). Settings: temperature 0.8 alone; with top-p 0.9 (``lmforge
generate``'s default); with top-k 50. Each figure is the median of ``--repeats`` steps, microseconds per step; the
ratio is transformers' over ours, measured in the same run. ``select`` runs in C (``lmf_sample_rows``) where the
library builds; with ``LMFORGE_NATIVE=0`` its PyTorch path is measured instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.infer.native import library  # noqa: E402
from lmforge.infer.params import SamplingParams  # noqa: E402
from lmforge.infer.sampling import TokenSampler, select  # noqa: E402

SETTINGS = [dict(temperature=0.8), dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=50)]


def smollm2_logits() -> torch.Tensor | None:
    """SmolLM2's logits (V,) after a short prompt, or None where its GGUF is not here."""
    found = sorted((Path.home() / ".cache" / "lmforge" / "smollm2").glob("*.gguf"))
    if not found:
        return None
    from lmforge.interop.gguf import load_gguf_model, load_gguf_tokenizer

    model, tok = load_gguf_model(found[0]), load_gguf_tokenizer(found[0])
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tok.encode("Once upon a time, there was a dog named")]))[0, -1].float()


def warpers(kw: dict) -> LogitsProcessorList:
    out = [TemperatureLogitsWarper(kw["temperature"])]
    if kw.get("top_k"):
        out.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1.0:
        out.append(TopPLogitsWarper(kw["top_p"]))
    return LogitsProcessorList(out)


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a server's decoding thread has one)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    smol = smollm2_logits()
    tables = {"stories260K-sized (512, random)": torch.randn(512) * 3,
              "SmolLM2 (49,152, its own)" if smol is not None else "SmolLM2-sized (49,152, random)":
                  smol if smol is not None else torch.randn(49152) * 4}
    ours_where = "C (lmf_sample_rows)" if library() is not None else "PyTorch (no C library)"
    print(f"select in {ours_where}; transformers' warpers + torch.multinomial; {a.threads} torch thread(s); "
          f"median of {a.repeats} steps")
    for name, row in tables.items():
        V = row.shape[0]
        for rows in (1, 16):
            logits = row[None].expand(rows, V).contiguous()
            ids = torch.zeros(rows, 1, dtype=torch.long)
            for kw in SETTINGS:
                samplers = [TokenSampler(SamplingParams(**kw), [], V) for _ in range(rows)]
                procs = warpers(kw)
                ours = median_us(lambda x=logits, s=samplers: select(x, s), a.repeats)
                def peer(x=logits, p=procs, i=ids):
                    return torch.multinomial(torch.softmax(p(i, x.clone()), -1), 1)

                theirs = median_us(peer, a.repeats)
                setting = ", ".join(f"{k} {v}" for k, v in kw.items())
                print(f"{name:32s} {rows:2d} row(s), {setting:28s}: lmforge {ours:8.1f} us, transformers "
                      f"{theirs:8.1f} us ({theirs / ours:5.1f}x)")


if __name__ == "__main__":
    main()
