"""`lmforge eval`: benchmark a model on a local task file (perplexity, MMLU, ARC, GSM8K, CMMLU, JSONL choice)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from lmforge.commands.args import seed_type
from lmforge.commands.common import add_model_args
from lmforge.errors import LMForgeError
from lmforge.files import check_output_file, write_text_atomic
from lmforge.loading import load_model_and_tokenizer

DESCRIPTION = (
    "Evaluate a model on a task read from local files, scored as lm-evaluation-harness scores it: multiple choice "
    "by the log-likelihood of each choice (acc, and acc_norm per character of the choice), GSM8K by generation and "
    "answer extraction (strict and flexible exact match), perplexity by rolling windows. The last line printed is "
    "`TASK metric=value ... n=N`."
)


def add_parser(sub, name: str, help_: str) -> None:
    from lmforge.eval.fewshot import METHODS, ORDERS
    from lmforge.eval.tasks import CLI_TASKS

    p = sub.add_parser(name, help=help_, description=DESCRIPTION)
    add_model_args(p)
    p.add_argument("--task", required=True, choices=CLI_TASKS, help="the task")
    p.add_argument("--data", required=True, help="task data: MMLU/CMMLU folder of {subject}_test.csv (or a CSV), "
                   "ARC/GSM8K/choice JSONL, a text file or JSONL with 'text' for perplexity")
    p.add_argument("--fewshot-data", help="demonstrations (MMLU: the folder of {subject}_dev.csv files)")
    p.add_argument("--shots", type=int, default=0, help="demonstrations per question (default 0)")
    p.add_argument("--select", default="first_n", choices=METHODS, help="how demonstrations are chosen "
                   "(default first_n; similar = BM25 nearest, diverse = maximal marginal relevance)")
    p.add_argument("--order", default="as_drawn", choices=ORDERS, help="demonstration order (default as_drawn)")
    p.add_argument("--seed", type=seed_type, default=1234, help="seed of random selection and sampling (default 1234)")
    p.add_argument("--cot", action="store_true", help="chain of thought (gsm8k): with --shots K the 8 exemplars of "
                   "Wei et al. (or --fewshot-data rationales), without shots \"Let's think step by step.\"")
    p.add_argument("--samples", type=int, default=1, help="self-consistency: sample N answers, majority vote")
    p.add_argument("--temperature", type=float, help="sampling temperature with --samples > 1 (default 0.7; one "
                   "answer is greedy)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation limit (default 256)")
    p.add_argument("--limit", type=int, help="only the first N documents (of each subject for a folder of subjects)")
    p.add_argument("--context", type=int, help="perplexity window in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, help="perplexity stride (default: the window, each token predicted once)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward (default 1024 on a CPU, 4096 on a GPU)")
    p.add_argument("--bos", action="store_true", help="start every prompt with BOS (the harness does not)")
    p.add_argument("--output", help="write the results JSON (every question's prompt, scores and choice) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=run)


def format_table(res) -> str:
    """Metrics (value ± standard error) and, for subject tasks, one line per subject."""
    lines = [f"{'metric':<24}{'value':>10}{'stderr':>10}"]
    for k, v in res.metrics.items():
        if k.endswith("_stderr"):
            continue
        se = res.metrics.get(f"{k}_stderr")
        lines.append(f"{k:<24}{v:>10.4f}" + (f"{se:>10.4f}" if se is not None else ""))
    if res.subjects:
        lines.append("")
        lines.append(f"{'subject':<40}{'acc':>8}{'acc_norm':>10}{'n':>6}")
        for s, m in res.subjects.items():
            lines.append(f"{s:<40}{m['acc']:>8.4f}{m['acc_norm']:>10.4f}{m['n']:>6}")
    lines.append(f"\n{res.n} {'tokens' if res.task == 'perplexity' else 'examples'} in {res.seconds:.1f} s, "
                 f"{res.tokens_per_s:.0f} tokens/s")
    return "\n".join(lines)


def run(args) -> None:
    from lmforge.eval import EvalConfig, evaluate

    if args.limit is not None and args.limit < 1:
        raise LMForgeError("--limit must be >= 1")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise LMForgeError("--batch-tokens must be >= 1")
    for flag, value, ok, need in (
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
            ("--samples", args.samples, args.samples >= 1, ">= 1"),
            ("--temperature", args.temperature, args.temperature is None or (
                math.isfinite(args.temperature) and args.temperature >= 0), ">= 0"),
            ("--context", args.context, args.context is None or args.context >= 2, ">= 2"),
            ("--stride", args.stride, args.stride is None or args.stride >= 1, ">= 1")):
        if not ok:
            raise LMForgeError(f"{flag} {value}: must be {need}")
    if args.temperature is not None and args.samples == 1:
        raise LMForgeError(f"--temperature {args.temperature}: applies with --samples > 1 (self-consistency); one "
                           "answer is decoded greedily")
    cfg = EvalConfig(task=args.task, data=args.data, fewshot_data=args.fewshot_data, shots=args.shots,
                     select=args.select, order=args.order, seed=args.seed, cot=args.cot, samples=args.samples,
                     temperature=0.7 if args.temperature is None else args.temperature,
                     max_new_tokens=args.max_new_tokens, limit=args.limit,
                     context=args.context, stride=args.stride, batch_tokens=args.batch_tokens, add_bos=args.bos)
    if args.output:  # before any work: never over what is read, nor over an existing file without --overwrite
        sources = [Path(p) for p in (args.data, args.fewshot_data, args.model, args.tokenizer, args.adapter) if p]
        check_output_file(args.output, args.overwrite, sources)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
    model.requires_grad_(False)  # inference only (decoding then streams its weights fastest)
    res = evaluate(model, tok, cfg)
    if args.output:
        write_text_atomic(args.output, json.dumps({**res.to_json(), "model": args.model}, indent=1,
                                                  ensure_ascii=False) + "\n")
    print(format_table(res))
    sys.stdout.flush()
    print(res.summary_line())
