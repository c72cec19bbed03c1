"""An OpenAI-compatible HTTP server over the continuous-batching engine, and a web chat page at ``/``.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` sends server-sent events ending with ``data: [DONE]``), ``GET /health``, ``GET /`` (the page) and
the OpenAPI docs at ``/docs``. The app is FastAPI (request schema: ``protocol``) served by uvicorn's h11 protocol,
which parses HTTP and refuses malformed requests (bad ``Content-Length``, ``Transfer-Encoding`` other than chunked,
both at once...). Generation goes through one ``Engine`` thread, which decodes all running requests together;
handlers wait on its events without blocking the event loop and cancel their requests when the client goes away.

In front of the routes (``_Guard``): the ``Host`` header must name this server (DNS rebinding), the API key is checked
for ``/v1/*``, bodies are read up to ``max_body`` bytes and no further (413), generation requests must be JSON (415),
and at most ``max_queue`` generation requests wait for a slot (429 with ``Retry-After``). The guard answers the two
generation routes itself, with the handler of the app's documented routes (FastAPI's middleware, router and request
objects took about a sixth of the loop's time per request). CORS is off unless origins are given. Every error is an
OpenAI-style JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from importlib import resources
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.infer.batching import BatchEngine
from lmforge.infer.batching import Request as EngineRequest
from lmforge.infer.chat import end_of_turn, get_template
from lmforge.infer.params import SamplingParams
from lmforge.infer.sequence import PromptScores, Step
from lmforge.serve import protocol as P
from lmforge.serve.protocol import APIError, GenRequest, Limits

ANSWER_WAIT = 60.0  # seconds a request that is not streamed sleeps between looks at its events (an end wakes it)
STREAM_PACE = 0.001  # seconds (per running request) a stream waits after a token for more to send together
GENERATE = ("/v1/completions", "/v1/chat/completions")
KIND = dict(zip(GENERATE, ("completion", "chat")))
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
PARSE_INLINE = 16 << 10  # request bodies up to this size are parsed on the event loop
ERRORS = {400: "Invalid request (param names the field)", 401: "Missing or wrong API key",
          404: "Unknown model", 413: "Body over --max-body", 415: "Content-Type is not application/json",
          429: "Queue full (see Retry-After)", 500: "Generation failed"}
ERROR_SCHEMA = {"title": "Error", "type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}


def _torch_engine(model, tokenizer, max_batch: int, max_len: int | None, threads: int | None,
                  kv_budget: int | None, draft: str | None) -> BatchEngine:
    """The engine of a PyTorch model. (PyTorch is imported here, not with this module: the lean runtime serves an
    int4 directory in a process without it, ~200 MB smaller.)"""
    from lmforge.infer.engine import Engine
    from lmforge.infer.speculative import Speculator

    engine = Engine(model, tokenizer, max_batch=max_batch, max_len=max_len, threads=threads, kv_budget=kv_budget)
    # a request running alone decodes speculatively (a float32 model of 64 MiB of block weights or more)
    engine.speculator = Speculator.auto(model, engine.runner.max_len, draft)
    return engine


class ModelServer:
    """One model behind the OpenAI API. ``start()`` serves in a background thread; ``serve_forever()`` blocks.

    ``max_queue``: generation requests that may wait for a decoding slot (more get 429). ``allowed_hosts``: extra
    ``Host`` header names accepted besides localhost and the bind address (``"*"``: any). ``cors_origins``: origins
    a browser may call the API from (none: CORS off). ``engine``: a ready engine to serve (``lmforge.infer.lean.
    LeanEngine``: no PyTorch) instead of one made for ``model`` (then None).
    """

    def __init__(self, model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_batch: int = 16, max_len: int | None = None,
                 max_tokens: int | None = None, max_body: int = 1 << 20, template: str | None = None,
                 aliases: tuple[str, ...] = (), max_queue: int = 64, allowed_hosts: tuple[str, ...] = (),
                 cors_origins: tuple[str, ...] = (), threads: int | None = None,
                 kv_budget: int | None = None, draft: str | None = "auto", engine: BatchEngine | None = None) -> None:
        if max_queue < 1 or max_body < 1:
            raise ValueError("max_queue and max_body must be >= 1")
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.model_ids = (model_id, *aliases)  # the served id first (a request without a model gets it)
        self.api_key = api_key or None
        self.max_body, self.max_queue = max_body, max_queue
        self.template = get_template(template, tokenizer)
        self.chat_stops, self.chat_stop_ids = end_of_turn(self.template, tokenizer)
        self.stop_ids = tokenizer.stop_ids()
        self.created = P.now()
        self.page = resources.files("lmforge.serve").joinpath("static/index.html").read_bytes()
        self.hosts = HostCheck(host, allowed_hosts)
        self.sock = _bind(host, port)
        self.engine = engine or _torch_engine(model, tokenizer, max_batch, max_len, threads, kv_budget, draft)
        ctx = self.engine.max_len
        self.limits = Limits(context=ctx, max_tokens=min(max_tokens or ctx, ctx))
        self.app = build_app(self)
        asgi: Any = _Guard(self, self.app)
        if cors_origins:
            asgi = _CORS(asgi, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                         allow_headers=["Authorization", "Content-Type"], max_age=600)
        asgi = _HostGuard(self.hosts, asgi)
        config = uvicorn.Config(asgi, http=_H11, lifespan="off", log_level="warning", access_log=False,
                                timeout_keep_alive=5, timeout_graceful_shutdown=2, server_header=False)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> ModelServer:
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="lmforge-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C / SIGTERM."""
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout=10)
            self._thread = None
        self.sock.close()
        self.engine.close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the API ----------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lmforge",
                "context_length": self.limits.context}

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "ok", "active": e.active, "waiting": e.waiting, "waiting_requests": e.waiting_groups,
                "max_queue": self.max_queue, "steps": e.steps, "tokens": e.tokens, "decode_seconds": round(e.busy, 3)}

    def parse(self, kind: str, raw: bytes) -> GenRequest:
        if kind == "completion":
            return P.parse_completion(raw, self.tokenizer, self.limits, self.model_ids, self.stop_ids)
        return P.parse_chat(raw, self.tokenizer, self.limits, self.model_ids, self.template, self.chat_stop_ids,
                            self.chat_stops)

    def submit(self, g: GenRequest, sink) -> list[EngineRequest]:
        """Queue every choice of ``g`` as one group (fair admission), or refuse with 429 when the queue is full."""
        if self.engine.waiting_groups >= self.max_queue:
            raise APIError(429, f"the server is busy: {self.engine.waiting_groups} requests are waiting "
                           f"(--max-queue {self.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        items = []
        for i, (ids, params) in enumerate(zip(g.prompts, g.params)):
            for j in range(g.n):
                p = params
                if g.n > 1 and params.seed is not None:  # distinct but reproducible choices
                    p = SamplingParams(**{**params.__dict__, "seed": (params.seed + j + P.INT64) % (2 * P.INT64)
                                          - P.INT64})
                items.append((ids, p, i * g.n + j))
        try:
            return self.engine.submit_group(items, sink)
        except ValueError as e:
            raise APIError(400, str(e)) from None


# ---- HTTP plumbing -------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so a busy port is an error before anything starts and port 0 works). Its
    protocol is TCP by number, so asyncio turns Nagle's algorithm off on every connection it accepts (it does so only
    for sockets made with IPPROTO_TCP; ``socket.create_server`` makes them with 0): with Nagle on, each streamed
    response on a kept-alive connection waited for the client's delayed ACK, about 40 ms (stories260K, 128 tokens:
    43-48 ms a request instead of 9; OpenAI's client keeps its connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name != "nt" and hasattr(socket, "SO_REUSEADDR"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _json_bytes(status: int, body: dict, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": hdrs}, data


