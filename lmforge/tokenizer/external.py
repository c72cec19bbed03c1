"""Real tokenizers read from local files with their reference engines: sentencepiece ``.model`` files and
OpenAI BPE ranks (``.tiktoken`` files, or GPT-2's ``encoder.json`` + ``vocab.bpe``) through tiktoken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer


def _meta(d: Path, kind: str, tok: Tokenizer, **extra) -> None:
    meta = {"kind": kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "vocab_size": tok.vocab_size, **extra}
    (d / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise LMForgeError("reading sentencepiece .model files needs `pip install sentencepiece`") from None
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise LMForgeError(f"{self.path}: not a sentencepiece model: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return self._add_special(ids, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, d / "tokenizer.model")
        _meta(d, self.kind, self)


class TiktokenTokenizer(Tokenizer):
    """OpenAI BPE ranks with tiktoken as the engine. ``encoding`` picks the split pattern and special tokens:
    gpt2/r50k_base, p50k_base, cl100k_base or o200k_base (guessed from the file name when not given)."""

    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], encoding: str, source: Path) -> None:
        try:
            import tiktoken
            import tiktoken_ext.openai_public as op
        except ImportError:
            raise LMForgeError("reading OpenAI BPE rank files needs `pip install tiktoken`") from None
        name = "r50k_base" if encoding == "gpt2" else encoding
        if name not in ("r50k_base", "p50k_base", "cl100k_base", "o200k_base"):
            raise LMForgeError(f"{source}: unknown tiktoken encoding {encoding!r}")
        original = op.load_tiktoken_bpe
        op.load_tiktoken_bpe = lambda *a, **k: ranks  # use the local ranks, never a download
        try:
            params = getattr(op, name)()
        finally:
            op.load_tiktoken_bpe = original
        self.enc = tiktoken.Encoding(name=name, pat_str=params["pat_str"], mergeable_ranks=ranks,
                                     special_tokens=params["special_tokens"])
        self.ranks, self.encoding, self.source = ranks, encoding, source
        self.vocab_size = self.enc.n_vocab
        self.eos_id = params["special_tokens"].get("<|endoftext|>")
        self.bos_id = self.pad_id = None

    @classmethod
    def from_tiktoken_file(cls, path: str | Path, encoding: str | None = None) -> TiktokenTokenizer:
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path)
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as e:  # noqa: BLE001 - a malformed line raises ValueError/binascii errors
            raise LMForgeError(f"{path}: not a .tiktoken rank file: {e}") from None
        if encoding is None:
            encoding = next((n for n in ("cl100k_base", "o200k_base", "p50k_base") if n.split("_")[0] in path.name),
                            "gpt2")
        return cls(ranks, encoding, path)

    @classmethod
    def from_gpt2_files(cls, directory: str | Path) -> TiktokenTokenizer:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        d = Path(directory)
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
        except Exception as e:  # noqa: BLE001
            raise LMForgeError(f"{d}: cannot read encoder.json + vocab.bpe: {e}") from None
        return cls(ranks, "gpt2", d)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        import base64

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = (base64.b64encode(t).decode() + f" {r}\n" for t, r in sorted(self.ranks.items(), key=lambda x: x[1]))
        (d / "tokenizer.tiktoken").write_text("".join(lines))
        _meta(d, self.kind, self, encoding=self.encoding)
