"""The OpenAI API's request fields, checked, and its response bodies.

``parse_completion`` / ``parse_chat`` turn a JSON body into a ``GenRequest`` (prompts as token ids, sampling
parameters) or raise ``APIError`` with an OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmforge.infer.sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error",
                              413: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    context: int  # the model's context length (the engine's cache length)
    max_tokens: int  # largest max_tokens a request may ask for
    max_n: int = 16  # choices per prompt
    max_prompts: int = 16  # prompts per completions request
    max_stop: int = 4


@dataclass
class GenRequest:
    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]  # token ids of each prompt
    params: list[SamplingParams]  # one per prompt (max_tokens may differ when it was not given)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: list[str] = field(default_factory=list)  # completions with echo: each prompt's text
    logprobs: int | None = None  # completions: top-n alternatives; chat: top_logprobs (0 = chosen only)


# ---- field checks ---------------------------------------------------------------------------------


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"{key}: expected a number, got {type(v).__name__}", param=key, code="invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(key, f"{v} is out of range; expected {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise APIError(400, f"{key}: expected an integer, got {type(v).__name__}", param=key, code="invalid_type")
    if v < lo or v > hi:
        raise _bad(key, f"{v} is out of range; expected [{lo}, {hi}]")
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{key}: expected a boolean", param=key, code="invalid_type")
    return v


def _stop(body: dict, limits: Limits) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop: expected a string or a list of strings", param="stop", code="invalid_type")
    if len(stops) > limits.max_stop:
        raise _bad("stop", f"at most {limits.max_stop} stop sequences")
    if any(not s for s in stops):
        raise _bad("stop", "stop sequences must not be empty")
    return stops


COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "frequency_penalty", "presence_penalty", "logprobs", "user", "logit_bias",
          "top_k", "min_p", "repetition_penalty", "ignore_eos"}  # the last four: vLLM-style extensions
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "top_logprobs", "max_completion_tokens", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls", "store", "metadata", "service_tier"}


def _common(body: dict, allowed: set[str], limits: Limits, model_ids: set[str]) -> dict[str, Any]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model: required (a model id from GET /v1/models)", param="model", code="missing_field")
    if model not in model_ids:
        raise APIError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "not supported by this server")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise APIError(400, "stream_options: expected an object", param="stream_options", code="invalid_type")
    stream = _bool(body, "stream")
    if so is not None and not stream:
        raise _bad("stream_options", "only allowed when stream is true")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "seed: expected an integer", param="seed", code="invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "user: expected a string", param="user", code="invalid_type")
    return {
        "model": model,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "n": _int(body, "n", 1, 1, limits.max_n),
        "stream": stream,
        "include_usage": bool(so and _bool(so, "include_usage")),
        "stop": _stop(body, limits),
        "seed": seed,
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "top_k": _int(body, "top_k", 0, -1, 1 << 30),
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        "ignore_eos": _bool(body, "ignore_eos"),
    }


def _params(c: dict, prompt_len: int, max_tokens: int | None, key: str, limits: Limits, stop_ids: list[int],
            logprobs: int | None) -> SamplingParams:
    room = limits.context - prompt_len
    if room <= 0:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens. However, your "
                       f"prompt has {prompt_len} tokens.", param="messages" if key == "max_completion_tokens"
                       else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(room, limits.max_tokens)
    elif prompt_len + max_tokens > limits.context:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens. However, you "
                       f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
                       f"the completion). Please reduce the prompt or the completion length.", param=key,
                       code="context_length_exceeded")
    return SamplingParams(
        temperature=c["temperature"], top_k=max(c["top_k"], 0), top_p=c["top_p"], min_p=c["min_p"],
        max_new_tokens=max_tokens, seed=c["seed"], stop_ids=[] if c["ignore_eos"] else list(stop_ids),
        repetition_penalty=c["repetition_penalty"], frequency_penalty=c["frequency_penalty"],
        presence_penalty=c["presence_penalty"], stop=list(c["stop"]), logprobs=logprobs is not None,
        top_logprobs=logprobs or 0)


def _max_tokens(body: dict, limits: Limits, default: int | None, keys: tuple[str, ...]) -> tuple[int | None, str]:
    for key in keys:
        if body.get(key) is not None:
            return _int(body, key, None, 0, limits.max_tokens), key
    return default, keys[0]


def parse_completion(body: Any, tokenizer, limits: Limits, model_ids: set[str], stop_ids: list[int]) -> GenRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_body")
    c = _common(body, COMPLETION_FIELDS, limits, model_ids)
    if body.get("suffix"):
        raise _bad("suffix", "not supported by this server")
    best_of = _int(body, "best_of", None, 1, limits.max_n)
    if best_of is not None and best_of != c["n"]:
        raise _bad("best_of", "only best_of == n is supported")
    echo = _bool(body, "echo")
    logprobs = _int(body, "logprobs", None, 0, 5)
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "prompt: required", param="prompt", code="missing_field")
    vocab = tokenizer.vocab_size
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        items = prompt
    else:
        raise APIError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of such "
                       "lists", param="prompt", code="invalid_type")
    if len(items) > limits.max_prompts:
        raise _bad("prompt", f"at most {limits.max_prompts} prompts per request")
    prompts, texts = [], []
    for i, p in enumerate(items):
        if isinstance(p, str):
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            ids = bos + tokenizer.encode(p)
            texts.append(p)
        else:
            if not p or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                raise _bad("prompt", f"prompt {i}: token ids must be integers in [0, {vocab})")
            ids = list(p)
            texts.append(tokenizer.decode(ids))
        if not ids:
            raise _bad("prompt", "empty prompt and the tokenizer has no BOS token")
        prompts.append(ids)
    mt, key = _max_tokens(body, limits, 16, ("max_tokens",))
    explicit = body.get("max_tokens") is not None
    params = []
    for ids in prompts:
        m = mt if explicit else min(mt, max(limits.context - len(ids), 0)) or None
        params.append(_params(c, len(ids), m, key, limits, stop_ids, logprobs))
    return GenRequest("completion", c["model"], prompts, params, c["n"], c["stream"], c["include_usage"],
                      texts if echo else [], logprobs)


def parse_chat(body: Any, tokenizer, limits: Limits, model_ids: set[str], template, stop_ids: list[int],
               template_stops: list[str]) -> GenRequest:
    from lmforge.infer.chat import check_messages, encode_chat

    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_body")
    c = _common(body, CHAT_FIELDS, limits, model_ids)
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise _bad("response_format", "only {\"type\": \"text\"} is supported")
    if body.get("tools"):
        raise _bad("tools", "tool calls are not supported by this server")
    if body.get("tool_choice") not in (None, "none"):
        raise _bad("tool_choice", "tool calls are not supported by this server")
    lp = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, 20)
    if top is not None and not lp:
        raise _bad("top_logprobs", "requires logprobs: true")
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    try:
        ids = encode_chat(tokenizer, template, messages, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    mt, key = _max_tokens(body, limits, None, ("max_completion_tokens", "max_tokens"))
    params = _params(c, len(ids), mt, key, limits, stop_ids, (top or 0) if lp else None)
    params.stop = list(dict.fromkeys([*params.stop, *template_stops]))
    return GenRequest("chat", c["model"], [ids], [params], c["n"], c["stream"], c["include_usage"], [],
                      (top or 0) if lp else None)


# ---- responses ------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_bytes(tokenizer, i: int) -> bytes:
    """The bytes one token stands for (without a decoder's start-of-text space stripping where possible)."""
    if hasattr(tokenizer, "byte_of") and hasattr(tokenizer, "pieces"):  # llama2.c
        if i in (tokenizer.bos_id, tokenizer.eos_id):
            return b""
        return tokenizer.byte_of.get(i, tokenizer.pieces[i])
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes(i)
    return tokenizer.decode_bytes([i])


def token_str(tokenizer, i: int) -> str:
    return token_bytes(tokenizer, i).decode("utf-8", errors="replace")


def chat_logprobs(tokenizer, steps) -> dict[str, Any]:
    content = []
    for s in steps:
        if s.token < 0 or s.logprob is None:
            continue
        b = token_bytes(tokenizer, s.token)
        content.append({"token": b.decode("utf-8", errors="replace"), "logprob": s.logprob, "bytes": list(b),
                        "top_logprobs": [{"token": token_str(tokenizer, t), "logprob": lp,
                                          "bytes": list(token_bytes(tokenizer, t))} for t, lp in s.top_logprobs or []]})
    return {"content": content}


def completion_logprobs(tokenizer, steps, offset: int = 0) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for s in steps:
        if s.token < 0 or s.logprob is None:
            continue
        t = token_str(tokenizer, s.token)
        tokens.append(t)
        lps.append(s.logprob)
        tops.append({token_str(tokenizer, a): lp for a, lp in s.top_logprobs or []} if s.top_logprobs else None)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"
