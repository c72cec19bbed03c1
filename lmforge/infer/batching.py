"""Continuous batching: requests wait in a queue, enter a free slot of the key/value cache as soon as one is free
(prefill), and every loop iteration decodes all active slots together. A finished or cancelled request frees its
slot without stopping the others (a cancelled one at the next step). Requests submitted together (``submit_group``:
the n choices of one API call) wait as a group, and free slots go round-robin over the waiting groups, so one call
with 256 sequences cannot starve a call with one.

Without PyTorch: the runner (the model's decoding) and the token selection are given (``BatchEngine``).
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
import traceback
from collections.abc import Iterator

from lmforge.infer.params import SamplingParams
from lmforge.infer.sequence import Sequence, Step, prompt_scores


class EngineError(RuntimeError):
    """A request failed inside the engine (the engine itself keeps running)."""


class Request:
    """One submitted generation: iterate it for ``Step``s; then ``finish_reason``, ``token_ids``, ``prompt_len``.

    Events go to a queue of ``(tag, item)`` pairs: the request's own, or one shared by several requests (pass
    ``sink``) so a caller can follow them all; an item is a ``Step``, ``Request.DONE`` or, first, the prompt's
    ``PromptScores`` when ``params.prompt_logprobs`` asked for them.
    """

    DONE = object()

    def __init__(self, seq: Sequence, sink: queue.SimpleQueue | None = None, tag=None) -> None:
        self.seq, self.tag = seq, tag
        self._q = sink if sink is not None else queue.SimpleQueue()
        self.cancelled = False
        self.error: str | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.seq.finish_reason

    @property
    def token_ids(self) -> list[int]:
        return self.seq.out_ids

    @property
    def prompt_len(self) -> int:
        return len(self.seq.prompt_ids)

    @property
    def text(self) -> str:
        return self.seq.output_text

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine frees the slot at its next step."""
        self.cancelled = True

    def _put(self, item) -> None:
        self._q.put((self.tag, item))

    def _put_last(self, step) -> None:
        """The last step (or None) and DONE together: a sink with ``put_many`` gets them in one call, so its
        reader never sees the last token without the end."""
        items = ([(self.tag, step)] if step is not None else []) + [(self.tag, Request.DONE)]
        put_many = getattr(self._q, "put_many", None)
        if put_many is not None:
            put_many(items)
        else:
            for item in items:
                self._q.put(item)

    def __iter__(self) -> Iterator[Step]:
        while True:
            _, item = self._q.get()
            if item is Request.DONE:
                if self.error is not None:
                    raise EngineError(self.error)
                return
            yield item

    def result(self) -> list[Step]:
        return list(self)


