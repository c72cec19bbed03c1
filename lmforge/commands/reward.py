"""`lmforge reward`: train a reward model on ranked preference data; `lmforge reward score`: score pairs with one."""

from __future__ import annotations

from pathlib import Path

from lmforge.commands.args import seed_type
from lmforge.commands.common import add_resume_args, report, train_in
from lmforge.commands.sft import _drop_none
from lmforge.errors import LMForgeError
from lmforge.files import check_output_file


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Train a reward model (the decoder + a scalar head) on preference data: {prompt|conversations, "
                    "chosen, rejected} (TRL, LLaMA-Factory), hh-rlhf {chosen, rejected} transcripts, or ranked lists "
                    "{prompt, responses: [best, ..., worst]} (every pair, one batch per prompt). Held-out pairwise "
                    "accuracy picks the best checkpoint; the reward is then normalised to mean 0 / std 1 over the "
                    "training responses. Overrides: --section.key value (sections data, train, peft; e.g. "
                    "--train.lr 1e-4 --data.max_len 256). The output directory is a reward model and a loadable "
                    "--model (its LM part). `lmforge reward score --model DIR --data FILE` scores pairs.")
    p.add_argument("--model", help="base model (default: the bundled stories260K)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the one beside the model)")
    p.add_argument("--data", help="preference data file (JSONL or JSON)")
    p.add_argument("--val-data", help="held-out file (default: --data.val_fraction 0.1 of the records)")
    p.add_argument("--template", help="chat template name or Jinja (default: the model's own, else plain text)")
    p.add_argument("--peft", help="lora | qlora (merged into the saved reward model; options --peft.KEY VALUE)")
    p.add_argument("--margin", type=float, help="loss margin: -log sigmoid(r_w - r_l - margin) (default 0)")
    p.add_argument("--epochs", type=float, help="passes over the training prompts (default 1; 0 with --head-init "
                   "probe: no fine-tuning, the head fitted to the frozen model's features is the reward model)")
    p.add_argument("--head-init", choices=["probe", "normal"],
                   help="normal (default): a random head, N(0, 1/sqrt(d+1)); probe: fit the head to the frozen "
                        "model's features first (a linear probe, L2 by cross-validation), then fine-tune at a tenth "
                        "of the rate, the fitted head alone a candidate for the best checkpoint")
    p.add_argument("--config", help="YAML config (keys model, tokenizer, data, train, peft, margin, epochs, "
                                    "head_init, out)")
    p.add_argument("--out", help="run directory (default runs/reward): checkpoints, metrics, then the reward model")
    add_resume_args(p)
    p.add_argument("--max-iters", type=int, help="optimizer steps (default: from --epochs)")
    p.add_argument("--seed", type=seed_type, help="random seed")
    p.set_defaults(func=run, accepts_overrides=True)
    ps = p.add_subparsers(dest="action", metavar="ACTION")
    s = ps.add_parser("score", help="score preference pairs with a reward model",
                      description="Score every (better, worse) pair of a preference file with a reward model: one "
                                  "JSON line per pair (to --output, or stdout), then `accuracy=0.XXX` on the last "
                                  "line of stdout.")
    s.add_argument("--model", required=True, help="reward model directory (written by `lmforge reward`)")
    s.add_argument("--data", required=True, help="preference data file (same formats as training)")
    s.add_argument("--output", help="JSONL file for the per-pair scores (default: stdout)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    s.add_argument("--max-len", type=int, default=0, help="tokens per prompt + response (default: as in training)")
    s.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    s.set_defaults(func=run_score, accepts_overrides=False)


def run(args) -> None:
    from lmforge.stages.reward import RewardConfig, load_reward_config, run_reward
    from lmforge.train.config import merge, parse_overrides, read_yaml

    d: dict = read_yaml(args.config) if args.config else {}
    flags = _drop_none({"model": args.model, "tokenizer": args.tokenizer, "out": args.out, "epochs": args.epochs,
                        "margin": args.margin, "head_init": args.head_init,
                        "data": {"path": args.data, "val_path": args.val_data, "template": args.template},
                        "train": {"max_iters": args.max_iters, "seed": args.seed}, "peft": {"method": args.peft}})
    d = merge(merge(d, flags), parse_overrides(getattr(args, "overrides", []), RewardConfig))
    explicit = set((d.get("train") or {}).keys())
    if isinstance(d.get("peft"), str):
        d["peft"] = {"method": d["peft"]}
    if d.get("peft") and "method" not in d["peft"]:
        raise LMForgeError(f"peft options {sorted(d['peft'])} given without a method: add --peft lora")
    cfg = load_reward_config(d, where=args.config or "command line")
    result = train_in(args, cfg.out, lambda resume: run_reward(cfg, explicit_train=explicit, resume=resume))
    keys = ("step", "train_loss", "val_loss", "val_accuracy", "val_margin", "best_val")
    summary = ", ".join(f"{k} {result[k]:.4g}" for k in keys if isinstance(result.get(k), (int, float)))
    report(f"done: {summary}; reward model in {cfg.out}")  # under torchrun only the first process reports


def run_score(args) -> None:
    from lmforge.stages.reward import score_file

    if args.batch_size < 1:
        raise LMForgeError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.max_len < 0:
        raise LMForgeError(f"--max-len {args.max_len}: must be >= 0 (0: as in training)")
    if args.output:  # before any work: never over what is read, nor over an existing file without --overwrite
        check_output_file(args.output, args.overwrite, [Path(args.model), Path(args.data)])
    acc = score_file(args.model, args.data, args.output, args.max_len, args.batch_size)
    print(f"accuracy={acc:.3f}")
