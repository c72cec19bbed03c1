"""`lmforge serve` under careless or hostile use (issue 14): malformed HTTP and bodies past the limit refused by the
HTTP layer, JSON error bodies for every status, Host/content-type/CORS checks, a bounded queue (429), fair admission,
cancellation of requests whose client went away, the OpenAPI docs, and the command's new flags."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs fastapi and uvicorn (pip install fastapi uvicorn)")

from pacing import paced  # noqa: E402

from lmforge.infer.engine import MIN_CACHE_LEN, Engine, Request, SlotRunner  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.serve import server as S  # noqa: E402
from lmforge.serve.server import ModelServer, _Sink  # noqa: E402

MODEL = "stories260K.bin"
KEY = "k3y"


@pytest.fixture(scope="module")
def server(stories):
    srv = ModelServer(*stories, MODEL, "127.0.0.1", 0, api_key=KEY, max_batch=4, max_body=64 * 1024,
                      allowed_hosts=("myhost.example",)).start()
    yield srv
    srv.close()


def http(server, data: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send raw bytes, read the response to the end (the server closes or answers Connection: close)."""
    s = socket.create_connection(server.address, timeout=timeout)
    s.sendall(data)
    out = b""
    while b"\r\n\r\n" not in out:
        b = s.recv(65536)
        if not b:
            break
        out += b
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", -1))
    while len(body) < n or n < 0:
        b = s.recv(65536)
        if not b:
            break
        body += b
    s.close()
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None, length: bool = True) -> bytes:
    h = {"Host": "127.0.0.1", "Authorization": f"Bearer {KEY}", "Connection": "close", **(headers or {})}
    if length and body:
        h.setdefault("Content-Length", str(len(body)))
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


def error(status: int, body: bytes) -> dict:
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    return e


def completion(**kw) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 2, **kw}).encode()


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("length", ["-1", "+10", "1_0", "\x0b10", "1 0", "0x10", "١٠"])
def test_malformed_content_length_is_400_and_nothing_runs(server, length):
    body = completion()
    tokens = server.engine.tokens
    st, _, out = http(server, request("POST", "/v1/completions", body, {**JSON, "Content-Length": length}))
    assert st == 400 and error(st, out)["code"] == "bad_request"
    assert server.engine.tokens == tokens


def test_headers_over_the_limit_get_431(server):
    """Headers past 16 KiB: 431 (uvicorn answered 400) as a JSON body, whether they are still arriving (h11's limit)
    or arrived whole in one write (which h11 let through)."""
    head = request("GET", "/v1/models", headers={"X-Big": "a" * 20_000})
    st, headers, out = http(server, head[: head.index(b"\r\n\r\n")])  # (the headers never end)
    assert st == 431 and error(st, out)["code"] == "header_too_large"
    assert headers["content-type"] == JSON["Content-Type"]
    for size in (17_000, 60_000):  # a whole head arriving in one write: h11 let it through, 200
        st, _, out = http(server, request("GET", "/health", headers={"X-Big": "a" * size}))
        assert st == 431 and error(st, out)["code"] == "header_too_large", size
    st, _, out = http(server, request("GET", "/health", headers={"X-Big": "a" * 16_000}))
    assert st == 200  # under the limit
    st, _, out = http(server, b"GARBAGE\r\n\r\n")  # the next connection's parse error is 400 again
    assert st == 400 and error(st, out)["code"] == "bad_request"


@pytest.mark.parametrize("te", ["gzip, chunked", "chunked"])
def test_transfer_encoding_with_content_length_is_refused(server, te):
    body = completion()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    st, _, out = http(server, request("POST", "/v1/completions", chunked,
                                      {**JSON, "Transfer-Encoding": te, "Content-Length": str(len(body))}))
    assert st == 400 and error(st, out)


