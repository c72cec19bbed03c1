"""`lmforge self-instruct`: instruction data written by a local model from seed tasks (Wang et al. 2022)."""

from __future__ import annotations

import time
from dataclasses import fields

from lmforge.assets import default_model
from lmforge.commands.args import seed_type
from lmforge.commands.common import add_model_args
from lmforge.errors import LMForgeError
from lmforge.loading import load_model_and_tokenizer


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Self-Instruct: the model proposes new instructions from prompts of 8 (6 seed + 2 of its own), "
                    "the paper's filters keep those that are new (ROUGE-L < 0.7 to every kept one), it tells "
                    "classification tasks apart, writes instances for each (output-first for classification) and "
                    "the instance filters clean them. Writes OUT/data.json (Alpaca; `lmforge sft --data` reads it), "
                    "OUT/machine_instructions.jsonl and OUT/report.json. Prompts are raw text, also for chat models.")
    add_model_args(p)
    p.add_argument("--seeds", required=True, help="seed tasks JSONL ({instruction, instances: [{input, output}], "
                                                  "is_classification}, as the paper's seed_tasks.jsonl)")
    p.add_argument("--num", type=int, required=True, help="new instructions to keep")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (e.g. with a larger --num)")
    p.add_argument("--batch-size", type=int,
                   help="instruction prompts per round, and sequences generated together (default 8)")
    p.add_argument("--temperature", type=float, help="instruction sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, help="instruction nucleus sampling (default 0.5, the paper's)")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens per instruction-generation prompt (default 256)")
    p.add_argument("--instance-max-new-tokens", type=int,
                   help="tokens per instance-generation prompt (default 256)")
    p.add_argument("--instance-temperature", type=float,
                   help="instance sampling temperature (default 0 = greedy, the paper's)")
    p.add_argument("--presence-penalty", type=float,
                   help="subtracted from the logit of every token already generated, for instructions (default 2, "
                        "the paper's; it keeps small models from repeating one instruction)")
    p.add_argument("--instance-presence-penalty", type=float,
                   help="the same for instances (default 1.5, the paper's)")
    p.add_argument("--instance-shots", type=int, help="seed tasks shown per instance prompt (default 4)")
    p.add_argument("--classify-shots", type=int,
                   help="labelled seed tasks in the classification prompt (default 12)")
    p.add_argument("--max-instances", type=int, help="instances kept per instruction (default 5)")
    p.add_argument("--similarity", type=float,
                   help="keep an instruction only if its ROUGE-L F1 to every kept one is below this (default 0.7)")
    p.add_argument("--max-rounds", type=int, help="stop after this many rounds (default 0 = no limit)")
    p.add_argument("--patience", type=int,
                   help="stop after this many rounds in a row that keep no instruction (default 5; 0 = never)")
    p.add_argument("--seed", type=seed_type, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> None:
    from lmforge.data.self_instruct import (
        ModelBackend,
        SelfInstructConfig,
        check_out_dir,
        format_report,
        load_seed_tasks,
        run_self_instruct,
    )

    names = {f.name for f in fields(SelfInstructConfig)}  # flags left unset keep the config's defaults
    cfg = SelfInstructConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    cfg.check()
    check_out_dir(args.out, args.resume)  # before the model loads
    load_seed_tasks(args.seeds)
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
    model.requires_grad_(False)  # inference only (decoding then streams its weights fastest)
    model.eval()
    backend = ModelBackend(model, tok, cfg.batch_size)
    rep = run_self_instruct(args.seeds, args.out, cfg, backend, resume=args.resume,
                            settings={"model": default_model(args.model), "adapter": args.adapter},
                            progress=not args.no_progress)
    for line in format_report(rep, cfg):
        print(line)
    dt = time.perf_counter() - t0
    print(f"{dt:.0f} s; {backend.prompt_tokens:,} prompt and {backend.new_tokens:,} generated tokens")
    short = f" (--num {cfg.num} not reached: {rep['stopped']})" if rep["stopped"] else ""
    if not rep["examples"]:  # an empty data.json is no SFT data: say so rather than "done"
        raise LMForgeError(f"{args.out}/data.json: no examples kept ({rep['kept']} instructions kept of "
                           f"{rep['generated']} generated{short}); the run is saved: --resume it with more "
                           "--max-rounds, or use a stronger --model")
    print(f"self-instruct done: {rep['kept']} instructions kept of {rep['generated']} generated{short}; "
          f"{rep['examples']} examples in {args.out}/data.json")
