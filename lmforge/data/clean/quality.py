"""Heuristic quality filters: Gopher's quality and repetition rules (Rae et al. 2021, appendix A) plus C4's
"lines end in terminal punctuation" as a document fraction, with character-based variants for CJK text.

Words are the tokens of :func:`lmforge.data.clean.text.tokens`: runs of letters/digits, and every CJK character on
its own, so a Chinese document's word count is its character count. For CJK documents (CJK fraction >=
``cjk_threshold``) the mean-word-length rule is skipped, the Chinese stop-word list is used, and the n-gram
repetition rules count character n-grams of ``cjk_ngram_scale`` times the configured n (a Chinese word is ~1.5
characters, so a 2-gram of English words is compared with 3 characters by default)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from lmforge.data.clean.base import Stage, check_range
from lmforge.data.clean.text import TokenHasher, cjk_fraction, tokens
from lmforge.data.io import Document
from lmforge.errors import LMForgeError

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
ZH_STOP_WORDS = ["的", "了", "是", "在", "不", "和", "有", "这", "也", "之", "而", "其", "我", "他", "你", "人"]
BULLETS = ("•", "●", "○", "▪", "◦", "‣", "⁃", "-", "*", "·", "►", "➢", "✓", "→")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = tuple(".!?:;\"'”’»)]" + "。！？…；：」』”）】》")
PUNCT_MIN_LINES = 3  # the line-punctuation rule needs this many non-empty lines (one-line documents are exempt)
_PARA = re.compile(r"\n\s*\n")


def _stop_list(cfg: dict[str, Any], key: str) -> set[str]:
    v = cfg[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise LMForgeError(f"stage quality: {key}: expected a list of words, got {v!r}")
    return {x.lower() for x in v}


def _ngram_table(cfg: dict[str, Any], key: str) -> dict[int, float]:
    v = cfg[key]
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise LMForgeError(f"stage quality: {key}: expected a mapping n -> max fraction, got {v!r}")
    out = {}
    for n, frac in v.items():
        try:
            n_int = int(n)
        except (TypeError, ValueError):
            raise LMForgeError(f"stage quality: {key}: n-gram size {n!r} is not an integer") from None
        if n_int < 1:
            raise LMForgeError(f"stage quality: {key}: n-gram size {n_int} must be >= 1")
        if frac is not None:
            check_range("quality", f"{key}.{n}", frac, 0, 1)
            out[n_int] = float(frac)
    return out


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier item, fraction of characters in those repeats)."""
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return (dup / len(items) if items else 0.0, dup_chars / total_chars if total_chars else 0.0)


