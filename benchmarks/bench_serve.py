"""Aggregate generation throughput of `lmforge serve` with 1, 4 and 16 concurrent clients (streaming by default),
against `lmforge generate` on the same model.

    python benchmarks/bench_serve.py [--model PATH] [--tokens 128] [--requests 3] [--min-seconds 1]
                                     [--clients 1 4 16] [--rounds 3]
                                     [--threads N] [--max-batch N] [--no-generate] [--connections new|keep|both]
                                     [--runtime auto|lean|torch] [--kv-cache-dtype auto|float16|float32]
                                     [--stream | --no-stream] [--temperature 0] [--top-p 1]

The server (`lmforge serve`, with its default --threads and --max-batch unless given) runs in a child process on a
free 127.0.0.1 port; each client thread sends ``--requests`` streaming completions one after another (greedy
unless ``--temperature``/``--top-p`` say otherwise, ``ignore_eos`` so every request yields ``--tokens`` tokens) and
reads the server-sent events to the end (with ``--no-stream``: the whole answer in one JSON body, as OpenAI's client
asks unless told to stream), and goes on
sending until ``--min-seconds`` have passed since the clients started (a load test's fixed duration: one start and
one tail a measurement; one client's 3 requests alone took 0.04 s, and a 16-client run of 3 requests each spent a
sixth of its time in its start and tail, where fewer than 16 requests ran). Two figures, best of ``--rounds`` rounds
in which the client counts alternate: "whole run" = completion tokens of all clients / wall time (start and tail
included), "steady" = tokens the server generated (its /health counter) from 20 % of ``--min-seconds`` to its end,
while every client is still sending (a server's throughput at that load). Each round measures a new connection per
request and one kept-alive connection per client (OpenAI's client keeps its connections), unless ``--connections``
picks one. Targets (issue 14): one client >= 0.8x
`lmforge generate` (measured here too, best of the rounds), and 16 clients >= 4x one client (continuous batching
decodes all running requests together); the `generate` ratio is taken with a new connection per request. With two or
more rounds the ratio of each round (its client counts measured back to back) is printed too, with their median: the
machine's speed drifts between runs.

To re-take the --threads default's measurement on a quiet machine, run it for a tiny and a large model with
``--threads 1`` and ``--threads <cores>``: the default is all cores (``lmforge.commands.serve.default_threads``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "Tom had a big red ball", "The cat sat", "Lily and her mom", "One day a bird",
           "Ben was sad", "The sun was hot", "Sue found a box"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_ID = "stories260K.bin"
SAMPLING = {"temperature": 0.0, "top_p": 1.0}  # every request's (--temperature, --top-p; greedy by default)
CONN = {False: "new connection per request", True: "kept-alive connections"}


def stream_completion(port: int, prompt: str, tokens: int, conn: http.client.HTTPConnection | None = None,
                      stream: bool = True) -> int:
    """Completion tokens of one completion, streamed unless ``stream`` is false; on ``conn`` (kept alive) if given,
    else on a connection of its own."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    req = {"model": MODEL_ID, "prompt": prompt, "max_tokens": tokens, **SAMPLING, "ignore_eos": True}
    if stream:
        req.update(stream=True, stream_options={"include_usage": True})
    conn.request("POST", "/v1/completions", body=json.dumps(req), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    if not stream:
        body = json.loads(resp.read())
        if own:
            conn.close()
        return body["usage"]["completion_tokens"]
    tail = b""
    while True:  # read the stream as it comes; only the last events (usage, [DONE]) are parsed
        block = resp.read1(65536)
        if not block:
            break
        tail = (tail + block)[-4096:]
    if own:
        conn.close()
    events = [e for e in tail.split(b"\n\n") if e.startswith(b"data: {")]
    if not tail.rstrip().endswith(b"data: [DONE]") or not events:
        raise RuntimeError(f"stream did not end with usage and [DONE]: {tail[-300:]!r}")
    return json.loads(events[-1][6:])["usage"]["completion_tokens"]


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def run_clients(port: int, clients: int, requests: int, tokens: int, keep: bool = False, stream: bool = True,
                seconds: float = 0.0) -> tuple[float, int, tuple[float, int] | None]:
    """``clients`` threads each sending completions one after another (streamed unless ``stream`` is false): at least
    ``requests`` each, and more until ``seconds`` have passed since they started; ``keep``: each client sends them on
    one kept-alive connection (as OpenAI's client does), else one each. Returns (seconds, completion tokens, steady),
    the first two over the whole run (its ramp and tail included), ``steady`` (seconds, tokens the server generated)
    between 20 % of ``seconds`` and ``seconds``, while every client was still sending (None without ``seconds``)."""
    counts = [0] * clients
    errors: list[BaseException] = []
    t0 = [0.0]
    start = threading.Barrier(clients + 1, action=lambda: t0.__setitem__(0, time.perf_counter()))

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300) if keep else None
        start.wait()
        try:
            r = 0
            while r < requests or time.perf_counter() - t0[0] < seconds:
                counts[i] += stream_completion(port, PROMPTS[(i + r) % len(PROMPTS)], tokens, conn, stream)
                r += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            if conn is not None:
                conn.close()

    def sample() -> tuple[float, int]:  # (when, server's generated tokens), timed at the middle of the request
        a = time.perf_counter()
        n = health(port)["tokens"]
        return (a + time.perf_counter()) / 2, n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    steady = None
    if seconds > 0:  # clients start requests until `seconds` have passed: all of them are sending until then
        time.sleep(max(0.0, t0[0] + 0.2 * seconds - time.perf_counter()))
        a = sample()
        time.sleep(max(0.0, t0[0] + seconds - 0.01 - time.perf_counter()))
        b = sample()
        steady = b[0] - a[0], b[1] - a[1]
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0[0]
    if errors:
        raise errors[0]
    return dt, sum(counts), steady


