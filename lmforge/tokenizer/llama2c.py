"""llama2.c's ``tokenizer.bin``: a sentencepiece-style BPE vocabulary with scores, encoded exactly as run.c does.

Layout: int32 max_token_length, then per token: float32 score, int32 byte length, bytes.
Ids 0/1/2 are <unk>/<s>/</s>; ``<0xXX>`` pieces are raw bytes (byte fallback, id = byte + 3).

run.c's ``encode``: optional BOS, the dummy-prefix token " " when the text is not empty, one token per UTF-8
character (its bytes + 3 when the character is not a piece), then repeatedly merge the adjacent pair whose
concatenation is the best-scoring piece (leftmost on ties). Two engines give those ids:

- sentencepiece, from a model built in memory out of the same pieces and scores, when the vocabulary is one where
  sentencepiece's BPE provably does what run.c does (see ``_spm_compatible``) and the text holds no U+2581 "▁"
  (sentencepiece reads that character as a space; run.c's vocabulary stores spaces as " ");
- otherwise an O(n log n) heap merge in Python over space-delimited segments (a merge can never cross them in
  vocabularies without a piece holding a non-space byte followed by a space), with a cache of segments.
"""

from __future__ import annotations

import heapq
import json
import re
import struct
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError
from lmforge.tokenizer._spm import ChunkedEncoder, cut_pattern, field, parse_model
from lmforge.tokenizer.base import Tokenizer
from lmforge.tokenizer.hf import write_tokenizer_json

BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")
FILE = "tokenizer.bin"
META = "tokenizer_config.json"
SPM_SPACE = "\u2581"
_MIN_SCORE = -1e10  # run.c starts its best score here: pairs scoring <= -1e10 are never merged
_CACHE_MAX = 200_000