def repetition_stats(lengths: np.ndarray, hashes: np.ndarray, hasher: TokenHasher, top_ns: list[int],
                     dup_ns: list[int], dup_limits: dict[int, float] | None = None) -> dict[str, float]:
    """Gopher's n-gram repetition statistics over word ``lengths`` and token ``hashes``.

    ``top_{n}``: characters of the most frequent n-gram (the longest if tied) times its count / all word characters
    (0 if no n-gram occurs twice);
    ``dup_{n}``: characters of words covered by any n-gram that occurs more than once / all word characters.
    Coverage can only shrink as n grows (every n-gram inside a repeated longer n-gram repeats), so with
    ``dup_limits`` (n -> threshold) larger n are skipped (left out of the result) once a smaller n's coverage is
    under all their limits."""
    out: dict[str, float] = {}
    total = float(lengths.sum())
    if total == 0:
        return out
    csum = np.concatenate([[0], np.cumsum(lengths)])
    skip_dup = False
    for n in sorted(set(top_ns) | set(dup_ns)):
        want_top, want_dup = n in top_ns, n in dup_ns and not skip_dup
        if not (want_top or want_dup):
            continue
        g = hasher.ngrams(hashes, n)
        m = len(g)
        if m < 2:
            if want_top:
                out[f"top_{n}"] = 0.0
            if want_dup:
                out[f"dup_{n}"] = 0.0
            continue
        order = np.argsort(g, kind="stable")
        s = g[order]
        same = s[1:] == s[:-1]
        if want_top:
            starts = np.flatnonzero(np.concatenate([[True], ~same]))
            counts = np.diff(np.append(starts, m))
            c = int(counts.max())
            if c > 1:  # ties: the longest of the most frequent n-grams
                pos = order[starts[counts == c]]
                out[f"top_{n}"] = c * float((csum[pos + n] - csum[pos]).max()) / total
            else:
                out[f"top_{n}"] = 0.0
        if want_dup:
            if not same.any():  # then no longer n-gram repeats either
                for mm in dup_ns:
                    if mm >= n:
                        out[f"dup_{mm}"] = 0.0
                skip_dup = True
                continue
            flag = np.zeros(m, dtype=bool)
            flag[1:] |= same
            flag[:-1] |= same
            dup_starts = order[flag]  # positions of every occurrence of a repeated n-gram (distinct)
            # word i is covered if some repeated n-gram starts in [i - n + 1, i]
            diff = np.zeros(len(lengths) + 1, dtype=np.int64)
            diff[dup_starts] += 1
            diff[dup_starts + n] -= 1
            covered = np.cumsum(diff[:-1]) > 0
            out[f"dup_{n}"] = cov = float(lengths[covered].sum()) / total
            if dup_limits and all(cov <= lim for mm, lim in dup_limits.items() if mm > n):
                skip_dup = True
    return out


