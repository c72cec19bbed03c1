"""`lmforge tokenizer train|encode|decode`."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.data.io import path_arg
from lmforge.errors import LMForgeError


def _nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must name a directory")
    return value


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="STEP", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, type=path_arg("a file"),
                   help="UTF-8 text files, or .jsonl/.json/.parquet files of records (the text of their --field); "
                   ".gz is decompressed")
    t.add_argument("--field", default="text", help="JSON/parquet field holding the text (default: text)")
    t.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--kind", choices=["bytelevel-bpe", "llama-bpe", "char"], required=True)
    t.add_argument("--output", required=True, type=_nonempty,
                   help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens")
    t.add_argument("--overwrite", action="store_true",
                   help="write into an --output directory that is not empty (its tokenizer files are replaced)")
    t.set_defaults(func=run_train)
    for step, fn, h in (("encode", run_encode, "read UTF-8 text on stdin, print the ids as a JSON array"),
                        ("decode", run_decode, "read a JSON array of ids on stdin, print the text (and a newline on a "
                                            "terminal)")):
        e = tsub.add_parser(step, help=h, description=h)
        e.add_argument("--tokenizer", required=True, type=path_arg("a tokenizer file or directory"),
                       help="lmforge tokenizer dir, or a llama2.c tokenizer.bin")
        e.set_defaults(func=fn)


def run_train(args) -> None:
    from lmforge.tokenizer.train import train_tokenizer

    if any(not t.strip() for t in args.special_tokens):
        raise LMForgeError("--special-tokens: an empty or blank token; give the tokens' text")
    tok = train_tokenizer(args.input, args.vocab_size, args.kind, args.output, args.special_tokens, args.overwrite,
                          field=args.field, skip_bad=args.skip_bad)
    short = ""
    if args.kind == "char" and tok.vocab_size != args.vocab_size:
        short = f" (--vocab-size {args.vocab_size:,} asked: a char tokenizer has a token per character of the text)"
    elif tok.vocab_size < args.vocab_size:
        short = f" (--vocab-size {args.vocab_size:,} asked: the text holds no more merges; more text gives more)"
    print(f"wrote {args.output}: {args.kind}, {tok.vocab_size} tokens{short}", file=sys.stderr)


def run_encode(args) -> None:
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)  # (a wrong path is said before stdin is read)
    text = read_stdin()
    try:
        ids = tok.encode(text)
    except LMForgeError as e:  # a character outside a char vocabulary: named with its line on stdin
        stoi = getattr(tok, "stoi", None)
        at = next((i for i, ch in enumerate(text) if ch not in stoi), None) if stoi is not None else None
        raise LMForgeError(f"stdin{'' if at is None else f':{text.count(chr(10), 0, at) + 1}'}: {e}") from None
    print(json.dumps(ids))


def run_decode(args) -> None:
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    try:
        ids = json.loads(read_stdin())
    except (ValueError, RecursionError) as e:  # (RecursionError: arrays nested thousands deep)
        raise LMForgeError(f"stdin: not a JSON array of ids: {e}") from None
    ok = isinstance(ids, list) and all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)  # (not true/false)
    if not ok:
        bad = next((i for i in ids if not (type(i) is int and 0 <= i < tok.vocab_size)), None) if isinstance(
            ids, list) else ids
        raise LMForgeError(f"stdin: expected a JSON array of integers in [0, {tok.vocab_size}), got "
                           f"{json.dumps(bad)[:40]}")
    text = tok.decode(ids)
    # a terminal gets a newline after the text (the shell's prompt went on its last line); a pipe or a file gets
    # the text exactly, so that encode | decode gives the input back
    out = text + "\n" if sys.stdout.isatty() and not text.endswith("\n") else text
    buf = getattr(sys.stdout, "buffer", None)
    if buf is None:
        sys.stdout.write(out)
    else:  # UTF-8 whatever the locale, as encode reads stdin (a latin-1 or GBK stdout failed on '你好' or an emoji)
        sys.stdout.flush()
        buf.write(out.encode("utf-8", "surrogateescape"))
        buf.flush()


def read_stdin() -> str:
    """All of stdin as UTF-8 text (one line naming stdin and the byte if it is not)."""
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LMForgeError(f"stdin: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
