"""`lmforge pretrain`: train a model from a YAML config or a named recipe, with ``--section.key value`` overrides."""

from __future__ import annotations

import math
from pathlib import Path

from lmforge.commands.args import seed_type
from lmforge.commands.common import add_resume_args, report, train_in
from lmforge.errors import LMForgeError
from lmforge.yamlfile import leading_comment


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Pretrain a model. Settings come from --recipe or --config, then any --section.key value "
                    "override (sections: model, data, train; e.g. --train.lr 3e-4 --model.n_layer 6). "
                    "Run the same command under `torchrun --nproc-per-node N -m lmforge pretrain ...` for DDP "
                    "(or --train.distributed fsdp).")
    p.add_argument("--config", help="YAML run config (sections model, data, train, out)")
    p.add_argument("--recipe", help="a named recipe (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="list the named recipes and exit")
    p.add_argument("--out", help="run directory: checkpoints, metrics.jsonl, loss.png")
    add_resume_args(p)
    p.add_argument("--save-interval", type=int, help="write a checkpoint every N steps (the last step always is)")
    p.add_argument("--max-iters", type=int, help="optimizer steps")
    p.add_argument("--eval-interval", type=int, help="evaluate every N steps")
    p.add_argument("--seed", type=seed_type, help="random seed")
    p.set_defaults(func=run, accepts_overrides=True)


def recipes() -> dict[str, Path]:
    from lmforge.assets import RECIPES

    return {p.stem: p for p in sorted(RECIPES.glob("*.yaml"))}


def check_prepared_data(path: str, block_size: int) -> None:
    """A prepared data directory must hold more than ``block_size`` tokens in each split (one line if not)."""
    from lmforge.data.dataset import open_prepared
    from lmforge.data.prepare import is_prepared
    from lmforge.stages.pretrain import resolve_path

    p = resolve_path(path)
    if not is_prepared(p):
        return
    data = open_prepared(p, verify_tokenizer=False)
    for split, s in data.index["splits"].items():
        if int(s["tokens"]) <= block_size:
            advice = _small_split_advice(data.index, split, block_size)
            raise LMForgeError(f"{p / s['file']}: the {split} split holds {int(s['tokens']):,} tokens, fewer than "
                               f"data.block_size+1 = {block_size + 1}; {advice}")


def _small_split_advice(index: dict, split: str, block_size: int) -> str:
    """What to do about a split of ``block_size`` tokens or fewer: more text when the whole data cannot give both
    splits a window; else a --val-fraction that gives the split its window, with the tail split where the data was
    split by document (a few documents make uneven splits)."""
    total = sum(int(s["tokens"]) for s in index["splits"].values())
    window = block_size + 1
    if total <= 2 * window:
        return (f"the data holds {total:,} tokens in all: prepare more text or lower --data.block_size (to "
                f"{total // 2 - 1:,} or less)")
    was = index.get("val_fraction")
    tail = index.get("split_mode") == "tail" or index.get("split_fallback") == "tail"
    if split == "val":
        need = math.ceil(window / total * 1000) / 1000
        fraction = f"--val-fraction {need:g} or more (it was {was}; of the {total:,} tokens)"
        how = ("the tail split was used already: prepare it again with a larger " + fraction if tail else
               "prepare it again with --split-mode tail" + (f" and {fraction}" if not was or was < need else ""))
    else:
        most = math.floor((total - window) / total * 1000) / 1000
        fraction = f"--val-fraction {most:g} or less (it was {was})"
        how = (f"prepare it again with a smaller {fraction}" if tail else
               "prepare it again with --split-mode tail" + (f" and {fraction}" if was and was > most else ""))
    return how + " or lower --data.block_size"


def run(args) -> None:
    from lmforge.stages.pretrain import run_pretrain
    from lmforge.train.config import RunConfig, load_run_config, merge, parse_overrides, read_yaml

    if args.list_recipes:
        for name, path in recipes().items():
            lines = leading_comment(path.read_text()) or [""]
            print(f"{name:28s} {lines[0]}")
            for ln in lines[1:]:  # the rest of the description under its first line
                print(f"{'':28s} {ln}")
        return
    if args.recipe and args.config:
        raise LMForgeError("give either --recipe or --config, not both")
    d: dict = {}
    source = "defaults"
    if args.recipe:
        known = recipes()
        if args.recipe not in known:
            raise LMForgeError(f"--recipe {args.recipe!r}: unknown; known recipes: {sorted(known)}")
        d, source = read_yaml(known[args.recipe]), f"recipe {args.recipe}"
    elif args.config:
        d, source = read_yaml(args.config), args.config
    flags = {"out": args.out, "train": {"save_interval": args.save_interval, "max_iters": args.max_iters,
                                        "eval_interval": args.eval_interval, "seed": args.seed}}
    flags = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
             for k, v in flags.items() if v is not None}
    d = merge(merge(d, flags), parse_overrides(getattr(args, "overrides", []), RunConfig))
    cfg = load_run_config(d, where=source)
    if not getattr(args, "plan_only", False):  # the pipeline's flag check: the data may not be prepared yet
        check_prepared_data(cfg.data.path, cfg.data.block_size)
    result = train_in(args, cfg.out, lambda resume: run_pretrain(cfg, resume=resume),
                      stream={"batch_size": cfg.train.batch_size, "block_size": cfg.data.block_size})
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                        if k in ("step", "train_loss", "val_loss", "best_val", "tokens_per_s", "mfu") and v is not None)
    report(f"done: {summary}; run directory {cfg.out}")  # under torchrun only the first process reports
