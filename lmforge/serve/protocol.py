"""The OpenAI API's request schema (pydantic models), its checks against the served model, and its response bodies.

``parse_completion`` / ``parse_chat`` validate a raw JSON body against ``CompletionRequest`` / ``ChatRequest`` and turn
it into a ``GenRequest`` (prompts as token ids, sampling parameters), or raise ``APIError`` with an OpenAI-style
error: ``{"error": {"message", "type", "param", "code"}}``. The JSON itself is parsed by pydantic (bounded nesting,
no lone surrogates, no NaN/Infinity), so every malformed body is a 400, naming the field where there is one.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.infer.chat import check_messages, encode_chat, special_tokens
from lmforge.infer.params import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error",
                              413: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the request schema --------------------------------------------------------------------------

INT64 = 1 << 63
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 16  # prompts per completions request
MAX_STOP = 4


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Schema):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's; accepted (usage is sent once, at the end)


Stop = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)]


class _Common(_Schema):
    model: str | None = Field(None, min_length=1, description="a model id from GET /v1/models; omitted: the served "
                              "model (as vLLM's and llama.cpp's servers take it)")
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1)] | Stop | None = None
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM-style extensions
    top_k: int | None = Field(None, ge=-1, le=1 << 30)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


@dataclass
class Limits:
    context: int  # the model's context length (the engine's cache length)
    max_tokens: int  # largest max_tokens a request may ask for


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


# ---- checks ---------------------------------------------------------------------------------------


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


_TYPE_ERRORS = ("_type", "_parsing", "literal_error", "union_tag", "is_instance")


def validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, as an OpenAI-style 400 naming the top-level field (``param``)."""
    errors = e.errors(include_url=False)
    # a union reports one error per member: prefer one that got past the member's type
    err = next((x for x in errors if not x["type"].endswith(_TYPE_ERRORS)), errors[0])
    kind, loc = err["type"], [str(x) for x in err["loc"]]
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}",
                        code="invalid_json")
    if not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    param = loc[0]
    # drop union member names (str, list[int], ...) from the path, keep fields and list indices
    path = ".".join(x for x in loc if x.isdigit() or x.isidentifier() and x not in ("str", "int", "float", "bool"))
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter")
        return APIError(400, f"{path}: unknown field", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"{path}: required", param=param, code="missing_field")
    code = "invalid_type" if kind.endswith(_TYPE_ERRORS) else "invalid_value"
    got = err.get("input")
    shown = f" (got {json.dumps(got)[:40]})" if isinstance(got, (int, float, str, bool)) else ""
    return APIError(400, f"{path}: {err['msg']}{shown}", param=param, code=code)


def _validate(schema: type[_Schema], raw: bytes) -> Any:
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None


def _check_common(r: _Common, model_ids: Sequence[str]) -> None:
    if r.model is not None and r.model not in model_ids:
        raise APIError(404, f"The model `{r.model}` does not exist", param="model", code="model_not_found")
    if r.logit_bias:
        raise _bad("logit_bias", "not supported by this server")
    if r.stream_options is not None and not r.stream:
        raise _bad("stream_options", "only allowed when stream is true")


