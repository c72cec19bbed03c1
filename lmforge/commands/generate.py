"""`lmforge generate`: print the prompt followed by generated text, streamed, as llama2.c's run.c does."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from lmforge.commands.common import add_model_args, load_model_and_tokenizer


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Generate text. With no --model, the bundled stories260K "
                       "(a 260K-parameter LLaMA trained on TinyStories) tells a story.")
    add_model_args(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1.0 = off; default 0.9)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.set_defaults(func=run)


def run(args) -> None:
    from lmforge.errors import LMForgeError
    from lmforge.infer.sampling import SamplingParams

    if args.max_new_tokens < 0:
        raise LMForgeError("--max-new-tokens must be >= 0")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise LMForgeError("--temperature must be >= 0 and --top-p in (0, 1]")
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
    model.requires_grad_(False)  # inference only (decoding then streams its weights fastest)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    prompt = bos + tok.encode(args.prompt)
    if not prompt:
        raise LMForgeError("empty prompt and the tokenizer has no BOS token: give --prompt")
    stops = [i for i in (tok.eos_id, tok.bos_id) if i is not None]  # BOS delimits documents (llama2.c)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, stop_ids=stops)
    start = time.perf_counter()
    n, first = write_generation(model, tok, prompt, params, sys.stdout)
    dt = time.perf_counter() - start
    if n:  # the first token carries the prompt's pass and one-off set-up (kernel layouts): said apart
        wait = first - start
        then = f", then {(n - 1) / (dt - wait):.1f} tok/s" if n > 1 and dt > wait else ""
        print(f"achieved tok/s: {n / dt:.1f} ({n} tokens; first token after {wait:.2f} s{then})", file=sys.stderr)


def write_generation(model, tok, prompt: list[int], params, out: TextIO) -> tuple[int, float]:
    """Write the prompt's text, then the generated text as it comes, then a newline; the number of tokens and the
    ``time.perf_counter()`` at which the first one came.

    Text comes from the incremental detokenizer the server uses (``TextStream``: each token decodes a short window
    of ids, so the cost per token stays constant however long the text gets)."""
    from lmforge.infer.generate import stream_steps

    out.write(tok.decode_bytes(prompt).decode("utf-8", errors="replace"))
    out.flush()
    n, first = 0, 0.0
    for step in stream_steps(model, prompt, params, tok):
        n += step.token >= 0
        if n == 1 and not first:
            first = time.perf_counter()
        if step.text:
            out.write(step.text)
            out.flush()
    out.write("\n")
    out.flush()
    return n, first
