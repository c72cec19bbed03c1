"""`lmforge serve` through the official openai client: models, chat and completions (plain and streamed), usage,
stop, n/seed, logprobs, errors, limits, concurrency (16 streaming clients), and a client that goes away."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="needs the openai client (pip install openai)")

from pacing import paced  # noqa: E402

from lmforge.infer.chat import encode_chat, end_of_turn  # noqa: E402
from lmforge.infer.generate import complete  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.serve.server import ModelServer  # noqa: E402

KEY = "test-key"
MODEL = "stories260K.bin"


@pytest.fixture(scope="module")
def server(stories):
    model, tok = stories
    srv = ModelServer(model, tok, MODEL, "127.0.0.1", 0, api_key=KEY, max_batch=16, max_body=64 * 1024,
                      aliases=("stories260K",)).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_reference(stories, messages, max_tokens, **kw):
    model, tok = stories
    ids = encode_chat(tok, "plain", messages)
    stops, stop_ids = end_of_turn("plain", tok)
    p = SamplingParams(temperature=0, max_new_tokens=max_tokens, stop=stops + kw.pop("stop", []), stop_ids=stop_ids,
                       **kw)
    return ids, complete(model, tok, ids, p)


def completion_reference(stories, prompt, max_tokens, **kw):
    model, tok = stories
    ids = [tok.bos_id] + tok.encode(prompt)
    p = SamplingParams(max_new_tokens=max_tokens, stop_ids=[tok.eos_id, tok.bos_id], **kw)
    return ids, complete(model, tok, ids, p)


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_matches_library_generation(client, stories):
    msgs = [{"role": "user", "content": "Tell me a story about a frog."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
    ids, ref = chat_reference(stories, msgs, 40)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    assert r.usage.total_tokens == len(ids) + len(ref.token_ids)


def test_chat_streaming_equals_non_streaming(client, server, stories):
    msgs = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story about a bee"}]
    with paced(server.engine):  # decode steps of >= 2 ms: a busy machine cannot gather every token in one event
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=50,
                                                     stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids, ref = chat_reference(stories, msgs, 50)
    assert text == ref.text
    # really streamed: in several events (each gathers the tokens of STREAM_PACE; stories260K decodes several a ms)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and chunks[-1].usage.prompt_tokens == len(ids)


def test_completions_stop_n_seed_and_logprobs(client, stories):
    _, full = completion_reference(stories, "Once upon a time", 40, temperature=0)
    stop = full.text[25:29]
    r = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=40, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == full.text.split(stop)[0] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt=["Once upon a time", "The dog"], max_tokens=20,
                                  temperature=0.9, seed=7, n=2, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for k, c in enumerate(r.choices):
        prompt = ["Once upon a time", "The dog"][k // 2]
        ids, ref = completion_reference(stories, prompt, 20, temperature=0.9, seed=7 + k % 2)
        assert c.text == ref.text
        full_ids = ids + ref.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(stories[0](torch.tensor([full_ids]))[0], -1)
        want = [float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(ref.token_ids)]
        assert c.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
        assert len(c.logprobs.top_logprobs[0]) == 2
    assert r.choices[0].text != r.choices[1].text  # n choices differ
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=0, echo=True)
    assert r.choices[0].text == "Once" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0


def test_completion_streaming_and_token_prompt(client, server, stories):
    _, tok = stories
    ids = [tok.bos_id] + tok.encode("Tom and Sue")
    with paced(server.engine):  # events gather the tokens of STREAM_PACE per running request
        parts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=ids, max_tokens=30,
                                                                        temperature=0, stream=True)]
    _, ref = completion_reference(stories, "Tom and Sue", 30, temperature=0)
    assert "".join(parts) == ref.text and sum(1 for p in parts if p) > 1
    # streamed logprobs count text_offset into the whole choice (each chunk's began at 0), echo included
    for echo in (False, True):
        kw = dict(model=MODEL, prompt="Tom and Sue", max_tokens=12, temperature=0, logprobs=1, echo=echo)
        whole = client.completions.create(**kw).choices[0].logprobs
        with paced(server.engine):
            chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)
                      if c.choices and c.choices[0].logprobs]
        assert len(chunks) > 1 and [o for c in chunks for o in c.text_offset] == whole.text_offset
        n = len(ids) if echo else 0  # with echo the prompt's tokens come first
        assert [t for c in chunks for t in c.tokens] == whole.tokens and whole.text_offset[n] == (11 if echo else 0)
    from lmforge.serve.protocol import token_str  # a special token is its name, not "" (two collided as keys)

    assert (token_str(tok, tok.eos_id), token_str(tok, tok.bos_id)) == ("</s>", "<s>")


def test_echo_with_logprobs_scores_the_prompt(client, server, stories):
    """``echo`` with ``logprobs`` (what lm-evaluation-harness' ``local-completions`` sends to score a continuation:
    max_tokens 1, logprobs 1, echo true): every prompt token's logprob under the model, the first null, then the
    generated ones; text prompts (BOS added) and token-id prompts, streamed and not, max_tokens 0 and n choices."""
    model, tok = stories
    text = "Tom and Sue went to the park"
    ids = [tok.bos_id] + tok.encode(text)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    _, ref = completion_reference(stories, text, 1, temperature=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + ref.token_ids]))[0].double(), -1)
    full = ids + ref.token_ids
    assert len(lp.token_logprobs) == len(full) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(logp[i - 1, t]) for i, t in enumerate(full) if i], abs=1e-4)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert r.choices[0].text == tok.decode(ids) + ref.text and lp.text_offset == sorted(lp.text_offset)
    # the harness' sum over the continuation: the scorer's log-likelihood of the last three tokens
    cont = float(sum(logp[i - 1, full[i]] for i in range(len(ids) - 3, len(ids))))
    assert sum(lp.token_logprobs[len(ids) - 3 : -1]) == pytest.approx(cont, abs=1e-4)
    # a text prompt: the same numbers; max_tokens 0: the prompt's alone; n choices each carry them
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, logprobs=2, echo=True, n=2)
    for c in r.choices:
        assert c.text == text and c.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1 : len(ids)],
                                                                                  abs=1e-6)
        assert len(c.logprobs.tokens) == len(ids) and len(c.logprobs.top_logprobs[1]) == 2
    # streamed: the echo chunk carries the prompt's logprobs, then the generated tokens follow
    kw = dict(model=MODEL, prompt=text, max_tokens=5, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert chunks[0].text == text and len(chunks[0].logprobs.tokens) == len(ids)
    assert "".join(c.text for c in chunks) == whole.text
    got = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert got[0] is None and got[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-6)


def error_of(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


def test_errors(client, server):
    msgs = [{"role": "user", "content": "hi"}]
    e = error_of(lambda: client.chat.completions.create(model=MODEL, messages=msgs, temperature=3))
    assert e.status_code == 400 and e.body["param"] == "temperature" and e.body["type"] == "invalid_request_error"
    assert set(e.body) == {"message", "type", "param", "code"}
    e = error_of(lambda: client.chat.completions.create(model=MODEL, messages=msgs, extra_body={"bogus": 1}))
    assert e.status_code == 400 and e.body["param"] == "bogus"
    e = error_of(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}]))
    assert e.status_code == 400 and e.body["param"] == "messages"
    e = error_of(lambda: client.chat.completions.create(model="gpt-4", messages=msgs))
    assert e.status_code == 404 and e.body["code"] == "model_not_found"
    e = error_of(lambda: client.completions.create(model=MODEL, prompt="x " * 600, max_tokens=5))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    e = error_of(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=100000))
    assert e.status_code == 400 and e.body["param"] == "max_tokens"
    e = error_of(lambda: client.completions.create(model=MODEL, prompt="hello", max_tokens=510))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    e = error_of(lambda: bad_key.models.list())
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key"


def raw_request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def test_raw_http_errors(server):
    st, body = raw_request(server, "POST", "/v1/chat/completions", b"{not json",
                           {"Content-Type": "application/json"})
    assert st == 400 and "JSON" in body["error"]["message"]
    st, body = raw_request(server, "POST", "/v1/completions", b"x" * (65 * 1024))
    assert st == 413 and body["error"]["code"] == "request_too_large"
    st, body = raw_request(server, "POST", "/v1/nothing", b"{}")
    assert st == 404
    st, body = raw_request(server, "GET", "/v1/models", headers={"Authorization": ""})
    assert st == 401
    st, body = raw_request(server, "POST", "/v1/completions", b"[1, 2]", {"Content-Type": "application/json"})
    assert st == 400
    # no model: the served one, as vLLM's and llama.cpp's servers answer (it was 400 "model: required")
    js = {"Content-Type": "application/json"}
    body = json.dumps({"prompt": "Once", "max_tokens": 3, "temperature": 0}).encode()
    st, body = raw_request(server, "POST", "/v1/completions", body, js)
    assert st == 200 and body["model"] == MODEL and body["usage"]["completion_tokens"] == 3
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    st, body = raw_request(server, "POST", "/v1/chat/completions", body, js)
    assert st == 200 and body["model"] == MODEL
    st, body = raw_request(server, "POST", "/v1/completions", json.dumps({"model": "", "prompt": "x"}).encode(),
                           {"Content-Type": "application/json"})
    assert st == 400 and body["error"]["param"] == "model"


def test_client_disconnect_mid_stream_frees_the_slot(server, client):
    host, port = server.address
    s = socket.create_connection((host, port))
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 400, "stream": True,
                       "ignore_eos": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data:" not in got:
        got += s.recv(4096)
    s.close()
    deadline = time.time() + 30
    while server.engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.active == 0
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices  # still serving


def test_a_request_not_streamed_wakes_the_loop_for_its_end_only(server, client, monkeypatch):
    """It woke its coroutine for every token (the engine's thread taking the interpreter lock as often): one
    client's 128-token requests 15.4 -> 11 ms, 16 clients 31.8k -> 42.3k tokens/s."""
    import lmforge.serve.server as srv_mod

    wakes = []
    wake = srv_mod._wake
    monkeypatch.setattr(srv_mod, "_wake", lambda fut: wakes.append(1) or wake(fut))
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=200, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 200 and len(wakes) <= 3, len(wakes)


def test_sixteen_concurrent_streaming_clients(server, client, stories):
    prompts = [f"{w} went to the" for w in ["Tom", "Sue", "Ben", "Lily", "Max", "Anna", "Tim", "Mia", "The dog",
                                            "A bird", "The king", "Sam", "Zoe", "The cat", "Lucy", "Jack"]]
    lengths = [20 + 3 * i for i in range(16)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def run(i):
        try:
            barrier.wait()
            stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                               stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    server.engine.max_active = 0
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    with paced(server.engine):  # each request runs >= 40 ms: all 16 overlap however slowly their requests come
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    for i in range(16):
        assert results[i] == completion_reference(stories, prompts[i], lengths[i], temperature=0)[1].text, i
    assert server.engine.max_active > 4  # decoded together


def test_cli_serve_binds_localhost_and_answers(tmp_path):
    from lmforge.cli import COMMANDS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--port", str(port), "--max-batch", "2"]
    if any(c[0] == "serve" for c in COMMANDS):
        cmd = [sys.executable, "-m", "lmforge", "serve", *args]
    else:
        code = ("import argparse, sys; from lmforge.commands import serve; p = argparse.ArgumentParser(); "
                "s = p.add_subparsers(); serve.add_parser(s, 'serve', ''); a = p.parse_args(sys.argv[1:]); a.func(a)")
        cmd = [sys.executable, "-c", code, "serve", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}" in line and "batch 2," in line, line  # an explicit --max-batch: no budget
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["stories260K.bin"]
    finally:
        proc.terminate()
        proc.wait(10)
