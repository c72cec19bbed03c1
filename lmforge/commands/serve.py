"""`lmforge serve`: an OpenAI-compatible HTTP API (completions, chat completions, streaming) and a web chat page."""

from __future__ import annotations

import gc
import ipaddress
import os
import sys

from lmforge.commands.args import (
    add_kv_cache_arg,
    add_model_args,
    check_torch_kv_cache,
    lean_kv_dtype,
    origin_type,
    template_arg,
)
from lmforge.commands.generate import lean_files, lean_unsupported
from lmforge.errors import LMForgeError


def add_parser(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description="Serve a model over the OpenAI API (GET /v1/models, POST "
                       "/v1/completions, POST /v1/chat/completions, stream: true) with a web chat page at / and API "
                       "docs at /docs. Concurrent requests are decoded together (continuous batching). The API key "
                       "can come from the environment variable LMFORGE_API_KEY (not visible in ps, unlike "
                       "--api-key); /health never needs it.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' for /v1/* (default: $LMFORGE_API_KEY, else no key; "
                   "prefer the environment variable: command lines are visible to other users in ps)")
    p.add_argument("--max-batch", type=int, default=None, help="sequences decoded together (default 16; then a "
                   "request waits while admitting it could grow the key/value cache past "
                   f"{KV_BUDGET >> 20} MiB, counting every running request's prompt and max_tokens: give max_tokens "
                   "or lower --max-len to run more long requests at once)")
    p.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for "
                   "(default: the context)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--max-queue", type=int, default=64, help="generation requests that may wait for a decoding "
                   "slot; more are answered 429 with Retry-After (default 64)")
    p.add_argument("--threads", type=int, default=None, help="threads of the decoding thread (default: all "
                   "cores; the HTTP thread keeps one torch thread of its own)")
    p.add_argument("--runtime", choices=("auto", "lean", "torch"), default="auto",
                   help="lean: an int4 directory (lmforge quantize --bits 4) served by the C step from NumPy in a "
                   "process without PyTorch (SmolLM2-135M int4: ~215 MB resident instead of ~425, and faster; needs "
                   "AVX512-VNNI; no --draft, no --adapter); torch: PyTorch; auto (default): lean where it applies")
    add_kv_cache_arg(p)
    p.add_argument("--allowed-hosts", default="", help="comma-separated extra names the Host header may carry "
                   "(default: localhost names and the bind address; '*' = any). Other hosts get 400: a web page "
                   "cannot reach the server through a DNS name of its own")
    p.add_argument("--cors-origin", action="append", default=[], type=origin_type, metavar="ORIGIN",
                   help="let web pages from ORIGIN (scheme://host[:port], e.g. http://localhost:3000; repeatable; "
                   "'*' = any) call the API from a browser (default: CORS off)")
    p.add_argument("--template", default=None, help="chat template: chatml, llama2, chatglm, alpaca, plain or a "
                   "Jinja file (default: the tokenizer's own, else plain)")
    p.add_argument("--model-id", default=None, help="id to list the model under (default: its directory or "
                   "file name)")
    p.add_argument("--draft", choices=("auto", "none"), default="auto", help="a request running alone decodes "
                   "speculatively, the model's int4 copy proposing (as lmforge generate --draft). auto (default): "
                   "float32 models of 64 MiB of block weights or more on a CPU with the int4 kernel; none: off")
    p.set_defaults(func=run)


KV_BUDGET = 1 << 30  # bytes of key/value cache the default --max-batch may take
# sequences decoded together by default (16 clients then decode >= 4x one). The cache is allocated as requests use
# it, and the engine admits a request only while the cache, every running request at its limit, stays within
# KV_BUDGET: many short requests run together, long ones fewer at a time (SmolLM2, 8,192 positions: two)
DEFAULT_MAX_BATCH = 16


def default_threads(model, cores: int | None = None) -> int:
    """Torch threads for the engine's decoding thread: all cores, for models of every size. Measured on 2 cores once
    the serving thread keeps one torch thread (no OpenMP pool of its own, see ``Engine``): SmolLM2-135M int4 served
    one stream at 136-139 tokens/s with 2 threads against 97 with 1, stories260K 2,614 against 2,335 and 16 clients
    13,820 against 11,295. (Before, two pools on two cores made one thread the faster choice: issue 14.)"""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores)


