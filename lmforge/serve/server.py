"""An OpenAI-compatible HTTP server over the continuous-batching engine, and a web chat page at ``/``.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` sends server-sent events ending with ``data: [DONE]``), ``GET /health`` and ``GET /`` (the page).
Every request runs in its own thread (stdlib ``ThreadingHTTPServer``); generation goes through one ``Engine``, which
decodes all running requests together. A failing request gets an OpenAI-style error body and never stops the server.
"""

from __future__ import annotations

import hmac
import json
import queue
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from lmforge.infer.chat import end_of_turn, get_template
from lmforge.infer.engine import Engine, Request
from lmforge.serve import protocol as P
from lmforge.serve.protocol import APIError, GenRequest, Limits


class ModelServer:
    """One model behind the OpenAI API. ``start()`` serves in a background thread; ``serve_forever()`` blocks."""

    def __init__(self, model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_batch: int = 8, max_len: int | None = None,
                 max_tokens: int | None = None, max_body: int = 1 << 20, template: str | None = None,
                 aliases: tuple[str, ...] = ()) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.model_ids = {model_id, *aliases}
        self.api_key = api_key or None
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_len=max_len)
        ctx = self.engine.max_len
        self.limits = Limits(context=ctx, max_tokens=min(max_tokens or ctx, ctx))
        self.max_body = max_body
        self.template = get_template(template, tokenizer)
        self.chat_stops, self.chat_stop_ids = end_of_turn(self.template, tokenizer)
        self.stop_ids = [i for i in (tokenizer.eos_id, tokenizer.bos_id) if i is not None]
        self.created = P.now()
        self.page = resources.files("lmforge.serve").joinpath("static/index.html").read_bytes()
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = _HTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="lmforge-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()
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

    def submit(self, g: GenRequest) -> tuple[list[Request], queue.SimpleQueue]:
        sink: queue.SimpleQueue = queue.SimpleQueue()
        reqs = []
        try:
            for i, (ids, params) in enumerate(zip(g.prompts, g.params)):
                for j in range(g.n):
                    p = params
                    if g.n > 1 and params.seed is not None:  # distinct but reproducible choices
                        p = P.SamplingParams(**{**params.__dict__, "seed": params.seed + j})
                    reqs.append(self.engine.submit(ids, p, sink, tag=i * g.n + j))
        except ValueError as e:
            for r in reqs:
                r.cancel()
            raise APIError(400, str(e)) from None
        return reqs, sink