def test_body_limit_refused_before_reading(server):
    # only the headers are sent: the 413 comes without the server waiting for (or reading) the body
    st, headers, out = http(server, request("POST", "/v1/completions", headers={**JSON, "Content-Length": "70000"}))
    assert st == 413 and error(st, out)["code"] == "request_too_large" and headers["connection"] == "close"
    big = b"x" * 70000  # chunked: counted as it arrives, refused at the limit
    st, _, out = http(server, request("POST", "/v1/completions", b"%x\r\n%s\r\n" % (len(big), big),
                                      {**JSON, "Transfer-Encoding": "chunked"}, length=False))
    assert st == 413 and error(st, out)["code"] == "request_too_large"
    st, headers, out = http(server, request("GET", "/v1/models", headers={"Content-Length": "70000"}))
    assert st == 413 and headers["connection"] == "close"
    st, _, out = http(server, request("POST", "/v1/completions", headers=JSON))
    assert st == 411 and error(st, out)["code"] == "length_required"
    body = completion()  # a chunked body within the limit is fine
    st, _, out = http(server, request("POST", "/v1/completions", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
                                      {**JSON, "Transfer-Encoding": "chunked"}, length=False))
    assert st == 200 and json.loads(out)["choices"][0]["finish_reason"] == "length"


def test_json_error_bodies_for_every_status(server, monkeypatch):
    st, _, out = http(server, request("GET", "/nothing"))
    assert st == 404 and error(st, out)["code"] == "not_found"
    st, headers, out = http(server, request("GET", "/v1/completions"))
    assert st == 405 and error(st, out)["code"] == "method_not_allowed" and headers["allow"] == "POST"
    st, headers, out = http(server, request("POST", "/v1/models"))  # no body: the method is wrong, not the length
    assert st == 405 and error(st, out)["code"] == "method_not_allowed" and "GET" in headers["allow"]
    st, _, out = http(server, request("POST", "/v1/completions", b"[" * 60000, JSON))
    assert st == 400 and error(st, out)["code"] == "invalid_json"
    for field, value, param in [("prompt", '"\\ud800"', None), ("seed", str(2**80), "seed"),
                                ("temperature", "NaN", "temperature"), ("temperature", "Infinity", "temperature"),
                                ("max_tokens", "1.5", "max_tokens"), ("stream", '"yes"', "stream")]:
        body = f'{{"model": "{MODEL}", "prompt": "x", "{field}": {value}}}'.encode()
        st, _, out = http(server, request("POST", "/v1/completions", body, JSON))
        assert st == 400 and error(st, out)["param"] == param, (field, out)
    st, _, out = http(server, request("POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 17}).encode(), JSON))
    assert st == 400 and error(st, out)["param"] == "n"

    big = completion(prompt="Once upon a time " * 1500)  # > 16 KiB: tokenized in a worker thread
    st, _, out = http(server, request("POST", "/v1/completions", big, JSON))
    assert st == 400 and error(st, out)["code"] == "context_length_exceeded"

    def broken(kind, raw):
        raise RuntimeError("boom")

    monkeypatch.setattr(server, "parse", broken)
    st, _, out = http(server, request("POST", "/v1/completions", completion(), JSON))
    assert st == 500 and error(st, out)["code"] == "internal_error"


def test_cross_site_requests_are_refused(server):
    tokens = server.engine.tokens
    body = completion()
    # a web page's "simple" POST (text/plain needs no preflight): refused before anything runs
    st, headers, out = http(server, request("POST", "/v1/completions", body,
                                            {"Content-Type": "text/plain", "Origin": "http://evil.example"}))
    assert st == 415 and error(st, out)["code"] == "unsupported_media_type"
    assert "access-control-allow-origin" not in headers
    # a compressed body is not decoded: 415 naming the header (it was parsed as if plain)
    st, _, out = http(server, request("POST", "/v1/completions", body, {**JSON, "Content-Encoding": "gzip"}))
    assert st == 415 and error(st, out)["param"] == "Content-Encoding", out
    # DNS rebinding: the page's own name in Host
    st, _, out = http(server, request("POST", "/v1/completions", body, {**JSON, "Host": "evil.example:8000"}))
    assert st == 400 and error(st, out)["code"] == "host_not_allowed"
    assert server.engine.tokens == tokens
    for host in ("localhost:8000", "127.0.0.1", "[::1]:80", "[::1]", "myhost.example", "MyHost.example:1"):
        st, _, _ = http(server, request("GET", "/v1/models", headers={"Host": host}))
        assert st == 200, host
    for host in ("localhost:8000@evil.example", "[::1]evil", "localhost:", "localhost:80x", "[::1", "[]:80",
                 "localhost:1234567"):  # a Host no browser sends, read loosely as a local name before
        st, _, out = http(server, request("GET", "/v1/models", headers={"Host": host}))
        assert st == 400 and error(st, out)["code"] == "host_not_allowed", host
    # no CORS: a preflight gets the allowed methods but no Access-Control-Allow-Origin
    st, headers, _ = http(server, request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}))
    assert st == 204 and headers["allow"] == "OPTIONS, POST" and "access-control-allow-origin" not in headers
    st, headers, _ = http(server, request("OPTIONS", "/v1/models"))
    assert st == 204 and "GET" in headers["allow"] and "HEAD" in headers["allow"]


