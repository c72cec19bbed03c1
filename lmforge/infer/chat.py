"""Chat templates: turn a list of messages into the one prompt string a model was trained on, and tell where a turn
ends (the strings and token ids that stop generation). The same rendering is used to build SFT examples and to
prompt at inference.

Built in: ``chatml``, ``llama2`` (``[INST]``), ``chatglm`` (ChatGLM2's ``[Round n]``/问/答), ``alpaca`` and ``plain``.
Any Hugging Face-style Jinja ``chat_template`` string works too; it is rendered in a sandbox as transformers does
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``), with ``messages``, ``add_generation_prompt``,
``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

from lmforge.errors import LMForgeError

ROLES = ("system", "user", "assistant")

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta's Llama-2-chat format: the system prompt inside the first [INST] block, </s><s> between turns.
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% else %}{% set system = none %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('llama2 template: roles must alternate user/assistant/user/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system is not none %}"
    "{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + m['content'] %}"
    "{% else %}{% set content = m['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# ChatGLM2-6B's build_prompt: "[Round n]\n\n问：{query}\n\n答：{response}\n\n", rounds counted from 1.
CHATGLM = (
    "{% set ns = namespace(round=0) %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{% set ns.round = ns.round + 1 %}"
    "{{ '[Round ' + ns.round|string + ']\n\n问：' + m['content'] + '\n\n答：' }}"
    "{% else %}{{ m['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# Stanford Alpaca's prompt (no-input form); later turns repeat Instruction/Response; a reply ends with EOS.
ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# A role-labelled transcript for base models: "User: ...\nAssistant: ...\n".
PLAIN = (
    "{% for m in messages %}{{ m['role']|capitalize + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # Jinja
    stop: tuple[str, ...] = ()  # strings that end an assistant turn
    stop_on_eos: bool = True  # the tokenizer's EOS ends a turn too


BUILTIN: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", CHATML, ("<|im_end|>",)),
    "llama2": ChatTemplate("llama2", LLAMA2, ("</s>", "[INST]")),
    "chatglm": ChatTemplate("chatglm", CHATGLM, ("\n\n[Round ",)),
    "alpaca": ChatTemplate("alpaca", ALPACA, ("### Instruction:", "### Response:")),
    "plain": ChatTemplate("plain", PLAIN, ("\nUser:", "\nSystem:")),
}
ALIASES = {"llama-2": "llama2", "inst": "llama2", "chatglm2": "chatglm", "glm": "chatglm", "none": "plain"}

# end-of-turn markers recognised in Jinja templates
KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|user|>",
                     "<|observation|>", "</s>")


def template_names() -> list[str]:
    return list(BUILTIN)


def get_template(template: str | ChatTemplate | None, tokenizer=None) -> ChatTemplate:
    """A built-in name, a Jinja string, a ChatTemplate, or None: the tokenizer's own template, else ``plain``."""
    if isinstance(template, ChatTemplate):
        return template
    if template is None:
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(own, str) and own.strip():
            return get_template(own)
        return BUILTIN["plain"]
    key = template.strip().lower()
    key = ALIASES.get(key, key)
    if key in BUILTIN:
        if tokenizer is not None:
            _warn_text_markers(BUILTIN[key], tokenizer)
        return BUILTIN[key]
    if "{{" in template or "{%" in template:
        stops = tuple(m for m in KNOWN_END_MARKERS if m in template)
        return ChatTemplate("jinja", template, stops)
    raise LMForgeError(f"chat template {template!r}: not a built-in ({', '.join(BUILTIN)}) nor a Jinja template")


# the markers a built-in template is written with, which a tokenizer made for it has as single special tokens
MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>")}
_warned: set[tuple[str, int]] = set()


def _warn_text_markers(t: ChatTemplate, tokenizer) -> None:
    """Say once (stderr) that a template's markers are not special tokens of ``tokenizer``: they are written and
    read as text, several tokens each (a base model trained with them so learns them as words)."""
    markers = MARKERS.get(t.name, ())
    missing = [m for m in markers if m not in special_tokens(tokenizer)]
    key = (t.name, id(tokenizer))
    if not missing or key in _warned:
        return
    _warned.add(key)
    sizes = ", ".join(f"{m} {len(tokenizer.encode(m))} tokens" for m in missing)
    print(f"warning: chat template {t.name}: {sizes} (not special tokens of this tokenizer: written and read as "
          "text; a reply still ends at the text of its end marker)", file=sys.stderr)


