"""Acceptance of `lmforge ppo` on the bundled stories260K with rule-based rewards: the commands a user runs, with
their defaults. The bundled model is instruction-tuned first (`lmforge sft` on the story instructions), then PPO runs
once per reward on the 500 training prompts and is measured on the 40 held-out prompts (unseen names):

    python benchmarks/accept_ppo.py [--steps 20] [--rewards ending_reward story_reward] [--out DIR]

Rewards (``lmforge.data.stories``): ``ending_reward`` +1 for a happy last sentence, -1 for a sad one;
``story_reward`` 1 for each requested word (the name, the animal) the story uses. Printed per reward: the held-out
mean reward before and after (sampled responses with the same seeds), the largest KL to the reference over the run
against the adaptive controller's target, and the final beta. About 1 minute for SFT and 1 per reward on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.stages.ppo import PPOOptions

ROOT = Path(__file__).resolve().parents[1]
INSTRUCT = ROOT / "lmforge" / "assets" / "instruct"


def lmforge(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"lmforge {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="PPO iterations (default: the command's)")
    ap.add_argument("--rewards", nargs="+", default=["ending_reward", "story_reward"])
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    a = ap.parse_args()
    with contextlib.nullcontext(a.out) if a.out else tempfile.TemporaryDirectory(prefix="accept-ppo-") as tmp:
        out = Path(tmp)
        sft = out / "sft-stories"
        if not (sft / "config.json").is_file():
            lmforge("sft", "--data", str(INSTRUCT / "stories_instruct.jsonl"), "--out", str(sft))
        for name in a.rewards:
            run = out / f"ppo-{name}"
            lmforge("ppo", "--model", str(sft), "--reward", f"lmforge.data.stories:{name}",
                    "--prompts", str(INSTRUCT / "stories_prompts.txt"),
                    "--eval-prompts", str(INSTRUCT / "stories_heldout_prompts.txt"),
                    "--out", str(run), "--overwrite", *(["--steps", str(a.steps)] if a.steps else []))
            s = json.loads((run / "ppo_summary.json").read_text())
            rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            kl = max(r["train_kl"] for r in rows if "train_kl" in r)
            target = PPOOptions().kl_target  # the command's default
            print(f"{name}: held-out mean reward {s['heldout_before']:.3f} -> {s['heldout_after']:.3f} "
                  f"({s['iterations']} iterations); KL to the reference at most {kl:.2f} (target {target:g}), "
                  f"final beta {s['beta']:.4f}")


if __name__ == "__main__":
    main()
