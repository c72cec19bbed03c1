"""Markup and keyword filter: HTML tags and entities, URLs, boilerplate lines (C4's rules) and blocked phrases."""

from __future__ import annotations

import html
import re
from collections import Counter
from typing import Any

from lmforge.data.clean.base import Stage, check_range
from lmforge.data.io import Document
from lmforge.errors import LMForgeError

# C4 (Raffel et al. 2020) removes lines containing these; plus common Chinese web boilerplate.
BOILERPLATE = ["javascript", "cookie policy", "privacy policy", "terms of use", "uses cookies", "use of cookies",
               "use cookies", "all rights reserved", "版权所有", "隐私政策", "免责声明", "使用条款"]
BAD_PHRASES = ["lorem ipsum"]  # C4: a page containing one of these is dropped

_SCRIPT = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s+[^<>]*?)?\s*/?>")
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'（）()\[\]{}，。、；！？]+", re.I)
_URL_TRAIL = ".,;:!?'\""
_MODES = {"html": ("strip", "drop", "keep"), "urls": ("strip", "keep")}


class _Phrases:
    """Case-insensitive phrase search; ASCII phrases must not touch a letter/digit on either side. A plain
    substring test on the lower-cased text comes first (fast), the regex only confirms a hit."""

    def __init__(self, phrases: list[str]) -> None:
        self.lower = [p.lower() for p in phrases]
        parts = []
        for p in self.lower:
            e = re.escape(p)
            parts.append(e if not p[:1].isascii() else rf"(?<![a-z0-9]){e}(?![a-z0-9])")
        self.re = re.compile("|".join(parts), re.I)

    def search(self, text: str, lower: str | None = None) -> re.Match[str] | None:
        lower = text.lower() if lower is None else lower
        if not any(p in lower for p in self.lower):
            return None
        return self.re.search(text)


def _phrase_re(phrases: list[str]) -> _Phrases | None:
    return _Phrases(phrases) if phrases else None


class MarkupFilter(Stage):
    name = "markup"
    help = "strip HTML and URLs, drop boilerplate lines (C4 rules) and documents with blocked phrases"
    state_attrs = ("counts",)
    options = {
        "html": "strip",  # strip: remove tags/scripts/comments, unescape entities; drop: drop docs with markup
        "max_markup_fraction": 0.3,  # html=strip: drop a document whose characters are more than this markup
        "urls": "strip",
        "max_url_fraction": 0.2,  # drop a document whose characters are more than this fraction URLs
        "boilerplate_lines": BOILERPLATE,  # lines containing any of these (case-insensitive words) are removed
        "bad_phrases": BAD_PHRASES,  # documents containing any of these are dropped
        "blocked_words": [],  # documents containing any of these words are dropped (e.g. an offensive-word list)
    }

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        c = self.cfg
        for k, allowed in _MODES.items():
            if c[k] not in allowed:
                raise LMForgeError(f"stage markup: {k}: {c[k]!r} is not one of {', '.join(allowed)}")
        for k in ("max_markup_fraction", "max_url_fraction"):
            if c[k] is not None:
                check_range(self.name, k, c[k], 0, 1)
        for k in ("boilerplate_lines", "bad_phrases", "blocked_words"):
            v = c[k]
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise LMForgeError(f"stage markup: {k}: expected a list of non-empty strings, got {v!r}")
        self.boiler = _phrase_re(c["boilerplate_lines"])
        self.bad = _phrase_re(c["bad_phrases"])
        self.blocked = _phrase_re(c["blocked_words"])
        self.counts: Counter[str] = Counter()

    def _strip_markup(self, text: str) -> tuple[str, int]:
        n0 = len(text)
        t = _SCRIPT.sub(" ", text)
        t = _COMMENT.sub(" ", t)
        t, k = _TAG.subn("", t)
        self.counts["html_tags"] += k
        removed = n0 - len(t)
        if "&" in t:
            t, k = _ENTITY.subn(lambda m: html.unescape(m.group(0)), t)
            self.counts["html_entities"] += k
        return t, removed

    def apply(self, doc: Document) -> Document | None:
        c = self.cfg
        text = doc.text
        n0 = max(1, len(text))
        if c["html"] != "keep" and "<" in text or "&" in text and c["html"] == "strip":
            if c["html"] == "drop":
                if _TAG.search(text) or _COMMENT.search(text):
                    self.drop("html", doc)
                    return None
            else:
                text, removed = self._strip_markup(text)
                if c["max_markup_fraction"] is not None and removed / n0 > c["max_markup_fraction"]:
                    self.drop("markup_fraction", doc)
                    return None
        if "://" in text or "www." in text or "WWW." in text:
            spans = [(m.start(), m.end() - (len(m.group(0)) - len(m.group(0).rstrip(_URL_TRAIL))))
                     for m in _URL.finditer(text)]
            url_chars = sum(b - a for a, b in spans)
            if c["max_url_fraction"] is not None and url_chars / n0 > c["max_url_fraction"]:
                self.drop("url_fraction", doc)
                return None
            if c["urls"] == "strip" and spans:
                self.counts["urls"] += len(spans)
                parts, last = [], 0
                for a, b in spans:
                    parts.append(text[last:a])
                    last = b
                parts.append(text[last:])
                text = "".join(parts)
        lower = text.lower()
        if self.bad is not None and (m := self.bad.search(text, lower)):
            self.drop(f"bad_phrase:{m.group(0).lower()}", doc)
            return None
        if self.blocked is not None and self.blocked.search(text, lower):
            self.drop("blocked_word", doc)
            return None
        if self.boiler is not None and self.boiler.search(text, lower):
            lines = text.split("\n")
            kept = [ln for ln in lines if not self.boiler.search(ln)]
            self.counts["boilerplate_lines"] += len(lines) - len(kept)
            text = "\n".join(kept)
        if text is not doc.text:
            text = re.sub(r"[ \t]{2,}", " ", text).strip() if text != doc.text else text
            if not text.strip():
                self.drop("empty_after_cleanup", doc)
                return None
            doc.text = text
        return doc

    def extra_report(self) -> dict[str, Any]:
        return {"stripped": dict(self.counts)}
