"""Choosing in-context demonstrations: ``first_n``, ``random`` (seeded), ``similar`` (BM25 nearest to the query) and
``diverse`` (maximal marginal relevance over TF-IDF cosine similarity, Carbonell & Goldstein 1998), computed locally;
and their order: as drawn, or ``similar_last`` (the most similar demonstration right before the query)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import numpy as np

from lmforge.errors import LMForgeError

METHODS = ("first_n", "random", "similar", "diverse")
ORDERS = ("as_drawn", "similar_last")
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|\w+")  # CJK characters one by one, other scripts by words


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75, idf = ln((N - df + 0.5) / (df + 0.5) + 1)) over tokenised documents."""

    def __init__(self, docs: list[list[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tf = [Counter(d) for d in docs]
        self.len = np.array([len(d) for d in docs], dtype=np.float64)
        self.avg = float(self.len.mean()) if len(docs) else 0.0
        df = Counter(w for d in self.tf for w in d)
        n = len(docs)
        self.idf = {w: math.log((n - c + 0.5) / (c + 0.5) + 1.0) for w, c in df.items()}

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(len(self.tf))
        norm = self.k1 * (1 - self.b + self.b * self.len / (self.avg or 1.0))
        for w in set(query):
            if w not in self.idf:
                continue
            f = np.array([tf.get(w, 0) for tf in self.tf], dtype=np.float64)
            out += self.idf[w] * f * (self.k1 + 1) / (f + norm)
        return out


def tfidf(docs: list[list[str]]) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Vocabulary, idf and L2-normalised TF-IDF rows (smooth idf = ln((1 + N) / (1 + df)) + 1)."""
    vocab: dict[str, int] = {}
    for d in docs:
        for w in d:
            vocab.setdefault(w, len(vocab))
    m = np.zeros((len(docs), len(vocab)))
    for i, d in enumerate(docs):
        for w, c in Counter(d).items():
            m[i, vocab[w]] = c
    idf = np.log((1 + len(docs)) / (1 + (m > 0).sum(0))) + 1
    m *= idf
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return vocab, idf, m


def mmr(query_sim: np.ndarray, doc_sim: np.ndarray, k: int, lam: float = 0.5) -> list[int]:
    """Maximal marginal relevance: repeatedly take argmax lam * sim(q, d) - (1 - lam) * max_{s chosen} sim(d, s)."""
    chosen: list[int] = []
    left = list(range(len(query_sim)))
    while left and len(chosen) < k:
        def gain(i: int) -> float:
            red = max((doc_sim[i, j] for j in chosen), default=0.0)
            return lam * query_sim[i] - (1 - lam) * red
        best = max(left, key=gain)
        chosen.append(best)
        left.remove(best)
    return chosen


class Selector:
    """Demonstrations for each query from one pool; indexes are built once per pool."""

    def __init__(self, pool: list[dict], text: callable, method: str = "first_n", order: str = "as_drawn",
                 seed: int = 1234) -> None:
        if method not in METHODS:
            raise LMForgeError(f"unknown selection {method!r}; choose from {', '.join(METHODS)}")
        if order not in ORDERS:
            raise LMForgeError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
        self.pool, self.text, self.method, self.order, self.seed = pool, text, method, order, seed
        self._texts = [text(d) for d in pool]
        self._bm25: BM25 | None = None
        self._tfidf: tuple | None = None

    def _query_sim(self, query: str) -> np.ndarray:
        vocab, idf, m = self._tfidf or tfidf([words(t) for t in self._texts])
        self._tfidf = (vocab, idf, m)
        q = np.zeros(len(vocab))
        for w, c in Counter(words(query)).items():
            if w in vocab:
                q[vocab[w]] = c
        q *= idf
        q /= max(float(np.linalg.norm(q)), 1e-12)
        return m @ q

    def select(self, doc: dict, k: int, index: int = 0) -> list[dict]:
        """``k`` demonstrations for ``doc`` (the query itself is never one of them)."""
        query = self.text(doc)
        cand = [i for i, t in enumerate(self._texts) if t != query]
        k = min(k, len(cand))
        if k <= 0:
            return []
        sim = None
        if self.method == "first_n":
            picked = cand[:k]
        elif self.method == "random":
            picked = random.Random(self.seed * 1_000_003 + index).sample(cand, k)
        elif self.method == "similar":
            self._bm25 = self._bm25 or BM25([words(t) for t in self._texts])
            sim = self._bm25.scores(words(query))
            picked = sorted(cand, key=lambda i: (-sim[i], i))[:k]  # most similar first
        else:
            qs = self._query_sim(query)
            m = self._tfidf[2]
            sub = mmr(qs[cand], m[cand] @ m[cand].T, k)
            picked = [cand[i] for i in sub]
            sim = qs
        if self.order == "similar_last":
            if sim is None:
                sim = self._query_sim(query)
            picked = sorted(picked, key=lambda i: (sim[i], -i))  # ascending: the most similar ends next to the query
        return [self.pool[i] for i in picked]
