"""Instruction and chat data for supervised fine-tuning: read Alpaca, ShareGPT, OpenAI-messages and self-instruct
seed records into one conversation form, mix several datasets, and tokenize with a chat template so that only the
assistant turns are scored.

    convs = load_conversations(["alpaca.json", "chat.jsonl"], weights=[1.0, 2.0], cap=1000, seed=0)
    ex = tokenize_conversation(tokenizer, "chatml", convs[0].messages)   # {"input_ids": [...], "labels": [...]}

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``. Formats (detected per
record): Alpaca ``{instruction, input, output, system?, history?: [[user, assistant], ...]}``; ShareGPT
``{conversations: [{from, value}], system?}``; OpenAI ``{messages: [{role, content}]}``; self-instruct seed tasks
``{instruction, instances: [{input, output}]}`` (one conversation per instance); preference records (every form
``lmforge.data.preference`` reads: hh-rlhf transcripts, LLaMA-Factory's and TRL's chosen/rejected, ranked lists),
of which the prompt and the chosen (best) response are kept. Files are JSON (a list of records)
or JSONL. A bad record is an error naming file, line (or record number) and field, or, with ``skip_bad``, counted.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge.data.io import SHAREGPT_ROLES, iter_records
from lmforge.data.preference import PreferenceRecord, parse_record
from lmforge.errors import LMForgeError
from lmforge.infer.chat import ChatTemplate, apply_template, encode_text_with_specials, end_of_turn, get_template
from lmforge.losses import IGNORE

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "self-instruct", "preference")


class BadRecord(ValueError):
    """A record that cannot be read: the message names the field."""


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    source: str  # "file:line" for error messages and reports
    pref: PreferenceRecord | None = None  # the record a preference file's conversation came from


@dataclass
class BadCounts:
    """Records skipped with ``skip_bad``, per file, with the first reason seen."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, path: str, where: str, why: str) -> None:
        self.counts[path] = self.counts.get(path, 0) + 1
        self.first.setdefault(path, f"{where}: {why}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ---- one record -> conversations ------------------------------------------------------------------


def _text(rec: dict, key: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None:
        if required:
            raise BadRecord(f"field {key!r} is missing")
        return ""
    if not isinstance(v, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def detect_format(rec: Any) -> str:
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    if "chosen" in rec or "responses" in rec:
        return "preference"
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instances" in rec:
        return "self-instruct"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    raise BadRecord(f"unknown record format (keys {sorted(rec)}): expected Alpaca instruction/input/output, "
                    "ShareGPT conversations, OpenAI messages, self-instruct instances or preference chosen/rejected")


def record_to_conversations(rec: Any, fmt: str = "auto") -> list[list[dict[str, str]]]:
    """The conversations in one record (a self-instruct seed task holds one per instance)."""
    fmt = detect_format(rec) if fmt == "auto" else fmt
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    if fmt == "preference":  # the prompt and its best response (SFT on the chosen answers, as DPO's authors did)
        pref = _preference(rec)
        return [[*pref.prompt, {"role": "assistant", "content": pref.chosen}]]
    if fmt == "alpaca":
        msgs = []
        if rec.get("system"):
            msgs.append({"role": "system", "content": _text(rec, "system")})
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise BadRecord("field 'history' must be a list of [user, assistant] pairs")
        for i, turn in enumerate(history):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise BadRecord(f"field 'history[{i}]' must be a [user, assistant] pair of strings")
            msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        instruction, inp = _text(rec, "instruction"), _text(rec, "input", required=False)
        user = f"{instruction}\n{inp}" if inp.strip() else instruction
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, "output")}]
        return [msgs]
    if fmt == "self-instruct":
        instruction = _text(rec, "instruction")
        inst = rec.get("instances")
        if not isinstance(inst, list) or not inst:
            raise BadRecord("field 'instances' must be a non-empty list of {input, output}")
        out = []
        for i, x in enumerate(inst):
            if not isinstance(x, dict):
                raise BadRecord(f"field 'instances[{i}]' must be an object")
            try:
                inp, outp = _text(x, "input", required=False), _text(x, "output")
            except BadRecord as e:
                raise BadRecord(f"instances[{i}]: {e}") from None
            user = f"{instruction}\n{inp}" if inp.strip() else instruction
            out.append([{"role": "user", "content": user}, {"role": "assistant", "content": outp}])
        return out
    if fmt == "sharegpt":
        turns = rec.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise BadRecord("field 'conversations' must be a non-empty list of {from, value}")
        msgs = [{"role": "system", "content": _text(rec, "system")}] if rec.get("system") else []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise BadRecord(f"field 'conversations[{i}]' must be an object with from and value")
            who = t.get("from", t.get("role"))
            role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
            if role is None:
                raise BadRecord(f"field 'conversations[{i}].from': {who!r} is not one of {sorted(SHAREGPT_ROLES)}")
            value = t.get("value", t.get("content"))
            if not isinstance(value, str):
                raise BadRecord(f"field 'conversations[{i}].value' must be a string")
            msgs.append({"role": role, "content": value})
        return [msgs]
    if fmt == "openai":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRecord("field 'messages' must be a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise BadRecord(f"field 'messages[{i}].role' must be system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise BadRecord(f"field 'messages[{i}].content' must be a string")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]})
        return [out]
    raise LMForgeError(f"data format {fmt!r}: allowed values are {list(FORMATS)}")


