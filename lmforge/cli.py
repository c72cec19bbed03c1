"""The `lmforge` command: one entry point, one module per subcommand.

Each command module defines ``add_parser(subparsers)`` which registers its parser and sets
``func=run`` through ``set_defaults``. Modules are imported lazily so ``lmforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
import time
import traceback

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
    ("eval", "lmforge.commands.eval", "evaluate a model on benchmarks (perplexity, MMLU, ARC, GSM8K, CMMLU, JSONL)"),
    ("scaling", "lmforge.commands.scaling", "scaling laws: Chinchilla/Kaplan predictions, fits, sweeps, memory"),
    ("reward", "lmforge.commands.reward", "train a reward model on ranked preferences; `reward score` scores pairs"),
    ("dpo", "lmforge.commands.dpo", "direct preference optimisation (sigmoid, IPO, hinge), full or LoRA"),
    ("rejection-sample", "lmforge.commands.rejection_sample", "best-of-K samples by a reward model, as SFT data"),
    ("self-instruct", "lmforge.commands.self_instruct", "instruction data written by a model from seed tasks "
                                                        "(Self-Instruct: generate, filter, classify, instances)"),
    ("ppo", "lmforge.commands.ppo", "RLHF with PPO: actor, critic, reference and a reward model or function"),
    ("pipeline", "lmforge.commands.pipeline", "the whole life of a model in one resumable command: tokenizer, "
                                              "cleaning, pretraining, SFT, reward model, DPO/PPO, eval, int4"),
]


# the commands that run as several processes under torchrun (the others are refused there)
PARALLEL = frozenset({"pretrain", "sft", "dpo", "reward", "pipeline"})


class FlagError(LMForgeError):
    """Flags argparse refused, raised instead of printing usage and exiting (``parse_command(strict=True)``)."""


# a flag's value that is a negative number, as Python writes floats (argparse knows -1 and -.5, not -1e-3 or -inf)
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line, like every other failure (argparse prints the usage block)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _RaisingParser(argparse.ArgumentParser):
    """The pipeline's parser of a stage's flags: errors raised; no abbreviations (a YAML key ``max_iter`` is a typo,
    not ``--max-iters``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str):  # type: ignore[override]
        raise FlagError(f"{self.prog}: {message}")


def build_parser(only: str | None = None, parser_class: type = _Parser) -> argparse.ArgumentParser:
    parser = parser_class(prog="lmforge", description=__doc__.splitlines()[0],
                          epilog="A failure prints one line (lmforge COMMAND: error: ...) and exits 1 (2 for a bad "
                          "or missing flag); set LMFORGE_DEBUG=1 to see the traceback. Decoding builds a small C "
                          "helper with the system's cc on first use (~/.cache/lmforge/native); LMFORGE_NATIVE=0 "
                          "decodes with PyTorch alone.")
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


def _refuse_unknown_flag(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An unknown ``--flag`` refused by name before argparse's check of required flags, which otherwise came first:
    a misspelt required flag said "the following arguments are required: --vocab-size", never the typo."""
    p = parser
    for tok in argv:  # the (sub)command's own parser
        sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if tok.startswith("-") or sub is None or tok not in sub.choices:
            break
        p = sub.choices[tok]
    known = set(p._option_string_actions)
    overrides = bool(p._defaults.get("accepts_overrides"))  # (other flags are settings, checked by name later)
    for tok in argv:
        name = tok.split("=", 1)[0]
        abbreviates = p.allow_abbrev and any(k.startswith(name) for k in known)  # (argparse takes those as given)
        if tok.startswith("--") and len(tok) > 2 and name not in known and not abbreviates:
            close = difflib.get_close_matches(name, sorted(k for k in known if k.startswith("--")), n=1,
                                              cutoff=0.8 if overrides else 0.6)
            if close or not overrides:
                p.error(f"unrecognized arguments: {name}" + (f" (did you mean {close[0]}?)" if close else ""))


def parse_command(argv: list[str], strict: bool = False) -> argparse.Namespace:
    """The parsed arguments of ``lmforge ARGV`` (``--section.key value`` overrides in ``args.overrides``); exits
    with a usage message on bad arguments, as argparse does, or with ``strict`` raises ``FlagError``."""
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {c[0] for c in COMMANDS}
    parser = build_parser(first if first in known else None, _RaisingParser if strict else _Parser)
    argv, dotted = _split_dotted(argv)
    _refuse_unknown_flag(parser, argv)
    args, extra = parser.parse_known_args(argv)
    extra = extra + dotted
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not getattr(args, "func", None):
        if strict:
            raise FlagError(f"lmforge {' '.join(argv)}: not a complete command")
        parser.print_help()
        sys.exit(0 if args.command is None else 2)
    return args


def run_command(argv: list[str]) -> None:
    """Run ``lmforge ARGV`` in this process, letting its exceptions through (the pipeline runs stages so)."""
    args = parse_command(argv)
    args.func(args)


# Under torchrun every process usually meets the same error (a config, a file): the first process of a machine says
# it at once, the others wait this long first, so that when the first one failed too torchrun ends them before they
# repeat it; an error of their own is still said, a moment later.
OTHER_RANKS_WAIT = 3.0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_command(argv)
    try:
        world = os.environ.get("WORLD_SIZE", "1")
        if world not in ("", "1") and args.command not in PARALLEL:  # each process ran the whole command
            raise LMForgeError(f"{args.command} runs in one process: not under torchrun (WORLD_SIZE={world})")
        args.func(args)
    except BrokenPipeError:
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # one line for every failure; the traceback only with LMFORGE_DEBUG=1
        if os.environ.get("LMFORGE_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        elif os.environ.get("LOCAL_RANK", "0") != "0":
            time.sleep(OTHER_RANKS_WAIT)
        rank = os.environ.get("RANK", "0")
        print(f"lmforge {args.command}: error: {'' if rank == '0' else f'[rank {rank}] '}{error_line(e)}",
              file=sys.stderr)
        sys.exit(1)



def error_line(e: BaseException) -> str:
    """One line saying what went wrong: the message of an LMForgeError, ``FILE: reason`` for OS errors, else the
    exception's type and message with a hint on how to see the traceback."""
    if isinstance(e, LMForgeError):
        msg = str(e)
    elif isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, MemoryError):
        msg = "out of memory (is the model or its context too large for this machine?)"
    else:
        msg = f"{type(e).__name__}: {e} (LMFORGE_DEBUG=1 shows the traceback)"
    return " ".join(msg.split()) or type(e).__name__


def _split_dotted(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the rest, ``--section.key value`` overrides): taken out before parsing so that their values are never
    mistaken for a positional argument (such as the action of ``lmforge reward score``)."""
    rest: list[str] = []
    dotted: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            if "=" in a or i + 1 >= len(argv):
                dotted.append(a)
                i += 1
            else:
                dotted += [a, argv[i + 1]]
                i += 2
            continue
        rest.append(a)
        i += 1
    return rest, dotted


if __name__ == "__main__":
    main()
