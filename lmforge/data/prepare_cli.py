"""`lmforge data prepare INPUT... --tokenizer PATH --output DIR [--val-fraction F]`."""

from __future__ import annotations

import sys


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Tokenize .txt/.jsonl/.parquet files into train.bin/val.bin "
                       "(uint16 or uint32 memmaps), document offsets, the tokenizer and index.json.")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--tokenizer", required=True, help="any tokenizer path lmforge reads")
    p.add_argument("--output", required=True)
    p.add_argument("--val-fraction", type=float, default=0.001, help="fraction held out (default 0.001)")
    p.add_argument("--split-mode", choices=["doc", "tail"], default="doc",
                   help="doc: whole documents by seeded hash; tail: the last fraction of the token stream (nanoGPT)")
    p.add_argument("--bos", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="BOS before each document (default: when the tokenizer has one)")
    p.add_argument("--eos", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="EOS after each document (default: when the tokenizer has one)")
    p.add_argument("--field", default="text", help="JSONL/parquet text field (default: text)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: min(2, CPUs))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="redo an already prepared output")
    p.set_defaults(func=run)


def run(args) -> None:
    from lmforge.data.prepare import prepare

    idx = prepare(args.inputs, args.tokenizer, args.output, args.val_fraction, args.split_mode, args.bos, args.eos,
                  args.workers, args.seed, args.overwrite, args.skip_bad, args.field)
    s = idx["splits"]
    print(f"{args.output}: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} docs), "
          f"val {s['val']['tokens']:,} tokens, {idx['dtype']}", file=sys.stderr)
