"""Read documents from .txt, .jsonl (and .json arrays) and .parquet files, optionally ``.gz``-compressed.

``iter_documents(paths, skip_bad=False)`` yields :class:`Document` (text, source file, line number) and reports a
malformed record (bad JSON, non-UTF-8 bytes, a missing or non-string field, an empty document) as
``LMForgeError("file:line: what is wrong")``; with ``skip_bad=True`` such records are skipped and counted in a
:class:`BadRecords` (pass your own to read the counts afterwards). ``drop_empty=True`` drops empty and
whitespace-only documents silently instead.

Text files: ``txt_split="file"`` (default) makes the whole file one document, ``"line"`` every non-blank line, and
``"paragraph"`` every block of lines between blank lines; these turn ``\\r\\n`` into ``\\n``. ``"raw"`` keeps the
text exactly as stored: the whole file is one document, or every piece between ``separator``s. A leading UTF-8
byte-order mark is dropped (of .jsonl files too).
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.assets import local_path
from lmforge.errors import LMForgeError
from lmforge.files import read_utf8

TXT_SPLITS = ("file", "line", "paragraph", "raw")
_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
_BOM = codecs.BOM_UTF8
CHUNK = 1 << 22  # bytes read at a time by txt_split="raw"


@dataclass
class Document:
    """One document: its text, where it came from (file, 1-based line or parquet row) and its other JSON fields."""

    text: str
    source: str
    line: int
    meta: dict[str, Any] | None = None
    nbytes: int = 0  # bytes of input this document accounts for (for progress bars)
    source_index: int = 0  # position of ``source`` in the paths given to iter_documents
    offset: int = 0  # bytes of the file as stored (compressed, for .gz) read once this document was complete

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


def check_input_file(path: str | Path) -> None:
    """One line for an input that is not a readable file: missing, a directory (its files must be named), or a
    device/pipe."""
    p = Path(path)
    if p.is_file():
        return
    if p.is_dir():
        raise LMForgeError(f"{p}: is a directory; give the files in it (e.g. {p / '*.jsonl'})")
    if p.exists():
        raise LMForgeError(f"{p}: not a regular file (a device or a pipe); write its text to a file first")
    raise LMForgeError(f"{p}: no such input file")


def path_arg(what: str) -> Callable[[str], str]:
    """An argparse ``type`` refusing an empty or blank path ('' was read as the working directory: "--output /cwd:
    holds the input", "--tokenizer .: no tokenizer files found")."""
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"must name {what}, got {value!r}")
        return value

    return check


def check_format_flags(inputs: Iterable[str | Path], field: str = "text", **text_flags: Any) -> None:
    """One line for a flag no input is read with: ``--field`` (other than "text") without a .jsonl/.json/.parquet
    input, or a text-file flag (``text_flags``: name -> value, None/default left out) without a text input."""
    kinds = {file_kind(p) for p in inputs}
    if field != "text" and kinds <= {"text"}:
        raise LMForgeError(f"--field {field}: no input is a .jsonl, .json or .parquet file (text files are read "
                           "whole); leave it out")
    for flag, value in text_flags.items():
        if value is not None and "text" not in kinds:
            raise LMForgeError(f"--{flag.replace('_', '-')} {value}: no input is a text file (it splits .txt "
                               "files only); leave it out")


def check_workers(workers: int) -> None:
    """``--workers`` of data clean/prepare: 0 (automatic) up to 4 per CPU this process may use (at least 8); more only
    start more interpreters competing for them (--workers 1000 started a thousand, each loading the tokenizer or the
    stages: the memory ran out)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    most = max(8, 4 * cpus)
    if not 0 <= workers <= most:
        raise LMForgeError(f"--workers {workers}: must be in [0, {most}] (0: automatic; {cpus} CPUs here)")


def file_kind(path: str | Path) -> str:
    """``jsonl``, ``json``, ``parquet`` or ``text`` from the suffix (a trailing ``.gz`` is ignored)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _KINDS.get(suffixes[-1] if suffixes else "", "text")


class _Input:
    """An input file as bytes (decompressed if ``.gz``); ``tell()`` is the position in the file as stored."""

    def __init__(self, path: Path) -> None:
        self.raw = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.f: BinaryIO = gzip.GzipFile(fileobj=self.raw) if path.suffix.lower() == ".gz" else self.raw  # type: ignore[assignment]

    def tell(self) -> int:
        return self.raw.tell()

    def __enter__(self) -> _Input:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()
        self.raw.close()


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte {e.start} of the line is 0x{raw[e.start]:02x}; re-encode the file as UTF-8)"


def _utf8(raw: bytes, where: str, bad: BadRecords) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(where, _not_utf8(raw, e), "encoding")
        return None


