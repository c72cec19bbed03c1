"""Tokenizers: llama2.c tokenizer.bin, and (see load_tokenizer) the other formats lmforge reads."""

from lmforge.tokenizer.base import Tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a checkpoint directory or a tokenizer file, choosing the format by content."""
    from lmforge.tokenizer.loader import load_tokenizer as _load

    return _load(path)
