"""`lmforge dpo`: direct preference optimisation on preference pairs, full or parameter-efficient (--peft)."""

from __future__ import annotations

from lmforge.commands.args import seed_type
from lmforge.commands.common import add_resume_args, report, train_in
from lmforge.commands.sft import _drop_none
from lmforge.errors import LMForgeError


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Train a policy with DPO on preference data: the reward model's formats ({prompt|conversations, "
                    "chosen, rejected}, hh-rlhf transcripts, ranked lists as all their pairs) and TRL's flat "
                    "{prompt, chosen, rejected} strings (joined as plain text for a model without a chat template). "
                    "Full fine-tuning stores the reference log-probs once in the run directory; with --peft the "
                    "reference is the base with adapters disabled. Overrides: --section.key value (sections data, "
                    "train, peft). The output directory is a loadable --model.")
    p.add_argument("--model", help="policy to start from (default: the bundled stories260K)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the one beside the model)")
    p.add_argument("--data", help="preference data file (JSONL or JSON)")
    p.add_argument("--val-data", help="held-out file (default: --data.val_fraction 0.1 of the records)")
    p.add_argument("--template", help="chat template name or Jinja (default: the model's own, else plain text)")
    p.add_argument("--loss", choices=("sigmoid", "ipo", "hinge"), help="DPO loss (default sigmoid)")
    p.add_argument("--beta", type=float, help="KL strength beta (default 0.1)")
    p.add_argument("--label-smoothing", type=float, help="conservative DPO's eps for the sigmoid loss (default 0)")
    p.add_argument("--peft", help="lora | qlora | ... (options --peft.KEY VALUE)")
    p.add_argument("--epochs", type=float, help="passes over the training pairs (default 1)")
    p.add_argument("--config", help="YAML config (keys model, tokenizer, data, train, peft, loss, beta, "
                                    "label_smoothing, epochs, out)")
    p.add_argument("--out", help="run directory (default runs/dpo): checkpoints, metrics, then the final model")
    add_resume_args(p)
    p.add_argument("--max-iters", type=int, help="optimizer steps (default: from --epochs)")
    p.add_argument("--seed", type=seed_type, help="random seed")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> None:
    from lmforge.stages.dpo import DPOConfig, load_dpo_config, run_dpo
    from lmforge.train.config import merge, parse_overrides, read_yaml

    d: dict = read_yaml(args.config) if args.config else {}
    flags = _drop_none({"model": args.model, "tokenizer": args.tokenizer, "out": args.out, "epochs": args.epochs,
                        "loss": args.loss, "beta": args.beta, "label_smoothing": args.label_smoothing,
                        "data": {"path": args.data, "val_path": args.val_data, "template": args.template},
                        "train": {"max_iters": args.max_iters, "seed": args.seed}, "peft": {"method": args.peft}})
    d = merge(merge(d, flags), parse_overrides(getattr(args, "overrides", []), DPOConfig))
    explicit = set((d.get("train") or {}).keys())
    if isinstance(d.get("peft"), str):
        d["peft"] = {"method": d["peft"]}
    if d.get("peft") and "method" not in d["peft"]:
        raise LMForgeError(f"peft options {sorted(d['peft'])} given without a method: add --peft lora")
    cfg = load_dpo_config(d, where=args.config or "command line")
    result = train_in(args, cfg.out, lambda resume: run_dpo(cfg, explicit_train=explicit, resume=resume))
    keys = ("step", "train_loss", "val_loss", "val_reward_accuracy", "val_reward_margin")
    summary = ", ".join(f"{k} {result[k]:.4g}" for k in keys if isinstance(result.get(k), (int, float)))
    report(f"done: {summary}; model in {cfg.out}")  # under torchrun only the first process reports