def _record(rec: Any, path: Path, n: int, fieldname: str, bad: BadRecords, drop_empty: bool,
            meta: bool) -> Document | None:
    where = f"{path}:{n}"
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
    if not text.isascii():  # a JSON \ud800 escape gives a lone surrogate: no tokenizer or UTF-8 file takes it
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad(where, f"field {fieldname!r} holds a lone surrogate {text[e.start]!r} at character {e.start} (half "
                "of a UTF-16 pair, not text)", "encoding")
            return None
    if not text.strip():
        if not drop_empty:
            bad(where, f"field {fieldname!r}: empty document", "empty")
        return None
    return Document(text, str(path), n, ({k: v for k, v in rec.items() if k != fieldname} or None) if meta else None)


def _read_jsonl(path: Path, fieldname: str, bad: BadRecords, drop_empty: bool, meta: bool) -> Iterator[Document]:
    with _Input(path) as src:
        for n, raw in enumerate(src.f, 1):  # bytes: only b"\n" ends a record (U+2028 may sit inside strings)
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            line = _utf8(raw[3:] if n == 1 and raw.startswith(_BOM) else raw, where, bad)
            if line is None:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad(where, f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json")
                continue
            except RecursionError:  # arrays or objects nested thousands deep
                bad(where, "malformed JSON (nested too deep)", "malformed_json")
                continue
            doc = _record(rec, path, n, fieldname, bad, drop_empty, meta)
            if doc is not None:
                doc.nbytes, doc.offset = len(raw), src.tell()
                yield doc


def _read_json(path: Path, fieldname: str, bad: BadRecords, drop_empty: bool, meta: bool) -> Iterator[Document]:
    with _Input(path) as src:
        raw = src.f.read()
        offset = src.tell()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path}: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # (RecursionError: nested thousands deep)
        raise LMForgeError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise LMForgeError(f"{path}: expected a JSON array of objects with a {fieldname!r} field")
    per = len(raw) // max(1, len(data))
    for n, rec in enumerate(data, 1):
        doc = _record(rec, path, n, fieldname, bad, drop_empty, meta)  # "line" = 1-based index in the array
        if doc is not None:
            doc.nbytes, doc.offset = per, offset
            yield doc


def _read_text(path: Path, split: str, bad: BadRecords, drop_empty: bool) -> Iterator[Document]:
    lines: list[str] = []
    start, nbytes = 0, 0
    with _Input(path) as src:
        for n, raw in enumerate(src.f, 1):
            if n == 1 and raw.startswith(_BOM):
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
                    yield Document("".join(lines).rstrip("\n"), str(path), start, None, nbytes, offset=src.tell())
                lines, nbytes = [], 0
            elif split == "line":
                yield Document(line.rstrip("\n"), str(path), n, None, len(raw), offset=src.tell())
            else:
                if not lines:
                    start = n
                lines.append(line)
                nbytes += len(raw)
        offset = src.tell()
    if split == "file":
        text = "".join(lines)
        if not text.strip():
            if not drop_empty:
                bad(f"{path}:1", "empty document (the file has no text)", "empty")
            return
        yield Document(text, str(path), 1, None, nbytes, offset=offset)
    elif lines:
        yield Document("".join(lines).rstrip("\n"), str(path), start, None, nbytes, offset=offset)


def _first_bad_line(path: Path) -> tuple[str, str]:
    """``(file:line, what)`` of the first line that is not UTF-8."""
    with _Input(path) as src:
        for n, raw in enumerate(src.f, 1):
            if n == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{n}", _not_utf8(raw, e)
    return f"{path}:1", "not UTF-8 text"


def _read_raw(path: Path, separator: str | None, bad: BadRecords, drop_empty: bool) -> Iterator[Document]:
    """The text exactly as stored (``\\r\\n`` kept), read in blocks: one document, or one per piece between
    ``separator``s. A file that is not UTF-8 is one bad record (with ``skip`` the rest of it is skipped)."""

    def doc(text: str, line: int, offset: int) -> Document | None:
        if text.strip():
            return Document(text, str(path), line, None, len(text.encode("utf-8")), offset=offset)
        if not drop_empty:
            bad(f"{path}:{line}", "empty document" + ("" if separator else " (the file has no text)"), "empty")
        return None

    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    blocks: list[str] = []
    rest, line = "", 1  # text after the last separator, and the line it starts on
    with _Input(path) as src:
        while True:
            block = src.f.read(CHUNK)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError:
                bad(*_first_bad_line(path), "encoding")
                return
            if separator is None:
                blocks.append(text)
            else:
                pieces = (rest + text).split(separator)
                rest = pieces.pop()
                for piece in pieces:
                    d = doc(piece, line, src.tell())
                    if d is not None:
                        yield d
                    line += piece.count("\n") + separator.count("\n")
            if not block:
                break
        offset = src.tell()
    d = doc("".join(blocks) if separator is None else rest, line, offset)
    if d is not None:
        yield d


