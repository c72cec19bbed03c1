"""Real tokenizers read from local files with their reference engines: sentencepiece ``.model`` files and
OpenAI BPE ranks (``.tiktoken`` files, or GPT-2's ``encoder.json`` + ``vocab.bpe``) through tiktoken.

Both engines are imported only when such a file is loaded; a missing one is a one-line LMForgeError."""

from __future__ import annotations

import base64
import json
import numbers
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer

META = "tokenizer_config.json"
# the tiktoken encodings lmforge knows the split pattern and special tokens of
ENCODINGS = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")


def write_meta(d: Path, kind: str, tok: Tokenizer, **extra) -> None:
    meta = {"kind": kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "vocab_size": tok.vocab_size, **extra}
    (d / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_ids(ids, n: int) -> list[int]:
    """``ids`` as a list of ints, or a one-line error naming the first id outside [0, n)."""
    ids = list(ids)
    for i in ids:
        if not isinstance(i, numbers.Integral) or not 0 <= i < n:
            raise LMForgeError(f"token id {i!r} is outside the vocabulary [0, {n})")
    return [int(i) for i in ids]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` with sentencepiece as the engine (``encode`` = ``SentencePieceProcessor.encode``;
    long texts are cut where no merge can cross, which gives the same ids several times faster)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise LMForgeError("reading sentencepiece .model files needs `pip install sentencepiece`") from None
        from lmforge.tokenizer import _spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise LMForgeError(f"{self.path}: not a sentencepiece model: {str(e).strip()}") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)
        proto = self.sp.serialized_model_proto()
        try:
            model = _spm.parse_model(proto)
        except (ValueError, IndexError, UnicodeDecodeError):
            model = None
        cut = _spm.cut_pattern(model) if model else None
        self.engine = _spm.ChunkedEncoder(proto, cut) if cut is not None else None
        self._bytes: list[bytes] | None = None
        self._prefix = self.sp.encode("x", out_type=str)[:1] != ["x"]  # the model adds a dummy-prefix space

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.engine.encode(text) if self.engine is not None else self.sp.encode(text)
        return self._add_special(ids, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(check_ids(ids, self.vocab_size))

    def token_bytes(self, i: int) -> bytes:
        """Bytes of one token mid-text: "▁" as a space, <0xXX> as the byte, control tokens as nothing."""
        if self._bytes is None:
            sp, out = self.sp, []
            for j in range(self.vocab_size):
                p = sp.id_to_piece(j)
                if sp.is_byte(j):
                    out.append(bytes([int(p[3:5], 16)]))
                elif sp.is_control(j) or sp.is_unknown(j):
                    out.append(b"")
                else:
                    out.append(p.replace("\u2581", " ").encode("utf-8"))
            self._bytes = out
        return self._bytes[i]

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes (a character split across byte tokens survives): pieces joined, the leading space of the
        text (sentencepiece's dummy prefix) dropped, as sentencepiece's decode does."""
        out = b"".join([self.token_bytes(i) for i in check_ids(ids, self.vocab_size)])
        return out[1:] if out[:1] == b" " and self._prefix else out

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != (d / "tokenizer.model").resolve():
            shutil.copyfile(self.path, d / "tokenizer.model")
        write_meta(d, self.kind, self)


@contextmanager
def _tiktoken_uncached():
    """tiktoken's file readers cache by the path's text (in /tmp/data-gym-cache), local files too: a .tiktoken file
    replaced at the same path (a prepared dataset's tokenizer copy, --overwrite) was read as the old ranks. Local
    files are read directly while this holds (TIKTOKEN_CACHE_DIR="" turns the cache off)."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def _pattern(encoding: str) -> tuple[str, dict[str, int]]:
    """(split regex, special tokens) of a tiktoken encoding, without downloading its ranks."""
    try:
        import tiktoken_ext.openai_public as op
    except ImportError:
        raise LMForgeError("reading OpenAI BPE rank files needs `pip install tiktoken`") from None
    name = "r50k_base" if encoding == "gpt2" else encoding
    original = op.load_tiktoken_bpe
    op.load_tiktoken_bpe = lambda *a, **k: {}  # only the pattern and special tokens are wanted: never download
    try:
        params = getattr(op, name)()
    finally:
        op.load_tiktoken_bpe = original
    return params["pat_str"], dict(params["special_tokens"])


class TiktokenTokenizer(Tokenizer):
    """OpenAI BPE ranks with tiktoken as the engine. ``encoding`` picks the split pattern and special tokens:
    gpt2/r50k_base, p50k_base, cl100k_base or o200k_base (guessed from the file name when not given).
    ``encode`` treats the text as plain text: "<|endoftext|>" in it is not the special token."""

    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], encoding: str, source: Path) -> None:
        try:
            import tiktoken
        except ImportError:
            raise LMForgeError("reading OpenAI BPE rank files needs `pip install tiktoken`") from None
        if encoding not in ENCODINGS:
            raise LMForgeError(f"{source}: unknown tiktoken encoding {encoding!r}: allowed values are "
                               f"{list(ENCODINGS)}")
        pat, specials = _pattern(encoding)
        name = "r50k_base" if encoding == "gpt2" else encoding
        try:
            self.enc = tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
        except Exception as e:  # noqa: BLE001 - the Rust core raises plain errors
            raise LMForgeError(f"{source}: tiktoken rejected the ranks: {e}") from None
        self.ranks, self.encoding, self.source = ranks, encoding, source
        self.vocab_size = self.enc.n_vocab
        self.eos_id = specials.get("<|endoftext|>")
        self.bos_id = self.pad_id = None
        self._bytes = {r: t for t, r in ranks.items()}

    @classmethod
    def from_tiktoken_file(cls, path: str | Path, encoding: str | None = None) -> TiktokenTokenizer:
        try:
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise LMForgeError("reading OpenAI BPE rank files needs `pip install tiktoken`") from None
        path = Path(path)
        try:
            with _tiktoken_uncached():
                ranks = load_tiktoken_bpe(str(path))
        except Exception as e:  # noqa: BLE001 - a malformed line raises ValueError/binascii errors
            raise LMForgeError(f"{path}: not a .tiktoken rank file: {e}") from None
        if not ranks:
            raise LMForgeError(f"{path}: empty .tiktoken rank file")
        if encoding is None:
            encoding = next((n for n in ("cl100k_base", "o200k_base", "p50k_base") if n.split("_")[0] in path.name),
                            "gpt2")
        return cls(ranks, encoding, path)

    @classmethod
    def from_gpt2_files(cls, directory: str | Path) -> TiktokenTokenizer:
        """GPT-2's ``encoder.json`` + ``vocab.bpe`` converted to ranks (tiktoken checks they agree)."""
        try:
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        except ImportError:
            raise LMForgeError("reading GPT-2 BPE files needs `pip install tiktoken`") from None
        d = Path(directory)
        try:
            with _tiktoken_uncached():
                ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
        except Exception as e:  # noqa: BLE001
            raise LMForgeError(f"{d}: cannot read encoder.json + vocab.bpe: {e}") from None
        return cls(ranks, "gpt2", d)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._add_special(self.enc.encode_ordinary(text), bos, eos)

    def token_bytes(self, i: int) -> bytes:
        b = self._bytes.get(i)
        if b is None:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise LMForgeError(f"token id {i!r} is outside the vocabulary [0, {self.vocab_size})")
            return b""  # special tokens print nothing
        return b

    def decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return b"".join([self._bytes[i] for i in ids])
        except (KeyError, TypeError):
            return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = (base64.b64encode(t).decode() + f" {r}\n" for t, r in sorted(self.ranks.items(), key=lambda x: x[1]))
        (d / "tokenizer.tiktoken").write_text("".join(lines))
        write_meta(d, self.kind, self, encoding=self.encoding)
