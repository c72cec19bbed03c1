"""`lmforge chat`: an interactive terminal chat with history and streamed replies."""

from __future__ import annotations

import sys

from lmforge.commands.common import add_model_args, load_model_and_tokenizer

HELP = "commands: /reset clears the conversation, /exit quits (so does end of input)"


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
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.set_defaults(func=run)


def run(args) -> None:
    from lmforge.commands.serve import _read_template
    from lmforge.errors import LMForgeError
    from lmforge.infer.chat import encode_chat, end_of_turn, get_template
    from lmforge.infer.generate import Sequence, stream_steps
    from lmforge.infer.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise LMForgeError("--max-new-tokens must be >= 1")
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
    model.requires_grad_(False)  # inference only (decoding then streams its weights fastest)
    model.eval()
    template = get_template(_read_template(args.template), tok)
    stops, stop_ids = end_of_turn(template, tok)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, stop_ids=stop_ids, stop=stops,
                            repetition_penalty=args.repetition_penalty)
    try:
        params.check()
    except ValueError as e:
        raise LMForgeError(str(e)) from None
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    ctx = model.cfg.block_size - model.num_virtual_tokens  # prefix/prompt tuning take the first positions
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
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and text.split()[0] not in ("/reset", "/exit"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        while True:  # drop the oldest turns until the prompt leaves room for a reply
            ids = encode_chat(tok, template, system + history)
            if len(ids) + min(args.max_new_tokens, 16) <= ctx or len(history) <= 1:
                break
            del history[: 2 if len(history) > 2 else 1]
        if len(ids) >= ctx:
            print(f"message too long: {len(ids)} tokens for a context of {ctx}", file=sys.stderr)
            history.pop()
            continue
        p = SamplingParams(**{**params.__dict__, "max_new_tokens": min(args.max_new_tokens, ctx - len(ids))})
        seq = Sequence(ids, p, tok, ctx, model.cfg.vocab_size)
        started = False
        try:
            for step in stream_steps(model, ids, p, tok, seq=seq):
                piece = step.text
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
        history.append({"role": "assistant", "content": seq.output_text.strip()})