def run(args) -> None:
    from lmforge.serve.server import ModelServer, model_id_for

    for flag in ("max_batch", "threads", "max_len", "max_tokens"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise LMForgeError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 1 or args.max_body < 1:
        raise LMForgeError("--max-queue and --max-body must be >= 1")
    if args.api_key is not None and not (args.api_key and all(33 <= ord(c) <= 126 for c in args.api_key)):
        raise LMForgeError("--api-key (or LMFORGE_API_KEY): must be printable ASCII without spaces, as an HTTP header "
                           "carries it (a client could never send this one)" if args.api_key else
                           "--api-key (or LMFORGE_API_KEY) is empty: give a key, or unset it to serve without one")
    if not 0 <= args.port < 65536:
        raise LMForgeError(f"--port {args.port}: must be in [0, 65535]")
    template = template_arg(args.template)
    # the engine's thread takes the interpreter back after each kernel call within 1 ms instead of Python's 5 while
    # this thread runs HTTP (stories260K, 2 cores: one stream 5,600-5,800 -> 6,150-6,250 tokens/s, 16 ~5 % more)
    sys.setswitchinterval(0.001)
    max_batch = args.max_batch or DEFAULT_MAX_BATCH
    budget = None if args.max_batch else KV_BUDGET  # an explicit --max-batch is the user's to size
    if args.threads:  # the C code's OpenMP pool (lean) takes it when the library loads, before anything else does
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    why = lean_unsupported(args) if args.runtime != "torch" else "--runtime torch"
    if why is None:
        model, engine, tok, threads, runtime = None, *_lean_engine(args, max_batch, budget), "lean"
    elif args.runtime == "lean":
        raise LMForgeError(f"{args.model or 'the bundled stories260K'}: --runtime lean: {why}")
    else:
        import torch

        from lmforge.loading import load_model_and_tokenizer

        check_torch_kv_cache(args)

        # this thread (HTTP, loading) keeps one torch thread, so it never grows an OpenMP pool of its own: the
        # engine's thread decodes with `threads` (see Engine: two pools on two cores made SmolLM2 int4 3x slower)
        torch.set_num_threads(1)
        model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, adapter=args.adapter)
        model.requires_grad_(False)  # inference only (decoding then streams its weights fastest)
        threads, engine, runtime = args.threads or default_threads(model), None, "torch"
    mid, aliases = model_id_for(args.model)
    if args.model_id:
        mid, aliases = args.model_id, (mid, *aliases)
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    try:
        server = ModelServer(model, tok, mid, args.host, args.port, api_key=args.api_key, max_batch=max_batch,
                             max_len=args.max_len, max_tokens=args.max_tokens, max_body=args.max_body,
                             template=template, aliases=aliases, max_queue=args.max_queue, allowed_hosts=hosts,
                             cors_origins=tuple(args.cors_origin), threads=threads,
                             kv_budget=budget, draft=None if args.draft == "none" else "auto", engine=engine)
    except OSError as e:
        raise LMForgeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if not _loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    batch = f"batch {max_batch}" + (f" within a {budget >> 20} MiB key/value cache" if budget else "")
    print(f"serving {mid} on {server.url} (context {server.limits.context}, {batch}, threads {threads}, "
          f"{runtime} runtime, template {server.template.name}); chat page at {server.url}/, API docs at "
          f"{server.url}/docs",
          file=sys.stderr, flush=True)
    # what is loaded lives as long as the server: out of the collector's sight, a full collection no longer walks it
    # (stories260K, 16 clients: one took 78 ms, 4 % of the run went to collections; 1 % after)
    gc.freeze()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)


def _lean_engine(args, max_batch: int, budget: int | None):
    """(engine, tokenizer, threads) of an int4 directory decoded without PyTorch."""
    from lmforge.infer.lean import LeanEngine

    threads = args.threads or default_threads(None)
    path, cfg, tok = lean_files(args)
    max_len = min(args.max_len or cfg.block_size, cfg.block_size)
    engine = LeanEngine(path, tok, max_batch=max_batch, max_len=max_len, kv_budget=budget, kv_dtype=lean_kv_dtype(args))
    return engine, tok, threads


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
