"""`lmforge data prepare INPUT... --tokenizer PATH --output DIR [--val-fraction F]`."""

from __future__ import annotations

import argparse

from lmforge.commands.args import seed_type
from lmforge.data.io import path_arg

DESCRIPTION = """Tokenize .txt/.jsonl/.json/.parquet files (optionally .gz) into train.bin/val.bin (raw uint16, or
uint32 for vocabularies over 65,536, memory-mappable with numpy), per-document offsets, a copy of the tokenizer and
index.json. A .txt file is one document unless --doc-separator is given. Documents are packed back to back with BOS
before / EOS after each one (default: BOS where the tokenizer starts a text with it, EOS where it has one). The
output is written to a temporary directory and renamed into place."""


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=DESCRIPTION)
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=path_arg("a file"),
                   help=".txt, .jsonl, .json or .parquet files")
    p.add_argument("--tokenizer", required=True, type=path_arg("a tokenizer file or directory"),
                   help="any tokenizer path lmforge reads (file or directory)")
    p.add_argument("--output", required=True, metavar="DIR", type=path_arg("a directory"))
    p.add_argument("--val-fraction", type=float, default=0.001, metavar="F",
                   help="fraction held out for validation (default 0.001)")
    p.add_argument("--split-mode", choices=["doc", "tail"], default="doc",
                   help="doc: whole documents chosen by a seeded hash of their text; tail: the last F of the token "
                   "stream, as nanoGPT splits shakespeare_char (default doc)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="BOS before each document (default: when the tokenizer starts a text with it, as "
                   "transformers encodes: not for one whose add_bos_token is false)")
    p.add_argument("--eos", action=argparse.BooleanOptionalAction, default=None,
                   help="EOS after each document (default: when the tokenizer has one)")
    p.add_argument("--field", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--doc-separator", default=None, metavar="STR",
                   help="split .txt files into documents on STR (escapes like \\n are decoded, e.g. '\\n\\n' or "
                   "'<|endoftext|>'); default: a whole file is one document")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="tokenizer processes (default: min(2, CPUs))")
    p.add_argument("--seed", type=seed_type, default=None, help="seed of the document split hash (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared output")
    p.set_defaults(func=run)


def decode_escapes(text: str) -> str:
    """``text`` with its backslash escapes decoded as Python reads them ('\\n', '\\u3002', '\\U0001F600'); other
    characters stay as typed (a '。' or 'é' was refused as a bad escape). Byte escapes of UTF-8 ('\\xe3\\x80\\x82')
    are read as those bytes. UnicodeError for a bad escape."""
    out = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    if "\\x" in text and max(map(ord, out), default=0) < 256:
        try:
            return out.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass
    return out


def run(args) -> None:
    from lmforge.data.prepare import prepare
    from lmforge.errors import LMForgeError

    sep = args.doc_separator
    if sep is not None:
        try:
            sep = decode_escapes(sep)
        except UnicodeError:
            raise LMForgeError(f"--doc-separator {args.doc_separator!r}: bad escape sequence") from None
    if args.seed is not None and (args.split_mode == "tail" or args.val_fraction == 0):
        why = "--split-mode tail" if args.split_mode == "tail" else "--val-fraction 0"
        raise LMForgeError(f"--seed {args.seed}: seeds the split by document only; with {why} it does nothing")
    idx = prepare(args.inputs, args.tokenizer, args.output, val_fraction=args.val_fraction,
                  split_mode=args.split_mode, bos=args.bos, eos=args.eos, workers=args.workers, seed=args.seed or 0,
                  overwrite=args.overwrite, skip_bad=args.skip_bad, field=args.field, separator=sep)
    s = idx["splits"]
    print(f"{args.output}: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} documents), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['documents']:,} documents), {idx['dtype']}")
