"""Acceptance run: nanoGPT's CPU "baby GPT" on tinyshakespeare-char, lmforge vs nanoGPT's own loop, same machine.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt     # any copy of nanoGPT's repo
    python benchmarks/bench_baby_gpt.py --nanogpt /tmp/nanogpt [--max-iters 2000]

Runs nanoGPT's train.py with the README's CPU command and `lmforge pretrain --recipe baby-gpt-shakespeare`, one after
the other with the same thread count, and prints each one's final val loss and wall time and the time ratio.
nanoGPT's README reports val loss ~1.88 for this run. (nanoGPT also evaluates the train split at every eval; the
wall time compared is the whole process, as a user would see it.)
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
           f"--out_dir={work / 'nanogpt-out'}"]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=dst, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)
    return float(vals[-1][1]), wall


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
    print(f"baby GPT, {a.max_iters} iters, {torch.get_num_threads()} threads, fp32 CPU")
    print(f"  nanoGPT  val loss {ng_loss:.4f}  wall {ng_wall:7.1f} s")
    print(f"  lmforge  val loss {lm_loss:.4f}  wall {lm_wall:7.1f} s")
    print(f"  lmforge time / nanoGPT time = {lm_wall / ng_wall:.2f}   (target <= 1.00 with val loss <= 1.88)")


if __name__ == "__main__":
    main()