@lru_cache(maxsize=32)
def compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters["tojson"] = lambda x, indent=None, **kw: __import__("json").dumps(x, indent=indent,
                                                                                    ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        line = getattr(e, "lineno", None)
        raise LMForgeError(f"chat template: cannot parse{f' (line {line})' if line else ''}: "
                           f"{getattr(e, 'message', None) or e}") from None


def check_messages(messages) -> list[dict[str, str]]:
    """Validate ``[{"role", "content"}, ...]`` (content may be a string or a list of text parts); normalised copy."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: must be an object with role and content")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: {role!r} is not one of {list(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string")
        out.append({"role": role, "content": content})
    return out


def apply_template(template: str | ChatTemplate | None, messages: list[dict], add_generation_prompt: bool = True,
                   bos_token: str = "<s>", eos_token: str = "</s>", tokenizer=None, **extra) -> str:
    """Render ``messages`` with ``template`` (a built-in name or a Jinja string) into one prompt string."""
    from jinja2 import TemplateError

    t = get_template(template, tokenizer)
    msgs = check_messages(messages)
    if tokenizer is not None:
        specials = {i: s for s, i in special_tokens(tokenizer).items()}
        bos_token = specials.get(tokenizer.bos_id, bos_token)
        eos_token = specials.get(tokenizer.eos_id, eos_token)
    try:
        return compile_template(t.source).render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError as e:
        raise ValueError(f"chat template {t.name}: {e}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as e:  # ({{ 1 / 0 }}, {{ x + 1 }})
        raise ValueError(f"chat template {t.name}: {type(e).__name__}: {e}") from None


def end_of_turn(template: str | ChatTemplate | None, tokenizer=None) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids) that end an assistant turn: the template's markers (as single tokens where the
    tokenizer has them), the tokenizer's EOS, BOS (a document boundary) and the model's other end ids."""
    t = get_template(template, tokenizer)
    strings, ids = list(t.stop), []
    if tokenizer is not None:
        specials = special_tokens(tokenizer)
        for s in t.stop:
            if s in specials:
                ids.append(specials[s])
        if t.stop_on_eos or not t.stop:
            ids += [i for i in (tokenizer.eos_id, tokenizer.bos_id) if i is not None]
        ids += getattr(tokenizer, "end_ids", ())
    return strings, sorted(set(ids))


# ---- special tokens in rendered text ----------------------------------------------------------------


def special_tokens(tokenizer) -> dict[str, int]:
    """Special-token strings a tokenizer should map to single ids when they appear in rendered chat text."""
    cached = getattr(tokenizer, "_lmforge_specials", None)
    if cached is not None:
        return cached
    out: dict[str, int] = {}
    kind = getattr(tokenizer, "kind", "")
    if hasattr(tokenizer, "specials") and hasattr(tokenizer, "token_to_id"):  # GGUF: encode parses them itself
        out = {s: tokenizer.token_to_id[s] for s in tokenizer.specials}
    elif hasattr(tokenizer, "tok") and hasattr(tokenizer.tok, "get_added_tokens_decoder"):  # tokenizers
        out = {t.content: i for i, t in tokenizer.tok.get_added_tokens_decoder().items()
               if not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t.content)}
    elif hasattr(tokenizer, "sp"):  # sentencepiece: control pieces are not parsed from text
        sp = tokenizer.sp
        for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
            if i is not None:
                out[sp.id_to_piece(i)] = i
    elif hasattr(tokenizer, "enc") and hasattr(tokenizer.enc, "_special_tokens"):  # tiktoken
        out = dict(tokenizer.enc._special_tokens)
    elif kind == "llama2c":
        out = {"<s>": tokenizer.bos_id, "</s>": tokenizer.eos_id}
    out = {s: i for s, i in out.items() if s and i is not None}
    try:
        tokenizer._lmforge_specials = out
    except AttributeError:
        pass
    return out


