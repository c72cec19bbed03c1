"""Tokenizers backed by Hugging Face `tokenizers` (a ``tokenizer.json``), with lmforge's metadata beside it."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer

META = "tokenizer_config.json"


class HFTokenizer(Tokenizer):
    def __init__(self, tok, kind: str, bos: str | None = None, eos: str | None = None, pad: str | None = None,
                 chat_template: str | None = None) -> None:
        self.tok, self.kind, self.chat_template = tok, kind, chat_template
        self.vocab_size = tok.get_vocab_size()
        self.bos_id = tok.token_to_id(bos) if bos else None
        self.eos_id = tok.token_to_id(eos) if eos else None
        self.pad_id = tok.token_to_id(pad) if pad else None
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self.fast = _tiktoken_engine(tok) if kind == "bytelevel-bpe" else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if self.fast is not None:  # same ids (tests check), ~10x faster
            ids = self.fast.encode_ordinary(text)
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        return self._add_special(ids, bos, eos)

    def decode(self, ids: list[int]) -> str:
        # byte-fallback tokens (<0xXX>) are registered as special: skip only the real specials
        return self.tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        inv = {i: self.tok.id_to_token(i) for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        meta = {"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "bos_token": inv.get(self.bos_id), "eos_token": inv.get(self.eos_id),
                "pad_token": inv.get(self.pad_id), "vocab_size": self.vocab_size, "chat_template": self.chat_template}
        (d / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as RawTokenizer

        d = Path(directory)
        try:
            tok = RawTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions for bad files
            raise LMForgeError(f"{d / 'tokenizer.json'}: cannot read: {e}") from None
        meta = json.loads((d / META).read_text()) if (d / META).is_file() else {}
        return cls(tok, meta.get("kind", "hf"), meta.get("bos_token"), meta.get("eos_token"), meta.get("pad_token"),
                   meta.get("chat_template"))


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