def _internal_error(e: Exception) -> APIError:
    """The 500 answering an unexpected exception (its traceback goes to stderr)."""
    traceback.print_exception(e, file=sys.stderr)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


async def _send_error(send, e: APIError, close: bool = False) -> None:
    headers = dict(e.headers)
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if close:
        headers["Connection"] = "close"
    start, data = _json_bytes(e.status, e.body(), headers)
    await send(start)
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


class HostCheck:
    """Which ``Host`` header values name this server: localhost, the bind address and ``extra`` (``"*"``: any);
    when bound to every interface (0.0.0.0 / ::), any IP address and this machine's names too. A name a page's
    script could point at this server (DNS rebinding) is refused."""

    def __init__(self, bind: str, extra: tuple[str, ...] = ()) -> None:
        self.any = "*" in extra
        self.names = {h.lower().strip("[]") for h in (*LOCAL_NAMES, bind, *extra) if h and h != "*"}
        self.any_ip = False
        try:
            self.any_ip = ipaddress.ip_address(bind.strip("[]")).is_unspecified
        except ValueError:
            pass
        if self.any_ip:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def allows(self, value: str | None) -> bool:
        if self.any or value is None:  # no Host (HTTP/1.0): not a browser, which always sends one
            return True
        v = value.strip().lower()
        if v.startswith("["):  # [IPv6]:port
            end = v.find("]")
            name, port = (v[1:end], v[end + 1:]) if end > 0 else ("", "")
        elif v.count(":") == 1:
            name, port = v[:v.index(":")], v[v.index(":"):]
        else:
            name, port = v, ""
        if port and not (port[0] == ":" and 1 < len(port) <= 6 and port[1:].isdigit() and port[1:].isascii()):
            return False  # (host:port@other, [::1]junk: no browser sends such a Host)
        if name in self.names or name.endswith(".localhost"):
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                pass
        return False


