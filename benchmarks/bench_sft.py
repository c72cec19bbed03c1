"""LoRA fine-tuning step: lmforge vs transformers + peft on the same model, LoRA rank and targets, and the same batch
of masked chat-like examples (the first half of each row is an unscored prompt). Each variant runs in a fresh child
process, so its peak resident memory is its own. Prints tokens/s (scored and total), seconds per step, peak RSS and
the ratios; with ``--qlora`` also lmforge's QLoRA (NF4 base) memory against LoRA.

    python benchmarks/bench_sft.py [--model smollm2|llama15m] [--steps 5] [--batch 4] [--seq 256] [--qlora]

Settings: fp32 on both sides (lmforge's `precision auto` is passed explicitly as fp32 here so both compute the same;
`--precision auto` measures lmforge with what a user gets), LoRA r=8, alpha=16, dropout 0, on q/k/v/o/gate/up/down;
AdamW over the LoRA weights; one optimizer step per batch. SmolLM2-135M comes from the GGUF that
scripts/fetch_smollm2.sh fetches (exported to a transformers directory first); llama15m is a stories15M-shaped LLaMA
with a 32,000-token vocabulary and random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2 = Path(os.environ.get("LMFORGE_SMOLLM2_GGUF",
                              Path.home() / ".cache/lmforge/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_hf_dir(kind: str, out: Path) -> Path:
    """A transformers checkpoint directory holding the benchmark model (float32)."""
    from lmforge.checkpoint import load_model
    from lmforge.interop.hf import write_hf_dir
    from lmforge.model import Decoder
    from lmforge.model.weights import model_state_dict
    from lmforge.presets import get_preset

    if kind == "smollm2":
        model = load_model(SMOLLM2)
    else:
        torch.manual_seed(0)
        model = Decoder(get_preset("llama-7b", n_layer=6, n_embd=288, n_head=6, n_kv_head=6, block_size=256,
                                   intermediate_size=768, vocab_size=32000))
    write_hf_dir(out, model.cfg, model_state_dict(model))
    return out


def batch(vocab: int, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (b, t + 1), generator=g)
    labels = x.clone()
    labels[:, : t // 2] = -100  # the prompt half is not scored
    return x, labels


def run_variant(variant: str, hf_dir: str, steps: int, b: int, t: int, precision: str) -> dict:
    torch.manual_seed(0)
    if variant == "transformers+peft":
        import peft
        import transformers as T

        model = T.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS_HF, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        vocab = model.config.vocab_size
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(x, labels):
            out = model(input_ids=x[:, :-1], labels=labels[:, :-1])  # transformers shifts the labels itself
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from lmforge.checkpoint import load_model
        from lmforge.losses import lm_loss
        from lmforge.peft import apply_peft
        from lmforge.train.loop import pick_precision
        from lmforge.train.optim import make_optimizer

        model = load_model(hf_dir).train()
        method = "qlora" if variant == "lmforge-qlora" else "lora"
        apply_peft(model, method, {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ",".join(TARGETS_HF)})
        vocab = model.cfg.vocab_size
        opt = make_optimizer(model, 1e-4, 0.0, (0.9, 0.999), 1e-8, False, "cpu")
        amp = pick_precision(precision, torch.device("cpu"), model, b * t)

        def step(x, labels):
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                s, n = lm_loss(model, {"input_ids": x[:, :-1], "targets": labels[:, 1:]})
            (s / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    x, labels = batch(vocab, b, t)
    step(x, labels)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, labels)
        times.append(time.perf_counter() - t0)
    best = min(times)
    seen = {}
    for p in [*model.parameters(), *model.buffers()]:
        if not p.requires_grad:
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return {"variant": variant, "s_per_step": best, "tokens_per_s": b * t / best,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_mb": sum(seen.values()) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama15m"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precision", default="fp32", help="lmforge's train.precision (fp32 or auto)")
    ap.add_argument("--qlora", action="store_true", help="also lmforge QLoRA (NF4 base)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "HF_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_variant(a.child[0], a.child[1], a.steps, a.batch, a.seq, a.precision)))
        return
    if a.model == "smollm2" and not SMOLLM2.is_file():
        sys.exit(f"{SMOLLM2}: not found (run scripts/fetch_smollm2.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_dir(a.model, Path(tmp) / "hf")
        variants = ["transformers+peft", "lmforge"] + (["lmforge-qlora"] if a.qlora else [])
        res = {}
        for v in variants:
            cmd = [sys.executable, __file__, "--child", v, str(hf_dir), "--steps", str(a.steps), "--batch",
                   str(a.batch), "--seq", str(a.seq), "--precision", a.precision]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[v] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {a.model}, batch {a.batch} x {a.seq} tokens (half scored), LoRA r=8 on q,k,v,o,gate,up,down, "
          f"{torch.get_num_threads()} threads, lmforge precision {a.precision}")
    for v, r in res.items():
        print(f"  {v:20s} {r['tokens_per_s']:9,.0f} tok/s  {r['s_per_step']:.3f} s/step  peak RSS "
              f"{r['peak_rss_mb']:8,.0f} MB  frozen base {r['base_mb']:7,.1f} MB")
    ref = res["transformers+peft"]
    ours = res["lmforge"]
    print(f"lmforge / transformers+peft: {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s, "
          f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x peak memory")
    if "lmforge-qlora" in res:
        q = res["lmforge-qlora"]
        print(f"QLoRA / LoRA: base weights {ours['base_mb'] / q['base_mb']:.2f}x smaller, peak memory "
              f"{q['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