def _preference(rec: Any) -> PreferenceRecord:
    try:
        return parse_record(rec)
    except ValueError as e:
        raise BadRecord(str(e)) from None


def _check(msgs: list[dict[str, str]]) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("no assistant turn to learn from")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise BadRecord("every assistant turn is empty")


def _fill(msgs: list[dict[str, str]], variables: dict[str, str]) -> list[dict[str, str]]:
    if not variables:
        return msgs
    pat = re.compile(r"\{\{\s*(" + "|".join(map(re.escape, variables)) + r")\s*\}\}")
    return [{**m, "content": pat.sub(lambda x: variables[x.group(1)], m["content"])} for m in msgs]


def _fill_record(rec: PreferenceRecord, variables: dict[str, str]) -> PreferenceRecord:
    """``_fill`` on every text of a preference record (its messages, responses and plain-text prompt)."""
    if not variables:
        return rec

    def one(text: str) -> str:
        return _fill([{"content": text}], variables)[0]["content"]

    return replace(rec, prompt=_fill(rec.prompt, variables), responses=[one(r) for r in rec.responses],
                   prompt_text=None if rec.prompt_text is None else one(rec.prompt_text))


def read_conversations(path: str | Path, fmt: str = "auto", skip_bad: bool = False, bad: BadCounts | None = None,
                       variables: dict[str, str] | None = None) -> list[Conversation]:
    """Every conversation in one file; ``variables`` fill ``{{name}}`` placeholders (e.g. identity data)."""
    if fmt not in FORMATS:
        raise LMForgeError(f"data format {fmt!r}: allowed values are {list(FORMATS)}")
    out = []

    def malformed(where: str, reason: str) -> None:  # with skip_bad a line that is not JSON is counted, as in data
        if bad is not None:  # clean/prepare (it stopped the run)
            bad.add(str(path), where, reason)

    for where, rec in iter_records(path, malformed if skip_bad else None):
        try:
            if (detect_format(rec) if fmt == "auto" else fmt) == "preference":  # parsed once, the record kept
                pref = _fill_record(_preference(rec), variables or {})  # an empty best reply is data: no _check
                out.append(Conversation([*pref.prompt, {"role": "assistant", "content": pref.chosen}], where, pref))
                continue
            for msgs in record_to_conversations(rec, fmt):
                _check(msgs)
                out.append(Conversation(_fill(msgs, variables or {}), where))
        except BadRecord as e:
            if not skip_bad:
                raise LMForgeError(f"{where}: {e} (or pass --skip-bad)") from None
            if bad is not None:
                bad.add(str(path), where, str(e))
    if not out:
        raise LMForgeError(f"{path}: no usable records")
    return out


MAX_WEIGHT = 1000  # a dataset repeated more often than this is a typo, not a mixture