def _params(r: _Common, prompt_len: int, max_tokens: int | None, key: str, limits: Limits, stop_ids: list[int],
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
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    return SamplingParams(
        temperature=1.0 if r.temperature is None else r.temperature, top_k=max(r.top_k or 0, 0),
        top_p=1.0 if r.top_p is None else r.top_p, min_p=r.min_p or 0.0, max_new_tokens=max_tokens, seed=r.seed,
        stop_ids=[] if r.ignore_eos else list(stop_ids),
        repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
        frequency_penalty=r.frequency_penalty or 0.0, presence_penalty=r.presence_penalty or 0.0,
        stop=stop, logprobs=logprobs is not None, top_logprobs=logprobs or 0)


def _max_tokens(r: _Common, limits: Limits, keys: tuple[str, ...]) -> tuple[int | None, str]:
    for key in keys:
        v = getattr(r, key)
        if v is not None:
            if v > limits.max_tokens:
                raise _bad(key, f"{v} is out of range; expected [0, {limits.max_tokens}]")
            return v, key
    return None, keys[0]


def parse_completion(raw: bytes, tokenizer, limits: Limits, model_ids: Sequence[str], stop_ids: list[int]
                     ) -> GenRequest:
    """A /v1/completions body checked and encoded (``model_ids``: the served model's id first, then its aliases)."""
    r = _validate(CompletionRequest, raw)
    _check_common(r, model_ids)
    if r.suffix:
        raise _bad("suffix", "not supported by this server")
    n = r.n or 1
    if r.best_of is not None and r.best_of != n:
        raise _bad("best_of", "only best_of == n is supported")
    vocab = tokenizer.vocab_size
    p = r.prompt
    items: list = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
    if len(items) > MAX_PROMPTS:
        raise _bad("prompt", f"at most {MAX_PROMPTS} prompts per request")
    prompts, texts = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenizer.prompt_prefix() + tokenizer.encode(item)  # (SmolLM2's BOS is <|im_start|>: not added)
            texts.append(item)
        else:
            if not all(0 <= t < vocab for t in item):
                raise _bad("prompt", f"prompt {i}: token ids must be integers in [0, {vocab})")
            ids = list(item)
            texts.append(tokenizer.decode(ids))
        if not ids:
            raise _bad("prompt", "empty prompt and the tokenizer has no BOS token")
        prompts.append(ids)
    mt, key = _max_tokens(r, limits, ("max_tokens",))
    explicit = mt is not None
    mt = 16 if mt is None else mt
    params = []
    for ids in prompts:
        m = mt if explicit else min(mt, max(limits.context - len(ids), 0)) or None
        params.append(_params(r, len(ids), m, key, limits, stop_ids, r.logprobs))
        if r.echo and r.logprobs is not None:  # the echoed prompt's tokens get logprobs too (the first: null)
            params[-1].prompt_logprobs = r.logprobs
    return GenRequest("completion", r.model or model_ids[0], prompts, params, n, bool(r.stream),
                      bool(r.stream_options and r.stream_options.include_usage), texts if r.echo else [], r.logprobs)


def parse_chat(raw: bytes, tokenizer, limits: Limits, model_ids: Sequence[str], template, stop_ids: list[int],
               template_stops: list[str]) -> GenRequest:
    r = _validate(ChatRequest, raw)
    _check_common(r, model_ids)
    rf = r.response_format
    if rf is not None and rf.get("type") != "text":
        raise _bad("response_format", "only {\"type\": \"text\"} is supported")
    if r.tools:
        raise _bad("tools", "tool calls are not supported by this server")
    if r.tool_choice not in (None, "none"):
        raise _bad("tool_choice", "tool calls are not supported by this server")
    lp = bool(r.logprobs)
    if r.top_logprobs is not None and not lp:
        raise _bad("top_logprobs", "requires logprobs: true")
    try:
        messages = check_messages([m.model_dump(exclude_none=True, exclude={"name"}) for m in r.messages])
        ids = encode_chat(tokenizer, template, messages, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    mt, key = _max_tokens(r, limits, ("max_completion_tokens", "max_tokens"))
    logprobs = (r.top_logprobs or 0) if lp else None
    params = _params(r, len(ids), mt, key, limits, stop_ids, logprobs)
    params.stop = list(dict.fromkeys([*params.stop, *template_stops]))
    return GenRequest("chat", r.model or model_ids[0], [ids], [params], r.n or 1, bool(r.stream),
                      bool(r.stream_options and r.stream_options.include_usage), [], logprobs)


# ---- responses ------------------------------------------------------------------------------------


_IDS = random.Random()  # seeded from the OS; ids need to be distinct, not secret (uuid4 read os.urandom per request)


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + f"{_IDS.getrandbits(96):024x}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_bytes(tokenizer, i: int) -> bytes:
    """The bytes one token stands for (without a decoder's start-of-text space stripping where possible); a special
    token that decodes to nothing is its own name (``<|im_end|>``), as OpenAI's and vLLM's logprobs show it."""
    if hasattr(tokenizer, "byte_of") and hasattr(tokenizer, "pieces"):  # llama2.c
        b = b"" if i in (tokenizer.bos_id, tokenizer.eos_id) else tokenizer.byte_of.get(i, tokenizer.pieces[i])
    elif hasattr(tokenizer, "token_bytes"):
        b = tokenizer.token_bytes(i)
    else:
        b = tokenizer.decode_bytes([i])
    if not b:
        name = next((s for s, j in special_tokens(tokenizer).items() if j == i), "")
        b = name.encode("utf-8")
    return b


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


def _top_dict(tokenizer, step) -> dict[str, float] | None:
    """A step's alternatives as the completions API names them (token text -> logprob), or None."""
    return {token_str(tokenizer, a): lp for a, lp in step.top_logprobs} if step.top_logprobs else None


def completion_logprobs(tokenizer, steps, offset: int = 0) -> dict[str, Any]:
    """The completions API's logprobs of ``steps``; ``text_offset`` counts from ``offset`` (the characters of the
    choice's text before them: an echoed prompt, earlier chunks of a stream)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for s in steps:
        if s.token < 0 or s.logprob is None:
            continue
        t = token_str(tokenizer, s.token)
        tokens.append(t)
        lps.append(s.logprob)
        tops.append(_top_dict(tokenizer, s))
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(tokenizer, scores, text: str) -> dict[str, Any]:
    """The completions API's logprobs of an echoed prompt (``lmforge.infer.sequence.PromptScores``), as OpenAI's
    legacy API, vLLM and llama.cpp give them: every prompt token, the first with a null logprob and top_logprobs;
    ``text_offset`` counts into the prompt's ``text`` (a token that adds no text there, BOS, takes no width)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = 0
    for s in scores.steps:
        t = token_str(tokenizer, s.token)
        tokens.append(t)
        lps.append(s.logprob)
        tops.append(_top_dict(tokenizer, s))
        offsets.append(min(pos, len(text)))
        if s.token not in (tokenizer.bos_id, tokenizer.eos_id) or text[pos : pos + len(t)] == t:
            pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two parts of one choice's completions logprobs, one after the other."""
    return {k: a[k] + b[k] for k in a}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"
