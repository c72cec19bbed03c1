"""Language identification and filtering with py3langid (langid.py's model, shipped inside the package: no download)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from lmforge.data.clean.base import Stage, check_range
from lmforge.data.io import Document
from lmforge.errors import LMForgeError

_IDENT: Any = None


def identifier() -> Any:
    """A py3langid LanguageIdentifier with normalized probabilities (loaded once)."""
    global _IDENT
    if _IDENT is None:
        try:
            from py3langid import langid
        except ImportError:
            raise LMForgeError("the lang stage needs py3langid (`pip install py3langid`); or remove the stage "
                               "from the cleaning config") from None
        _IDENT = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    return _IDENT


def detect(text: str, max_chars: int | None = None) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of ``text`` (its first ``max_chars`` characters)."""
    return identifier().classify(text[:max_chars] if max_chars else text)


_TABLES: Any = None


def _tables(ident: Any) -> Any:
    """numpy views of py3langid's byte-DFA (None if this py3langid version is laid out differently)."""
    global _TABLES
    if _TABLES is None:
        try:
            _TABLES = (np.asarray(ident.tk_nextmove, dtype=np.int64), np.asarray(ident._rowbase, dtype=np.int64),
                       np.asarray(ident.tk_output, dtype=np.int64),
                       np.asarray(ident.nb_ptc, dtype=np.float32))  # float16 -> float32 once (57 MB)
            ident._encode, ident._alias_pairs, ident._norm_probs, ident.nb_ptc, ident.nb_pc  # noqa: B018
        except (AttributeError, TypeError):
            _TABLES = False
    return _TABLES or None


# py3langid tells Chinese varieties apart and calls much vernacular/classical prose Wu or Cantonese (a third of
# 红楼梦's paragraphs): by default their probabilities are added to Chinese (zh)
VARIETIES = {"wuu": "zh", "yue": "zh"}


def detect_batch(texts: list[str], max_chars: int | None = None,
                 merge: dict[str, str] | None = None) -> list[tuple[str, float]]:
    """:func:`detect` for many texts at once: py3langid's byte-DFA feature walk is stepped for all texts together
    with numpy (one step per byte position instead of one Python step per byte of every text), then scored with
    py3langid's own model and normalization, so the results equal ``detect`` (checked in the tests).

    ``merge``: language -> language whose probability absorbs it (e.g. :data:`VARIETIES`)."""
    ident = identifier()
    tables = _tables(ident)
    if tables is None or not texts:  # another py3langid layout: one text at a time through its public API
        if not merge:
            return [detect(t, max_chars) for t in texts]
        res = []
        for t in texts:
            probs = dict(ident.rank(t[:max_chars] if max_chars else t))
            for a, b in merge.items():
                if a in probs and b in probs:
                    probs[b] += probs.pop(a)
            lang = max(probs, key=probs.__getitem__)
            res.append((lang, float(probs[lang])))
        return res
    col = {c: i for i, c in reversed(list(enumerate(ident.nb_classes)))}
    fold = [(col[a], col[b]) for a, b in (merge or {}).items() if a in col and b in col]
    nm, rowbase, out, ptc = tables
    enc = [ident._encode(t[:max_chars] if max_chars else t) for t in texts]
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    order = np.argsort(-lens, kind="stable")
    width = int(lens.max()) if len(lens) else 0
    buf = np.zeros((len(enc), max(width, 1)), dtype=np.uint8)
    for row, i in enumerate(order):
        buf[row, :lens[i]] = np.frombuffer(enc[i], dtype=np.uint8)
    sorted_lens = lens[order]
    feats = np.full(buf.shape, -1, dtype=np.int32)
    state = np.zeros(len(enc), dtype=np.int64)
    active = len(enc)
    for t in range(width):
        while active and sorted_lens[active - 1] <= t:
            active -= 1
        st = nm[rowbase[state[:active]] + buf[:active, t]]
        state[:active] = st
        feats[:active, t] = out[st]
    results: list[tuple[str, float]] = [("", 0.0)] * len(enc)
    for row, i in enumerate(order):
        f = feats[row, :lens[i]]
        f = f[f >= 0]
        if len(f):
            idx, counts = np.unique(f, return_counts=True)
            # = py3langid's _sparse_score (log1p(counts) @ nb_ptc[idx] + nb_pc), in float32 through BLAS
            scores = np.log1p(counts.astype(np.float32)) @ ptc[idx] + ident.nb_pc
        else:
            scores = np.full(len(ident.nb_classes), 0.0 if ident._norm_probs else -1e30, dtype=np.float32)
        if ident._norm_probs:
            scores = scores * (1.0 / math.sqrt(len(enc[i]) or 1))
            np.exp(scores - scores.max(), out=scores)
            scores /= scores.sum()
        for a, b in ident._alias_pairs:
            scores[a] += scores[b]
            scores[b] = 0.0
        for a, b in fold:
            scores[b] += scores[a]
            scores[a] = 0.0
        k = int(scores.argmax())
        results[i] = (ident.nb_classes[k], float(scores[k]))
    return results


class LanguageFilter(Stage):
    name = "lang"
    help = ("keep documents whose identified language is in `languages` with probability >= min_score "
            "(Wu and Cantonese count as zh unless merge_varieties: false)")
    state_attrs = ("seen",)
    options = {"languages": ["en", "zh"], "min_score": 0.5, "max_chars": 4000, "merge_varieties": True}

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        langs = self.cfg["languages"]
        if langs is not None and (not isinstance(langs, list) or not all(isinstance(x, str) for x in langs)):
            raise LMForgeError(f"stage lang: languages: expected a list of language codes, got {langs!r}")
        if langs == []:
            raise LMForgeError("stage lang: languages: an empty list keeps no document; name the languages to keep "
                               "(or null for any)")
        check_range(self.name, "min_score", self.cfg["min_score"], 0, 1)
        check_range(self.name, "merge_varieties", self.cfg["merge_varieties"], kind=bool)
        if self.cfg["max_chars"] is not None:
            check_range(self.name, "max_chars", self.cfg["max_chars"], 1, None, int)
        known = set(identifier().nb_classes)
        unknown = sorted(set(langs or []) - known)
        if unknown:
            raise LMForgeError(f"stage lang: languages: unknown code(s) {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(known))})")
        self.langs = set(langs) if langs is not None else None
        self.seen: Counter[str] = Counter()

    def apply_batch(self, docs: list[Document]) -> list[Document]:
        out = []
        for doc, (lang, p) in zip(docs, detect_batch([d.text for d in docs], self.cfg["max_chars"],
                                                               VARIETIES if self.cfg["merge_varieties"] else None)):
            self.seen[lang] += 1
            if self.langs is not None and lang not in self.langs:
                self.drop(f"language:{lang}", doc)
            elif p < self.cfg["min_score"]:
                self.drop("low_language_score", doc)
            else:
                out.append(doc)
        return out

    def extra_report(self) -> dict[str, Any]:
        return {"languages_seen": dict(self.seen.most_common())}
