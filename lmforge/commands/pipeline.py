"""`lmforge pipeline`: run a YAML list of stages (or the built-in default) from raw text to an evaluated chat model."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmforge.commands.common import is_main_process
from lmforge.errors import LMForgeError
from lmforge.pipeline import KINDS, presets, read_pipeline
from lmforge.pipeline.report import format_table
from lmforge.pipeline.runner import run_pipeline
from lmforge.pipeline.spec import apply_overrides
from lmforge.train.config import parse_overrides
from lmforge.yamlfile import leading_comment


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Run a pipeline: a YAML list of stages, each an lmforge command with its flags (tokenizer, "
                    "clean, prepare, pretrain, sft, reward, dpo, ppo, rejection-sample, eval, quantize), in order, "
                    "under one run directory. Without CONFIG it runs the built-in default on data shipped in the "
                    "package: a tokenizer, cleaning, a LLaMA pretrained from scratch, SFT, a reward model, DPO and "
                    "int4, measured after every stage (held-out perplexity, instruction following, preference, "
                    "KL), in minutes on a CPU. A stage whose output is complete is skipped when run again; an "
                    "interrupted one resumes from its last checkpoint; changing a stage's flags or inputs reruns it "
                    "and the stages after it. Writes DIR/report.html, DIR/report.json and DIR/final (a --model for "
                    "generate/chat/serve/eval). Overrides: --STAGE.flag VALUE (--pretrain.train.max_iters 200, "
                    "--sft.data my.json), --measure.key VALUE. Under `torchrun --nproc-per-node N -m lmforge "
                    "pipeline` the training stages use every process (DDP/FSDP).")
    p.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in default pipeline)")
    p.add_argument("--preset", help="a built-in pipeline instead of CONFIG (see --list-presets)")
    p.add_argument("--out", help="run directory (default: the YAML's `out`, runs/pipeline)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every stage after it")
    p.add_argument("--only", metavar="STAGE", help="run only this stage (its inputs must be complete)")
    p.add_argument("--dry-run", action="store_true", help="print each stage's command and whether it would run")
    p.add_argument("--list-stages", action="store_true", help="list the stage commands a pipeline can use")
    p.add_argument("--list-presets", action="store_true", help="list the built-in pipelines")
    p.add_argument("--print-default", action="store_true",
                   help="print the default pipeline's YAML (a start for one's own) and exit")
    p.add_argument("--print-preset", metavar="NAME", help="print a built-in pipeline's YAML and exit")
    p.add_argument("--base", help="start from this model (any --model path): the tokenizer, clean, prepare and "
                                  "pretrain stages are dropped and `from: pretrain` means this model")
    p.add_argument("--device", default="auto", help="device of the measurements (the stages choose their own)")
    p.set_defaults(func=run, accepts_overrides=True)


def _preset(name: str) -> Path:
    known = presets()
    if name not in known:
        raise LMForgeError(f"--preset {name!r}: unknown; built in: {', '.join(known)}")
    return known[name]


def run(args) -> None:
    if args.list_stages:
        for k, spec in KINDS.items():
            print(f"{k:18s} {spec.help}")
        return
    if args.list_presets:
        for name, path in presets().items():
            lines = leading_comment(path.read_text(), paragraph=True) or [""]
            print(f"{name:12s} {lines[0]}")
            for ln in lines[1:]:  # the rest of the description under its first line
                print(f"{'':12s} {ln}")
        return
    if args.print_default or args.print_preset:
        sys.stdout.write(_preset(args.print_preset or "default").read_text(encoding="utf-8"))
        return
    if args.config and args.preset:
        raise LMForgeError("give either CONFIG or --preset, not both")
    path = Path(args.config) if args.config else _preset(args.preset or "default")
    p = read_pipeline(path)
    if not args.config:
        p.source = f"built-in pipeline {args.preset or 'default'}"
    apply_overrides(p, parse_overrides(getattr(args, "overrides", [])))
    if args.base:
        apply_overrides(p, {"base": args.base})
    out = Path(args.out or p.out)
    t0 = time.perf_counter()
    echo = print if is_main_process() else (lambda _msg: None)
    echo(f"pipeline: {p.source}, {len(p.stages)} stages -> {out}")
    results = run_pipeline(p, out, args.from_stage, args.only, args.dry_run, echo, args.device)
    if not is_main_process():
        return
    if args.dry_run:
        print(f"pipeline dry run: {len(results)} stages, "
              f"{sum(r.status == 'planned' for r in results)} would run, "
              f"{sum(r.status == 'cached' for r in results)} complete")
        return
    ran = [r for r in results if r.status in ("done", "cached")]
    failed_checks = [f"{r.name}: {c['what']}" for r in results for c in r.checks if not c["ok"]]
    print()
    print(format_table(results))
    for f in failed_checks:
        print(f"check not met: {f}")
    if args.only is None and (out / "final").is_dir():
        print(f"\nchat with the result:  lmforge chat --model {out / 'final'}")
        print(f"serve it:              lmforge serve --model {out / 'final'}")
    checks = sum(len(r.checks) for r in results)
    print(f"pipeline done: {len(ran)} stages, {sum(r.status == 'done' for r in results)} run and "
          f"{sum(r.status == 'cached' for r in results)} reused in {time.perf_counter() - t0:.0f} s, "
          f"{checks - len(failed_checks)}/{checks} checks met; see {out / 'report.html'}")