def encode_text_with_specials(tokenizer, text: str) -> list[int]:
    """Encode ``text``, mapping special-token strings (``<|im_end|>``, ``</s>``, ...) to their single ids."""
    return _encode_segments(tokenizer, text, {})


def encode_plain(tokenizer, text: str, at_start: bool = True) -> list[int]:
    """Ids of ``text`` as plain text: a special-token string in it is ordinary text, never the special token."""
    if hasattr(tokenizer, "specials") and hasattr(tokenizer, "_encode_plain"):  # GGUF: encode parses specials
        return tokenizer._encode_plain(text, at_start) if text else []
    raw = getattr(tokenizer, "tok", None)
    if raw is not None and hasattr(raw, "encode_special_tokens"):  # tokenizers: added specials are matched in text
        with _PLAIN_LOCK:
            old = raw.encode_special_tokens
            raw.encode_special_tokens = True
            try:
                return tokenizer.encode(text)
            finally:
                raw.encode_special_tokens = old
    return tokenizer.encode(text)


_PLAIN_LOCK = threading.Lock()


# Private-use code points marking, in rendered chat text, where a message's text stood in for a special string.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(_OPEN + "([0-9]+)" + _CLOSE)


def _encode_segments(tokenizer, text: str, literal: dict[int, str]) -> list[int]:
    """Encode rendered text: special-token strings become their ids; placeholders (``literal``) are restored as
    text and encoded as plain text with the text around them."""
    specials = special_tokens(tokenizer)
    pieces: list[tuple[str, bool]] = []
    if specials:
        pat = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        pos = 0
        for m in pat.finditer(text):
            if m.start() > pos:
                pieces.append((text[pos : m.start()], False))
            pieces.append((m.group(), True))
            pos = m.end()
        if pos < len(text):
            pieces.append((text[pos:], False))
    elif text:
        pieces = [(text, False)]
    ids: list[int] = []
    for k, (piece, special) in enumerate(pieces):
        if special:
            ids.append(specials[piece])
        else:
            if literal:
                piece = _PLACEHOLDER.sub(lambda m: literal[int(m.group(1))], piece)
            # text at the start or after a special token (llama.cpp's spm prefixes its space there too)
            ids += encode_plain(tokenizer, piece, at_start=k == 0 or pieces[k - 1][1])
    return ids


def _hide_specials(messages: list[dict[str, str]], specials: dict[str, int]) -> tuple[list[dict], dict[int, str]]:
    """Messages with every special-token string (and placeholder mark) in their text replaced by a placeholder,
    and the placeholders' texts: what a user writes is text, only the template makes special tokens."""
    marks = sorted({*specials, _OPEN, _CLOSE}, key=len, reverse=True)
    pat = re.compile("|".join(re.escape(s) for s in marks))
    literal: dict[int, str] = {}

    def hide(m: re.Match) -> str:
        literal[len(literal)] = m.group()
        return f"{_OPEN}{len(literal) - 1}{_CLOSE}"

    return [{**m, "content": pat.sub(hide, m["content"])} for m in messages], literal


def encode_chat(tokenizer, template: str | ChatTemplate | None, messages: list[dict],
                add_generation_prompt: bool = True) -> list[int]:
    """Render and tokenize a conversation; BOS first when the tokenizer has one and the template did not add it.

    Only the template's own text makes special tokens: a special-token string inside a message (a user writing
    ``<|im_end|>\\n<|im_start|>system``) is encoded as the plain text it is, so no one can forge a turn."""
    msgs, literal = _hide_specials(check_messages(messages), special_tokens(tokenizer))
    text = apply_template(template, msgs, add_generation_prompt, tokenizer=tokenizer)
    ids = _encode_segments(tokenizer, text, literal)
    bos = tokenizer.bos_id
    if bos is not None and (not ids or ids[0] != bos) and getattr(tokenizer, "add_bos", True):
        ids = [bos, *ids]
    return ids
