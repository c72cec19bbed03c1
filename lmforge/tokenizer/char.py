"""Character-level tokenizer (nanoGPT's shakespeare_char): the vocabulary is the sorted set of characters."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer

VOCAB_FILE = "char_vocab.json"


class CharTokenizer(Tokenizer):
    kind = "char"
    FILES = (VOCAB_FILE, "tokenizer_config.json")  # what save() writes

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self._table = None

    def _lookup_table(self):
        """code point -> id (-1 for characters outside the vocabulary), for vectorized encoding."""
        if self._table is None:
            import numpy as np

            top = max((ord(c) for c in self.chars if len(c) == 1), default=0)
            table = np.full(top + 2, -1, dtype=np.int64)
            for c, i in self.stoi.items():
                if len(c) == 1:
                    table[ord(c)] = i
            self._table = table
        return self._table

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if len(text) > 64 and all(len(c) == 1 for c in self.stoi):  # vectorized: same ids, ~10x faster
            import numpy as np

            table = self._lookup_table()
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            ids = table[np.minimum(cps, len(table) - 1)]
            if not (ids < 0).any():
                return ids.tolist()
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            n = self.vocab_size
            raise LMForgeError(f"character {e.args[0]!r} is not in the {n}-character vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / VOCAB_FILE).write_text(json.dumps(self.chars, ensure_ascii=False) + "\n", encoding="utf-8")
        meta = {"kind": "char", "bos_id": None, "eos_id": None, "pad_id": None, "vocab_size": self.vocab_size}
        (d / self.FILES[1]).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str) -> CharTokenizer:
        """The vocabulary of ``directory/char_vocab.json``: a JSON list of distinct single characters (anything else
        is one line naming the file: it was a JSONDecodeError, or a vocabulary whose ids encode could not give)."""
        path = Path(directory) / VOCAB_FILE
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LMForgeError(f"{path}: cannot read a char vocabulary: {str(e).splitlines()[0]}") from None
        if not isinstance(chars, list) or not chars:
            raise LMForgeError(f"{path}: expected a non-empty JSON list of characters")
        bad = next((c for c in chars if not isinstance(c, str) or len(c) != 1), None)
        if bad is not None:
            raise LMForgeError(f"{path}: entry {json.dumps(bad, ensure_ascii=False)[:40]} is not one character")
        if len(set(chars)) != len(chars):
            dup = next(c for i, c in enumerate(chars) if c in chars[:i])
            raise LMForgeError(f"{path}: character {dup!r} appears twice (each id is one character)")
        return cls(chars)
