"""Issue 10's PEFT acceptance: every method fine-tunes the same model on the same data for the same number of steps
with `lmforge sft` and its defaults; reported per method: trainable parameters, held-out loss before and after,
median step time and the run's peak resident memory.

    python benchmarks/accept_peft.py [--model GGUF] [--data alpaca_en_demo.json] [--steps 50]
                                     [--methods full lora qlora adapter prefix prompt ptuning] [--out DIR]

Defaults: SmolLM2-135M-Instruct (scripts/fetch_smollm2.sh) on ../shared/data/instruct/alpaca_en_demo.json with
sft's own 10 % held out. Each run is the command a user types plus `--max-iters STEPS` and, to spend the time on
training, evaluation and checkpoints at the start and the end only (`--train.eval_interval STEPS
--train.save_interval STEPS`); everything else (learning rate per method, batch, LoRA targets...) is sft's default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_quant import smollm2_path  # the GGUF that scripts/fetch_smollm2.sh fetches

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ["full", "lora", "qlora", "adapter", "prefix", "prompt", "ptuning"]


def run(method: str, model: str, data: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lmforge", "sft", "--model", model, "--data", data, "--max-iters", str(steps),
           "--out", str(out), "--overwrite", "--train.eval_interval", str(steps), "--train.save_interval", str(steps)]
    if method != "full":
        cmd += ["--peft", method]
    t = time.perf_counter()
    with open(out.parent / f"{method}.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise RuntimeError(f"{method}: exit status {status}; see {out.parent / f'{method}.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    steps_s = [r["step_s"] for r in rows if "step_s" in r]
    done = [r for r in rows if "trainable_params" in r] or [{}]
    plan = next(line for line in (out.parent / f"{method}.log").read_text().splitlines() if line.startswith("sft:"))
    trainable = int(plan.split("trainable ")[1].split(" of ")[0].replace(",", ""))
    total = int(plan.split(" of ")[1].split(" parameters")[0].replace(",", ""))
    lr = float(plan.split(" lr ")[1].split(",")[0])
    return {"method": method, "trainable": trainable, "total": total, "lr": lr, "val_first": vals[0][1],
            "val_last": vals[-1][1], "step_s": statistics.median(steps_s) if steps_s else float("nan"),
            "peak_mb": usage.ru_maxrss / 1024, "wall_s": wall, "done": done[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--data", default=str(SHARED / "instruct" / "alpaca_en_demo.json"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--out", default="runs/accept_peft")
    a = ap.parse_args()
    model = a.model or smollm2_path()
    if model is None:
        sys.exit("no model: pass --model, or run scripts/fetch_smollm2.sh")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{Path(model).name} on {Path(a.data).name}, {a.steps} steps per method, threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'method':<9}{'trainable':>12}{'share':>8}{'lr':>9}{'val before':>11}{'val after':>10}{'step s':>8}"
          f"{'peak MB':>9}{'wall s':>8}", flush=True)
    results = []
    for m in a.methods:
        d = out / m
        r = run(m, str(model), a.data, a.steps, d)
        results.append(r)
        print(f"{m:<9}{r['trainable']:>12,}{100 * r['trainable'] / r['total']:>7.2f}%{r['lr']:>9.1e}"
              f"{r['val_first']:>11.4f}{r['val_last']:>10.4f}{r['step_s']:>8.2f}{r['peak_mb']:>9.0f}"
              f"{r['wall_s']:>8.0f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    fell = [r["method"] for r in results if r["val_last"] < r["val_first"]]
    print(f"held-out loss fell for {len(fell)}/{len(results)} methods: {', '.join(fell)}")


if __name__ == "__main__":
    main()
