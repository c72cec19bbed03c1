"""LoRA vs QLoRA memory on SmolLM2-135M: base weight bytes and peak resident memory of one training step.

    python benchmarks/bench_peft_memory.py [--batch 4] [--seq 256] [--methods lora qlora-nf4 qlora-int4]

Each method runs in a fresh child process: load the GGUF (fp32 weights), apply the method (LoRA r=8 on every linear
layer of the blocks), one forward + backward + AdamW step on random tokens; it reports the bytes of the blocks'
base linear weights, trainable parameters, the peak RSS of loading (VmHWM), the resident memory after applying the
method and the peak RSS of the training step (VmHWM reset before it), all minus the RSS before loading. Memory only,
no timing. The model is $LMFORGE_SMOLLM2_GGUF or ~/.cache/lmforge/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = Path(os.environ.get("LMFORGE_SMOLLM2_GGUF",
                           os.path.expanduser("~/.cache/lmforge/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
METHODS = {"lora": ("lora", {}), "qlora-nf4": ("qlora", {"quant": "nf4"}),
           "qlora-nf4-nodq": ("qlora", {"quant": "nf4", "double_quant": False}),
           "qlora-int4": ("qlora", {"quant": "int4", "group_size": 64})}


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, batch: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge.checkpoint import load_model
    from lmforge.peft import apply_peft
    from lmforge.peft.base import count_params
    from lmforge.peft.lora import lora_layers

    before = status_mb("VmRSS")
    model = load_model(GGUF)
    method, opts = METHODS[name]
    apply_peft(model, method, {"targets": "all-linear", "r": 8, **opts})
    base_bytes = sum(b.numel() * b.element_size() for m in lora_layers(model).values()
                     for b in list(m.base.parameters()) + list(m.base.buffers()))
    trainable, total = count_params(model)
    gc.collect()
    load_peak = status_mb("VmHWM") - before
    resident = status_mb("VmRSS") - before
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the step's own peak from here
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    return {"method": name, "base_linear_MB": base_bytes / 2**20, "trainable": trainable, "total": total,
            "load_peak_MB": load_peak, "resident_MB": resident, "step_peak_MB": status_mb("VmHWM") - before,
            "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora-nf4", "qlora-int4"], choices=sorted(METHODS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.seq)))
        return
    if not GGUF.is_file():
        sys.exit(f"{GGUF}: not found (scripts/fetch_smollm2.sh)")
    # a fixed mmap threshold: large tensors are returned to the OS when freed, so RSS follows the live tensors (glibc's
    # dynamic threshold otherwise keeps freed weights in the heap and RSS after quantizing stays high)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    for m in a.methods:
        out = subprocess.run([sys.executable, __file__, "--child", m, "--batch", str(a.batch), "--seq", str(a.seq)],
                             capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = rows[0]
    print(f"SmolLM2-135M, batch {a.batch} x {a.seq} tokens, LoRA r=8 on all linear layers of the blocks")
    print("MB over the RSS before loading; load peak includes reading the GGUF as float32 before quantizing")
    print(f"{'method':16s} {'base linear MB':>15s} {'ratio':>7s} {'trainable':>10s} {'load peak':>10s} "
          f"{'resident':>9s} {'step peak':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['method']:16s} {r['base_linear_MB']:15.1f} {ref['base_linear_MB'] / r['base_linear_MB']:6.2f}x "
              f"{r['trainable']:10d} {r['load_peak_MB']:10.0f} {r['resident_MB']:9.0f} {r['step_peak_MB']:10.0f} "
              f"{ref['step_peak_MB'] / r['step_peak_MB']:6.2f}x")


if __name__ == "__main__":
    main()
