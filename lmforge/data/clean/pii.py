"""PII scrubbing: e-mail addresses, phone numbers, Chinese resident ID numbers, IP addresses and payment-card
numbers are replaced by typed placeholders (``<EMAIL>``, ``<PHONE>``, ``<ID_CARD>``, ``<IP>``, ``<CARD>``).

Candidates are found with regular expressions whose edges are "not a letter/digit" (not ``\\b``, which fails
between a CJK character and a digit) and then validated: ID numbers by their date and ISO 7064 MOD 11-2 check
digit, card numbers by issuer prefix and the Luhn checksum, IPs with :mod:`ipaddress`, phone numbers by digit count.
Types are applied in a fixed order (e-mail, ID card, card, IP, phone) so a longer match wins over a shorter one."""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections import Counter
from typing import Any

from lmforge.data.clean.base import Stage
from lmforge.data.io import Document
from lmforge.errors import LMForgeError

PII_TYPES = ("email", "id_card", "card", "ip", "phone")
PLACEHOLDERS = {"email": "<EMAIL>", "id_card": "<ID_CARD>", "card": "<CARD>", "ip": "<IP>", "phone": "<PHONE>"}

_L = r"(?<![0-9A-Za-z])"  # left edge: no ASCII letter/digit before
_R = r"(?![0-9A-Za-z])"  # right edge
_LD = r"(?<![0-9A-Za-z.\-+])"  # numbers: also not inside a dotted/dashed number
_RD = r"(?![0-9A-Za-z]|[.\-][0-9])"

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9](?:[A-Za-z0-9._%+\-]{0,62}[A-Za-z0-9_%+\-])?"
                   r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}" + _R)
ID_CARD = re.compile(_LD + r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]" + _RD,
                     re.ASCII)
CARD = re.compile(_LD + r"(?:\d[ \-]?){12,18}\d" + _RD, re.ASCII)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(_LD + rf"(?:{_OCTET}\.){{3}}{_OCTET}" + _RD, re.ASCII)
IPV6 = re.compile(r"(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|"
                  r"(?:\d{1,3}\.){3}\d{1,3})(?![0-9A-Za-z:])", re.ASCII)
PHONE = re.compile(
    _LD + r"(?:"
    # Chinese mobile: optional +86 / 0086, 1[3-9]x xxxx xxxx
    r"(?:(?:\+|00)86[ \-]?)?1[3-9]\d(?:[ \-]?\d{4}){2}"
    # international: +CC then 2-5 groups (optionally a parenthesized area code)
    r"|\+\d{1,3}[ \-.]?(?:\(\d{1,4}\)[ \-.]?)?\d{1,5}(?:[ \-.]\d{1,5}){1,4}"
    # NANP: (415) 555-0132, 415-555-0132, 415.555.0132, 1-800-555-0199
    r"|(?:1[ \-.])?(?:\(\d{3}\)[ ]?|\d{3}[\-.])\d{3}[\-.]\d{4}"
    # national trunk prefix 0: 010-12345678, 0755 1234 5678, 07885 577 899, 020 7946 0958
    r"|0\d{2,4}[ \-]\d{3,4}[ \-]?\d{3,4}"
    # local seven digits: 555-0132
    r"|[2-9]\d{2}-\d{4}"
    r")" + _RD, re.ASCII)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_CARD_PREFIX = re.compile(r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[689])|6(?:011|5|4[4-9]|2)|35")


def id_card_valid(s: str) -> bool:
    """An 18-character PRC resident ID: a real birth date and the ISO 7064 MOD 11-2 check character."""
    if len(s) != 18:
        return False
    try:
        datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_valid(s: str) -> bool:
    """13-19 digits (spaces/dashes allowed), a known issuer prefix, Luhn checksum, and consistent grouping."""
    digits = re.sub(r"[ \-]", "", s)
    if not 13 <= len(digits) <= 19 or not _CARD_PREFIX.match(digits):
        return False
    seps = set(re.findall(r"[ \-]", s))
    if len(seps) > 1:
        return False
    if seps:  # grouped like 4-4-4-4, 4-6-5 (Amex) or 4-4-4-4-3: no single-digit groups
        groups = re.split(r"[ \-]", s)
        if any(len(g) < 3 for g in groups) or len(groups) > 5:
            return False
    return luhn_valid(digits)


