"""`lmforge serve`: an OpenAI-compatible HTTP API (completions, chat completions, streaming) and a web chat page."""

from __future__ import annotations

import ipaddress
import os
import sys

from lmforge.commands.common import add_model_args, load_model_and_tokenizer


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Serve a model over the OpenAI API (GET /v1/models, POST "
                       "/v1/completions, POST /v1/chat/completions, stream: true) with a web chat page at /. "
                       "Concurrent requests are decoded together (continuous batching).")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for "
                   "(default: the context)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--template", default=None, help="chat template: chatml, llama2, chatglm, alpaca, plain or a "
                   "Jinja file (default: the tokenizer's own, else plain)")
    p.add_argument("--model-id", default=None, help="id to list the model under (default: its directory or "
                   "file name)")
    p.set_defaults(func=run)


def run(args) -> None:
    from lmforge.errors import LMForgeError
    from lmforge.serve.server import ModelServer, model_id_for

    if args.max_batch < 1:
        raise LMForgeError("--max-batch must be >= 1")
    if not 0 <= args.port < 65536:
        raise LMForgeError(f"--port {args.port}: must be in [0, 65535]")
    template = _read_template(args.template)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
    mid, aliases = model_id_for(args.model)
    if args.model_id:
        mid, aliases = args.model_id, (mid, *aliases)
    try:
        server = ModelServer(model, tok, mid, args.host, args.port, api_key=args.api_key, max_batch=args.max_batch,
                             max_len=args.max_len, max_tokens=args.max_tokens, max_body=args.max_body,
                             template=template, aliases=aliases)
    except OSError as e:
        raise LMForgeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if not _loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    print(f"serving {mid} on {server.url} (context {server.limits.context}, batch {args.max_batch}, "
          f"template {server.template.name}); chat page at {server.url}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)


def _read_template(value: str | None) -> str | None:
    from pathlib import Path

    from lmforge.errors import LMForgeError
    from lmforge.infer.chat import BUILTIN, get_template

    if value is None or value.lower() in BUILTIN:
        return value
    p = Path(value)
    if p.is_file():
        return p.read_text()
    get_template(value)  # a Jinja string, or an error naming the choices
    if "{" not in value:
        raise LMForgeError(f"--template {value!r}: no such template file")
    return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
