"""The `lmforge` command: one entry point, one module per subcommand.

Each command module defines ``add_parser(subparsers)`` which registers its parser and sets
``func=run`` through ``set_defaults``. Modules are imported lazily so ``lmforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge.errors import LMForgeError

# (subcommand, module, one-line help). Modules are imported only when their command is parsed.
COMMANDS: list[tuple[str, str, str]] = [
    ("models", "lmforge.commands.models", "list model presets with parameter counts"),
    ("generate", "lmforge.commands.generate", "generate text from a model"),
    ("chat", "lmforge.commands.chat", "chat with a model in the terminal"),
    ("serve", "lmforge.commands.serve", "serve a model over an OpenAI-compatible HTTP API with a web chat page"),
    ("convert", "lmforge.commands.convert", "convert checkpoints between lmforge, Hugging Face and llama2.c"),
    ("pretrain", "lmforge.commands.pretrain", "pretrain a model from a YAML config or a named recipe"),
    ("quantize", "lmforge.commands.quantize", "weight-only int8/int4 quantization of a model's linear layers"),
    ("peft", "lmforge.commands.peft", "merge and export PEFT adapters (LoRA, QLoRA, ...)"),
    ("tokenizer", "lmforge.commands.tokenizer", "train, encode and decode with tokenizers"),
    ("data", "lmforge.commands.data", "clean and prepare corpora"),
    ("sft", "lmforge.commands.sft", "supervised fine-tuning on instruction/chat data, full or PEFT (LoRA, QLoRA, ...)"),
    ("ppo", "lmforge.commands.ppo", "RLHF with PPO: actor, critic, reference and a reward model or function"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # command not built yet in this checkout
            if e.name != module:
                raise
            sub.add_parser(name, help=help_ + " (not available)")
            continue
        mod.add_parser(sub, name, help_)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {c[0] for c in COMMANDS}
    parser = build_parser(first if first in known else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(0 if args.command is None else 2)
    try:
        args.func(args)
    except LMForgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