class _HostGuard:
    """ASGI: refuse a ``Host`` that does not name this server (before CORS and everything else)."""

    def __init__(self, hosts: HostCheck, app) -> None:
        self.hosts, self.app = hosts, app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if not self.hosts.allows(host):
                await _send_error(send, APIError(400, f"Host {host!r} is not allowed: this server answers to "
                                                 f"{sorted(self.hosts.names)} (add names with --allowed-hosts)",
                                                 code="host_not_allowed"), close=True)
                return
        await self.app(scope, receive, send)


def _without_body(send):
    """``send`` for a HEAD request answered as GET: the response's start as it is, its body left out."""
    async def head_send(message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)
    return head_send


class _Guard:
    """ASGI, in front of the routes: OPTIONS, HEAD, the API key, the body limit and the JSON content type."""

    def __init__(self, server: ModelServer, app: FastAPI) -> None:
        self.server, self.app = server, app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        try:
            if method == "OPTIONS":
                await self._options(path, send)
                return
            if method == "HEAD":  # wherever GET works (HTTP): GET's status and headers, no body
                scope, send = {**scope, "method": "GET"}, _without_body(send)
            if path.startswith("/v1/"):
                self._auth(scope)
            if method in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, path in GENERATE)
                if body is None:  # the client went away
                    return
                if method == "POST" and path in GENERATE:
                    await self._generate(scope, body, receive, send, KIND[path])
                    return
                receive = _replay(body, receive)
            elif _header(scope, b"transfer-encoding") or int(_header(scope, b"content-length") or 0) > \
                    self.server.max_body:  # never read (uvicorn would read and drop it to keep the connection)
                raise APIError(413, f"{method} request with a body over {self.server.max_body} bytes",
                               code="request_too_large")
        except APIError as e:
            # a body left unread would be taken for the next request: close the connection instead
            has_body = _header(scope, b"transfer-encoding") or _header(scope, b"content-length") not in (None, "0")
            await _send_error(send, e, close=bool(has_body))
            return
        await self.app(scope, receive, send)

    async def _generate(self, scope, body: bytes, receive, send, kind: str) -> None:
        """A generation request, answered here rather than through FastAPI's middleware, router and request objects
        (the same handler as its routes, which document the API; about a sixth of the event loop's time per
        request): errors as the app's handlers answer them."""
        try:
            response = await _generate(self.server, body, receive, kind)
        except APIError as e:
            await _send_error(send, e)
            return
        except Exception as e:  # noqa: BLE001 - as the app's handler of any other exception: a 500
            await _send_error(send, _internal_error(e))
            return
        await response(scope, receive, send)

    async def _options(self, path: str, send) -> None:
        methods: set[str] = set()
        for route in self.app.router.routes:
            match, _ = route.matches({"type": "http", "path": path, "method": "GET", "root_path": ""})
            if match != Match.NONE:
                methods |= set(getattr(route, "methods", None) or ())
        if not methods:
            await _send_error(send, APIError(404, f"no route for OPTIONS {path}", code="not_found"))
            return
        if "GET" in methods:
            methods.add("HEAD")
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"allow", allow.encode()), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _auth(self, scope) -> None:
        key = self.server.api_key
        if key is None:
            return
        got = _header(scope, b"authorization") or ""
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided." if token else
                           "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")

    async def _read_body(self, scope, receive, generate: bool) -> bytes | None:
        """The whole body (at most ``max_body`` bytes, never more read); None if the client went away while
        sending."""
        limit = self.server.max_body
        length = _header(scope, b"content-length")  # h11 has checked it: digits only, one value
        chunked = _header(scope, b"transfer-encoding") is not None
        if length is None and not chunked:
            if not generate:  # no body: the route answers (405 where it takes no POST)
                return b""
            raise APIError(411, "Content-Length required", code="length_required")
        if length is not None and chunked:  # which one frames the body? (request smuggling): refuse
            raise APIError(400, "both Content-Length and Transfer-Encoding given", code="bad_request")
        if length is not None and int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes exceeds the limit of {limit}",
                           code="request_too_large")
        encoding = (_header(scope, b"content-encoding") or "identity").strip().lower()
        if encoding != "identity":  # (RFC 7694: 415 for a content coding the server does not decode)
            raise APIError(415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed",
                           param="Content-Encoding", code="unsupported_media_type")
        if generate:
            ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
                raise APIError(415, f"Content-Type must be application/json, not {ctype or 'missing'!r}",
                               param="Content-Type", code="unsupported_media_type")
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            if not msg.get("more_body", False):
                break
        return bytes(body)