def test_head_answers_as_get_without_a_body(server):
    """HEAD works wherever GET does (a load balancer's health check): GET's status and headers, no body; the key
    is still needed under /v1/."""
    for path in ("/health", "/", "/v1/models", "/docs"):
        _, get_headers, get_body = http(server, request("GET", path))
        s = socket.create_connection(server.address, timeout=30)
        s.sendall(request("HEAD", path))
        out = b""
        while b := s.recv(65536):  # the server closes (Connection: close): all it sent, body or not
            out += b
        s.close()
        head, _, body = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        assert lines[0].split()[1] == "200" and body == b"", (path, out[:200])
        assert headers["content-type"] == get_headers["content-type"], path
        if path != "/health":  # (its counters may move between the two requests)
            assert int(headers["content-length"]) == len(get_body), path
    st, _, out = http(server, request("HEAD", "/v1/models", headers={"Authorization": "Bearer wrong"}))
    assert st == 401


def test_cors_only_for_the_given_origin(stories):
    with ModelServer(*stories, MODEL, "127.0.0.1", 0, max_batch=1, cors_origins=("http://app.example",)) as srv:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        st, headers, _ = http(srv, request("OPTIONS", "/v1/completions", headers={"Origin": "http://app.example",
                                                                                  **pre}))
        assert st == 200 and headers["access-control-allow-origin"] == "http://app.example"
        st, headers, _ = http(srv, request("OPTIONS", "/v1/completions", headers={"Origin": "http://evil.example",
                                                                                  **pre}))
        assert st == 400 and "access-control-allow-origin" not in headers and headers["content-type"] == JSON[
            "Content-Type"]
        st, headers, out = http(srv, request("POST", "/v1/completions", completion(),
                                             {**JSON, "Origin": "http://app.example"}))
        assert st == 200 and headers["access-control-allow-origin"] == "http://app.example"


