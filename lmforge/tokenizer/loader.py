"""Pick a tokenizer reader by what the path holds."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer
from lmforge.tokenizer.external import ENCODINGS


class NoTokenizerFiles(LMForgeError):
    """A directory without any tokenizer file lmforge reads."""


def load_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if not p.exists():
        raise LMForgeError(f"{p}: no such tokenizer file or directory")
    if p.suffix == ".gguf":
        from lmforge.interop.gguf_file import load_gguf_tokenizer

        return load_gguf_tokenizer(p)
    if p.is_dir():
        kind = None
        meta: dict = {}
        if (p / "tokenizer_config.json").is_file():
            try:
                meta = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
            except ValueError:
                raise LMForgeError(f"{p / 'tokenizer_config.json'}: not valid JSON") from None
            if not isinstance(meta, dict):
                raise LMForgeError(f"{p / 'tokenizer_config.json'}: expected a JSON object, got "
                                   f"{type(meta).__name__}")
            kind = meta.get("kind")
        if (p / "tokenizer.tiktoken").is_file():
            from lmforge.tokenizer.external import TiktokenTokenizer

            return TiktokenTokenizer.from_tiktoken_file(p / "tokenizer.tiktoken",
                                                        meta.get("encoding") if kind else None)
        if (p / "encoder.json").is_file() and (p / "vocab.bpe").is_file():
            from lmforge.tokenizer.external import TiktokenTokenizer

            return TiktokenTokenizer.from_gpt2_files(p)
        if kind == "char" or (p / "char_vocab.json").is_file():
            from lmforge.tokenizer.char import CharTokenizer

            return CharTokenizer.load(str(p))
        if kind == "llama2c" and (p / "tokenizer.bin").is_file():  # (its tokenizer.json is for transformers)
            from lmforge.tokenizer.llama2c import Llama2cTokenizer

            return Llama2cTokenizer.load(p / "tokenizer.bin")
        # (kind gguf without tokenizer.gguf: transformers' save_pretrained of an exported directory keeps the kind,
        # drops the file, and writes tokenizer.json, the same tokenizer)
        if (p / "tokenizer.gguf").is_file() or kind == "gguf" and not (p / "tokenizer.json").is_file():
            from lmforge.interop.gguf_file import load_gguf_tokenizer

            return load_gguf_tokenizer(p)
        if (p / "tokenizer.json").is_file():
            from lmforge.tokenizer.hf import HFTokenizer

            return HFTokenizer.load(p)
        if (p / "tokenizer.model").is_file():
            from lmforge.tokenizer.external import SentencePieceTokenizer

            return SentencePieceTokenizer(p / "tokenizer.model")
        if (p / "tokenizer.bin").is_file():
            from lmforge.tokenizer.llama2c import Llama2cTokenizer

            return Llama2cTokenizer.load(p / "tokenizer.bin")
        ranks = sorted(p.glob("*.tiktoken"))
        if len(ranks) == 1 and ranks[0].stem in ENCODINGS:  # tiktoken's own file of an encoding
            from lmforge.tokenizer.external import TiktokenTokenizer

            return TiktokenTokenizer.from_tiktoken_file(ranks[0])
        inner = p / "tokenizer"  # (a prepared dataset keeps its tokenizer there)
        hint = f"; its tokenizer is {inner}" if inner.is_dir() and any(inner.iterdir()) else ""
        if ranks:  # (a model's own rank file, e.g. Qwen's, comes with special tokens lmforge does not know)
            hint = f"; give a .tiktoken file itself ({ranks[0]}), or rename it tokenizer.tiktoken"
        raise NoTokenizerFiles(f"{p}: no tokenizer files found (tokenizer.json, tokenizer.bin, char_vocab.json)"
                               f"{hint}")
    if p.suffix == ".bin":
        from lmforge.tokenizer.llama2c import Llama2cTokenizer

        return Llama2cTokenizer.load(p)
    if p.suffix == ".model":
        from lmforge.tokenizer.external import SentencePieceTokenizer

        return SentencePieceTokenizer(p)
    if p.suffix == ".tiktoken":
        from lmforge.tokenizer.external import TiktokenTokenizer

        return TiktokenTokenizer.from_tiktoken_file(p)
    hint = ""
    if p.name in ("tokenizer.json", "tokenizer_config.json", "char_vocab.json", "encoder.json", "vocab.bpe"):
        hint = f"; {p.name} is read with the files beside it: give its directory {p.parent}"
    raise LMForgeError(f"{p}: unknown tokenizer format (expected a directory, .bin, .model, .tiktoken or .gguf){hint}")
