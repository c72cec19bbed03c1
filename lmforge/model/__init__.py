"""The one decoder and its parts."""

from lmforge.model.cache import KVCache
from lmforge.model.decoder import Block, Decoder

__all__ = ["Block", "Decoder", "KVCache"]