def _replay(body: bytes, receive):
    """A receive that gives ``body`` (read already), then waits for the client to go away."""
    replay = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return replay.pop() if replay else await receive()

    return replayed


class _CORS(CORSMiddleware):
    """Starlette's CORS middleware, with its refused preflight (400) as a JSON error body."""

    def preflight_response(self, request_headers) -> Response:
        resp = super().preflight_response(request_headers)
        if resp.status_code < 400:
            return resp
        headers = {k: v for k, v in resp.headers.items() if k not in ("content-type", "content-length")}
        body = APIError(resp.status_code, resp.body.decode(), code="cors_refused").body()
        return JSONResponse(body, status_code=resp.status_code, headers=headers)


def _head_size(r: h11.Request) -> int:
    """Bytes of a request's line and headers as sent (each header ``name: value\\r\\n``)."""
    return len(r.method) + len(r.target) + 12 + sum(len(k) + len(v) + 4 for k, v in r.headers.raw_items())


class _H11(H11Protocol):
    """uvicorn's h11 protocol, answering a malformed request with a JSON error body, and headers over h11's limit
    with the status h11 gives for them (431; uvicorn answered every parse error 400). h11 applies its limit only to
    a request head still arriving; one that arrives whole in a single read is measured here against the same limit."""

    def __init__(self, config: uvicorn.Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.error_status = 400
        limit = config.h11_max_incomplete_event_size or h11_impl.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        next_event = self.conn.next_event

        def noting_status():  # (uvicorn drops the exception's error_status_hint)
            try:
                event = next_event()
            except h11.RemoteProtocolError as e:
                self.error_status = e.error_status_hint
                raise
            if isinstance(event, h11.Request) and _head_size(event) > limit:
                self.error_status = 431
                raise h11.RemoteProtocolError("request head over the limit", error_status_hint=431)
            return event

        self.conn.next_event = noting_status

    def send_400_response(self, msg: str) -> None:
        status = self.error_status
        if status == 431:
            reason, error = b"Request Header Fields Too Large", APIError(
                431, "request header fields too large (over 16 KiB)", code="header_too_large")
        else:
            status, reason, error = 400, b"Bad Request", APIError(
                400, f"malformed HTTP request: {msg} (request line, headers, Content-Length or Transfer-Encoding)",
                code="bad_request")
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response had already started
            pass
        self.transport.close()


# ---- the app -------------------------------------------------------------------------------------


class _Sink:
    """Where the engine thread puts ``(tag, item)`` events for one HTTP request, and its coroutine takes them.

    The engine wakes the event loop only when the coroutine is waiting for events: events that come while it writes
    or paces its stream are only appended (one wake-up of the loop per token of every stream cost the engine its
    interpreter lock that often). An end (``Request.DONE``, ``GONE``) is always the last item of a put: the sink
    notes it there, so nobody looks through the tokens for it."""

    GONE = object()  # the client went away

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._waker = _Waker.of(self.loop)
        self._lock = threading.Lock()
        self._items: list = []  # put, not yet taken
        self._waiter: asyncio.Future | None = None  # set while the coroutine waits in get()
        self._pacer: asyncio.Future | None = None  # set while it paces its stream in pause()
        self._end = False  # an end is among the items not yet taken
        self.ended = False  # the items the last take returned hold an end
        self.gone = False  # the client went away

    def put(self, item) -> None:
        self.put_many([item])

    def put_many(self, items: list) -> None:
        """From the engine thread (or the loop): append, and wake the reader if it waits."""
        last = items[-1][1] if items else None
        end = last is EngineRequest.DONE or last is self.GONE
        with self._lock:
            self._items.extend(items)
            if end:
                self._end = True
                if last is self.GONE:
                    self.gone = True
            waiter, self._waiter = self._waiter, None
            if waiter is None and end:
                waiter, self._pacer = self._pacer, None  # a pacing reader answers an end at once
        if waiter is not None:
            self._waker.wake(waiter)

    def take(self) -> list:
        """Every event put since the last take (perhaps none); ``ended`` tells whether they hold an end."""
        with self._lock:
            items, self._items = self._items, []
            self.ended, self._end = self._end, False
        return items

    async def get(self) -> list:
        """Every event put since the last take; waits for one when there is none."""
        with self._lock:
            fut = None if self._items else self.loop.create_future()
            self._waiter = fut
        if fut is not None:
            try:
                await fut
            finally:
                with self._lock:
                    if self._waiter is fut:
                        self._waiter = None
        return self.take()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds`` for more events to gather, or less: until a request's end (or the client's) is put."""
        with self._lock:
            if self._end:
                return
            fut = self._pacer = self.loop.create_future()
        timer = self.loop.call_later(seconds, _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            with self._lock:
                if self._pacer is fut:
                    self._pacer = None

    async def watch(self, receive) -> None:
        """Wait until the client disconnects, then tell the reader."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.put((None, self.GONE))