STREAM_PACE = 0.001  # seconds (per running request) a stream waits after a token for more to send together


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # listen backlog (socketserver's default of 5 drops bursts of connections)
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    app: ModelServer
    protocol_version = "HTTP/1.1"
    server_version = "lmforge"
    timeout = 60  # seconds a client may stall while sending a request

    def log_message(self, fmt: str, *args) -> None:  # quiet: one line per error only
        pass

    # ---- plumbing ---------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def _error(self, e: APIError) -> None:
        extra = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        self._send(e.status, json.dumps(e.body()).encode("utf-8"), extra=extra)

    def _auth(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        got = self.headers.get("Authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided." if token else
                           "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")

    def _body(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported: send Content-Length",
                           code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "Content-Length required", code="length_required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "bad Content-Length", code="invalid_body") from None
        if n > self.app.max_body:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise APIError(413, f"request body of {n} bytes exceeds the limit of {self.app.max_body}",
                           code="request_too_large")
        raw = self.rfile.read(n)
        self._consumed = True
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _guard(self, fn) -> None:
        self._consumed = self.command != "POST"
        try:
            fn()
        except APIError as e:
            if not self._consumed:  # an unread body would be taken for the next request: close instead
                self.close_connection = True
            self._error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - one failing request never takes the server down
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            try:
                self._error(APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))
            except OSError:
                pass

    # ---- routes -----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._guard(self._get)

    def do_HEAD(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, self.app.page, "text/html; charset=utf-8", {"Cache-Control": "no-cache"})
            return
        if path == "/health":
            e = self.app.engine
            self._json(200, {"status": "ok", "active": e.active, "waiting": e.waiting, "steps": e.steps,
                             "tokens": e.tokens, "decode_seconds": round(e.busy, 3)})
            return
        if path.startswith("/v1/"):
            self._auth()
            if path == "/v1/models":
                self._json(200, self.app.models())
                return
            if path.startswith("/v1/models/"):
                mid = path[len("/v1/models/"):]
                if mid in self.app.model_ids:
                    self._json(200, self.app._model_card())
                    return
                raise APIError(404, f"The model `{mid}` does not exist", param="model", code="model_not_found")
        raise APIError(404, f"no route for GET {path}", code="not_found")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/completions", "/v1/chat/completions"):
            if path.startswith("/v1/"):
                self._auth()
            raise APIError(404, f"no route for POST {path}", code="not_found")
        self._auth()
        body = self._body()
        app = self.app
        if path == "/v1/completions":
            g = P.parse_completion(body, app.tokenizer, app.limits, app.model_ids, app.stop_ids)
        else:
            g = P.parse_chat(body, app.tokenizer, app.limits, app.model_ids, app.template, app.chat_stop_ids,
                             app.chat_stops)
        reqs, sink = app.submit(g)
        try:
            if g.stream:
                self._stream(g, reqs, sink)
            else:
                self._complete(g, reqs, sink)
        finally:
            for r in reqs:
                if r.finish_reason is None:
                    r.cancel()

    # ---- generation -------------------------------------------------------------------------------
    def _complete(self, g: GenRequest, reqs: list[Request], sink: queue.SimpleQueue) -> None:
        steps: list[list] = [[] for _ in reqs]
        left = len(reqs)
        while left:
            tag, item = sink.get()
            if item is Request.DONE:
                left -= 1
            else:
                steps[tag].append(item)
        failed = [r for r in reqs if r.error is not None]
        if failed:
            raise APIError(500, f"generation failed: {failed[0].error}", code="internal_error")
        tok = self.app.tokenizer
        choices = []
        for i, r in enumerate(reqs):
            text = r.text
            if g.kind == "chat":
                c = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": r.finish_reason}
                if g.logprobs is not None:
                    c["logprobs"] = P.chat_logprobs(tok, steps[i])
            else:
                prefix = g.echo[i // g.n] if g.echo else ""
                c = {"index": i, "text": prefix + text, "logprobs": None, "finish_reason": r.finish_reason}
                if g.logprobs is not None:
                    c["logprobs"] = P.completion_logprobs(tok, steps[i], len(prefix))
            choices.append(c)
        prompt_tokens = sum(len(p) for p in g.prompts)
        out = {"id": P.new_id(g.kind), "object": "chat.completion" if g.kind == "chat" else "text_completion",
               "created": P.now(), "model": g.model, "system_fingerprint": None, "choices": choices,
               "usage": P.usage(prompt_tokens, sum(len(r.token_ids) for r in reqs))}
        self._json(200, out)

    def _stream(self, g: GenRequest, reqs: list[Request], sink: queue.SimpleQueue) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        tok = self.app.tokenizer
        cid, created = P.new_id(g.kind), P.now()
        obj = "chat.completion.chunk" if g.kind == "chat" else "text_completion"

        def chunk(choices: list, **extra) -> dict:
            return {"id": cid, "object": obj, "created": created, "model": g.model, "system_fingerprint": None,
                    "choices": choices, **extra}

        def send(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        try:
            if g.kind == "chat":
                send(b"".join(P.sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}])) for i in range(len(reqs))))
            elif g.echo:
                send(b"".join(P.sse(chunk([{"index": i, "text": g.echo[i // g.n], "logprobs": None,
                                             "finish_reason": None}])) for i in range(len(reqs))))
            left = len(reqs)
            while left:
                items = [sink.get()]
                # let tokens gather for a moment, longer the more requests run: fewer, larger events under load
                time.sleep(min(STREAM_PACE * max(self.app.engine.active, 1), 0.02))
                while True:
                    try:
                        items.append(sink.get_nowait())
                    except queue.Empty:
                        break
                pending: dict[int, list] = {}  # tag -> steps not yet sent, in order
                out: list[bytes] = []

                def flush(tag: int, pending=pending, out=out) -> None:
                    steps = pending.pop(tag, [])
                    text = "".join(st.text for st in steps)
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
                            c["logprobs"] = P.completion_logprobs(tok, steps)
                    out.append(P.sse(chunk([c])))

                for tag, item in items:
                    if item is not Request.DONE:
                        pending.setdefault(tag, []).append(item)
                        continue
                    left -= 1
                    flush(tag)
                    r = reqs[tag]
                    if r.error is not None:
                        out.append(P.sse(APIError(500, f"generation failed: {r.error}", code="internal_error").body()))
                        continue
                    done = {"index": tag, "finish_reason": r.finish_reason, "logprobs": None}
                    done.update({"delta": {}} if g.kind == "chat" else {"text": ""})
                    out.append(P.sse(chunk([done])))
                for tag in list(pending):
                    flush(tag)
                if out:
                    send(b"".join(out))
            if g.include_usage:
                prompt_tokens = sum(len(p) for p in g.prompts)
                send(P.sse(chunk([], usage=P.usage(prompt_tokens, sum(len(r.token_ids) for r in reqs)))))
            send(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            for r in reqs:
                r.cancel()


def model_id_for(path: str | None) -> tuple[str, tuple[str, ...]]:
    """The id a served model is listed under: its checkpoint directory or file name (plus the stem as an alias)."""
    from lmforge.assets import STORIES260K

    p = Path(path) if path else STORIES260K
    p = Path(str(p).rstrip("/")) if str(p) not in ("/", "") else p
    aliases = (p.stem,) if p.stem != p.name else ()
    return p.name, aliases
