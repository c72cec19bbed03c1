"""`lmforge data clean|prepare`: corpus cleaning and tokenized shards."""

from __future__ import annotations

import importlib

# (sub-subcommand, module defining add_parser(sub, name, help) and run(args), help)
DATA_COMMANDS = [
    ("clean", "lmforge.data.clean_cli", "filter, de-duplicate and scrub a corpus"),
    ("prepare", "lmforge.data.prepare_cli", "tokenize a corpus into memory-mapped shards"),
]


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_)
    dsub = p.add_subparsers(dest="data_command", metavar="STEP", required=True)
    for cmd, module, h in DATA_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            dsub.add_parser(cmd, help=h + " (not available)")
            continue
        mod.add_parser(dsub, cmd, h)