class _Waker:
    """Wakes futures of one event loop from other threads: one byte down a pipe of its own for all the futures
    put before the loop reads it. The byte is written by libc's ``write`` called with the interpreter lock held:
    ``call_soon_threadsafe`` writes with the lock released, and the loop's thread, woken by that very write, took
    the lock first: the engine's thread waited for it after every wake (11 % of its samples under 16 clients)."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lock = threading.Lock()
        self._futs: list[asyncio.Future] = []
        self._armed = False  # a byte is on its way: later wakes only add their future
        self._call = None  # a loop without add_reader (Windows' proactor): its call_soon_threadsafe, weakly
        self._r, self._w = os.pipe()
        try:
            os.set_blocking(self._r, False)
            os.set_blocking(self._w, False)
            loop.add_reader(self._r, self._drain)
        except (NotImplementedError, OSError):
            _close_fds(self._r, self._w)
            self._call = weakref.WeakMethod(loop.call_soon_threadsafe)
            return
        weakref.finalize(loop, _close_fds, self._r, self._w)  # (every sink holds the loop: none writes after)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Waker:
        """The loop's waker (made at first use; called on the loop)."""
        w = cls._of.get(loop)
        if w is None:
            w = cls._of[loop] = cls(loop)
        return w

    def wake(self, fut: asyncio.Future) -> None:
        if self._call is not None:
            call = self._call()
            if call is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                    call(_wake, fut)
            return
        with self._lock:
            self._futs.append(fut)
            if self._armed:
                return
            self._armed = True
        _write_holding_gil(self._w, b"\0", 1)  # (a full pipe, EAGAIN: the loop has bytes to read already)

    def _drain(self) -> None:
        try:
            os.read(self._r, 4096)
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            futs, self._futs, self._armed = self._futs, [], False
        for fut in futs:
            _wake(fut)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _libc_write():
    """libc's ``write(fd, buf, n)`` called without releasing the interpreter lock (os.write releases it)."""
    try:
        f = ctypes.PyDLL(None).write
    except (OSError, AttributeError, TypeError):  # no libc symbols (Windows): os.write
        return lambda fd, data, n: os.write(fd, data[:n])
    f.argtypes, f.restype = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t), ctypes.c_ssize_t
    return f