def _ip_valid(s: str) -> bool:
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    if ip.version == 6:
        return s.count(":") >= 2 and sum(c.isalnum() for c in s) >= 3 and s not in ("::",)
    return True


def _phone_valid(s: str) -> bool:
    digits = sum(c.isdigit() for c in s)
    return 7 <= digits <= 15


_VALIDATORS = {"email": None, "id_card": id_card_valid, "card": card_valid, "ip": _ip_valid, "phone": _phone_valid}
_PATTERNS: dict[str, list[re.Pattern[str]]] = {"email": [EMAIL], "id_card": [ID_CARD], "card": [CARD],
                                               "ip": [IPV4, IPV6], "phone": [PHONE]}
_DIGIT = re.compile(r"[0-9]")


def find_pii(text: str, types: tuple[str, ...] = PII_TYPES) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans, earlier types in ``PII_TYPES`` order taking precedence."""
    spans: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []
    has_digit = _DIGIT.search(text) is not None
    for t in PII_TYPES:
        if t not in types or (t == "email" and "@" not in text) or (t != "email" and not has_digit):
            continue
        valid = _VALIDATORS[t]
        for pat in _PATTERNS[t]:
            for m in pat.finditer(text):
                a, b = m.span()
                if valid is not None and not valid(m.group(0)):
                    continue
                if any(a < y and x < b for x, y in taken):
                    continue
                spans.append((a, b, t))
                taken.append((a, b))
    spans.sort()
    return spans


def scrub(text: str, types: tuple[str, ...] = PII_TYPES,
          placeholders: dict[str, str] = PLACEHOLDERS) -> tuple[str, Counter[str]]:
    """``text`` with every PII span replaced by its placeholder, and the count of replacements by type."""
    spans = find_pii(text, types)
    counts: Counter[str] = Counter()
    if not spans:
        return text, counts
    out, last = [], 0
    for a, b, t in spans:
        out.append(text[last:a])
        out.append(placeholders[t])
        counts[t] += 1
        last = b
    out.append(text[last:])
    return "".join(out), counts


class PIIScrubber(Stage):
    name = "pii"
    help = "replace e-mails, phones, Chinese ID numbers, IPs and card numbers with <EMAIL>, <PHONE>, ... placeholders"
    state_attrs = ("counts",)
    options = {"types": list(PII_TYPES), "placeholders": dict(PLACEHOLDERS)}

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        types = self.cfg["types"]
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise LMForgeError(f"stage pii: types: expected a list, got {types!r}")
        bad = [t for t in types if t not in PII_TYPES]
        if bad:
            raise LMForgeError(f"stage pii: types: unknown type {bad[0]!r} (allowed: {', '.join(PII_TYPES)})")
        ph = self.cfg["placeholders"]
        if not isinstance(ph, dict):
            raise LMForgeError("stage pii: placeholders: expected a mapping type -> placeholder")
        unknown = [k for k in ph if k not in PII_TYPES]
        if unknown:
            raise LMForgeError(f"stage pii: placeholders: unknown type {unknown[0]!r} "
                               f"(allowed: {', '.join(PII_TYPES)})")
        self.placeholders = {**PLACEHOLDERS, **ph}
        self.types = tuple(types)
        self.counts: Counter[str] = Counter()

    def apply(self, doc: Document) -> Document | None:
        text, counts = scrub(doc.text, self.types, self.placeholders)
        if counts:
            self.counts.update(counts)
            doc.text = text
        return doc

    def extra_report(self) -> dict[str, Any]:
        return {"replacements": {PLACEHOLDERS[t][1:-1]: self.counts.get(t, 0) for t in self.types}}