class QualityFilter(Stage):
    name = "quality"
    help = "Gopher quality and repetition rules (CJK-aware); set a threshold to null to disable its rule"
    options = {
        "min_words": 50, "max_words": 100_000,
        "min_mean_word_length": 3.0, "max_mean_word_length": 10.0,
        "max_symbol_word_ratio": 0.1,
        "max_bullet_lines": 0.9, "max_ellipsis_lines": 0.3,
        "min_alpha_words": 0.8,
        "min_stop_words": 2,
        "min_punct_lines": 0.1,
        "max_dup_line_fraction": 0.3, "max_dup_line_chars": 0.2,
        "max_dup_para_fraction": 0.3, "max_dup_para_chars": 0.2,
        "max_top_ngram_chars": {2: 0.20, 3: 0.18, 4: 0.16},
        "max_dup_ngram_chars": {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        "stop_words": GOPHER_STOP_WORDS, "stop_words_cjk": ZH_STOP_WORDS,
        "cjk_threshold": 0.3, "cjk_ngram_scale": 1.5,
    }

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        c = self.cfg
        for k in ("min_words", "max_words", "min_stop_words"):
            if c[k] is not None:
                check_range(self.name, k, c[k], 0, None, int)
        for k in ("min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio"):
            if c[k] is not None:
                check_range(self.name, k, c[k], 0, None)
        for k in ("max_bullet_lines", "max_ellipsis_lines", "min_alpha_words", "min_punct_lines",
                  "max_dup_line_fraction", "max_dup_line_chars", "max_dup_para_fraction", "max_dup_para_chars",
                  "cjk_threshold"):
            if c[k] is not None:
                check_range(self.name, k, c[k], 0, 1)
        check_range(self.name, "cjk_ngram_scale", c["cjk_ngram_scale"], 0.1, 10)
        self.top = _ngram_table(c, "max_top_ngram_chars")
        self.dupn = _ngram_table(c, "max_dup_ngram_chars")
        self.stop = _stop_list(c, "stop_words")
        self.stop_cjk = _stop_list(c, "stop_words_cjk")
        self.hasher = TokenHasher()

    def _n(self, n: int, cjk: bool) -> int:
        return max(1, round(n * self.cfg["cjk_ngram_scale"])) if cjk else n

    def check(self, text: str) -> str | None:
        """The first rule ``text`` fails (a reason string), or None."""
        c = self.cfg
        cjk = c["cjk_threshold"] is not None and cjk_fraction(text) >= c["cjk_threshold"]
        words = tokens(text)
        n = len(words)
        if c["min_words"] is not None and n < c["min_words"]:
            return "too_few_words"
        if c["max_words"] is not None and n > c["max_words"]:
            return "too_many_words"
        if n == 0:
            return "too_few_words"
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=n)
        if not cjk:
            mean = float(lengths.mean())
            if c["min_mean_word_length"] is not None and mean < c["min_mean_word_length"]:
                return "mean_word_length_low"
            if c["max_mean_word_length"] is not None and mean > c["max_mean_word_length"]:
                return "mean_word_length_high"
        if c["max_symbol_word_ratio"] is not None:
            if text.count("#") / n > c["max_symbol_word_ratio"]:
                return "hash_symbol_ratio"
            if (text.count("...") + text.count("…")) / n > c["max_symbol_word_ratio"]:
                return "ellipsis_ratio"
        lines = [ln.strip() for ln in text.split("\n")]
        lines = [ln for ln in lines if ln]
        nl = max(1, len(lines))
        if c["max_bullet_lines"] is not None and \
                sum(ln.startswith(BULLETS) for ln in lines) / nl > c["max_bullet_lines"]:
            return "bullet_lines"
        if c["max_ellipsis_lines"] is not None and \
                sum(ln.endswith(ELLIPSES) for ln in lines) / nl > c["max_ellipsis_lines"]:
            return "ellipsis_lines"
        if c["min_punct_lines"] is not None and len(lines) >= PUNCT_MIN_LINES and \
                sum(ln.endswith(TERMINAL_PUNCT) for ln in lines) / nl < c["min_punct_lines"]:
            return "few_lines_end_in_punctuation"
        if c["min_alpha_words"] is not None:
            # tokens are letters/digits only: a word "has an alphabetic character" unless it is all digits
            alpha = n - sum(map(str.isdigit, words))
            if alpha / n < c["min_alpha_words"]:
                return "alphabetic_words"
        if c["min_stop_words"]:
            stop = self.stop_cjk if cjk else self.stop
            need = c["min_stop_words"]
            for w in words:
                if w in stop:
                    need -= 1
                    if need == 0:
                        break
            if need > 0:
                return "stop_words"
        if c["max_dup_line_fraction"] is not None or c["max_dup_line_chars"] is not None:
            frac, chars = _dup_fractions(lines)
            if c["max_dup_line_fraction"] is not None and frac > c["max_dup_line_fraction"]:
                return "duplicate_lines"
            if c["max_dup_line_chars"] is not None and chars > c["max_dup_line_chars"]:
                return "duplicate_line_chars"
        if c["max_dup_para_fraction"] is not None or c["max_dup_para_chars"] is not None:
            paras = [p.strip() for p in _PARA.split(text) if p.strip()]
            frac, chars = _dup_fractions(paras)
            if c["max_dup_para_fraction"] is not None and frac > c["max_dup_para_fraction"]:
                return "duplicate_paragraphs"
            if c["max_dup_para_chars"] is not None and chars > c["max_dup_para_chars"]:
                return "duplicate_paragraph_chars"
        if self.top or self.dupn:
            hashes = self.hasher.hash_tokens(words)
            top = {self._n(k, cjk): v for k, v in self.top.items()}
            dupn = {self._n(k, cjk): v for k, v in self.dupn.items()}
            stats = repetition_stats(lengths, hashes, self.hasher, list(top), list(dupn), dupn)
            for k, v in sorted(top.items()):
                if stats.get(f"top_{k}", 0.0) > v:
                    return f"top_{k}gram_chars"
            for k, v in sorted(dupn.items()):
                if stats.get(f"dup_{k}", 0.0) > v:
                    return f"duplicate_{k}gram_chars"
        return None

    def apply(self, doc: Document) -> Document | None:
        reason = self.check(doc.text)
        if reason is not None:
            self.drop(reason, doc)
            return None
        return doc