class Llama2cTokenizer(Tokenizer):
    """A llama2.c ``tokenizer.bin`` vocabulary. ``pieces`` are the raw piece bytes, ``scores`` their merge scores."""

    kind = "llama2c"

    def __init__(self, pieces: list[bytes], scores: list[float], bos_id: int = 1, eos_id: int = 2,
                 engine: str = "auto") -> None:
        if len(pieces) != len(scores):
            raise LMForgeError(f"llama2.c tokenizer: {len(pieces)} pieces but {len(scores)} scores")
        if len(pieces) < 3:
            raise LMForgeError(f"llama2.c tokenizer: {len(pieces)} pieces, need at least <unk>, <s>, </s>")
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(s) for s in scores]
        self.vocab_size = len(self.pieces)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, None
        self.lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self.lookup.setdefault(p, i)  # first id wins on duplicates
        self.byte_of = {i: bytes([int(m.group(1), 16)]) for i, p in enumerate(self.pieces)
                        if (m := BYTE_PIECE.match(p))}
        # bytes each id decodes to (control and unknown tokens decode to nothing)
        self._out = [self.byte_of.get(i, p) for i, p in enumerate(self.pieces)]
        for i in (0, bos_id, eos_id):
            if i is not None and 0 <= i < self.vocab_size and not (i == 0 and i in self.byte_of):
                self._out[i] = b""
        self._space_id = self.lookup.get(b" ")
        # ids of single characters (str -> ids), filled lazily
        self._char_ids: dict[str, tuple[int, ...]] = {}
        self._cache: dict[str, list[int]] = {}
        # a merge never crosses "X| " (X not a space) when no piece holds a non-space byte followed by a space
        self._split_spaces = self._space_id is not None and not any(
            re.search(rb"[^ ] ", p) for p in self.pieces)
        self._sp = None
        self._sp_reason = "engine='python' requested"
        if engine == "auto":
            self._sp_reason = _spm_compatible(self)
            if self._sp_reason is None:
                self._sp = _build_spm(self)
                if self._sp is None:
                    self._sp_reason = "sentencepiece rejected the model built from the pieces"
        elif engine != "python":
            raise LMForgeError(f"llama2.c tokenizer: engine {engine!r}: allowed values are 'auto', 'python'")

    @property
    def engine(self) -> str:
        """'sentencepiece' when run.c's ids come from sentencepiece, else 'python'."""
        return "sentencepiece" if self._sp is not None else "python"

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto") -> Llama2cTokenizer:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise LMForgeError(f"{path}: cannot read: {e.strerror}") from None
        pieces, scores = read_llama2c_tokenizer_bytes(raw, str(path))
        bos, eos = 1, 2
        meta = path.parent / META
        if meta.is_file():  # ids written by save(); a plain llama2.c file uses 1 and 2
            try:
                m = json.loads(meta.read_text(encoding="utf-8"))
                if m.get("kind") == "llama2c":
                    bos, eos = m.get("bos_id", bos), m.get("eos_id", eos)
            except ValueError:
                raise LMForgeError(f"{meta}: not valid JSON") from None
        return cls(pieces, scores, bos, eos, engine=engine)

    @classmethod
    def from_sentencepiece(cls, model_file: str | Path) -> Llama2cTokenizer:
        """The vocabulary of a sentencepiece BPE ``.model`` as llama2.c's tokenizer.py exports it:
        BOS/EOS become "\\n<s>\\n"/"\\n</s>\\n" and "▁" becomes " "."""
        try:
            import sentencepiece as spm
        except ImportError:
            raise LMForgeError("reading sentencepiece .model files needs `pip install sentencepiece`") from None
        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise LMForgeError(f"{model_file}: not a sentencepiece model: {e}") from None
        pieces, scores = [], []
        for i in range(sp.get_piece_size()):
            t = sp.id_to_piece(i)
            if i == sp.bos_id():
                t = "\n<s>\n"
            elif i == sp.eos_id():
                t = "\n</s>\n"
            pieces.append(t.replace(SPM_SPACE, " ").encode("utf-8"))
            scores.append(sp.get_score(i))
        return cls(pieces, scores, sp.bos_id(), sp.eos_id())

    # ---- encode ---------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise LMForgeError(f"llama2.c tokenizer: encode expects a str, got {type(text).__name__}")
        try:
            if self._sp is not None and SPM_SPACE not in text:
                ids = self._sp.encode(text)
            else:
                ids = self._encode_python(text)
        except UnicodeEncodeError as e:
            raise LMForgeError(f"text is not valid Unicode at character {e.start}: {e.reason}") from None
        return self._add_special(ids, bos, eos)

    def _encode_python(self, text: str) -> list[int]:
        if not text:
            return []
        text = " " + text  # run.c's dummy prefix: the token " " before non-empty text
        segments = _SPACE_SPLIT.split(text) if self._split_spaces else [text]
        out: list[int] = []
        cache = self._cache
        for seg in segments:
            if not seg:
                continue
            ids = cache.get(seg)
            if ids is None:
                ids = self._merge(self._initial(seg))
                if len(seg) < 64:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[seg] = ids
            out.extend(ids)
        return out

    def _initial(self, text: str) -> list[int]:
        """One id per character, or its UTF-8 bytes + 3 when the character is not a piece."""
        ids: list[int] = []
        char_ids = self._char_ids
        for ch in text:
            t = char_ids.get(ch)
            if t is None:
                b = ch.encode("utf-8")
                i = self.lookup.get(b)
                t = (i,) if i is not None else tuple(x + 3 for x in b)
                char_ids[ch] = t
            ids.extend(t)
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop (best score, leftmost on ties) in O(n log n): a heap of candidate pairs over a linked
        list; a popped pair is stale when either side changed since it was pushed (merges only lengthen pieces)."""
        n = len(ids)
        if n < 2:
            return ids
        pieces, lookup, scores = self.pieces, self.lookup, self.scores
        strs: list[bytes | None] = [pieces[i] for i in ids]
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for k in range(n - 1):
            a, b = strs[k], strs[k + 1]
            j = lookup.get(a + b)
            if j is not None and scores[j] > _MIN_SCORE:
                heap.append((-scores[j], k, j, len(a), len(b)))
        if not heap:
            return ids
        heapq.heapify(heap)
        ids = list(ids)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, k, j, la, lb = pop(heap)
            a = strs[k]
            r = nxt[k]
            if a is None or r < 0 or len(a) != la or len(strs[r]) != lb:
                continue  # stale
            merged = a + strs[r]
            strs[k], ids[k], strs[r] = merged, j, None
            nr = nxt[r]
            nxt[k] = nr
            if nr >= 0:
                prv[nr] = k
                c = strs[nr]
                j2 = lookup.get(merged + c)
                if j2 is not None and scores[j2] > _MIN_SCORE:
                    push(heap, (-scores[j2], k, j2, len(merged), len(c)))
            p = prv[k]
            if p >= 0:
                c = strs[p]
                j2 = lookup.get(c + merged)
                if j2 is not None and scores[j2] > _MIN_SCORE:
                    push(heap, (-scores[j2], p, j2, len(c), len(merged)))
        out, k = [], 0
        while k >= 0:
            out.append(ids[k])
            k = nxt[k]
        return out

    # ---- decode ---------------------------------------------------------------------------------------

    def token_bytes(self, i: int) -> bytes:
        """The bytes of one token as it appears mid-text (no start-of-text space stripping)."""
        return self._out[i]

    def bytes_after(self, prev: int, i: int) -> bytes | None:
        """The bytes token ``i`` adds right after token ``prev`` (``decode_bytes`` of a text ending in ``prev`` and
        then ``i`` minus that of the text up to ``prev``), where that is its piece as is: ``prev`` shown text (so
        ``i`` is not where a leading space is stripped) and ``i`` is no BOS. None otherwise, and for ids out of
        range (``decode_bytes`` says what is wrong)."""
        out = self._out
        if 0 <= prev < len(out) and 0 <= i < len(out) and out[prev] and i != self.bos_id:
            return out[i]
        return None

    def decode_bytes(self, ids: list[int]) -> bytes:
        """run.c's decode, done right: BOS/EOS/<unk> produce nothing, the piece after BOS (or the first piece)
        drops its leading space (the dummy prefix), ``<0xXX>`` pieces are raw bytes."""
        out = self._out
        bos = self.bos_id
        parts: list[bytes] = []
        strip = True  # at the start of the text, or right after BOS
        try:
            for i in ids:
                if i == bos:
                    strip = True
                    continue
                piece = out[i]
                if not piece:
                    continue
                if strip:
                    if piece[:1] == b" ":
                        piece = piece[1:]
                    strip = False
                parts.append(piece)
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size)
            raise LMForgeError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})") from None
        return b"".join(parts)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- save -----------------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_llama2c_tokenizer(d / FILE, self.pieces, self.scores)
        meta = {"kind": "llama2c", "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": None,
                "vocab_size": self.vocab_size, "chat_template": None, **self._save_hf(d)}
        (d / META).write_text(json.dumps(meta, indent=2) + "\n")

    def _save_hf(self, d: Path) -> dict[str, Any]:
        """``tokenizer.json`` beside ``tokenizer.bin`` for transformers, as its Llama converter makes one from a
        SentencePiece model: the pieces (spaces as "▁"), merges ranked by the merged piece's score, byte fallback, a
        "▁" before the text, BOS added. Its keys for tokenizer_config.json ({} when the pieces are not text)."""
        from tokenizers import AddedToken, decoders, normalizers
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers.models import BPE

        try:
            names = [p.decode("utf-8").replace(" ", "\u2581") for p in self.pieces]
        except UnicodeDecodeError:
            return {}
        vocab: dict[str, int] = {}
        for i, t in enumerate(names):
            vocab.setdefault(t, i)
        special = {i: names[i] for i in (0, self.bos_id, self.eos_id) if i is not None and 0 <= i < len(names)}
        merges = []
        for t, i in vocab.items():
            if i in special or i in self.byte_of:
                continue
            for k in range(1, len(t)):
                left, right = t[:k], t[k:]
                if left in vocab and right in vocab:
                    merges.append((-self.scores[i], vocab[left], vocab[right], left, right))
        merges.sort()
        hf = RawTokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=names[0], fuse_unk=True,
                              byte_fallback=True))
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
        write_tokenizer_json(hf, d, (special[self.bos_id], self.bos_id) if self.bos_id in special else None)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": special.get(0),
                "bos_token": special.get(self.bos_id), "eos_token": special.get(self.eos_id)}


_SPACE_SPLIT = re.compile(r"(?<=[^ ])(?= )")


def read_llama2c_tokenizer_bytes(raw: bytes, name: str = "tokenizer.bin") -> tuple[list[bytes], list[float]]:
    """(pieces, scores) from the bytes of a llama2.c tokenizer.bin."""
    if len(raw) < 4:
        raise LMForgeError(f"{name}: not a llama2.c tokenizer.bin ({len(raw)} bytes)")
    (max_len,) = struct.unpack_from("<i", raw, 0)
    pieces: list[bytes] = []
    scores: list[float] = []
    off = 4
    while off < len(raw):
        if off + 8 > len(raw):
            raise LMForgeError(f"{name}: truncated at byte {off} (token {len(pieces)}): not a llama2.c tokenizer.bin")
        score, n = struct.unpack_from("<fi", raw, off)
        if n < 0 or off + 8 + n > len(raw) or n > max_len:
            raise LMForgeError(f"{name}: token {len(pieces)} at byte {off}: length {n} is invalid "
                               f"(max_token_length {max_len}): not a llama2.c tokenizer.bin")
        pieces.append(raw[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    if len(pieces) < 3:
        raise LMForgeError(f"{name}: not a llama2.c tokenizer.bin ({len(pieces)} tokens)")
    return pieces, scores


def write_llama2c_tokenizer(path: str | Path, pieces: list[bytes] | list[str], scores: list[float]) -> None:
    """Write a llama2.c tokenizer.bin (atomically). ``pieces`` as bytes, or str (UTF-8 encoded)."""
    path = Path(path)
    raw = [p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in pieces]
    if len(raw) != len(scores):
        raise LMForgeError(f"{path}: {len(raw)} pieces but {len(scores)} scores")
    if not raw:
        raise LMForgeError(f"{path}: no pieces to write")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in raw)))
        for p, s in zip(raw, scores):
            f.write(struct.pack("<fi", s, len(p)) + p)
    tmp.replace(path)


# ---- sentencepiece as the engine ------------------------------------------------------------------------


def _spm_compatible(tok: Llama2cTokenizer) -> str | None:
    """None when sentencepiece's BPE (identity normalizer, dummy prefix, byte fallback, " " written as "▁")
    gives run.c's ids for every text without "▁"; otherwise the reason it may not.

    run.c merges any pieces whose concatenation is a piece and maps unknown characters to bytes before merging;
    sentencepiece never merges into or out of control/byte pieces and lets an unknown character merge into a
    longer piece. These agree when: ids 3..258 are the 256 byte pieces (run.c's id = byte + 3); pieces are unique,
    non-empty UTF-8 without "▁" and " " is one; no control/byte piece is a single character or the concatenation of
    two pieces; every character of a normal piece is a piece; no normal piece contains a byte piece's text."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return "sentencepiece is not installed"
    pieces, n = tok.pieces, tok.vocab_size
    if n < 259 or any(pieces[3 + b] != f"<0x{b:02X}>".encode() for b in range(256)):
        return "ids 3..258 are not the byte pieces <0x00>..<0xFF>"
    if (tok.bos_id, tok.eos_id) != (1, 2):
        return "BOS/EOS are not ids 1/2"
    if len(tok.lookup) != n or any(not p for p in pieces):
        return "duplicate or empty pieces"
    if b" " not in tok.lookup:
        return "no ' ' piece"
    special = set(range(259))
    texts: dict[int, str] = {}
    for i, p in enumerate(pieces):
        try:
            texts[i] = p.decode("utf-8")
        except UnicodeDecodeError:
            return f"piece {i} is not UTF-8"
        if SPM_SPACE in texts[i]:
            return f"piece {i} contains U+2581"
    for i in special:
        s = pieces[i]
        if len(texts[i]) == 1 or any(s[:k] in tok.lookup and s[k:] in tok.lookup for k in range(1, len(s))):
            return f"control/byte piece {i} can be formed by run.c's lookup or merges"
    byte_text = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
    for i in range(259, n):
        t = texts[i]
        if len(t) > 1 and any(c.encode() not in tok.lookup or tok.lookup[c.encode()] < 259 for c in t):
            return f"piece {i} holds a character that is not a piece"
        if byte_text.search(pieces[i]):
            return f"piece {i} contains a byte piece's text"
    return None


def spm_model_proto(tok: Llama2cTokenizer) -> bytes:
    """A serialized sentencepiece ModelProto (BPE) with the tokenizer's pieces and scores."""
    out = bytearray()
    for i, p in enumerate(tok.pieces):
        kind = 2 if i == 0 else 3 if i in (1, 2) else 6 if i < 259 else 1  # UNKNOWN, CONTROL, BYTE, NORMAL
        text = p.decode("utf-8").replace(" ", SPM_SPACE) if kind == 1 else p.decode("utf-8")
        sp = field(1, text.encode("utf-8"), 2) + field(2, tok.scores[i], 5) + field(3, kind, 0)
        out += field(1, sp, 2)
    # TrainerSpec: model_type=BPE, vocab_size, byte_fallback, unk/bos/eos ids
    trainer = (field(3, 2, 0) + field(4, tok.vocab_size, 0) + field(35, 1, 0) + field(40, 0, 0)
               + field(41, 1, 0) + field(42, 2, 0))
    out += field(2, trainer, 2)
    # NormalizerSpec: identity, add_dummy_prefix, no whitespace removal, escape whitespaces
    norm = field(1, b"identity", 2) + field(3, 1, 0) + field(4, 0, 0) + field(5, 1, 0)
    out += field(3, norm, 2)
    return bytes(out)


def _build_spm(tok: Llama2cTokenizer) -> ChunkedEncoder | None:
    proto = spm_model_proto(tok)
    try:
        return ChunkedEncoder(proto, cut_pattern(parse_model(proto)))
    except (RuntimeError, OSError, TypeError):
        return None
