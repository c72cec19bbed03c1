"""`lmforge sft`: supervised fine-tuning on instruction/chat data, full or parameter-efficient (--peft)."""

from __future__ import annotations

from lmforge.commands.args import seed_type
from lmforge.commands.common import add_resume_args, report, train_in
from lmforge.errors import LMForgeError


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Fine-tune a model on instruction or chat data (Alpaca, ShareGPT, OpenAI messages, self-instruct "
                    "seeds; or preference pairs, trained on the prompt and chosen reply; JSON or JSONL), scoring "
                    "only the assistant turns. An adapter directory as --model is merged in first (new adapters "
                    "start from it). Settings: --config YAML, the flags "
                    "below, then --section.key value overrides (sections data, train, peft; e.g. --train.lr 1e-4 "
                    "--peft.r 16 --data.vars.name Forge). Defaults (epochs, learning rate, schedule) are chosen "
                    "from the data and the method and printed. The output directory is a loadable --model. "
                    "Run under `torchrun --nproc-per-node N -m lmforge sft ...` for DDP.")
    p.add_argument("--model", help="base model: lmforge/HF checkpoint dir, llama2.c .bin, GGUF or quantized dir "
                                   "(default: the bundled stories260K)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the one beside the model)")
    p.add_argument("--data", help="training data file(s), comma-separated; mixed (see --data.weights, --data.cap)")
    p.add_argument("--val-data", help="held-out data file (default: --data.val_fraction 0.1 of the data)")
    p.add_argument("--template", help="chat template: chatml, llama2, chatglm, alpaca, plain or a Jinja string "
                                      "(default: the model's own, else alpaca)")
    p.add_argument("--peft", help="lora | qlora | adapter | prefix | prompt | ptuning (options: --peft.KEY VALUE)")
    p.add_argument("--epochs", type=float, help="passes over the training data (default 3)")
    p.add_argument("--packing", action="store_true", help="pack several examples per row (attention kept apart)")
    p.add_argument("--train-on-prompt", action="store_true", help="score prompt tokens too")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable records (counted in the log)")
    p.add_argument("--config", help="YAML config (keys model, tokenizer, data, train, peft, epochs, out)")
    p.add_argument("--out", help="run directory (default runs/sft): checkpoints, metrics, then the final model")
    add_resume_args(p)
    p.add_argument("--max-iters", type=int, help="optimizer steps (default: from --epochs)")
    p.add_argument("--seed", type=seed_type, help="random seed")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> None:
    from lmforge.stages.sft import SFTConfig, load_sft_config, run_sft
    from lmforge.train.config import merge, parse_overrides, read_yaml

    d: dict = read_yaml(args.config) if args.config else {}
    source = args.config or "command line"
    flags: dict = {"model": args.model, "tokenizer": args.tokenizer, "out": args.out, "epochs": args.epochs,
                   "data": {"path": args.data, "val_path": args.val_data, "template": args.template,
                            "packing": args.packing or None, "train_on_prompt": args.train_on_prompt or None,
                            "skip_bad": args.skip_bad or None},
                   "train": {"max_iters": args.max_iters, "seed": args.seed},
                   "peft": {"method": args.peft}}
    flags = _drop_none(flags)
    overrides = parse_overrides(getattr(args, "overrides", []), SFTConfig)
    d = merge(merge(d, flags), overrides)
    explicit = set((d.get("train") or {}).keys())
    if isinstance(d.get("peft"), str):
        d["peft"] = {"method": d["peft"]}
    if d.get("peft") and "method" not in d["peft"]:
        raise LMForgeError(f"peft options {sorted(d['peft'])} given without a method: add --peft METHOD")
    cfg = load_sft_config(d, where=source)
    result = train_in(args, cfg.out, lambda resume: run_sft(cfg, explicit_train=explicit, resume=resume),
                      stream={"batch_size": cfg.train.batch_size})
    keys = ("step", "train_loss", "val_loss", "best_val", "trainable_params")
    summary = ", ".join(f"{k} {result[k]:.4g}" if isinstance(result[k], float) else f"{k} {result[k]}"
                        for k in keys if result.get(k) is not None)
    report(f"done: {summary}; model in {cfg.out}")


def _drop_none(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if not v:
                continue
        if v is not None:
            out[k] = v
    return out
