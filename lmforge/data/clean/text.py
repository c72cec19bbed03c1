"""Text helpers shared by the cleaning stages: CJK detection, tokens (words, or single characters for CJK), stable
64-bit token hashes and vectorized n-gram hashes."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

# CJK ideographs (+ extension A, compatibility, extension B-F), kana, hangul: one "word" per character.
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af\U00020000-\U0002ebef"
_CJK = re.compile(f"[{CJK_RANGES}]")
# a token: one CJK character, or a run of word characters that are not CJK and not "_"
_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")
_SPACE = re.compile(r"\s+")
_NON_WORD = re.compile(r"[\W_]+")

_MASK64 = (1 << 64) - 1


def cjk_count(text: str) -> int:
    return len(_CJK.findall(text))


def cjk_fraction(text: str) -> float:
    """CJK characters / non-space characters."""
    n = len(text) - text.count(" ") - text.count("\n") - text.count("\t")
    return cjk_count(text) / n if n > 0 else 0.0


def is_cjk_text(text: str, threshold: float = 0.3) -> bool:
    return cjk_fraction(text) >= threshold


def tokens(text: str) -> list[str]:
    """Lower-cased tokens: a CJK character is a token, other tokens are runs of letters/digits."""
    return _TOKEN.findall(text.lower())


def normalize(text: str) -> str:
    """For exact de-duplication: NFKC, lower case, punctuation/underscores removed, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _NON_WORD.sub(" ", t)).strip()


class TokenHasher:
    """Stable 64-bit hashes of tokens (blake2b, cached) and of token n-grams (vectorized with numpy)."""

    def __init__(self, max_cache: int = 1 << 21) -> None:
        self.cache: dict[str, int] = {}
        self.max_cache = max_cache
        rng = np.random.default_rng(0x5EED)
        self._mult = (rng.integers(1, 1 << 63, size=64, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)

    def _hash(self, tok: str) -> int:
        h = int.from_bytes(hashlib.blake2b(tok.encode("utf-8"), digest_size=8).digest(), "little")
        if len(self.cache) >= self.max_cache:
            self.cache.clear()
        self.cache[tok] = h
        return h

    def hash_tokens(self, toks: list[str]) -> np.ndarray:
        hs = list(map(self.cache.get, toks))
        if None in hs:
            hs = [h if h is not None else self._hash(t) for h, t in zip(hs, toks)]
        return np.array(hs, dtype=np.uint64)

    def ngrams(self, hashes: np.ndarray, n: int) -> np.ndarray:
        """64-bit hash of every n-gram of a token-hash array (``len - n + 1`` values, none if shorter than n)."""
        m = len(hashes) - n + 1
        if m <= 0:
            return np.zeros(0, dtype=np.uint64)
        h = hashes[:m] * self._mult[0]
        for k in range(1, n):
            h += hashes[k:k + m] * self._mult[k % 64]
        return mix64(h)


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (in place on a copy): spreads the bits of combined hashes."""
    h = h.copy()
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h
