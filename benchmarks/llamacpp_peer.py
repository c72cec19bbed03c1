"""llama.cpp as a peer (llama-cpp-python): greedy decoding of a GGUF from given prompt ids, in a process without
torch. Prints one JSON line: tokens/s (prefill included), peak resident memory added by loading and decoding, the
process's peak.

    python benchmarks/llamacpp_peer.py MODEL.gguf "[1, 2, 3]" TOKENS THREADS

``pip install llama-cpp-python`` builds llama.cpp from the registry's source package (about 5 minutes on 2 cores).
On a CPU with AMX, 0.3.36's native build (``-march=native``) crashed in ``ggml_backend_amx_mul_mat`` on the first
Q4_1 product (a segmentation fault; ``bench_quant.py`` then leaves llama.cpp out and says so); built without AMX it
runs: ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" pip install llama-cpp-python``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    path, prompt, n_tokens, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from llama_cpp import Llama

    base = rss_mb()
    llm = Llama(model_path=path, n_threads=threads, n_ctx=len(prompt) + n_tokens + 8, verbose=False, seed=0)

    def run(k: int) -> int:
        n = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if n >= k:
                break
        return n

    run(4)  # warm-up
    t = time.perf_counter()
    n = run(n_tokens)
    dt = time.perf_counter() - t
    print(json.dumps({"rss_mb": rss_mb("VmHWM") - base, "total_mb": rss_mb("VmHWM"), "tok_s": n / dt, "n": n}))


if __name__ == "__main__":
    main()