def test_health_needs_no_key_and_docs_describe_the_api(server):
    st, _, out = http(server, request("GET", "/health", headers={"Authorization": ""}))
    assert st == 200 and json.loads(out)["status"] == "ok"
    st, _, out = http(server, request("GET", "/v1/models", headers={"Authorization": ""}))
    assert st == 401 and error(st, out)["code"] == "invalid_api_key"
    st, headers, out = http(server, request("GET", "/", headers={"Authorization": ""}))
    assert st == 200 and headers["content-type"].startswith("text/html") and b"/v1/chat/completions" in out
    st, _, out = http(server, request("GET", "/favicon.ico", headers={"Authorization": ""}))
    assert st == 204 and out == b""  # (a browser asks on every page: no 404 in its console)
    st, headers, out = http(server, request("GET", "/docs"))
    assert st == 200 and headers["content-type"].startswith("text/html") and b"openapi.json" in out
    st, _, out = http(server, request("GET", "/openapi.json"))
    spec = json.loads(out)
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatRequest"}
    schemas = spec["components"]["schemas"]
    assert "messages" in schemas["ChatRequest"]["properties"] and "prompt" in schemas["CompletionRequest"]["required"]
    assert schemas["ChatRequest"]["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
    # errors documented as they are answered: OpenAI's body, 400 for a bad field (not FastAPI's 422)
    responses = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in json.dumps(spec) and "HTTPValidationError" not in schemas
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert {"message", "type", "param", "code"} <= set(schemas["Error"]["properties"]["error"]["properties"])


def open_generation(server, body: dict) -> socket.socket:
    """Send a generation request on a raw socket and leave it open (the caller closes it)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(server.address, timeout=30)
    s.sendall(request("POST", "/v1/completions", data, {**JSON, "Connection": "keep-alive"}))
    return s


def wait_for(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_non_streaming_request_is_cancelled_when_the_client_goes_away(server):
    e = server.engine
    before = e.cancelled
    with paced(e):
        s = open_generation(server, {"model": MODEL, "prompt": "Once", "max_tokens": 500, "ignore_eos": True})
        wait_for(lambda: e.active == 1, "the request to start")
        s.close()
        wait_for(lambda: e.active == 0, "the slot to be freed")
    assert e.cancelled == before + 1  # stopped, not run to its 500 tokens for nobody


def chunks(s: socket.socket) -> list[bytes]:
    """Read a chunked response to its end: the body as the chunks the server wrote."""

    def more() -> bytes:
        b = s.recv(65536)
        if not b:
            raise AssertionError("the connection closed before the body's end")
        return b

    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    out: list[bytes] = []
    while True:
        while b"\r\n" not in rest:
            rest += more()
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        while len(rest) < n + 2:
            rest += more()
        out.append(rest[:n])
        rest = rest[n + 2:]
        if n == 0:
            return out


def test_a_finished_stream_ends_in_one_write(server):
    """The last tokens, the finish event, the usage and [DONE] leave in one chunk, which ends the body: nothing
    waits to gather more tokens once the request finished (the client's next request waits for that end)."""
    s = open_generation(server, {"model": MODEL, "prompt": "Once", "max_tokens": 3, "stream": True,
                                 "ignore_eos": True, "stream_options": {"include_usage": True}})
    try:
        body = chunks(s)
    finally:
        s.close()
    assert body[-1] == b"" and sum(b"[DONE]" in c for c in body) == 1
    last = [json.loads(e[6:]) for e in body[-2].split(b"\n\n") if e.startswith(b"data: {")]
    assert body[-2].endswith(b"data: [DONE]\n\n")
    assert last[-2]["choices"][0]["finish_reason"] == "length" and last[-1]["usage"]["completion_tokens"] == 3


def test_the_engine_wakes_the_loop_only_for_a_waiting_reader():
    """Events put while a request's coroutine writes or paces its stream are only appended (a wake-up of the event
    loop per token of each stream took the interpreter lock from the engine that often); a coroutine waiting in
    ``get`` is woken by the first put, once, and gets everything put."""

    async def main() -> None:
        sink = _Sink()
        wakes: list = []
        wake = sink._waker.wake
        sink._waker.wake = lambda fut: wakes.append(fut) or wake(fut)
        engine = threading.Thread(target=lambda: [sink.put((0, i)) for i in range(100)])
        engine.start()
        engine.join()
        assert wakes == [] and [i for _, i in sink.take()] == list(range(100)) and sink.take() == []
        reader = asyncio.ensure_future(sink.get())
        await asyncio.sleep(0.01)
        assert not reader.done()
        engine = threading.Thread(target=lambda: (sink.put_many([(0, "a"), (1, "b")]), sink.put((0, "c"))))
        engine.start()
        engine.join()
        assert await asyncio.wait_for(reader, 10) == [(0, "a"), (1, "b"), (0, "c")] and len(wakes) == 1
        reader = asyncio.ensure_future(sink.get())  # a reader that is cancelled leaves no waiter behind
        await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.sleep(0)
        sink.put((0, "d"))
        assert len(wakes) == 1 and await sink.get() == [(0, "d")]

    asyncio.run(main())


def test_wakes_from_the_engine_before_the_loop_reads_share_one_byte(monkeypatch):
    """The engine's thread wakes waiting coroutines through a pipe of the loop's waker: every future put before the
    loop reads the pipe is woken by one byte, written with the interpreter lock held (call_soon_threadsafe wrote
    one per wake with it released, and the loop's thread, woken by that write, took the lock from the engine)."""
    writes: list = []
    write = S._write_holding_gil
    monkeypatch.setattr(S, "_write_holding_gil", lambda fd, data, n: writes.append(fd) or write(fd, data, n))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        waker = S._Waker.of(loop)
        assert S._Waker.of(loop) is waker  # one per loop
        futs = [loop.create_future() for _ in range(5)]
        t = threading.Thread(target=lambda: [waker.wake(f) for f in futs])
        t.start()
        t.join()
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert len(writes) == 1
        fut = loop.create_future()  # after the loop read the byte, the next wake writes again
        threading.Thread(target=waker.wake, args=(fut,)).start()
        await asyncio.wait_for(fut, 10)
        assert len(writes) == 2

    asyncio.run(main())


def test_a_sink_notes_ends_where_they_are_put():
    """An end (a request's DONE, the client's GONE) is the last item of a put: the sink notes it there, and the
    reader asks ``ended`` / ``gone`` instead of looking through every token for it."""

    async def main() -> None:
        sink = _Sink()
        sink.put_many([(0, "a"), (0, "b")])
        assert [i for _, i in sink.take()] == ["a", "b"] and not sink.ended and not sink.gone
        sink.put_many([(0, "c"), (0, Request.DONE)])
        assert [i for _, i in sink.take()] == ["c", Request.DONE] and sink.ended and not sink.gone
        assert sink.take() == [] and not sink.ended
        sink.put((None, _Sink.GONE))
        assert sink.take() == [(None, _Sink.GONE)] and sink.ended and sink.gone

    asyncio.run(main())


def test_generation_requests_are_answered_in_front_of_fastapi(server, monkeypatch):
    """POST /v1/completions and /v1/chat/completions are answered by the guard in front of the app (the same
    handler as the app's documented routes, without FastAPI's middleware, router and request objects: about a
    sixth of the event loop's time per request); every other request goes on to the app."""
    guard = server._uvicorn.config.app
    while not isinstance(guard, S._Guard):
        guard = guard.app
    seen: list[str] = []
    app = guard.app

    async def noting(scope, receive, send):
        seen.append(scope["path"])
        await app(scope, receive, send)

    monkeypatch.setattr(guard, "app", noting)
    st, _, out = http(server, request("POST", "/v1/completions", completion(), JSON))
    assert st == 200 and json.loads(out)["choices"][0]["text"]
    chat = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    st, _, out = http(server, request("POST", "/v1/chat/completions", chat, JSON))
    assert st == 200 and json.loads(out)["choices"][0]["message"]["role"] == "assistant"
    st, _, _ = http(server, request("GET", "/v1/models"))
    assert st == 200 and seen == ["/v1/models"]


def test_connections_send_without_nagles_delay(server):
    """Every accepted connection has TCP_NODELAY (asyncio sets it only on sockets made with IPPROTO_TCP, and the
    listening socket was made with protocol 0): with Nagle on, each streamed response on a kept-alive connection
    (OpenAI's client keeps them) waited for the client's delayed ACK, about 40 ms."""
    assert server.sock.proto == socket.IPPROTO_TCP
    s = socket.create_connection(server.address, timeout=30)
    try:
        s.sendall(request("POST", "/v1/completions", completion(), {**JSON, "Connection": "keep-alive"}))
        out = b""
        while b"\r\n\r\n" not in out:
            out += s.recv(65536)
        conns = list(server._uvicorn.server_state.connections)
        assert conns
        for c in conns:
            assert c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        s.close()


def test_a_pacing_stream_answers_the_end_of_a_request_at_once():
    """A stream pacing its events (letting tokens gather under load) stops pacing when its request ends (or its
    client goes away): the client's next request waited out the pace (up to 16 ms at 16 running requests), with a
    slot idle meanwhile. Tokens alone let the pace run to its end."""

    async def main() -> None:
        sink = _Sink()
        t = time.perf_counter()
        await sink.pause(0.05)  # nothing comes: the whole pace
        assert time.perf_counter() - t >= 0.045
        for last in (Request.DONE, _Sink.GONE):
            pacer = asyncio.ensure_future(sink.pause(30))
            await asyncio.sleep(0.01)
            threading.Thread(target=lambda: sink.put_many([(0, "a"), (0, "b")])).start()  # tokens: still pacing
            await asyncio.sleep(0.02)
            assert not pacer.done()
            t = time.perf_counter()
            threading.Thread(target=lambda last=last: sink.put_many([(0, "c"), (0, last)])).start()
            await asyncio.wait_for(pacer, 5)
            assert time.perf_counter() - t < 1 and [i for _, i in sink.take()] == ["a", "b", "c", last]
        sink.put((0, Request.DONE))  # an end already there: no pause at all
        t = time.perf_counter()
        await sink.pause(30)
        assert time.perf_counter() - t < 1

    asyncio.run(main())


def test_full_queue_answers_429_with_retry_after(stories):
    with ModelServer(*stories, MODEL, "127.0.0.1", 0, max_batch=1, max_queue=1) as srv, paced(srv.engine):
        e = srv.engine
        long = {"model": MODEL, "prompt": "Once", "max_tokens": 500, "ignore_eos": True}
        running = open_generation(srv, {**long, "stream": True})
        wait_for(lambda: e.active == 1, "the first request to run")
        waiting = open_generation(srv, long)
        wait_for(lambda: e.waiting_groups == 1, "the second request to wait")
        st, headers, out = http(srv, request("POST", "/v1/completions", completion(), JSON))
        assert st == 429 and error(st, out)["code"] == "queue_full" and int(headers["retry-after"]) >= 1
        assert error(st, out)["type"] == "rate_limit_error"
        running.close()
        waiting.close()
        wait_for(lambda: e.active == 0 and e.waiting == 0, "both to be cancelled")
        st, _, out = http(srv, request("POST", "/v1/completions", completion(), JSON))
        assert st == 200


def test_fair_admission_one_call_cannot_starve_another(stories):
    """A call with 8 sequences and a call with 1, on 2 slots: the small one is admitted within the next round,
    not after all 8 (first-come-first-served would admit it 9th)."""
    model, tok = stories
    eng = Engine(model, tok, max_batch=2)
    try:
        sink: queue.SimpleQueue = queue.SimpleQueue()
        p = SamplingParams(temperature=0, max_new_tokens=6)
        eng.submit_group([([tok.bos_id], p, ("big", i)) for i in range(8)], sink)
        eng.submit_group([([tok.bos_id], p, ("small", 0))], sink)
        first: list = []
        done = 0
        while done < 9:
            tag, item = sink.get(timeout=60)
            if item is Request.DONE:
                done += 1
            elif tag not in first:
                first.append(tag)
        assert first.index(("small", 0)) <= 3, first
        assert sorted(first) == sorted([("big", i) for i in range(8)] + [("small", 0)])
    finally:
        eng.close()


def test_a_large_call_does_not_starve_a_small_one(stories):
    """prompt x 4 with n 4 (16 sequences) on 2 slots, then a 5-token call: the small call is answered while most of
    the large one still waits (first-come-first-served would run all 16 first)."""
    with ModelServer(*stories, MODEL, "127.0.0.1", 0, max_batch=2) as srv, paced(srv.engine):
        e = srv.engine
        big = open_generation(srv, {"model": MODEL, "prompt": ["Once", "The dog", "Tom", "A bird"], "n": 4,
                                    "max_tokens": 40, "ignore_eos": True, "temperature": 0})
        wait_for(lambda: e.active == 2 and e.waiting == 14, "the large call to start")
        st, _, out = http(srv, request("POST", "/v1/completions", completion(max_tokens=5, ignore_eos=True), JSON))
        assert st == 200 and json.loads(out)["usage"]["completion_tokens"] == 5
        assert e.waiting >= 8, e.waiting  # most of the large call is still waiting
        big.close()
        wait_for(lambda: e.active == 0 and e.waiting == 0, "the large call to be cancelled")


def test_cli_flags_env_key_and_allowed_hosts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    help_ = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    for flag in ("LMFORGE_API_KEY", "--max-queue", "--allowed-hosts", "--cors-origin", "--threads", "/docs"):
        assert flag in help_, flag
    env = {**os.environ, "LMFORGE_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--port", str(port), "--threads", "1",
                             "--max-queue", "4", "--allowed-hosts", "box.lan"], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}" in line and "threads 1" in line, line
        assert "batch 16 within a 1024 MiB key/value cache" in line, line  # the default's admission budget

        class Srv:
            address = ("127.0.0.1", port)

        st, _, _ = http(Srv, request("GET", "/v1/models", headers={"Authorization": "Bearer from-env"}))
        assert st == 200
        st, _, _ = http(Srv, request("GET", "/v1/models", headers={"Authorization": "Bearer " + KEY}))
        assert st == 401
        st, _, _ = http(Srv, request("GET", "/health", headers={"Host": "box.lan:1", "Authorization": ""}))
        assert st == 200
        st, _, _ = http(Srv, request("GET", "/health", headers={"Host": "other.lan"}))
        assert st == 400
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--threads", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "--threads" in bad.stderr and "Traceback" not in bad.stderr
    # an origin CORS could never match (a browser sends scheme://host[:port]) is refused, not silently useless
    for origin in ("evil", "localhost:3000", "http://app.example/", "http://app.example:99999", "ftp://x"):
        bad = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--cors-origin", origin],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "not a web origin" in bad.stderr and "Traceback" not in bad.stderr, origin
    from lmforge.commands.args import origin_type

    assert origin_type("HTTP://App.Example:3000") == "http://app.example:3000" and origin_type("*") == "*"


def test_default_threads_and_batch_rules(stories):
    from lmforge.commands.serve import DEFAULT_MAX_BATCH, default_threads

    model, _ = stories
    assert default_threads(model, cores=8) == 8  # all cores, the serving thread keeping one (see Engine)

    class Big:
        def parameters(self):
            import torch

            return iter([torch.empty(1, dtype=torch.float32).expand(300 << 18)])  # 300 MiB of float32, no memory

        def buffers(self):
            return iter([])

    assert default_threads(Big(), cores=8) == 8 and default_threads(Big(), cores=1) == 1
    assert DEFAULT_MAX_BATCH == 16  # with the cache budget below


def test_requests_are_admitted_while_the_cache_stays_within_the_budget(stories):
    """The engine admits a request only while the key/value cache, every running request at its limit, stays within
    ``kv_budget`` (what `lmforge serve` gives its default --max-batch): requests that may fill the context run two
    at a time under a budget of two full slots, short ones four at a time (an idle engine gives back a cache far
    longer than its next request needs)."""
    model, tok = stories
    probe = SlotRunner(model, 4)
    assert probe.max_len == 512 == 2 * MIN_CACHE_LEN
    eng = Engine(model, tok, max_batch=4, kv_budget=2 * probe.max_len * probe.per_pos)
    ids = [tok.bos_id] + tok.encode("Once upon a time")
    try:
        for max_new, together in ((1000, 2), (20, 4)):
            wait_for(lambda: eng.active == 0, "the engine to be idle")
            eng.max_active = 0
            reqs = eng.submit_group([(ids, SamplingParams(temperature=0, max_new_tokens=max_new), i)
                                     for i in range(4)])
            outs = [[st.token for st in r] for r in reqs]
            assert len({tuple(o) for o in outs}) == 1 and len(outs[0]) == min(max_new, probe.max_len - len(ids))
            assert eng.max_active == together, (max_new, eng.max_active)
        assert (eng.runner.slots, eng.runner.cap) == (4, 256)  # the long requests' cache was given back
    finally:
        eng.close()


def test_an_exception_inside_a_stream_ends_it_with_an_error_event(server, monkeypatch):
    """A bug after the head was sent cannot change the status: the client gets an error event and [DONE] in a body
    that ends properly (it used to be cut off mid-chunk, curl exit 18), and the server goes on serving."""
    real = S._EventStream._events

    async def failing(self):
        async for data, _last in real(self):
            yield data, False  # the first events go out, then the bug
            raise RuntimeError("a bug in the stream")

    monkeypatch.setattr(S._EventStream, "_events", failing)
    s = open_generation(server, {"model": MODEL, "prompt": "Once", "max_tokens": 20, "stream": True,
                                 "ignore_eos": True})
    try:
        body = chunks(s)
    finally:
        s.close()
    assert body[-1] == b"" and body[-2].endswith(b"data: [DONE]\n\n")  # a whole chunked body
    events = [json.loads(e[6:]) for c in body for e in c.split(b"\n\n") if e.startswith(b"data: {")]
    assert events[0]["choices"] and events[-1]["error"]["code"] == "internal_error"
    assert "RuntimeError: a bug in the stream" in events[-1]["error"]["message"]
    monkeypatch.undo()
    status, _, answer = http(server, request("POST", "/v1/completions", completion(), JSON))
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2
