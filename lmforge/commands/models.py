"""`lmforge models`: the named model presets with their parameter counts."""

from __future__ import annotations

import argparse
import json

from lmforge.errors import LMForgeError

DESCRIPTION = (
    "List the named model presets (published shapes of GPT-1/2/3, LLaMA 1/2, GLM-130B, ChatGLM 1/2, PaLM, BLOOM, "
    "Qwen, Baichuan, and a tiny-<family> test model of each) with parameter counts computed from the decoder "
    "built on the meta device (no memory is allocated). Tied embeddings are counted once."
)
COLUMNS = ("name", "family", "params", "layers", "width", "heads", "kv_heads", "ctx", "vocab", "published")


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=DESCRIPTION)
    p.add_argument("names", nargs="*", metavar="NAME", help="only these presets (default: all)")
    p.add_argument("--family", help="only presets of this family (e.g. llama, gpt3, bloom)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    p.add_argument("--config", action="store_true", help="with --json: include each preset's full ModelConfig")
    p.set_defaults(func=run)


def rows(names: list[str] | None = None, family: str | None = None, with_config: bool = False) -> list[dict]:
    """One summary dict per preset: name, family, params (int), layers, width, heads, kv_heads, ctx, vocab."""
    from lmforge.presets import count_params, get_preset, list_presets

    if family is not None and not list_presets(family):
        families = sorted({get_preset(n).family for n in list_presets()})
        raise LMForgeError(f"--family {family!r}: no presets; families are {', '.join(families)}")
    selected = names or list_presets(family)
    out = []
    for name in selected:
        cfg = get_preset(name)
        if family is not None and cfg.family != family:
            continue
        row = {
            "name": cfg.name,
            "family": cfg.family,
            "params": count_params(cfg),
            "layers": cfg.n_layer,
            "width": cfg.n_embd,
            "heads": cfg.n_head,
            "kv_heads": cfg.kv_heads,
            "head_dim": cfg.head_size,
            "ctx": cfg.block_size,
            "vocab": cfg.vocab_size,
            "published": cfg.extra.get("published_params"),
        }
        if with_config:
            row["config"] = cfg.to_dict()
        out.append(row)
    if names and family is not None and not out:  # an empty table said nothing about why
        raise LMForgeError(f"none of {', '.join(names)} is of --family {family!r}")
    return out


def format_table(data: list[dict]) -> str:
    from lmforge.presets import human_count

    header = [c.replace("_", " ") for c in COLUMNS]
    body = [
        [str(r[c] if c != "params" else human_count(r[c])) if r[c] is not None else "" for c in COLUMNS]
        for r in data
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    left = {"name", "family"}

    def line(cells: list[str]) -> str:
        return "  ".join(x.ljust(w) if c in left else x.rjust(w) for c, x, w in zip(COLUMNS, cells, widths)).rstrip()

    return "\n".join([line(header), *(line(b) for b in body)])


def run(args: argparse.Namespace) -> None:
    if args.config and not args.json:
        raise LMForgeError("--config adds each preset's full config to --json output; give --json too")
    data = rows(args.names, args.family, with_config=args.config)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(format_table(data))
