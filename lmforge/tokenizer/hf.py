"""Tokenizers backed by Hugging Face `tokenizers` (a ``tokenizer.json``), with lmforge's metadata beside it."""

from __future__ import annotations

import json
import re
from itertools import chain
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer

META = "tokenizer_config.json"


class HFTokenizer(Tokenizer):
    FILES = ("tokenizer.json", META)  # what save() writes

    def __init__(self, tok, kind: str, bos: str | None = None, eos: str | None = None, pad: str | None = None,
                 chat_template: str | None = None) -> None:
        self.tok, self.kind, self.chat_template = tok, kind, chat_template
        self.vocab_size = tok.get_vocab_size()
        self.bos_id = tok.token_to_id(bos) if bos else None
        self.eos_id = tok.token_to_id(eos) if eos else None
        self.pad_id = tok.token_to_id(pad) if pad else None
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self.fast = _tiktoken_engine(tok) if kind == "bytelevel-bpe" else None
        self.words = _LlamaWords.build(tok) if kind == "llama-bpe" else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text`` as plain text (a special-token string such as "<s>" in it is text, as with tiktoken and
        sentencepiece; lmforge's chat code maps rendered specials itself)."""
        if self.fast is not None:  # same ids (tests check), ~10x faster
            ids = self.fast.encode_ordinary(text)
        elif self.words is not None:  # same ids, word cache: ~5x faster
            ids = self.words.encode(text)
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        return self._add_special(ids, bos, eos)

    def decode(self, ids: list[int]) -> str:
        # byte-fallback tokens (<0xXX>) are registered as special: skip only the real specials
        return self.tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def save(self, directory: str) -> None:
        """``tokenizer.json`` and lmforge's metadata (also transformers' ``tokenizer_config.json``). A tokenizer
        whose prompts start with BOS (llama-bpe) is saved with a post-processor adding it, so transformers' encoding
        of a prompt is lmforge's."""
        from tokenizers import Tokenizer as RawTokenizer

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.prompt_prefix() and self.tok.post_processor is None:
            bos = (self.tok.id_to_token(self.bos_id), self.bos_id)
            write_tokenizer_json(RawTokenizer.from_str(self.tok.to_str()), d, bos)
        else:
            (d / self.FILES[0]).write_text(self.tok.to_str(pretty=True), encoding="utf-8")  # (as save(); a
            # path that is not UTF-8, a GBK-named directory, is refused by the library's own file functions)
        inv = {i: self.tok.id_to_token(i) for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        meta = {"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "bos_token": inv.get(self.bos_id), "eos_token": inv.get(self.eos_id),
                "pad_token": inv.get(self.pad_id), "unk_token": _unk_token(self.tok),
                "add_bos_token": bool(self.prompt_prefix()), "vocab_size": self.vocab_size,
                "chat_template": self.chat_template}
        (d / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as RawTokenizer

        d = Path(directory)
        try:
            tok = RawTokenizer.from_str((d / "tokenizer.json").read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions for bad files
            raise LMForgeError(f"{d / 'tokenizer.json'}: cannot read: {e}") from None
        try:
            meta = json.loads((d / META).read_text(encoding="utf-8")) if (d / META).is_file() else {}
        except ValueError as e:
            raise LMForgeError(f"{d / META}: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise LMForgeError(f"{d / META}: expected a JSON object, got {type(meta).__name__}")
        for key in ("bos_token", "eos_token", "pad_token"):  # a string, or transformers' AddedToken dict
            v = meta.get(key)
            if v is not None and not isinstance(_token_text(v), str):
                raise LMForgeError(f"{d / META}: {key}: expected the token's text, got {json.dumps(v)[:40]}")
        out = cls(tok, meta.get("kind", "hf"), _token_text(meta.get("bos_token")), _token_text(meta.get("eos_token")),
                  _token_text(meta.get("pad_token")), meta.get("chat_template"))
        out.add_bos = _adds_bos(tok, out.bos_id, meta)
        return out


def _unk_token(tok) -> str | None:
    """The text of the tokenizer model's unknown token (BPE, WordLevel, WordPiece name one), for transformers'
    ``unk_token``."""
    unk = getattr(tok.model, "unk_token", None)
    return unk if isinstance(unk, str) and tok.token_to_id(unk) is not None else None


def _token_text(token) -> str | None:
    """A special token as transformers' tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _adds_bos(tok, bos_id: int | None, meta: dict) -> bool:
    """Whether a prompt starts with BOS, as transformers (5.x) encodes it: what the tokenizer's post-processor adds;
    without one, ``add_bos_token`` where the config has it, else BOS only in a tokenizer lmforge wrote (its convention
    since training: a transformers directory without a post-processor adds nothing)."""
    if bos_id is None:
        return False
    if tok.post_processor is not None:
        return tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    if isinstance(meta.get("add_bos_token"), bool):
        return meta["add_bos_token"]
    return "kind" in meta


def write_tokenizer_json(hf, directory: Path, bos: tuple[str, int] | None = None) -> None:
    """Save a ``tokenizers`` tokenizer as ``directory/tokenizer.json`` (atomically) for transformers; with ``bos``
    (its text, its id) the tokenizer prepends it, as LLaMA's does."""
    from tokenizers import processors

    if bos is not None:
        hf.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                          special_tokens=[bos])
    tmp = directory / "tokenizer.json.tmp"
    tmp.write_text(hf.to_str(pretty=True), encoding="utf-8")  # (hf.save: a path must be UTF-8)
    tmp.replace(directory / "tokenizer.json")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, inverted (the byte-level BPE vocabulary is written in them)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _tiktoken_engine(tok):
    """A tiktoken Encoding with the same ranks as a GPT-2-style byte-level BPE (ids are assigned in merge order,
    so rank order is merge priority), or None when tiktoken is missing."""
    try:
        import tiktoken
        import tiktoken_ext.openai_public as op
    except ImportError:
        return None
    dec = _byte_decoder()
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    try:
        ranks = {bytes(dec[ch] for ch in s): i for s, i in tok.get_vocab().items() if s not in added}
    except KeyError:  # not a byte-level vocabulary
        return None
    return tiktoken.Encoding("lmforge-bpe", pat_str=op.r50k_pat_str, mergeable_ranks=ranks, special_tokens={})


_ASCII_DIGITS = re.compile(r"[0-9]|[^0-9]+")
_WORD_CACHE_MAX = 200_000
_WORD_CACHE_LEN = 64  # words longer than this are encoded but not cached
# characters a word may be cut after (when no vocabulary token holds one of them followed by anything)
_CUT_CANDIDATES = "\n\r\t\u3000。，、；：！？」』）》"


class _LlamaWords:
    """llama-bpe's encode (``normalizers.Prepend("▁") + Replace(" ", "▁")``, ``Split("▁", merged_with_next)``,
    ``Digits(individual)``, BPE with byte fallback) done word by word with a cache: the normalizer and the "▁" split
    are done in Python, each distinct word is encoded once by `tokenizers` (batched) with the digit split and the
    same BPE model, and the ids are joined. A word is also cut after a character no vocabulary token continues
    past ("\n", "。", ...: no merge can cross it), which keeps Chinese words short. The added tokens are left out of
    the word encoder, so "<s>" in the text is text."""

    def __init__(self, words_tok, cuts: str) -> None:
        self.tok = words_tok
        cls = re.escape(cuts)
        self.split = re.compile(f"[{cls}]|(?:\u2581|[^\u2581{cls}])[^\u2581{cls}]*[{cls}]?" if cuts
                                else "\u2581?[^\u2581]+|\u2581")
        self.cache: dict[str, list[int]] = {}
        self.tokenize = words_tok.model.tokenize

    def _encode_words(self, words: list[str]) -> dict[str, list[int]]:
        """Ids of distinct words: ASCII words through the BPE model directly after splitting off each digit
        (Digits' "numeric" is exactly 0-9 in ASCII), others through `tokenizers` in one batch."""
        out: dict[str, list[int]] = {}
        other = []
        tokenize, digits = self.tokenize, _ASCII_DIGITS.findall
        for w in words:
            if w.isascii() or (w[0] == "\u2581" and w[1:].isascii()):  # "▁" only ever starts a word
                out[w] = [t.id for part in digits(w) for t in tokenize(part)]
            else:
                other.append(w)
        if other:
            out.update(zip(other, (e.ids for e in self.tok.encode_batch_fast(other, add_special_tokens=False))))
        return out

    @classmethod
    def build(cls, tok) -> _LlamaWords | None:
        """The word encoder of a tokenizer laid out exactly as train.py writes llama-bpe, else None."""
        from tokenizers import Tokenizer as RawTokenizer

        try:
            d = json.loads(tok.to_str())
        except (ValueError, AttributeError):
            return None
        norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        digits = {"type": "Digits", "individual_digits": True}
        pre = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"String": "\u2581"},
               "behavior": "MergedWithNext", "invert": False}, digits]}
        model = d.get("model") or {}
        if (d.get("normalizer") != norm or d.get("pre_tokenizer") != pre or model.get("type") != "BPE"
                or model.get("dropout") or model.get("continuing_subword_prefix")
                or model.get("end_of_word_suffix") or d.get("truncation") or d.get("padding")):
            return None
        vocab = model.get("vocab") or {}
        cuts = "".join(c for c in _CUT_CANDIDATES if not any(c in t[:-1] for t in vocab))
        d.update(normalizer=None, pre_tokenizer=digits, post_processor=None, added_tokens=[])
        try:
            return cls(RawTokenizer.from_str(json.dumps(d)), cuts)
        except Exception:  # noqa: BLE001 - the library raises bare Exceptions
            return None

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        words = self.split.findall("\u2581" + text.replace(" ", "\u2581"))
        cache = self.cache
        missing = list({w: None for w in words if w not in cache})
        if missing:
            if len(cache) + len(missing) > _WORD_CACHE_MAX:
                cache.clear()
            fresh = self._encode_words(missing)
            cache.update(fresh)
            ids = list(chain.from_iterable(map(cache.__getitem__, words)))
            for w in fresh:
                if len(w) > _WORD_CACHE_LEN:
                    del cache[w]
            return ids
        return list(chain.from_iterable(map(cache.__getitem__, words)))