def mix(datasets: list[list[Conversation]], weights: list[float] | None = None, cap: int = 0,
        seed: int = 0) -> list[Conversation]:
    """Examples-proportional mixing (T5/FLAN): dataset i contributes ``min(n_i, cap)`` examples (cap 0: all),
    times its weight (2.0 repeats each example twice, 0.5 keeps a random half), drawn with ``seed``."""
    weights = weights or [1.0] * len(datasets)
    if len(weights) != len(datasets):
        raise LMForgeError(f"data.weights: {len(weights)} weights for {len(datasets)} datasets")
    for w in weights:  # (NaN, inf and 1e9 crashed or filled the memory)
        if not (isinstance(w, (int, float)) and 0 <= w <= MAX_WEIGHT):
            raise LMForgeError(f"data.weights: {w!r}: a weight is a number in [0, {MAX_WEIGHT}] (2.0 repeats each "
                               "example twice, 0.5 keeps a random half)")
    if not (isinstance(cap, int) and cap >= 0):
        raise LMForgeError(f"data.cap: {cap!r}: must be >= 0 (examples per dataset; 0: all)")
    rng = random.Random(seed)
    out: list[Conversation] = []
    for convs, w in zip(datasets, weights):
        pool = list(convs)
        if cap and len(pool) > cap:
            pool = rng.sample(pool, cap)
        whole, frac = int(w), w - int(w)
        out += pool * whole + rng.sample(pool, round(frac * len(pool)))
    if not out and any(datasets):  # (it went on to "batch_size 8 is more than the 0 training examples")
        raise LMForgeError(f"data.weights {list(weights)}: they keep no example of the "
                           f"{sum(map(len, datasets)):,} given (a weight of 0 drops its dataset)")
    return out


def split_heldout(convs: list[Conversation], fraction: float, seed: int = 0) -> tuple[list[Conversation],
                                                                                       list[Conversation]]:
    """(train, held out): a seeded random ``fraction`` of the conversations held out (at least one if > 0)."""
    if not 0 <= fraction < 1:
        raise LMForgeError(f"data.val_fraction={fraction}: must be in [0, 1)")
    if fraction == 0 or len(convs) < 2:
        return convs, []
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n = max(1, round(fraction * len(convs)))
    held = set(idx[:n])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


# ---- tokenization with response masks -----------------------------------------------------------------


def default_template(tokenizer) -> ChatTemplate:
    """The tokenizer's own chat template, else Alpaca's (its responses end with EOS, so a base model learns to
    stop)."""
    own = getattr(tokenizer, "chat_template", None)
    return get_template(own if isinstance(own, str) and own.strip() else "alpaca")


def tokenize_conversation(tokenizer, template: str | ChatTemplate | None, messages: list[dict[str, str]],
                          train_on_prompt: bool = False) -> dict[str, list[int]]:
    """Render ``messages`` turn by turn; ``labels`` equal the ids on assistant turns (their end-of-turn marker or
    EOS included) and ``IGNORE`` elsewhere, unless ``train_on_prompt``. Every assistant turn is scored.

    The rendering of the first k messages must be a prefix of the rendering of k+1 (true of ChatML, Llama-2,
    Alpaca, ChatGLM and most Jinja templates); each piece is tokenized on its own, so that the ids a turn gets do
    not depend on what follows it."""
    t = template if isinstance(template, ChatTemplate) else (
        default_template(tokenizer) if template is None else get_template(template, tokenizer))
    _, stop_ids = end_of_turn(t, tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    bos = tokenizer.bos_id
    prev = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = apply_template(t, messages[:i], add_generation_prompt=True, tokenizer=tokenizer) if i else ""
        full = apply_template(t, messages[: i + 1], add_generation_prompt=False, tokenizer=tokenizer)
        if not (prompt.startswith(prev) and full.startswith(prompt)):
            raise LMForgeError(f"chat template {t.name}: rendering is not incremental (a turn changes what came "
                               "before it), so response tokens cannot be masked; choose another --template")
        p_ids = encode_text_with_specials(tokenizer, prompt[len(prev):]) if len(prompt) > len(prev) else []
        r_ids = encode_text_with_specials(tokenizer, full[len(prompt):])
        if tokenizer.eos_id is not None and not any(x in stop_ids for x in r_ids):
            r_ids.append(tokenizer.eos_id)  # a template without an end marker: the turn ends with EOS
        ids += p_ids + r_ids
        labels += (p_ids if train_on_prompt else [IGNORE] * len(p_ids)) + r_ids
        prev = full
    if bos is not None and getattr(tokenizer, "add_bos", True) and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE, *labels]
    return {"input_ids": ids, "labels": labels}
