"""llama2.c's ``tokenizer.bin``: a sentencepiece-style BPE vocabulary with scores, encoded as run.c does.

Layout: int32 max_token_length, then per token: float32 score, int32 byte length, bytes.
Ids 0/1/2 are <unk>/<s>/</s>; ``<0xXX>`` pieces are raw bytes (byte fallback, id = byte + 3).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer

BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")
FILE = "tokenizer.bin"


class Llama2cTokenizer(Tokenizer):
    kind = "llama2c"

    def __init__(self, pieces: list[bytes], scores: list[float], bos_id: int = 1, eos_id: int = 2) -> None:
        self.pieces, self.scores = pieces, scores
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, None
        self.lookup = {p: i for i, p in reversed(list(enumerate(pieces)))}  # first id wins on duplicates
        self.byte_of = {i: bytes([int(m.group(1), 16)]) for i, p in enumerate(pieces) if (m := BYTE_PIECE.match(p))}

    @classmethod
    def load(cls, path: str | Path) -> Llama2cTokenizer:
        path = Path(path)
        raw = path.read_bytes()
        pieces, scores, off = [], [], 4
        try:
            while off < len(raw):
                score, n = struct.unpack_from("<fi", raw, off)
                if n < 0 or off + 8 + n > len(raw):
                    raise struct.error
                pieces.append(raw[off + 8 : off + 8 + n])
                scores.append(score)
                off += 8 + n
        except struct.error:
            raise LMForgeError(f"{path}: truncated or not a llama2.c tokenizer.bin (token {len(pieces)})") from None
        if len(pieces) < 3:
            raise LMForgeError(f"{path}: not a llama2.c tokenizer.bin ({len(pieces)} tokens)")
        return cls(pieces, scores)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = []
        if text:  # sentencepiece's dummy prefix
            text = " " + text
        for ch in text:
            i = self.lookup.get(ch.encode("utf-8"))
            if i is not None:
                ids.append(i)
            else:
                ids.extend(b + 3 for b in ch.encode("utf-8"))
        while True:  # merge the best-scoring adjacent pair until none is in the vocabulary
            best, best_i, best_id = -1e10, -1, -1
            for k in range(len(ids) - 1):
                j = self.lookup.get(self.pieces[ids[k]] + self.pieces[ids[k + 1]])
                if j is not None and self.scores[j] > best:
                    best, best_i, best_id = self.scores[j], k, j
            if best_i < 0:
                break
            ids[best_i : best_i + 2] = [best_id]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode_bytes(self, ids: list[int]) -> bytes:
        out = bytearray()
        prev = None
        for i in ids:
            if i in (self.bos_id, self.eos_id) or i == 0 and self.pieces[0] == b"<unk>":
                prev = i
                continue
            piece = self.byte_of.get(i, self.pieces[i])
            if (prev == self.bos_id or not out and prev is None) and piece.startswith(b" "):
                piece = piece[1:]  # the dummy prefix space
            out += piece
            prev = i
        return bytes(out)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_llama2c_tokenizer(d / FILE, self.pieces, self.scores)
        meta = {"kind": "llama2c", "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": None,
                "vocab_size": self.vocab_size}
        (d / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")


def write_llama2c_tokenizer(path: str | Path, pieces: list[bytes], scores: list[float]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)) + p)
    tmp.replace(path)