class BatchEngine:
    """Continuous batching over ``max_batch`` slots in a background thread. ``submit`` is thread-safe.

    The engine schedules; a runner decodes. ``runner`` has ``max_len`` and ``nv`` (positions each slot may hold, and
    how many of them virtual tokens take), ``prefill(slot, ids, every=False)`` (the logits (V,) after a prompt;
    ``every``: (len(ids), V) after each of its tokens),
    ``prefill_many(slots, prompts)`` (B, V), ``decode(tokens)`` (a token or None per slot: the logits (k, V) of the
    k slots given a token, in slot order), ``cache_bytes(slots, length)`` and ``idle(positions)`` (nothing runs; the
    next request needs that many positions); optionally ``start(tokens)`` (a ``decode`` begun in the background: True
    if it was) and ``finish()`` (its logits). ``select(logits, samplers, rows=None)`` picks tokens from ``rows`` of
    ``logits`` (default all) with samplers of type ``sampler_type``: ``lmforge.infer.engine.Engine`` decodes a
    PyTorch model, ``lmforge.infer.lean.LeanEngine`` an int4 directory without PyTorch.

    ``kv_budget``: bytes the key/value cache may grow to. A waiting request is admitted only while the cache, with
    every running request at its prompt plus its limit, stays within it (a request alone always is); the others
    wait their turn. None: every free slot takes a request.

    ``speculator`` (an attribute, ``lmforge.infer.speculative.Speculator`` or None): while one request runs alone,
    its tokens come from rounds of speculative decoding (several a pass over the weights) instead of one-row
    steps."""

    def __init__(self, runner, vocab_size: int, select, sampler_type: type, tokenizer=None, max_batch: int = 8,
                 kv_budget: int | None = None) -> None:
        self.runner, self.vocab_size, self.tokenizer, self.kv_budget = runner, vocab_size, tokenizer, kv_budget
        self._select, self._sampler_type = select, sampler_type
        self.speculator = None  # set by the caller (it reads runner.max_len)
        # the context requests get: prefix/prompt tuning's virtual tokens take the start of every slot
        self.max_len = self.runner.max_len - self.runner.nv
        self._waiting: collections.OrderedDict[int, collections.deque[Request]] = collections.OrderedDict()
        self._group_ids = iter(range(1 << 62))
        self._slots: list[Request | None] = [None] * max_batch
        self._last: list[int | None] = [None] * max_batch
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # batched decode steps run (for tests and statistics)
        self.tokens = 0  # tokens generated
        self.busy = 0.0  # seconds spent in decode steps (a step begun in the background: from its start to the end of
        # its computation, as the runner measured it, then its tokens' selection)
        self.prefill_batches = 0  # prefills of several prompts in one forward
        self.max_active = 0
        self.cancelled = 0  # requests stopped by cancel() before they finished
        # the step begun in the background (runner.start) while the step before it is reported: its rows' (slot,
        # request), their slots and samplers, and _frees then; None when no step is under way
        self._started: tuple[list[tuple[int, Request]], list[int], list, int] | None = None
        self._frees = 0  # slots freed so far (a begun step's rows all still run if none was freed since)
        self.started_steps = self.started_rows = 0  # steps begun in the background, their rows (for tests, statistics)
        self._can_start = callable(getattr(runner, "start", None))
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def _thread_setup(self) -> None:
        """Called first in the engine's thread."""

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: queue.SimpleQueue | None = None,
               tag=None) -> Request:
        """Queue a request. Raises ValueError for an empty prompt, one that fills the context, or bad params.
        Events go to the request's own queue, or to ``sink`` (anything with ``put``) as ``(tag, item)``."""
        return self.submit_group([(prompt_ids, params, tag)], sink)[0]

    def submit_group(self, items: list[tuple[list[int], SamplingParams, object]], sink=None) -> list[Request]:
        """Queue ``(prompt_ids, params, tag)`` requests as one group (all or none: a ValueError queues nothing).
        Waiting groups take free slots in turn, one request at a time."""
        reqs = [self._request(ids, params, sink, tag) for ids, params, tag in items]
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if reqs:
                self._waiting[next(self._group_ids)] = collections.deque(reqs)
            self._cv.notify()
        return reqs

    def _request(self, prompt_ids: list[int], params: SamplingParams, sink, tag) -> Request:
        params.check()
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context of {self.max_len}")
        vocab = self.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
        seq = Sequence(prompt_ids, params, self.tokenizer, self.max_len, vocab, self._sampler_type)
        return Request(seq, sink, tag)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        with self._cv:
            return sum(len(g) for g in self._waiting.values())

    @property
    def waiting_groups(self) -> int:
        """Groups (API calls) with a request waiting for a slot."""
        return len(self._waiting)

    def _head(self) -> Request:
        """The request ``_next_waiting`` would take (call with the lock held)."""
        return self._waiting[next(iter(self._waiting))][0]

    def _next_waiting(self) -> Request:
        """The next request to admit: round-robin over the waiting groups (call with the lock held)."""
        key = next(iter(self._waiting))
        group = self._waiting[key]
        req = group.popleft()
        if group:
            self._waiting.move_to_end(key)
        else:
            del self._waiting[key]
        return req

    # ---- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        self._thread_setup()
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not any(self._slots):
                    self._cv.wait()
                if self._closed:
                    break
                if self._waiting and not any(self._slots):  # idle: the runner may give back a long cache
                    try:
                        self.runner.idle(self._need(self._head()))
                    except Exception:  # noqa: BLE001 - the cache is only kept; the engine's thread must not end
                        traceback.print_exc(file=sys.stderr)
                admitted = []
                try:
                    self._drop_cancelled_waiting()
                    while self._waiting and None in self._slots:
                        slot = self._slots.index(None)
                        if not self._fits(slot, self._head()):
                            break
                        self._slots[slot] = req = self._next_waiting()
                        admitted.append((slot, req))
                except Exception as e:  # noqa: BLE001 - the waiting requests fail, the engine and running ones go on
                    traceback.print_exc(file=sys.stderr)
                    for req in [r for g in self._waiting.values() for r in g]:
                        self._fail(req, f"{type(e).__name__}: {e}")
                    self._waiting.clear()
            try:
                if admitted:
                    if self._started is not None:  # a prefill waits for the step under way
                        self._decode_step(start_next=False)
                    self._admit_many(admitted)
                    self.max_active = max(self.max_active, self.active)
                self._drop_cancelled()
                self._settle()
                if self._started is not None:
                    self._decode_step()
                elif any(t is not None for t in self._last):
                    if self.speculator is not None and self.active == 1 and not self._waiting:
                        self._speculate()  # one request alone: several tokens a pass over the weights
                    else:
                        self._decode_step()
            except Exception as e:  # noqa: BLE001 - a bug must not leave requests waiting forever
                traceback.print_exc(file=sys.stderr)
                self._settle(always=True)
                for i, req in enumerate(self._slots):
                    if req is not None:
                        self._free(i)
                        self._fail(req, f"{type(e).__name__}: {e}")
        self._settle(always=True)
        for req in [*(r for g in self._waiting.values() for r in g), *(r for r in self._slots if r is not None)]:
            self._fail(req, "the engine was closed")

    def _need(self, req: Request) -> int:
        """Cache positions ``req`` may fill: its prompt and every token it may generate."""
        return self.runner.nv + len(req.seq.prompt_ids) + req.seq.limit

    def _fits(self, slot: int, req: Request) -> bool:
        """Whether admitting ``req`` into ``slot`` keeps the cache within ``kv_budget`` even when every running
        request runs to its limit (a request alone is always admitted). Without a budget, always."""
        running = [(i, r) for i, r in enumerate(self._slots) if r is not None]
        if self.kv_budget is None or not running:
            return True
        slots = max(slot, *(i for i, _ in running)) + 1
        length = max(self._need(req), *(self._need(r) for _, r in running))
        return self.runner.cache_bytes(slots, length) <= self.kv_budget

    def _admit_many(self, admitted: list[tuple[int, Request]]) -> None:
        """Prefill new requests together (in groups of similar length); a failing group is retried one by one."""
        live = []
        for slot, req in admitted:
            if req.seq.params.prompt_logprobs is not None:  # its prompt is scored: a prefill of its own
                self._admit(slot, req)
            elif req.cancelled or req.seq.finish_reason is not None:  # cancelled, or nothing to generate
                self._free(slot)
                req._put(Request.DONE)
            else:
                live.append((slot, req))
        live.sort(key=lambda sr: len(sr[1].seq.prompt_ids))
        groups: list[list[tuple[int, Request]]] = []
        for sr in live:  # padding to the longest prompt of a group costs at most as much as the real tokens
            n = len(sr[1].seq.prompt_ids)
            g = groups[-1] if groups else None
            if g is not None and (len(g) + 1) * n <= max(2 * (n + sum(len(r.seq.prompt_ids) for _, r in g)), 64):
                g.append(sr)
            else:
                groups.append([sr])
        for g in groups:
            if len(g) == 1:
                self._admit(*g[0])
                continue
            try:
                logits = self.runner.prefill_many([s for s, _ in g], [r.seq.prompt_ids for _, r in g])
                choices = self._select(logits, [r.seq.sampler for _, r in g])
                self.prefill_batches += 1
            except Exception:  # noqa: BLE001 - find the failing request alone
                for slot, req in g:
                    self._admit(slot, req)
                continue
            for (slot, req), c in zip(g, choices):
                self._emit(slot, req, c)

    def _admit(self, slot: int, req: Request) -> None:
        try:
            top = req.seq.params.prompt_logprobs
            if req.cancelled or (req.seq.finish_reason is not None and top is None):  # or nothing to do
                raise _Cancelled
            ids = req.seq.prompt_ids
            if top is None:
                logits = self.runner.prefill(slot, ids)
            else:  # the logits after every prompt token: its scores, then the first token from the last row
                rows = self.runner.prefill(slot, ids, every=True)
                req._put(prompt_scores(rows, ids, top))
                if req.seq.finish_reason is not None:  # max_tokens 0: the scores were all it asked for
                    raise _Cancelled
                logits = rows[-1]
            (choice,) = self._select(logits[None], [req.seq.sampler])
            self._emit(slot, req, choice)
        except _Cancelled:
            self._free(slot)
            req._put(Request.DONE)
        except Exception as e:  # noqa: BLE001 - one failing request never stops the engine
            self._free(slot)
            self._fail(req, f"{type(e).__name__}: {e}")

    def _decode_step(self, start_next: bool = True) -> None:
        """One token for every running request: the step begun in the background if there is one, else a step now.
        With ``start_next``, the next step is begun (``runner.start``) before this one's tokens are reported, so the
        per-token work (detokenizing, stop strings, the requests' queues) runs while it computes."""
        started, self._started = self._started, None
        t0 = time.perf_counter()
        try:
            if started is not None:
                logits = self.runner.finish()  # a row per started slot
                t0 = time.perf_counter() - self.runner.begun_seconds  # (its time under way, not the wait for it)
                go, rows, samplers, frees = started
                at = None
                if frees != self._frees:  # the rows not finished or cancelled since
                    at = [k for k, (i, r) in enumerate(go) if self._slots[i] is r]
                    rows, samplers = [rows[k] for k in at], [samplers[k] for k in at]
            else:
                n = max(i for i, t in enumerate(self._last) if t is not None) + 1
                tokens = self._last[:n]
                logits = self.runner.decode(tokens)  # a row per slot given a token
                rows, at = [i for i, t in enumerate(tokens) if t is not None], None
                samplers = [self._slots[i].seq.sampler for i in rows]
            choices = self._select(logits, samplers, at) if rows else []
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            traceback.print_exc(file=sys.stderr)
            for i, req in enumerate(self._slots):
                if req is not None and self._last[i] is not None:
                    self._free(i)
                    self._fail(req, f"{type(e).__name__}: {e}")
            return
        self.steps += 1
        self.tokens += len(rows)
        self.busy += time.perf_counter() - t0
        if start_next and self._can_start and rows:
            self._start_next(rows, choices)
        for i, c in zip(rows, choices):
            self._emit(i, self._slots[i], c)
        self._settle()

    def _start_next(self, rows: list[int], choices: list) -> None:
        """Begin the step after this one, whose tokens are ``choices`` (of slots ``rows``), in the background: every
        row goes on unless its token certainly ends it (a stop token, its last token); a stop string found when the
        token is reported ends it too, and its row of the begun step is dropped. Not when a request waits for a free
        slot (its prefill would wait for the step), another slot has a token to decode, or a lone request decodes
        speculatively; for one request only unless the runner decodes on a pair of threads (``SlotRunner.pair``: the
        begun step's rows are shared by the library's thread and this one, which joins it once it has reported).
        Begun for up to two requests on OpenMP's threads, two clients of stories260K had lost (16.7k -> 15.0k tokens/s)
        and sixteen more (47k -> 31k): libgomp's worker, spinning between parallel regions, took a core from it."""
        if (self._waiting and None in self._slots) or self.speculator is not None:
            return
        last = self._last
        if len(last) - last.count(None) != len(rows):  # another slot has a token to decode (rows' are not None)
            return
        most = len(rows) if getattr(self.runner, "pair", False) else 1
        nxt: list[int | None] = [None] * len(last)
        go, slots = [], self._slots
        for i, c in zip(rows, choices):
            req = slots[i]
            seq = req.seq
            if c.token not in seq.stop_ids and len(seq.out_ids) + 1 < seq.limit:
                if len(go) == most:
                    return
                nxt[i] = c.token
                go.append((i, req))
        if not go:
            return
        if self.runner.start(nxt[: go[-1][0] + 1]):
            self._started = (go, [i for i, _ in go], [r.seq.sampler for _, r in go], self._frees)
            self.started_steps += 1
            self.started_rows += len(go)

    def _settle(self, always: bool = False) -> None:
        """Wait for the step begun in the background and drop it when none of its rows still runs (or ``always``):
        nothing may be left under way when the engine waits for requests, or stops."""
        started = self._started
        if started is not None and (always or (started[3] != self._frees
                                               and not any(self._slots[i] is r for i, r in started[0]))):
            self._started = None
            self.runner.finish()

    def _speculate(self) -> None:
        """A round of speculative decoding for the one running request."""
        slot = next(i for i, t in enumerate(self._last) if t is not None)
        req = self._slots[slot]
        t0 = time.perf_counter()
        try:
            for choice in self.speculator.round(self.runner, slot, req.seq, self._last[slot]):
                self._emit(slot, req, choice)
                self.tokens += 1
        except Exception as e:  # noqa: BLE001 - fail the request, keep serving
            traceback.print_exc(file=sys.stderr)
            self._free(slot)
            self._fail(req, f"{type(e).__name__}: {e}")
            return
        self.steps += 1
        self.busy += time.perf_counter() - t0

    def _emit(self, slot: int, req: Request, choice) -> None:
        step = req.seq.accept(choice)
        if req.seq.finish_reason is not None:
            self._free(slot)
            req._put_last(step)
            return
        if step is not None:
            req._put(step)
        self._last[slot] = choice.token

    def _drop_cancelled(self) -> None:
        for i, req in enumerate(self._slots):
            if req is not None and req.cancelled and req.seq.finish_reason is None:
                req.seq.finish_reason = "cancelled"
                self.cancelled += 1
                self._free(i)
                req._put(Request.DONE)

    def _drop_cancelled_waiting(self) -> None:
        """Finish cancelled requests that are still waiting (call with the lock held)."""
        for key in [k for k, g in self._waiting.items() if any(r.cancelled for r in g)]:
            group = self._waiting[key]
            for req in [r for r in group if r.cancelled]:
                group.remove(req)
                if req.seq.finish_reason is None:
                    req.seq.finish_reason = "cancelled"
                    self.cancelled += 1
                req._put(Request.DONE)
            if not group:
                del self._waiting[key]

    def _free(self, slot: int) -> None:
        with self._cv:
            self._slots[slot] = None
            self._last[slot] = None
            self._frees += 1

    @staticmethod
    def _fail(req: Request, message: str) -> None:
        req.error = message
        if req.seq.finish_reason is None:
            req.seq.finish_reason = "error"
        req._put(Request.DONE)


class _Cancelled(Exception):
    pass


__all__ = ["BatchEngine", "EngineError", "Request"]
