"""`lmforge chat`: an interactive terminal chat with history and streamed replies."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

from lmforge.commands.args import (
    MAX_SEED,
    add_kv_cache_arg,
    add_model_args,
    check_torch_kv_cache,
    lean_kv_dtype,
    seed_type,
    template_arg,
    utf8_text,
)
from lmforge.commands.generate import check_sampling, kv_cache_not_lean, lean_files, lean_unsupported
from lmforge.errors import LMForgeError

HELP = ("commands: /reset clears the conversation, /exit (or /quit, /bye) quits, as does end of input; begin a message "
        "with // to send one that starts with /")


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Chat with a model in the terminal. Each reply streams as it "
                       "is generated; the conversation so far is the prompt. " + HELP + ".")
    add_model_args(p)
    p.add_argument("--template", default=None, help="chat template: chatml, llama2, chatglm, alpaca, plain or a "
                   "Jinja file (default: the tokenizer's own, else plain)")
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    p.add_argument("--seed", type=seed_type, default=None, help="random seed of the session: each turn draws its "
                   "own numbers from it, and the same session repeats itself (default: random)")
    p.add_argument("--runtime", choices=("auto", "lean", "torch"), default="auto",
                   help="as lmforge generate --runtime: an int4 directory chats without PyTorch (lean; ~220 MB "
                        "resident for SmolLM2-135M instead of ~480; the conversation's cached positions are kept "
                        "between turns) where it applies (no --adapter, no --repetition-penalty, the CPU), else torch")
    add_kv_cache_arg(p)
    p.set_defaults(func=run)


def _check(args) -> None:
    if args.max_new_tokens < 1:
        raise LMForgeError("--max-new-tokens must be >= 1")
    check_sampling(args)
    if args.system is not None and not args.system.strip():  # (it was dropped: the template's default was used)
        raise LMForgeError(f"--system {args.system!r}: empty; give a system message, or leave --system out for the "
                           "template's own default")
    if not 0 < args.repetition_penalty < math.inf:  # (inf: every token of the conversation's text banned or kept)
        raise LMForgeError(f"--repetition-penalty {args.repetition_penalty}: must be a finite number > 0 (1 = off)")


def run(args) -> None:
    _check(args)
    template = template_arg(args.template)
    why = lean_unsupported(args) if args.runtime != "torch" else "--runtime torch"
    if why is None and args.repetition_penalty != 1.0:
        why = "--repetition-penalty needs PyTorch's sampler"
    if why is None:
        session: _Torch | _Lean = _Lean(args, template)
    elif args.runtime == "lean":
        raise LMForgeError(f"{args.model or 'the bundled stories260K'}: --runtime lean: {why}")
    else:
        if args.runtime == "auto":
            kv_cache_not_lean(args, why)
        check_torch_kv_cache(args)
        session = _Torch(args, template)
    _loop(args, session)


def turn_seed(seed: int | None, turn: int) -> int | None:
    """The seed of a session's turn (0, 1, ...): ``seed`` itself first, then the next ones (wrapping within
    ``--seed``'s range). Each turn had restarted the generator with ``seed``: the same message, after ``/reset``,
    got the same reply (llama.cpp's session goes on drawing from one generator)."""
    return None if seed is None else (seed + turn) % (MAX_SEED + 1)


class _Torch:
    """Replies through PyTorch (``lmforge.infer.generate.stream_steps``; a float32 model may decode speculatively)."""

    def __init__(self, args, template: str | None) -> None:
        from lmforge.infer.chat import end_of_turn, get_template
        from lmforge.loading import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
        model.requires_grad_(False)  # inference only (decoding then streams its weights fastest)
        model.eval()
        self.model, self.tok, self.args = model, tok, args
        self.template = get_template(template, tok)
        self.stops, self.stop_ids = end_of_turn(self.template, tok)
        self.ctx = model.cfg.block_size - model.num_virtual_tokens  # prefix/prompt tuning take the first positions
        self.seq = None
        self.turns = 0  # replies so far (the seed of each: turn_seed)

    @property
    def text(self) -> str:
        """The last reply's text so far."""
        return self.seq.output_text if self.seq is not None else ""

    @property
    def n(self) -> int:
        """The last reply's tokens."""
        return len(self.seq.out_ids) if self.seq is not None else 0

    def reply(self, ids: list[int], max_new: int) -> Iterator[str]:
        from lmforge.infer.generate import Sequence, stream_steps
        from lmforge.infer.sampling import SamplingParams, TokenSampler

        a = self.args
        p = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                           max_new_tokens=max_new, seed=turn_seed(a.seed, self.turns), stop_ids=self.stop_ids,
                           stop=self.stops,
                           repetition_penalty=a.repetition_penalty)
        self.turns += 1
        self.seq = seq = Sequence(ids, p, self.tok, self.ctx, self.model.cfg.vocab_size, TokenSampler)
        for step in stream_steps(self.model, ids, p, self.tok, seq=seq):
            yield step.text


