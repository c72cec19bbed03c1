"""`lmforge tokenizer train|encode|decode`."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.errors import LMForgeError


def _nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must name a directory")
    return value


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="STEP", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--kind", choices=["bytelevel-bpe", "llama-bpe", "char"], required=True)
    t.add_argument("--output", required=True, type=_nonempty,
                   help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens")
    t.add_argument("--overwrite", action="store_true",
                   help="write into an --output directory that is not empty (its tokenizer files are replaced)")
    t.set_defaults(func=run_train)
    for step, fn, h in (("encode", run_encode, "read UTF-8 text on stdin, print the ids as a JSON array"),
                        ("decode", run_decode, "read a JSON array of ids on stdin, print the text")):
        e = tsub.add_parser(step, help=h, description=h)
        e.add_argument("--tokenizer", required=True, help="lmforge tokenizer dir, or a llama2.c tokenizer.bin")
        e.set_defaults(func=fn)


def run_train(args) -> None:
    from lmforge.tokenizer.train import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.kind, args.output, args.special_tokens, args.overwrite)
    short = ""
    if args.kind == "char" and tok.vocab_size != args.vocab_size:
        short = f" (--vocab-size {args.vocab_size:,} asked: a char tokenizer has a token per character of the text)"
    elif tok.vocab_size < args.vocab_size:
        short = f" (--vocab-size {args.vocab_size:,} asked: the text holds no more merges; more text gives more)"
    print(f"wrote {args.output}: {args.kind}, {tok.vocab_size} tokens{short}", file=sys.stderr)


def run_encode(args) -> None:
    from lmforge.tokenizer import load_tokenizer

    text = sys.stdin.buffer.read().decode("utf-8", errors="strict")
    print(json.dumps(load_tokenizer(args.tokenizer).encode(text)))


def run_decode(args) -> None:
    from lmforge.tokenizer import load_tokenizer

    raw = sys.stdin.read()
    try:
        ids = json.loads(raw)
    except ValueError as e:
        raise LMForgeError(f"stdin: not a JSON array of ids: {e}") from None
    tok = load_tokenizer(args.tokenizer)
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids):
        raise LMForgeError(f"stdin: expected a JSON array of integers in [0, {tok.vocab_size})")
    sys.stdout.write(tok.decode(ids))
