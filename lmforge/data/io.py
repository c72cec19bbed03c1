"""Read documents from .txt, .jsonl (and .json arrays) and .parquet files, optionally ``.gz``-compressed.

``iter_documents(paths, skip_bad=False)`` yields :class:`Document` (text, source file, line number) and reports a
malformed record (bad JSON, non-UTF-8 bytes, a missing or non-string field, an empty document) as
``LMForgeError("file:line: what is wrong")``; with ``skip_bad=True`` such records are skipped and counted in a
:class:`BadRecords` (pass your own to read the counts afterwards).

Text files: ``txt_split="file"`` (default) makes the whole file one document, ``"line"`` every non-blank line, and
``"paragraph"`` every block of lines between blank lines. A leading UTF-8 byte-order mark is dropped.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.errors import LMForgeError

TXT_SPLITS = ("file", "line", "paragraph")
_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class Document:
    """One document: its text, where it came from (file, 1-based line or parquet row) and its other JSON fields."""

    text: str
    source: str
    line: int
    meta: dict[str, Any] | None = None
    nbytes: int = 0  # bytes of input this document accounts for (for progress bars)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class BadRecords:
    """Malformed records: raised as one-line errors, or counted when ``skip``."""

    skip: bool = False
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def __call__(self, where: str, what: str, reason: str) -> None:
        if not self.skip:
            raise LMForgeError(f"{where}: {what} (use --skip-bad to skip such records)")
        self.count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {what}")

    def as_dict(self) -> dict[str, Any]:
        return {"skipped": self.count, "reasons": dict(self.reasons), "examples": list(self.examples)}


def file_kind(path: str | Path) -> str:
    """``jsonl``, ``json``, ``parquet`` or ``text`` from the suffix (a trailing ``.gz`` is ignored)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _KINDS.get(suffixes[-1] if suffixes else "", "text")


def _open(path: Path) -> BinaryIO:
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed there
    return gzip.GzipFile(fileobj=f) if path.suffix.lower() == ".gz" else f  # type: ignore[return-value]


def _utf8(raw: bytes, where: str, bad: BadRecords) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(where, f"not UTF-8 text (byte {e.start} of the line is 0x{raw[e.start]:02x}; re-encode the file as "
            "UTF-8)", "encoding")
        return None


def _record(rec: Any, where: str, fieldname: str, bad: BadRecords) -> Document | None:
    if not isinstance(rec, dict):
        bad(where, f"not a JSON object (got {type(rec).__name__})", "not_object")
        return None
    if fieldname not in rec:
        have = ", ".join(map(str, list(rec)[:8])) or "none"
        bad(where, f"field {fieldname!r} missing (fields: {have}; choose one with --field)", "missing_field")
        return None
    text = rec[fieldname]
    if not isinstance(text, str):
        bad(where, f"field {fieldname!r} is {'null' if text is None else type(text).__name__}, not a string",
            "not_string")
        return None
    if not text.strip():
        bad(where, f"field {fieldname!r}: empty document", "empty")
        return None
    meta = {k: v for k, v in rec.items() if k != fieldname} or None
    source, _, line = where.rpartition(":")
    return Document(text, source, int(line), meta)


def _read_jsonl(path: Path, fieldname: str, bad: BadRecords) -> Iterator[Document]:
    with _open(path) as f:
        for n, raw in enumerate(f, 1):  # bytes: only b"\n" ends a record (U+2028 may sit inside strings)
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            line = _utf8(raw, where, bad)
            if line is None:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad(where, f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json")
                continue
            doc = _record(rec, where, fieldname, bad)
            if doc is not None:
                doc.nbytes = len(raw)
                yield doc


def _read_json(path: Path, fieldname: str, bad: BadRecords) -> Iterator[Document]:
    with _open(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path}: not UTF-8 (byte {e.start})") from None
    except ValueError as e:
        raise LMForgeError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise LMForgeError(f"{path}: expected a JSON array of objects with a {fieldname!r} field")
    per = len(raw) // max(1, len(data))
    for n, rec in enumerate(data, 1):
        doc = _record(rec, f"{path}:{n}", fieldname, bad)  # "line" = 1-based index in the array
        if doc is not None:
            doc.nbytes = per
            yield doc


def _read_text(path: Path, split: str, bad: BadRecords) -> Iterator[Document]:
    lines: list[str] = []
    start, nbytes = 0, 0
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            line = _utf8(raw, f"{path}:{n}", bad)
            if line is None:
                if split == "file":  # the whole document is bad; skip the rest of the file
                    return
                lines, nbytes = [], 0  # drop the broken line/paragraph
                continue
            line = line.replace("\r\n", "\n")
            if split == "file":
                lines.append(line)
                nbytes += len(raw)
            elif not line.strip():
                if lines:
                    yield Document("".join(lines).rstrip("\n"), str(path), start, None, nbytes)
                lines, nbytes = [], 0
            elif split == "line":
                yield Document(line.rstrip("\n"), str(path), n, None, len(raw))
            else:
                if not lines:
                    start = n
                lines.append(line)
                nbytes += len(raw)
    if split == "file":
        text = "".join(lines)
        if not text.strip():
            bad(f"{path}:1", "empty document (the file has no text)", "empty")
            return
        yield Document(text, str(path), 1, None, nbytes)
    elif lines:
        yield Document("".join(lines).rstrip("\n"), str(path), start, None, nbytes)


def _read_parquet(path: Path, fieldname: str, bad: BadRecords) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LMForgeError(f"{path}: reading parquet needs pyarrow (`pip install pyarrow`)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types
        raise LMForgeError(f"{path}: not a parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if fieldname not in names:
        raise LMForgeError(f"{path}: field {fieldname!r}: no such column (columns: {', '.join(names)}; "
                           "choose one with --field)")
    per = path.stat().st_size // max(1, pf.metadata.num_rows)
    row = 0
    for batch in pf.iter_batches(batch_size=2048):
        for rec in batch.to_pylist():
            row += 1
            doc = _record(rec, f"{path}:{row}", fieldname, bad)  # "line" = 1-based row number
            if doc is not None:
                doc.nbytes = per
                yield doc


def input_bytes(paths: Iterable[str | Path]) -> int:
    """Total size of the input files (for a progress bar's total)."""
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


def iter_documents(paths: Iterable[str | Path], skip_bad: bool = False, *, field: str = "text",
                   txt_split: str = "file", bad: BadRecords | None = None) -> Iterator[Document]:
    """Every document of ``paths`` in order (see the module docstring for formats and errors)."""
    if txt_split not in TXT_SPLITS:
        raise LMForgeError(f"txt_split {txt_split!r}: must be one of {', '.join(TXT_SPLITS)}")
    bad = bad if bad is not None else BadRecords(skip_bad)
    for p in map(Path, paths):
        if not p.is_file():
            raise LMForgeError(f"{p}: no such input file")
        kind = file_kind(p)
        try:
            if kind == "parquet":
                yield from _read_parquet(p, field, bad)
            elif kind == "jsonl":
                yield from _read_jsonl(p, field, bad)
            elif kind == "json":
                yield from _read_json(p, field, bad)
            else:
                yield from _read_text(p, txt_split, bad)
        except (OSError, EOFError) as e:  # e.g. a truncated .gz
            raise LMForgeError(f"{p}: cannot read ({e})") from None
