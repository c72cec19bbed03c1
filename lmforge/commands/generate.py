"""`lmforge generate`: print the prompt followed by generated text, streamed, as llama2.c's run.c does."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from lmforge.commands.args import (
    add_kv_cache_arg,
    add_model_args,
    check_sampling_args,
    check_torch_kv_cache,
    check_vocab,
    find_tokenizer_path,
    lean_kv_dtype,
    read_template,
    seed_type,
    take_model_ends,
    utf8_text,
)
from lmforge.errors import LMForgeError
from lmforge.infer.params import MIN_TEMPERATURE


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Generate text. With no --model, the bundled stories260K "
                       "(a 260K-parameter LLaMA trained on TinyStories) tells a story.")
    add_model_args(p)
    p.add_argument("--prompt", default="", help="text to continue; - reads it from standard input (its trailing "
                   "newlines dropped) (default: start from BOS; without one, from a newline as nanoGPT's sample.py, "
                   "else from EOS)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1.0 = off; default 0.9)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0 = off)")
    p.add_argument("--seed", type=seed_type, default=None, help="random seed (default: random)")
    p.add_argument("--runtime", choices=("auto", "lean", "torch"), default="auto",
                   help="lean: an int4 directory (lmforge quantize --bits 4) decoded by the C step from numpy, in a "
                        "process that never imports PyTorch (~180 MB resident for SmolLM2-135M instead of ~470; CPUs "
                        "with AVX512-VNNI; greedy gives PyTorch's tokens, exactly its numbers with --kv-cache-dtype "
                        "float32; a --seed other samples); torch: PyTorch; auto (default): lean where it applies (no "
                        "--adapter, on the CPU), else torch")
    add_kv_cache_arg(p)
    p.add_argument("--draft", choices=("auto", "int4", "none"), default="auto",
                   help="speculative decoding: the model's int4 copy proposes tokens and the model checks several in "
                        "one pass over its weights (greedy: the same tokens; sampling: the same distribution, other "
                        "samples for a --seed). auto (default): for float32 models of 64 MiB of block weights or more "
                        "on a CPU with the int4 kernel (AVX512-VNNI); int4: always; none: off")
    p.set_defaults(func=run)


def run(args) -> None:
    if args.max_new_tokens < 0:
        raise LMForgeError("--max-new-tokens must be >= 0")
    check_sampling(args)
    if args.runtime != "torch":
        why = lean_unsupported(args)
        if why is None:
            if args.draft == "int4":  # as the PyTorch path refuses a quantized model's draft
                raise LMForgeError(f"--draft int4: {args.model} is an int4 model already (a draft speeds up float32 "
                                   "models)")
            return _run_lean(args)
        if args.runtime == "lean":
            raise LMForgeError(f"{args.model or 'the bundled stories260K'}: --runtime lean: {why}")
        kv_cache_not_lean(args, why)
    _run_torch(args)


def kv_cache_not_lean(args, why: str) -> None:
    """--kv-cache-dtype where the lean runtime does not apply, refused saying why not (the PyTorch runtime's message
    spoke of 'an int4 directory on a CPU' for an int4 directory the lean runtime cannot run)."""
    if getattr(args, "kv_cache_dtype", "auto") != "auto":
        where = f"which does not run {args.model}: " if args.model else "not for "
        raise LMForgeError(f"--kv-cache-dtype {args.kv_cache_dtype}: a choice of the lean runtime, {where}{why}; "
                           "PyTorch keeps the cache in the model's dtype")


def check_sampling(args) -> None:
    """``check_sampling_args`` and a finite --temperature (inf sampled every token alike: random bytes with exit 0
    on the lean runtime, a ValueError after the prompt was printed on PyTorch's), not so small that the logits
    divided by it overflow."""
    check_sampling_args(args)
    if not math.isfinite(args.temperature):
        raise LMForgeError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if 0 < args.temperature < MIN_TEMPERATURE:  # the logits divided by it overflow: NaN text ('\ufffd' x N, exit 0)
        raise LMForgeError(f"--temperature {args.temperature:g}: below {MIN_TEMPERATURE:g} the logits divided by it "
                           "overflow; such a temperature samples as greedy does: give 0")


def lean_unsupported(args) -> str | None:
    """Why ``args`` cannot decode without PyTorch, or None."""
    from lmforge.infer import lean

    if not args.model:
        return "the bundled stories260K is a float32 checkpoint (lean decodes int4 directories)"
    if args.adapter:
        return "an --adapter needs PyTorch"
    if args.device not in ("auto", "cpu"):
        return f"--device {args.device}"
    if args.device == "auto" and any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/kfd")):
        return "a GPU is present (--device cpu to decode on the CPU without PyTorch)"
    return lean.unsupported(args.model)


def _prompt(tok, text: str, context: int, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """The prompt's ids (BOS first where the tokenizer has one and adds it) and the stop ids; refused in one line
    naming --prompt when it is not UTF-8 or leaves no room in the ``context`` for a token."""
    if text == "-":  # (as a shell's $(...) takes a command's output: echo's newline is not part of the prompt)
        text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape").rstrip("\r\n")
    prompt = tok.prompt_prefix() + tok.encode(utf8_text(text, "--prompt"))
    if not prompt:
        prompt = _start(tok)
    if not prompt:
        raise LMForgeError("empty prompt and the tokenizer adds no BOS token, cannot encode a newline and has no "
                           "EOS: give --prompt")
    if len(prompt) >= context and max_new_tokens > 0:
        raise LMForgeError(f"--prompt: {len(prompt):,} tokens leave no room in the model's context of {context:,} "
                           "(shorten it)")
    return prompt, tok.stop_ids()


def _start(tok) -> list[int]:
    """What an empty prompt starts from when the tokenizer adds no BOS (a character-level GPT): a newline where
    the tokenizer encodes one (nanoGPT's sample.py starts from "\\n"), else its EOS (what ends the document before),
    else nothing."""
    try:
        ids = tok.encode("\n")
    except LMForgeError:  # a character vocabulary without "\n"
        ids = []
    if ids and tok.decode(ids) == "\n":
        return ids
    return [tok.eos_id] if tok.eos_id is not None else []


def _context_note(n: int, prompt: list[int], context: int, max_new_tokens: int) -> None:
    """One line on stderr when generation stopped because the model's context was full, not at a stop token or
    --max-new-tokens."""
    if n < max_new_tokens and len(prompt) + n >= context:
        print(f"note: stopped after {n:,} of {max_new_tokens:,} new tokens: the model's context of {context:,} "
              f"positions is full ({len(prompt):,} of them the prompt's)", file=sys.stderr)


def _report(n: int, start: float, first: float) -> None:
    dt = time.perf_counter() - start
    if n:  # the first token carries the prompt's pass and one-off set-up (kernel layouts): said apart
        wait = first - start
        then = f", then {(n - 1) / (dt - wait):.1f} tok/s" if n > 1 and dt > wait else ""
        print(f"achieved tok/s: {n / dt:.1f} ({n} tokens; first token after {wait:.2f} s{then})", file=sys.stderr)


def lean_files(args):
    """(directory, ModelConfig, tokenizer) of ``--model``/``--tokenizer`` for the lean runtime (no PyTorch)."""
    from lmforge.config import ModelConfig
    from lmforge.infer import lean
    from lmforge.tokenizer import load_tokenizer

    path = Path(args.model)
    cfg = ModelConfig.load(path / lean.CONFIG)
    tok_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer_path(path, cfg.vocab_size)
    if tok_path is None:
        raise LMForgeError(f"{path}: no tokenizer found beside the model; pass --tokenizer PATH")
    tok = load_tokenizer(str(tok_path))
    read_template(path, tok)
    check_vocab(cfg, tok, str(path), str(tok_path))
    take_model_ends(cfg, tok)
    return path, cfg, tok


def _run_lean(args) -> None:
    from lmforge.infer import lean

    path, cfg, tok = lean_files(args)
    prompt, stops = _prompt(tok, args.prompt, cfg.block_size, args.max_new_tokens)
    model = lean.LeanModel(path, max_len=len(prompt) + args.max_new_tokens, kv_dtype=lean_kv_dtype(args))
    start = time.perf_counter()  # (as for PyTorch's path: after the model is loaded)
    tokens = lean.generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p,
                           args.seed, stops)
    n, first = write_tokens(tok, prompt, tokens, sys.stdout)
    _context_note(n, prompt, cfg.block_size, args.max_new_tokens)
    _report(n, start, first)


def _run_torch(args) -> None:
    from lmforge.infer.sampling import SamplingParams
    from lmforge.loading import load_model_and_tokenizer

    check_torch_kv_cache(args)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
    model.requires_grad_(False)  # inference only (decoding then streams its weights fastest)
    context = model.cfg.block_size - model.num_virtual_tokens
    prompt, stops = _prompt(tok, args.prompt, context, args.max_new_tokens)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, stop_ids=stops)
    draft = args.draft if args.draft != "int4" else _draft(model)
    start = time.perf_counter()
    n, first = write_generation(model, tok, prompt, params, sys.stdout, None if draft == "none" else draft)
    _context_note(n, prompt, context, args.max_new_tokens)
    _report(n, start, first)


def _draft(model):
    from lmforge.infer.speculative import draft_unsupported, make_draft

    why = draft_unsupported(model, any_size=True)
    if why:
        raise LMForgeError(f"--draft int4: {why}")
    return functools.partial(make_draft, model)  # built after the first token


def write_generation(model, tok, prompt: list[int], params, out: TextIO, draft="auto") -> tuple[int, float]:
    """Write the prompt's text, then the generated text as it comes, then a newline; the number of tokens and the
    ``time.perf_counter()`` at which the first one came.

    Text comes from the incremental detokenizer the server uses (``TextStream``: each token decodes a short window
    of ids, so the cost per token stays constant however long the text gets)."""
    from lmforge.infer.generate import stream_steps

    out.write(tok.decode_bytes(prompt).decode("utf-8", errors="replace"))
    out.flush()
    n, first = 0, 0.0
    for step in stream_steps(model, prompt, params, tok, draft=draft):
        n += step.token >= 0
        if n == 1 and not first:
            first = time.perf_counter()
        if step.text:
            out.write(step.text)
            out.flush()
    out.write("\n")
    out.flush()
    return n, first


def write_tokens(tok, prompt: list[int], tokens: Iterable[int], out: TextIO) -> tuple[int, float]:
    """``write_generation`` for token ids from any source (the lean runtime's): the same text, through the same
    incremental detokenizer."""
    from lmforge.infer.text import TextStream

    out.write(tok.decode_bytes(prompt).decode("utf-8", errors="replace"))
    out.flush()
    text, n, first = TextStream(tok, prompt), 0, 0.0
    for t in tokens:
        n += 1
        if n == 1:
            first = time.perf_counter()
        piece = text.push(t)
        if piece:
            out.write(piece)
            out.flush()
    out.write(text.flush() + "\n")
    out.flush()
    return n, first
