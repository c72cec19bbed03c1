"""lmforge's lean runtime (``lmforge.infer.lean``: an int4 directory decoded by the C step from numpy, the runtime
`lmforge generate` takes by default for such a directory): greedy decoding from given prompt ids in a process without
torch, as ``llamacpp_peer.py`` measures llama.cpp. Prints one JSON line: tokens/s (prefill included), peak resident
memory added by loading and decoding, the process's peak.

    python benchmarks/lean_decode.py INT4_DIR "[1, 2, 3]" TOKENS
"""

from __future__ import annotations

import json
import sys
import time

from llamacpp_peer import rss_mb  # this directory is on the path of a script run from it


def main() -> None:
    path, prompt, n_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    from lmforge.infer import lean

    base = rss_mb()
    model = lean.LeanModel(path, max_len=len(prompt) + n_tokens)

    def run(k: int) -> int:
        model.length = 0  # the sequence starts again (its cache is overwritten)
        return sum(1 for _ in lean.generate(model, prompt, k, temperature=0))

    run(4)  # warm-up
    t = time.perf_counter()
    n = run(n_tokens)
    dt = time.perf_counter() - t
    assert "torch" not in sys.modules
    print(json.dumps({"rss_mb": rss_mb("VmHWM") - base, "total_mb": rss_mb("VmHWM"), "tok_s": n / dt, "n": n}))


if __name__ == "__main__":
    main()