def generate_rate(model: list[str], tokens: int, env: dict) -> tuple[float, float]:
    """Tokens/s `lmforge generate` reports for one sequence (sampled as the requests are): overall, and after the
    first token (a served model has built its kernel layouts before the first request; generate builds them for its
    first token)."""
    r = subprocess.run([sys.executable, "-m", "lmforge", "generate", *model,
                        "--temperature", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
                        "--max-new-tokens", str(tokens), "--prompt", PROMPTS[0]], env=env, capture_output=True,
                       text=True)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("achieved tok/s:")]
    if r.returncode or not line:
        raise SystemExit(f"lmforge generate failed: {r.stderr[-500:]}")
    then = re.search(r"then ([\d.]+) tok/s", line[0])
    overall = float(line[0].split()[2])
    return overall, float(then.group(1)) if then else overall


def model_id(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out["data"][0]["id"]


def resident_mb(pid: int) -> tuple[int, int] | None:
    """(resident, peak resident) MB of process ``pid`` (Linux's /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            d = {ln.split(":")[0]: int(ln.split()[1]) >> 10 for ln in f if ln.startswith(("VmRSS", "VmHWM"))}
        return d["VmRSS"], d["VmHWM"]
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    global MODEL_ID
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model path (default: the bundled stories260K)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="each client sends requests until this long has passed since the clients started, at least "
                    "--requests (0: --requests each, and no steady figure)")
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: its own)")
    ap.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the client counts; the best is reported")
    ap.add_argument("--no-generate", action="store_true", help="skip the `lmforge generate` comparison")
    ap.add_argument("--runtime", choices=["auto", "lean", "torch"], default=None,
                    help="the server's and generate's --runtime (default: their own, auto: lean for an int4 directory)")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "float16", "float32"], default=None,
                    help="the server's and generate's --kv-cache-dtype (default: their own)")
    ap.add_argument("--connections", choices=["new", "keep", "both"], default="both",
                    help="a new connection per request, one kept-alive connection per client (as OpenAI's client "
                    "keeps them), or both in each round (default)")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                    help="streamed completions (server-sent events, the default) or whole JSON answers (--no-stream)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="every request's temperature (default 0: greedy; OpenAI's clients send 1 unless told)")
    ap.add_argument("--top-p", type=float, default=1.0, help="every request's top_p (default 1: off)")
    args = ap.parse_args()
    SAMPLING.update(temperature=args.temperature, top_p=args.top_p)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    model = ["--model", args.model] if args.model else []
    if args.runtime:
        model += ["--runtime", args.runtime]
    if args.kv_cache_dtype:
        model += ["--kv-cache-dtype", args.kv_cache_dtype]
    extra = [*model]
    for flag, v in (("--threads", args.threads), ("--max-batch", args.max_batch)):
        if v is not None:
            extra += [flag, str(v)]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--port", str(port), *extra],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        if "serving" not in line:
            raise SystemExit(f"server did not start: {line}{proc.stderr.read()}")
        print(line.strip())
        MODEL_ID = model_id(port)
        stream_completion(port, "warm up", 8)
        warm = resident_mb(proc.pid)
        print(f"lmforge serve, {MODEL_ID}, {args.tokens} tokens per request, {args.requests} requests per client "
              f"(more until {args.min_seconds:g} s have passed), " + ("streamed" if args.stream else "not streamed"))
        modes = {"new": (False,), "keep": (True,), "both": (False, True)}[args.connections]
        kinds = ("whole run", "steady") if args.min_seconds > 0 else ("whole run",)
        best: dict[tuple[str, bool, int], float] = {}
        each: dict[tuple[str, bool, int], list[float]] = {}  # every round's rate
        for r in range(args.rounds):  # client counts alternate within a round: all see the same machine load
            for keep in modes:
                for c in args.clients:
                    before = health(port)
                    dt, n, steady = run_clients(port, c, args.requests, args.tokens, keep, args.stream,
                                                args.min_seconds)
                    after = health(port)
                    steps = after["steps"] - before["steps"]
                    busy = after["decode_seconds"] - before["decode_seconds"]
                    rate = {"whole run": n / dt}
                    if steady:
                        rate["steady"] = steady[1] / steady[0]
                    for kind in kinds:
                        best[kind, keep, c] = max(best.get((kind, keep, c), 0.0), rate[kind])
                        each.setdefault((kind, keep, c), []).append(rate[kind])
                    print(f"round {r + 1}, {CONN[keep]}: {c:3d} clients: {n:6d} tokens in {dt:6.2f} s = {n / dt:8.0f} "
                          f"tok/s aggregate ({n / dt / c:6.0f} tok/s per client; {steps} decode steps, "
                          f"{n / max(steps, 1):.1f} rows/step, {busy / max(steps, 1) * 1e3:.2f} ms/step, decoding "
                          f"{busy / dt:.0%} of the time)" + (f"; steady {rate['steady']:8.0f} tok/s" if steady else ""))
        for kind in kinds:
            for keep in modes:
                print(f"best of rounds, {kind}, {CONN[keep]}: " + ", ".join(
                    f"{c} clients {best[kind, keep, c]:.0f} tok/s" for c in args.clients))
                if (kind, keep, 1) in best:
                    for c in args.clients:
                        if c != 1:
                            print(f"  {c} clients / 1 client: {best[kind, keep, c] / best[kind, keep, 1]:.2f}x "
                                  "(target >= 4x for 16)")
                            per = sorted(a / b for a, b in zip(each[kind, keep, c], each[kind, keep, 1]))
                            if len(per) > 1:  # the machine's speed drifts: the ratio within each round shows how much
                                print(f"    within each round: {', '.join(f'{r:.2f}x' for r in per)} "
                                      f"(median {statistics.median(per):.2f}x)")
        rates = {c: best["whole run", modes[0], c] for c in args.clients}
        end = resident_mb(proc.pid)
        if warm and end:
            print(f"server memory: {warm[0]} MB resident after one request, {end[0]} MB at the end, peak {end[1]} MB")
    finally:
        proc.terminate()
        proc.wait(10)
    if not args.no_generate and 1 in rates:  # after the server stopped: the two never share the cores
        runs = [generate_rate(model, args.tokens, env) for _ in range(args.rounds)]
        gen, then = max(r[0] for r in runs), max(r[1] for r in runs)
        print(f"lmforge generate: {gen:.0f} tok/s; one client / generate: {rates[1] / gen:.2f}x (target >= 0.8x)")
        print(f"  generate after its first token (the prompt's pass, kernel layouts): {then:.0f} tok/s; one client / "
              f"that: {rates[1] / then:.2f}x")


if __name__ == "__main__":
    main()
