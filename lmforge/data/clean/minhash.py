"""MinHash signatures and LSH banding, vectorized with numpy.

Each of the ``num_perm`` hash functions is ``h_j(x) = (a_j * x + b_j) mod 2**64`` (a_j odd) applied to 64-bit
shingle hashes, keeping the top 32 bits of the minimum: the fraction of equal signature entries of two documents
estimates the Jaccard similarity of their shingle sets. Signatures of a whole batch of documents are computed at
once, ``rows x num_perm`` blocks at a time, with ``np.minimum.reduceat`` over document boundaries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a document without shingles
_U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


class MinHasher:
    """``num_perm`` seeded hash functions; ``signatures(list of uint64 shingle arrays) -> (docs, num_perm) uint32``."""

    def __init__(self, num_perm: int = 128, seed: int = 1, block_rows: int = 4096) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = (rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) << np.uint64(1)
        self.block_rows = block_rows

    def signatures(self, shingles: Sequence[np.ndarray]) -> np.ndarray:
        n_docs = len(shingles)
        lens = np.fromiter((len(s) for s in shingles), dtype=np.int64, count=n_docs)
        if n_docs == 0 or lens.sum() == 0:
            return np.full((n_docs, self.num_perm), EMPTY, dtype=np.uint32)
        allx = np.concatenate([np.asarray(s, dtype=np.uint64) for s in shingles])
        doc_of = np.repeat(np.arange(n_docs), lens)
        sig = np.full((self.num_perm, n_docs), _U64_MAX, dtype=np.uint64)  # (perm, doc): reduce along rows
        a, b = self.a[:, None], self.b[:, None]
        block = np.empty((self.num_perm, self.block_rows), dtype=np.uint64)
        for r0 in range(0, len(allx), self.block_rows):
            x = allx[r0:r0 + self.block_rows]
            d = doc_of[r0:r0 + self.block_rows]
            m = block[:, :len(x)]
            np.multiply(a, x[None, :], out=m)
            m += b
            starts = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
            ids = d[starts]
            sig[:, ids] = np.minimum(sig[:, ids], np.minimum.reduceat(m, starts, axis=1))
        out = (sig.T >> np.uint64(32)).astype(np.uint32)
        out[lens == 0] = EMPTY
        return out

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        return self.signatures([shingles])[0]


def jaccard_estimate(s1: np.ndarray, s2: np.ndarray) -> float:
    """Fraction of equal entries of two signatures (broadcasts: ``s2`` may be a matrix of signatures)."""
    return (s1 == s2).mean(axis=-1)


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted false-positive and false-negative areas
    under the S-curve ``1 - (1 - s**rows)**bands`` (the choice datasketch's MinHashLSH makes)."""
    s_lo = np.linspace(0.0, threshold, 201)
    s_hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(1 - (1 - s_lo ** r) ** b, s_lo)
            fn = _trapezoid((1 - s_hi ** r) ** b, s_hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class LSHIndex:
    """Banded LSH over signatures: ``query`` returns ids of indexed signatures sharing at least one band."""

    def __init__(self, num_perm: int, bands: int, rows: int, seed: int = 7) -> None:
        if bands * rows > num_perm:
            raise ValueError("bands * rows must be <= num_perm")
        self.bands, self.rows = bands, rows
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        rng = np.random.default_rng(seed)
        self._mult = (rng.integers(0, 1 << 63, size=rows, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(docs, bands) uint64 keys, one per band of each signature."""
        n = sigs.shape[0]
        s = sigs[:, :self.bands * self.rows].astype(np.uint64).reshape(n, self.bands, self.rows)
        k = (s * self._mult).sum(axis=2, dtype=np.uint64)
        k ^= k >> np.uint64(29)
        k *= np.uint64(0xBF58476D1CE4E5B9)
        k ^= k >> np.uint64(32)
        return k

    def query(self, keys: np.ndarray) -> set[int]:
        out: set[int] = set()
        for t, k in zip(self.tables, keys.tolist()):
            ids = t.get(k)
            if ids:
                out.update(ids)
        return out

    def insert(self, doc_id: int, keys: np.ndarray) -> None:
        for t, k in zip(self.tables, keys.tolist()):
            t.setdefault(k, []).append(doc_id)
