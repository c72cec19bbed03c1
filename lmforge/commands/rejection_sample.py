"""`lmforge rejection-sample`: best-of-K responses by a reward model, written as SFT data."""

from __future__ import annotations

from lmforge.commands.args import seed_type


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(
        name, help=help_,
        description="Sample K responses per prompt from a policy (batched, KV cache), score them with a reward model "
                    "and write the best one per prompt as SFT data (OpenAI messages JSONL, with its reward): "
                    "`lmforge sft --data OUT` trains on it.")
    p.add_argument("--model", required=True, help="the policy (any --model path)")
    p.add_argument("--tokenizer", help="the policy's tokenizer (default: the one beside it)")
    p.add_argument("--reward", required=True, help="reward model directory (from `lmforge reward`)")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' (or 'messages') field, or a text file "
                                                    "with one prompt per line")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--out", required=True, help="output JSONL (SFT format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sample (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences generated together (default 16)")
    p.add_argument("--seed", type=seed_type, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(func=run)


def run(args) -> None:
    import math
    from pathlib import Path

    from lmforge.errors import LMForgeError
    from lmforge.files import check_output_file
    from lmforge.stages.rejection import run_rejection
    for flag, value, ok, need in (
            ("--k", args.k, args.k >= 1, ">= 1"), ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1,
                                                   ">= 1"),
            ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
            ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0, ">= 0"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise LMForgeError(f"{flag} {value}: must be {need}")
    if args.temperature == 0 and args.k > 1:  # (K times the work for one answer)
        raise LMForgeError(f"--temperature 0 with --k {args.k}: every sample would be the same greedy answer; "
                           "sample (e.g. --temperature 1) or use --k 1")
    check_output_file(args.out, args.overwrite, [Path(args.model), Path(args.reward), Path(args.prompts),
                                                  Path(args.tokenizer) if args.tokenizer else None], "--out")
    run_rejection(args.model, args.reward, args.prompts, args.out, args.k, args.temperature, args.top_p,
                  args.max_new_tokens, args.batch_size, args.seed, args.device, args.tokenizer)
