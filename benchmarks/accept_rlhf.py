"""Acceptance of the alignment stages on real preference data: SmolLM2-135M-Instruct (its GGUF) and Anthropic's
hh-rlhf harmless pairs (``../shared/data/preference/hh_rlhf_harmless_train.jsonl``), the commands a user runs with
their defaults:

    python benchmarks/accept_rlhf.py --out DIR [--stages reward ppo dpo] [--ppo-steps 30]

- ``reward``: ``lmforge reward --peft lora --head-init probe``; held-out pairwise accuracy on the command's own
  validation split (``data.val_fraction`` 0.1 of the file, seeded: 150 pairs), per evaluation and for the saved
  model.
- ``ppo``: ``lmforge ppo --peft lora`` against that reward model. Prompts are the first human turn of each
  transcript (whole multi-turn contexts made an iteration take 3 minutes on two cores), written here from the same
  split: the training pairs' prompts to train on, the first 64 held-out pairs' prompts to measure on. Prints the
  held-out reward-model score before and after (same sampling seeds) and the largest KL to the reference.
- ``dpo``: ``lmforge dpo --peft lora`` on the same training pairs; held-out implicit-reward accuracy per evaluation.
- ``sft-dpo``: the DPO paper's recipe for hh-rlhf, where no model tuned on its kind of dialogue exists: first
  ``lmforge sft --peft lora --epochs 1`` on the chosen replies of the training pairs (written here from the same
  split, so the held-out pairs stay unseen), then ``lmforge dpo --peft lora`` from that model (it is also the
  reference); held-out implicit-reward accuracy per evaluation.
- ``sft-reward``: ``lmforge reward --peft lora --head-init probe`` from that SFT model; held-out accuracy as above.
- ``reward-probe``: ``lmforge reward --head-init probe --epochs 0``: the head fitted to the frozen model's features
  is the reward model (~8 min); its held-out accuracy as the command measures it (training precision) and by
  ``lmforge reward score`` (float32) on the held-out pairs, written here from the same split.

Hours on two CPU cores (reward model ~45 min, PPO 30 iterations ~30 min, DPO ~45 min); a SmolLM2 LoRA step needs
13-17 GB of memory, so the stages run one after the other. ``DIR`` keeps every run; a stage whose output exists is
not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from lmforge.stages.reward import PrefData, read_split
from lmforge.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "preference" / "hh_rlhf_harmless_train.jsonl"


def find_gguf() -> Path:
    env = os.environ.get("LMFORGE_SMOLLM2_GGUF")
    found = [Path(env)] if env else sorted((Path.home() / ".cache" / "lmforge" / "smollm2").glob("*.gguf"))
    if not found or not found[0].is_file():
        raise SystemExit("SmolLM2's GGUF is missing: run scripts/fetch_smollm2.sh (or set LMFORGE_SMOLLM2_GGUF)")
    return found[0]


def lmforge(log: Path, *args: str) -> None:
    """Run one command, its stderr to ``log``; stop with its tail on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "lmforge", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"lmforge {' '.join(args)} failed:\n{log.read_text()[-3000:]}")