_write_holding_gil = _libc_write()


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def build_app(server: ModelServer) -> FastAPI:
    # the docs page's Swagger UI from files installed with fastapi-offline (FastAPI's own loads it from a CDN: a
    # blank page offline, and third-party requests from a page on localhost)
    app = FastAPIOffline(title="lmforge", version="0.1.0", docs_url="/docs", redoc_url=None,
                         description=f"OpenAI-compatible API serving `{server.model_id}`.")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {**e.headers, **({"WWW-Authenticate": "Bearer"} if e.status == 401 else {})}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route for {request.method} {request.url.path}",
               405: f"method {request.method} not allowed for {request.url.path}"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        body = APIError(400, f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}",
                        param=loc[0] if loc else None, code="invalid_value").body()
        return JSONResponse(body, status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:  # one failing request never stops serving
        return JSONResponse(_internal_error(e).body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return HTMLResponse(server.page, headers={"Cache-Control": "no-cache"})

    @app.get("/index.html", include_in_schema=False)
    async def page_file() -> Response:
        return HTMLResponse(server.page, headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # a browser asks for it on any page of the server: no icon, no 404 logged
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    @app.get("/health", summary="Liveness and engine statistics (no API key needed)")
    async def health() -> dict:
        return server.health()

    @app.get("/v1/models", summary="The served model")
    async def models() -> dict:
        return server.models()

    @app.get("/v1/models/{model_id:path}", summary="One model by id")
    async def model(model_id: str) -> dict:
        if model_id not in server.model_ids:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return server._model_card()

    @app.post("/v1/completions", summary="Text completion (OpenAI's legacy completions API)")
    async def completions(request: Request) -> Response:
        return await _generate(server, await request.body(), request.receive, "completion")

    @app.post("/v1/chat/completions", summary="Chat completion")
    async def chat(request: Request) -> Response:
        return await _generate(server, await request.body(), request.receive, "chat")

    def openapi() -> dict:
        """The generated schema, with the request bodies of the two POST routes (parsed by ``protocol``)."""
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model_cls in zip(GENERATE, (P.CompletionRequest, P.ChatRequest)):
            js = model_cls.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model_cls.__name__] = js
            ref = {"$ref": f"#/components/schemas/{model_cls.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {"required": True,
                                                            "content": {"application/json": {"schema": ref}}}
        # errors are OpenAI's JSON bodies with the status of each case (never FastAPI's 422 validation shape)
        for ops in schema["paths"].values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        comps["Error"] = ERROR_SCHEMA
        err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for path in GENERATE:
            schema["paths"][path]["post"]["responses"].update({str(code): {"description": why, **err}
                                                               for code, why in ERRORS.items()})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app


async def _generate(server: ModelServer, raw: bytes, receive, kind: str) -> Response:
    """The response to a generation request of ``raw`` bytes; ``receive`` tells when the client goes away."""
    # tokenizing a large body would hold up every stream on the event loop: do it in a worker thread
    g = server.parse(kind, raw) if len(raw) < PARSE_INLINE else await asyncio.to_thread(server.parse, kind, raw)
    sink = _Sink()
    reqs = server.submit(g, sink)
    if g.stream:
        return _EventStream(server, g, reqs, sink)
    watch = asyncio.ensure_future(sink.watch(receive))
    try:
        steps: list[list] = [[] for _ in reqs]
        scores: dict[int, PromptScores] = {}  # echo with logprobs: each choice's prompt scored
        left = len(reqs)
        while left:
            for tag, item in await sink.get():
                if item is _Sink.GONE:  # nobody will read the answer: stop decoding it now
                    return Response(status_code=499)
                if item is EngineRequest.DONE:
                    left -= 1
                elif isinstance(item, PromptScores):
                    scores[tag] = item
                else:
                    steps[tag].append(item)
            if left:  # nothing is sent before the end: sleep until an end (a request's, the client's) is put; waking
                await sink.pause(ANSWER_WAIT)  # for every token took the interpreter from the engine's thread
    finally:
        watch.cancel()
        for r in reqs:
            if r.finish_reason is None:
                r.cancel()
    failed = [r for r in reqs if r.error is not None]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}", code="internal_error")
    tok = server.tokenizer
    choices = []
    for i, r in enumerate(reqs):
        if g.kind == "chat":
            c = {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                 "finish_reason": r.finish_reason}
            if g.logprobs is not None:
                c["logprobs"] = P.chat_logprobs(tok, steps[i])
        else:
            prefix = g.echo[i // g.n] if g.echo else ""
            c = {"index": i, "text": prefix + r.text, "logprobs": None, "finish_reason": r.finish_reason}
            if g.logprobs is not None:
                c["logprobs"] = P.completion_logprobs(tok, steps[i], len(prefix))
                if i in scores:
                    c["logprobs"] = P.join_logprobs(P.echo_logprobs(tok, scores[i], prefix), c["logprobs"])
        choices.append(c)
    prompt_tokens = sum(len(p) for p in g.prompts)
    return JSONResponse({"id": P.new_id(g.kind), "object": "chat.completion" if g.kind == "chat" else
                         "text_completion", "created": P.now(), "model": g.model, "system_fingerprint": None,
                         "choices": choices, "usage": P.usage(prompt_tokens, sum(len(r.token_ids) for r in reqs))})


class _EventStream(Response):
    """Server-sent events for a streamed request; stops (and cancels generation) when the client goes away."""

    def __init__(self, server: ModelServer, g: GenRequest, reqs: list[EngineRequest], sink: _Sink) -> None:
        super().__init__(status_code=200, media_type="text/event-stream; charset=utf-8",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.server, self.g, self.reqs, self.sink = server, g, reqs, sink
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]

    async def __call__(self, scope, receive, send) -> None:
        watch = asyncio.ensure_future(self.sink.watch(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            last = False
            async for data, last in self._events_or_error():  # the last event ends the body in the same write
                await send({"type": "http.response.body", "body": data, "more_body": not last})
            if not last:  # the client went away
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.cancel()
            for r in self.reqs:
                if r.finish_reason is None:
                    r.cancel()

    async def _events_or_error(self):
        """``_events``; an unexpected exception in them (a bug: the head is sent, a status can no longer say it) ends
        the stream with an error event and [DONE], as an engine's failure does, instead of a cut-off body."""
        try:
            async for item in self._events():
                yield item
        except Exception as e:  # noqa: BLE001 - the client is told, the server goes on
            yield P.sse(_internal_error(e).body()) + b"data: [DONE]\n\n", True

    async def _events(self):
        """(bytes, last) to send: the events of the tokens that came, gathered; the last holds [DONE]."""
        g, reqs, sink = self.g, self.reqs, self.sink
        tok = self.server.tokenizer
        cid, created = P.new_id(g.kind), P.now()
        obj = "chat.completion.chunk" if g.kind == "chat" else "text_completion"

        def chunk(choices: list, **extra) -> dict:
            return {"id": cid, "object": obj, "created": created, "model": g.model, "system_fingerprint": None,
                    "choices": choices, **extra}

        head = P.sse(chunk([])).removesuffix(b"]}\n\n")  # each event as sse(chunk([choice])), its head made once

        def event(choice: dict) -> bytes:
            return head + json.dumps(choice, ensure_ascii=False).encode("utf-8") + b"]}\n\n"

        if g.kind == "chat":
            yield b"".join(P.sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])) for i in range(len(reqs))), False
        elif g.echo and g.logprobs is None:  # (with logprobs: the echo is sent with its scores, when they come)
            yield b"".join(P.sse(chunk([{"index": i, "text": g.echo[i // g.n], "logprobs": None,
                                         "finish_reason": None}])) for i in range(len(reqs))), False
        left = len(reqs)
        # each choice's characters so far (text_offset counts into the choice's whole text, as without streaming)
        offsets = {i: len(g.echo[i // g.n]) if g.echo else 0 for i in range(len(reqs))}
        while left:
            items = await sink.get()
            if not sink.ended:
                # let tokens gather for a moment, longer the more requests run: fewer, larger events under load
                # (a finished request is answered at once: its client's next request waits for the end)
                await sink.pause(min(STREAM_PACE * max(self.server.engine.active, 1), 0.02))
                items += sink.take()
            if sink.gone:
                return
            pending: dict[int, list] = {}  # tag -> steps not yet sent, in order
            out: list[bytes] = []

            def flush(tag: int, pending=pending, out=out) -> None:
                steps = pending.pop(tag, [])
                text = "".join([st.text for st in steps])
                if not text and (g.logprobs is None or not any(st.token >= 0 for st in steps)):
                    return
                c: dict[str, Any] = {"index": tag, "logprobs": None, "finish_reason": None}
                if g.kind == "chat":
                    c["delta"] = {"content": text}
                    if g.logprobs is not None:
                        c["logprobs"] = P.chat_logprobs(tok, steps)
                else:
                    c["text"] = text
                    if g.logprobs is not None:
                        lp = c["logprobs"] = P.completion_logprobs(tok, steps, offsets[tag])
                        if lp["tokens"]:
                            offsets[tag] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                out.append(event(c))

            for tag, item in items:
                if type(item) is Step:
                    steps = pending.get(tag)
                    if steps is None:
                        pending[tag] = [item]
                    else:
                        steps.append(item)
                    continue
                if isinstance(item, PromptScores):  # a choice's first event: its echoed prompt, scored
                    echo = g.echo[tag // g.n]
                    out.append(event({"index": tag, "text": echo, "finish_reason": None,
                                      "logprobs": P.echo_logprobs(tok, item, echo)}))
                    continue
                left -= 1
                flush(tag)
                r = reqs[tag]
                if r.error is not None:
                    out.append(P.sse(APIError(500, f"generation failed: {r.error}", code="internal_error").body()))
                    continue
                done = {"index": tag, "finish_reason": r.finish_reason, "logprobs": None}
                done.update({"delta": {}} if g.kind == "chat" else {"text": ""})
                out.append(event(done))
            for tag in list(pending):
                flush(tag)
            if not left:  # the last events, the usage and [DONE] in one write
                if g.include_usage:
                    prompt_tokens = sum(len(p) for p in g.prompts)
                    out.append(P.sse(chunk([], usage=P.usage(prompt_tokens, sum(len(r.token_ids) for r in reqs)))))
                out.append(b"data: [DONE]\n\n")
            if out:
                yield b"".join(out), not left


def model_id_for(path: str | None) -> tuple[str, tuple[str, ...]]:
    """The id a served model is listed under: its checkpoint directory or file name (plus the stem as an alias)."""
    from lmforge.assets import STORIES260K

    p = Path(path) if path else STORIES260K
    p = Path(str(p).rstrip("/")) if str(p) not in ("/", "") else p
    aliases = (p.stem,) if p.stem != p.name else ()
    return p.name, aliases