def _read_parquet(path: Path, fieldname: str, bad: BadRecords, drop_empty: bool, meta: bool) -> Iterator[Document]:
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
    size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    per = size // rows
    row = 0
    for batch in pf.iter_batches(batch_size=2048, columns=None if meta else [fieldname]):
        for rec in batch.to_pylist():
            row += 1
            doc = _record(rec, path, row, fieldname, bad, drop_empty, meta)  # "line" = 1-based row number
            if doc is not None:
                doc.nbytes, doc.offset = per, size * row // rows
                yield doc


def input_bytes(paths: Iterable[str | Path]) -> int:
    """Total size of the input files (for a progress bar's total)."""
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


def iter_documents(paths: Iterable[str | Path], skip_bad: bool = False, *, field: str = "text",
                   txt_split: str = "file", separator: str | None = None, drop_empty: bool = False,
                   meta: bool = True, bad: BadRecords | None = None) -> Iterator[Document]:
    """Every document of ``paths`` in order (see the module docstring for formats and errors).

    ``separator`` (with ``txt_split="raw"`` only) splits text files into documents; ``meta=False`` leaves
    :attr:`Document.meta` None (and reads only the ``field`` column of parquet files)."""
    if txt_split not in TXT_SPLITS:
        raise LMForgeError(f"txt_split {txt_split!r}: must be one of {', '.join(TXT_SPLITS)}")
    if separator is not None and (txt_split != "raw" or not separator):
        raise LMForgeError(f"separator {separator!r}: needs txt_split='raw' and must not be empty")
    bad = bad if bad is not None else BadRecords(skip_bad)
    for i, p in enumerate(map(Path, paths)):
        check_input_file(p)
        kind = file_kind(p)
        if kind == "parquet":
            docs = _read_parquet(p, field, bad, drop_empty, meta)
        elif kind == "jsonl":
            docs = _read_jsonl(p, field, bad, drop_empty, meta)
        elif kind == "json":
            docs = _read_json(p, field, bad, drop_empty, meta)
        elif txt_split == "raw":
            docs = _read_raw(p, separator, bad, drop_empty)
        else:
            docs = _read_text(p, txt_split, bad, drop_empty)
        try:
            for doc in docs:
                doc.source_index = i
                yield doc
        except (OSError, EOFError) as e:  # e.g. a truncated .gz
            raise LMForgeError(f"{p}: cannot read ({e})") from None


# chat roles by the names ShareGPT-style files use (``from``) and OpenAI's (``role``)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


# ---- records of instruction and preference files (JSON lists or JSONL) ------------------------------------------


def iter_records(path: str | Path, on_malformed: Callable[[str, str], None] | None = None
                 ) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a JSON list or JSONL file; ``where`` is ``file:line``. A JSONL line that
    is not JSON is an error, or with ``on_malformed`` is passed to it as (where, reason) and skipped."""
    path = local_path(path)
    text = read_utf8(path)
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and path.suffix == ".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = "; one record per line is JSONL: name the file .jsonl" if (
                e.msg == "Extra data" and stripped.startswith("{")) else ""
            raise LMForgeError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}){hint}") from None
        if isinstance(data, dict):  # {"data": [...]} or a single record
            lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            data = lists[0] if len(lists) == 1 and not _looks_like_record(data) else [data]
        starts = _record_lines(text)
        for i, rec in enumerate(data):
            line = starts[i] if i < len(starts) else None
            yield (f"{path}:{line}" if line else f"{path}: record {i + 1}"), rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            reason = f"malformed JSON ({e.msg} at column {e.colno})"
            if on_malformed is None:
                raise LMForgeError(f"{path}:{n}: {reason}") from None
            on_malformed(f"{path}:{n}", reason)
            continue
        yield f"{path}:{n}", rec


def _looks_like_record(d: dict) -> bool:
    """A single record (instruction, chat or preference data), not a wrapper such as {"data": [...]}."""
    return any(k in d for k in ("instruction", "conversations", "messages", "instances", "prompt", "chosen",
                                "rejected", "responses"))


def _record_lines(text: str) -> list[int]:
    """Line numbers where the elements of a top-level JSON list start, whatever their type (for error messages)."""
    lines, depth, in_str, esc, line, expect = [], 0, False, False, 1, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if expect and not ch.isspace() and ch != "]":  # an element of the top-level list starts here
            lines.append(line)
            expect = False
        if ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            expect = depth == 1 and ch == "["
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 1:
            expect = True
    return lines