class _Lean:
    """Replies from an int4 directory without PyTorch (``lmforge.infer.lean``). The key/value cache keeps the
    conversation: a turn computes only the positions after the longest prefix it shares with the cached tokens."""

    def __init__(self, args, template: str | None) -> None:
        from lmforge.infer import lean
        from lmforge.infer.chat import end_of_turn, get_template

        path, cfg, tok = lean_files(args)
        self.tok, self.args, self.ctx = tok, args, cfg.block_size
        self.template = get_template(template, tok)
        self.stops, self.stop_ids = end_of_turn(self.template, tok)
        # the cache at the full context: its pages are taken only as positions are written
        self.model = lean.LeanModel(path, max_len=cfg.block_size, kv_dtype=lean_kv_dtype(args))
        self.cached: list[int] = []  # the tokens whose positions the cache holds
        self.stream = None
        self.n = 0  # the last reply's tokens
        self.turns = 0  # replies so far (the seed of each: turn_seed)

    @property
    def text(self) -> str:
        """The last reply's text so far."""
        return self.stream.text if self.stream is not None else ""

    def reply(self, ids: list[int], max_new: int) -> Iterator[str]:
        from lmforge.infer import lean
        from lmforge.infer.text import TextStream

        a, model = self.args, self.model
        keep = 0
        for x, y in zip(self.cached, ids[:-1]):  # (the last prompt token is always run: its logits are needed)
            if x != y:
                break
            keep += 1
        model.length = keep
        out: list[int] = []
        self.stream = stream = TextStream(self.tok, ids, self.stops)
        try:
            seed, self.turns = turn_seed(a.seed, self.turns), self.turns + 1
            for t in lean.generate(model, ids[keep:], max_new, a.temperature, a.top_k, a.top_p, a.min_p, seed,
                                   self.stop_ids):
                out.append(t)
                yield stream.push(t)
                if stream.stopped:
                    break
            yield stream.flush()
        finally:
            self.cached = (ids + out)[: model.length]
            self.n = len(out)


def _loop(args, session: _Torch | _Lean) -> None:
    from lmforge.infer.chat import encode_chat

    tok, template, ctx = session.tok, session.template, session.ctx
    system = [{"role": "system", "content": utf8_text(args.system, "--system")}] if args.system else []
    hi = [{"role": "user", "content": "hi"}]
    try:  # rendered now: a template that fails (Gemma's and Mistral's refuse a system message) is said at start
        first = encode_chat(tok, template, [*system, *hi])
    except ValueError as e:
        where = f"--template {args.template}" if args.template else f"{args.model or 'stories260K'}'s chat template"
        if system:
            try:
                encode_chat(tok, template, hi)
            except ValueError:
                pass
            else:
                raise LMForgeError(f"--system: {where} refuses a system message ({e})") from None
        raise LMForgeError(f"{where}: {e}") from None
    if system and len(first) >= ctx:
        raise LMForgeError(f"--system: with a one-word message it fills the model's context of {ctx:,} tokens; "
                           "shorten it")
    history: list[dict[str, str]] = []
    tty = sys.stdin.isatty()
    print(f"chatting with {args.model or 'stories260K'} (template {template.name}); {HELP}", file=sys.stderr)
    out = sys.stdout
    while True:
        if tty:
            out.write(">>> ")
            out.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        try:
            utf8_text(text, "message")
        except LMForgeError as e:
            print(f"{e}; not sent", file=sys.stderr)
            continue
        if text.startswith("//"):  # a message that begins with a slash
            text = text[1:]
        elif text.startswith("/"):  # a command: never sent to the model
            cmd, *rest = text.split()
            if cmd not in ("/exit", "/quit", "/bye", "/reset"):
                print(f"unknown command {cmd}; {HELP}", file=sys.stderr)
            elif rest:
                print(f"{cmd} takes no arguments; {HELP}", file=sys.stderr)
            elif cmd == "/reset":
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
            else:
                break
            continue
        history.append({"role": "user", "content": text})
        try:
            while True:  # drop the oldest turns until the prompt leaves room for a reply
                ids = encode_chat(tok, template, system + history)
                if len(ids) + min(args.max_new_tokens, 16) <= ctx or len(history) <= 1:
                    break
                del history[: 2 if len(history) > 2 else 1]
        except ValueError as e:  # the template refused this conversation (raise_exception): the chat goes on
            print(f"{e}; not sent", file=sys.stderr)
            history.pop()
            continue
        if len(ids) >= ctx:
            print(f"message too long: {len(ids)} tokens for a context of {ctx}", file=sys.stderr)
            history.pop()
            continue
        started, room = False, min(args.max_new_tokens, ctx - len(ids))
        try:
            for piece in session.reply(ids, room):
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            print("\n(interrupted)", file=sys.stderr)
        out.write("\n")
        out.flush()
        if room < args.max_new_tokens and session.n >= room:  # (said, as generate says it)
            print(f"note: the reply stopped after {session.n:,} tokens: the model's context of {ctx:,} is full (the "
                  "next message drops the oldest turns)", file=sys.stderr)
        history.append({"role": "assistant", "content": session.text.strip()})
