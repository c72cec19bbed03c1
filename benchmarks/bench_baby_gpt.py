"""Acceptance run: nanoGPT's CPU "baby GPT" on tinyshakespeare-char, lmforge vs nanoGPT's own loop, same machine.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt     # any copy of nanoGPT's repo
    python benchmarks/bench_baby_gpt.py --nanogpt /tmp/nanogpt [--max-iters 2000]

Runs nanoGPT's train.py with the README's CPU command and `lmforge pretrain --recipe baby-gpt-shakespeare`, one after
the other with the same thread count, and prints each one's final val loss and wall time and the time ratio.
nanoGPT's README reports val loss ~1.88 for this run. (nanoGPT also evaluates the train split at every eval; the
wall time compared is the whole process, as a user would see it.) Both final models are then also scored on the
*whole* validation split (1,742 non-overlapping 64-token windows) by the same code, since a 20-batch estimate
moves by about +-0.02 from run to run. nanoGPT is run with --always_save_checkpoint=True so its final weights exist.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.assets import TINYSHAKESPEARE


def run_nanogpt(repo: Path, iters: int, work: Path) -> tuple[float, float]:
    dst = work / "nanogpt"
    shutil.copytree(repo, dst, ignore=shutil.ignore_patterns(".git"))
    data = dst / "data" / "shakespeare_char"
    shutil.copy(TINYSHAKESPEARE, data / "input.txt")  # prepare.py downloads only when input.txt is missing
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
           "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
           f"--out_dir={work / 'nanogpt-out'}", "--always_save_checkpoint=True"]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=dst, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)
    return float(vals[-1][1]), wall


def full_val_loss(model) -> float:
    """Mean next-token loss over the whole nanoGPT validation split, in non-overlapping 64-token windows."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    text = TINYSHAKESPEARE.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    val = np.array([stoi[c] for c in text[int(len(text) * 0.9):]], dtype=np.int64)
    T = 64
    starts = list(range(0, len(val) - T - 1, T))
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for k in range(0, len(starts), 64):
            idx = starts[k : k + 64]
            x = torch.from_numpy(np.stack([val[i : i + T] for i in idx]))
            y = torch.from_numpy(np.stack([val[i + 1 : i + T + 1] for i in idx]))
            logits = model(x)
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
            n += y.numel()
    return total / n


def nanogpt_as_lmforge(ckpt_path: Path):
    """nanoGPT's checkpoint (weights only) mapped onto lmforge's decoder with the recipe's config."""
    import torch

    from lmforge.checkpoint import build_model
    from lmforge.commands.pretrain import recipes
    from lmforge.stages.pretrain import build_model_config
    from lmforge.train.config import read_yaml

    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    cfg = build_model_config(read_yaml(recipes()["baby-gpt-shakespeare"])["model"], 65, 64)
    names = {"ln_1": "norm1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "ln_2": "norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    out = {"wte.weight": sd["transformer.wte.weight"], "wpe.weight": sd["transformer.wpe.weight"],
           "norm_f.weight": sd["transformer.ln_f.weight"]}
    for i in range(cfg.n_layer):
        for a, b in names.items():
            out[f"blocks.{i}.{b}.weight"] = sd[f"transformer.h.{i}.{a}.weight"]
    return build_model(cfg, out, str(ckpt_path))


def run_lmforge(iters: int, work: Path) -> tuple[float, float]:
    out = work / "lmforge-out"
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--recipe", "baby-gpt-shakespeare", "--out", str(out),
           "--max-iters", str(iters)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if r.get("val_loss") is not None][-1], wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", required=True, type=Path, help="a checkout of karpathy/nanoGPT")
    ap.add_argument("--max-iters", type=int, default=2000)
    a = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lm_loss, lm_wall = run_lmforge(a.max_iters, work)
        ng_loss, ng_wall = run_nanogpt(a.nanogpt, a.max_iters, work)
        from lmforge.checkpoint import load_model

        lm_full = full_val_loss(load_model(work / "lmforge-out" / f"ckpt-{a.max_iters:07d}"))
        ng_full = full_val_loss(nanogpt_as_lmforge(work / "nanogpt-out" / "ckpt.pt"))
    print(f"baby GPT, {a.max_iters} iters, {torch.get_num_threads()} threads, fp32 CPU")
    print(f"  nanoGPT  val loss {ng_loss:.4f} (its own estimate)  full val split {ng_full:.4f}  wall {ng_wall:7.1f} s")
    print(f"  lmforge  val loss {lm_loss:.4f} (its own estimate)  full val split {lm_full:.4f}  wall {lm_wall:7.1f} s")
    print(f"  lmforge time / nanoGPT time = {lm_wall / ng_wall:.2f}   (target <= 1.00 with val loss <= 1.88)")


if __name__ == "__main__":
    main()
