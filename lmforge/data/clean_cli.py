"""`lmforge data clean INPUT... --output OUT.jsonl --report REPORT.json [--config YAML]`."""

from __future__ import annotations

import sys

DESCRIPTION = """Clean a pretraining corpus: language identification, markup/boilerplate and Gopher-style quality
filters (CJK-aware), optional perplexity filter, de-duplication (repeated sentences in a document, exact and MinHash
near-duplicate documents, n-gram overlap with evaluation sets) and PII scrubbing (<EMAIL>, <PHONE>, <ID_CARD>, <IP>,
<CARD>). Inputs: .txt (a whole file is one document unless --txt-split line|paragraph), .jsonl with a text field,
.json arrays, .parquet (needs pyarrow); .gz is decompressed. Output: JSONL, one {"text": ...} object per kept
document (other input fields are kept). The report (JSON) gives, per stage, documents/characters in and out,
removals by reason with example locations, PII replacements by type and duplicate clusters. Both files are written
to temporary files and renamed into place at the end, so an interrupted run leaves no partial output.

Config (YAML): {stages: [name | {name: {option: value}}], batch_size: N}; default stages:
lang, markup, quality, sentence_dedup, exact_dedup, near_dedup, pii."""


def _stage_help() -> str:
    from lmforge.data.clean.pipeline import STAGES

    return "; ".join(f"{n} ({', '.join(c.options)})" for n, c in STAGES.items())


def add_parser(sub, name: str, help_: str) -> None:
    import argparse

    from lmforge.data.io import path_arg

    p = sub.add_parser(name, help=help_, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=path_arg("a file"),
                   help=".txt, .jsonl, .json or .parquet files (optionally .gz)")
    p.add_argument("--output", required=True, metavar="OUT.jsonl", type=path_arg("a file"),
                   help="cleaned documents (JSONL)")
    p.add_argument("--report", required=True, metavar="REPORT.json", type=path_arg("a file"),
                   help="per-stage statistics (JSON)")
    p.add_argument("--config", metavar="YAML", help="stages and their options (see above)")
    p.add_argument("--stages", metavar="A,B,...",
                   help="comma-separated stages with default options instead of a config's list; "
                   "known: lang, markup, quality, perplexity, sentence_dedup, exact_dedup, near_dedup, decontaminate, "
                   "pii")
    p.add_argument("--eval", nargs="+", default=None, metavar="FILE",
                   help="evaluation texts to decontaminate against (adds a decontaminate stage before pii)")
    p.add_argument("--txt-split", choices=["file", "line", "paragraph"], default="file",
                   help="documents of a .txt file: the whole file (default), each non-blank line, or each block "
                   "between blank lines")
    p.add_argument("--field", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count in the report) malformed records instead of stopping with an error")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes for the per-document stages before the first de-duplication stage "
                   "(default: 2 from 16 MB of input on, if there are 2 CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --output and --report files")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run)


def run(args) -> None:
    from lmforge.data.clean.pipeline import clean, load_config
    from lmforge.errors import LMForgeError

    config = load_config(args.config) if args.config else {}
    if args.stages is not None:
        if "stages" in config:
            raise LMForgeError(f"--stages: {args.config} already lists stages; use one or the other")
        config["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
        if not config["stages"]:
            raise LMForgeError(f"--stages {args.stages!r}: names no stage (a run without stages only copies the "
                               "documents); give stage names, e.g. --stages exact_dedup,pii")
    rep = clean(args.inputs, args.output, args.report, config, skip_bad=args.skip_bad, field=args.field,
                txt_split=args.txt_split, eval_files=args.eval, progress=not args.quiet,
                workers=args.workers, overwrite=args.overwrite)
    if rep["documents_in"] and not rep["documents_out"]:
        _warn_nothing_kept(rep, args)
    if args.quiet:
        return
    mb = rep["bytes_in"] / 1e6
    print(f"{args.output}: kept {rep['documents_out']:,} of {rep['documents_in']:,} documents, "
          f"{rep['characters_out']:,} of {rep['characters_in']:,} characters ({mb:.2f} MB in {rep['seconds']:.1f} s)")
    if rep["bad_records"]["skipped"]:
        print(f"  skipped {rep['bad_records']['skipped']:,} malformed records: "
              + ", ".join(f"{k} {v}" for k, v in rep["bad_records"]["reasons"].items()))
    for s in rep["stages"]:
        reasons = ", ".join(f"{k} {v['documents']}" for k, v in list(s["removed"].items())[:4])
        extra = ""
        if any(s.get("replacements", {}).values()):
            extra = " replaced " + ", ".join(f"{k} {v}" for k, v in s["replacements"].items() if v)
        if s["documents_modified"]:
            extra += f" modified {s['documents_modified']}"
        print(f"  {s['stage']:<15} {s['documents_in']:>8,} -> {s['documents_out']:>8,}"
              + (f"  ({reasons})" if reasons else "") + extra)
    print(f"report: {args.report}")


def _warn_nothing_kept(rep: dict, args) -> None:
    """One line on stderr (also with --quiet) when every document was dropped: by which stage, and for a whole .txt
    file taken as one document, how to split it."""
    why = "; ".join(f"{s['stage']}: " + ", ".join(f"{k} {v['documents']:,}" for k, v in s["removed"].items())
                    for s in rep["stages"] if s["removed"])
    hint = ""
    txt = [str(p) for p in args.inputs if str(p).endswith((".txt", ".txt.gz"))]
    if txt and args.txt_split == "file":
        hint = (f"; a .txt file is one document ({txt[0]}: the whole file), so a whole book fails the per-document "
                "filters: give --txt-split paragraph or line")
    print(f"warning: {args.output}: no document kept of {rep['documents_in']:,} ({why or 'none removed'}){hint}",
          file=sys.stderr)