def evals(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


def first_turn_prompts(data: Path, out: Path, n_eval: int = 64) -> tuple[Path, Path]:
    """The first user turn of every record, training and held-out split as the reward model and DPO split them."""
    train, held = read_split(PrefData(path=str(data)), TrainConfig().seed)
    files = []
    for name, recs in (("train", train), ("eval", held[:n_eval])):
        path = out / f"ppo_prompts_{name}.jsonl"
        path.write_text("".join(json.dumps({"messages": [r.prompt[0]]}) + "\n" for r in recs))
        files.append(path)
    return files[0], files[1]


def split_file(data: Path, out: Path, held_out: bool = False) -> Path:
    """The training (or held-out) pairs' records as they are in ``data``, in a file of their own: the training ones
    for ``lmforge sft``, which trains on each prompt and its chosen reply; the held-out ones for ``reward score``."""
    train, held = read_split(PrefData(path=str(data)), TrainConfig().seed)
    lines = data.read_text(encoding="utf-8").splitlines()
    path = out / ("heldout_pairs.jsonl" if held_out else "sft_chosen_train.jsonl")
    recs = held if held_out else train
    path.write_text("".join(lines[int(r.source.rsplit(":", 1)[1]) - 1] + "\n" for r in recs), encoding="utf-8")
    return path


def reward_stage(name: str, model: Path, data: str, rm: Path, out: Path) -> None:
    """``lmforge reward --peft lora --head-init probe`` from ``model`` (unless ``rm`` holds one); held-out accuracy."""
    if not (rm / "value_head.json").is_file():
        lmforge(out / f"{rm.name}.log", "reward", "--model", str(model), "--data", data, "--out", str(rm), "--peft",
                "lora", "--head-init", "probe", "--overwrite")
    final = json.loads((rm / "value_head.json").read_text()).get("val_accuracy")
    shown = ", ".join(f"{s}: {v:.3f}" for s, v in evals(rm, "val_accuracy"))
    print(f"{name}: held-out accuracy by step {shown}; saved model {final:.3f}")


def probe_reward_stage(model: Path, data: str, rm: Path, out: Path) -> None:
    """``lmforge reward --head-init probe --epochs 0`` (unless ``rm`` holds one); held-out accuracy as the command
    measured it and by ``lmforge reward score`` in float32."""
    if not (rm / "value_head.json").is_file():
        lmforge(out / f"{rm.name}.log", "reward", "--model", str(model), "--data", data, "--out", str(rm),
                "--head-init", "probe", "--epochs", "0", "--overwrite")
    head = json.loads((rm / "value_head.json").read_text())
    held, log = split_file(Path(data), out, held_out=True), out / f"{rm.name}-score.log"
    lmforge(log, "reward", "score", "--model", str(rm), "--data", str(held), "--output",
            str(out / f"{rm.name}-heldout-scores.jsonl"))
    acc = [ln for ln in log.read_text().splitlines() if ln.startswith("accuracy=")][-1]
    print(f"reward-probe: 5-fold accuracy on the training prompts {head['head_probe']['cv_accuracy']:.3f}; held-out "
          f"{head['val_accuracy']:.3f} (training precision), `reward score` {acc}")


def dpo_stage(name: str, model: Path, data: str, dpo: Path, out: Path) -> None:
    """``lmforge dpo --peft lora`` from ``model`` (unless ``dpo`` holds a run); held-out implicit-reward accuracy."""
    if not (dpo / "adapter_config.json").is_file():
        lmforge(out / f"{dpo.name}.log", "dpo", "--model", str(model), "--data", data, "--out", str(dpo), "--peft",
                "lora", "--overwrite")
    shown = ", ".join(f"{s}: {v:.3f}" for s, v in evals(dpo, "val_reward_accuracy"))
    print(f"{name}: held-out implicit-reward accuracy by step {shown}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the runs (kept; finished stages are reused)")
    ap.add_argument("--stages", nargs="+", default=["reward", "ppo", "dpo"],
                    choices=["reward", "ppo", "dpo", "sft-dpo", "sft-reward", "reward-probe"])
    ap.add_argument("--data", default=str(HH), help="preference file (default: the shared hh-rlhf harmless pairs)")
    ap.add_argument("--ppo-steps", type=int, default=30, help="PPO iterations (the acceptance asks for <= 30)")
    a = ap.parse_args()
    if not Path(a.data).is_file():
        raise SystemExit(f"{a.data}: missing (the shared data directory is not beside this checkout)")
    gguf, out = find_gguf(), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rm = out / "reward"
    if "reward" in a.stages:
        reward_stage("reward", gguf, a.data, rm, out)
    if "ppo" in a.stages:
        if not (rm / "value_head.json").is_file():
            raise SystemExit(f"{rm}: no reward model yet (run the reward stage first)")
        ppo = out / "ppo"
        if not (ppo / "ppo_summary.json").is_file():
            train, held = first_turn_prompts(Path(a.data), out)
            lmforge(out / "ppo.log", "ppo", "--model", str(gguf), "--reward-model", str(rm), "--prompts", str(train),
                    "--eval-prompts", str(held), "--peft", "lora", "--steps", str(a.ppo_steps), "--out", str(ppo),
                    "--overwrite")
        s = json.loads((ppo / "ppo_summary.json").read_text())
        kl = max(v for _, v in evals(ppo, "train_kl"))
        print(f"ppo: held-out reward-model score {s['heldout_before']:.3f} -> {s['heldout_after']:.3f} "
              f"({s['iterations']} iterations); KL to the reference at most {kl:.2f}, final beta {s['beta']:.4f}")
    if "dpo" in a.stages:
        dpo_stage("dpo", gguf, a.data, out / "dpo", out)
    sft = out / "sft-chosen"
    if {"sft-dpo", "sft-reward"} & set(a.stages) and not (sft / "adapter_config.json").is_file():
        lmforge(out / "sft-chosen.log", "sft", "--model", str(gguf), "--data",
                str(split_file(Path(a.data), out)), "--out", str(sft), "--peft", "lora", "--epochs", "1",
                "--overwrite")
    if "sft-reward" in a.stages:
        reward_stage("sft-reward", sft, a.data, out / "reward-from-sft", out)
    if "sft-dpo" in a.stages:
        dpo_stage("sft-dpo", sft, a.data, out / "dpo-from-sft", out)
    if "reward-probe" in a.stages:
        probe_reward_stage(gguf, a.data, out / "reward-probe", out)


if __name__ == "__main__":
    main()
