"""The stage protocol: a stage takes a batch of documents and returns the survivors (possibly with edited text),
recording why it removed each one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmforge.data.io import Document
from lmforge.errors import LMForgeError

MAX_EXAMPLES = 3  # document locations kept per removal reason in the report


@dataclass
class StageStats:
    """What a stage saw, kept, removed (by reason) and changed."""

    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    modified: int = 0
    removed: dict[str, list[int]] = field(default_factory=dict)  # reason -> [documents, characters]
    examples: dict[str, list[str]] = field(default_factory=dict)

    def remove(self, reason: str, doc: Document) -> None:
        r = self.removed.setdefault(reason, [0, 0])
        r[0] += 1
        r[1] += len(doc.text)
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(doc.where)


class Stage:
    """Base class. Subclasses set ``name`` and ``options`` (option -> default) and implement ``apply`` (one
    document: return it, possibly edited, or call ``self.drop(reason, doc)`` and return None) or ``apply_batch``."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    help: ClassVar[str] = ""
    local: ClassVar[bool] = True  # per-document (no state across documents): may run in worker processes
    state_attrs: ClassVar[tuple[str, ...]] = ()  # report counters (Counter, set, list, int) merged from workers

    def __init__(self, **opts: Any) -> None:
        self.stats = StageStats()
        cfg = dict(self.options)
        cfg.update(opts)
        self.cfg = cfg

    def drop(self, reason: str, doc: Document) -> None:
        self.stats.remove(reason, doc)

    def apply(self, doc: Document) -> Document | None:
        raise NotImplementedError

    def apply_batch(self, docs: list[Document]) -> list[Document]:
        out = []
        for d in docs:
            before = d.text
            r = self.apply(d)
            if r is not None:
                if r.text is not before and r.text != before:
                    self.stats.modified += 1
                out.append(r)
        return out

    def __call__(self, docs: list[Document]) -> list[Document]:
        s = self.stats
        s.docs_in += len(docs)
        s.chars_in += sum(len(d.text) for d in docs)
        s.bytes_in += sum(len(d.text.encode("utf-8")) for d in docs)
        t0 = time.perf_counter()
        out = self.apply_batch(docs)
        s.seconds += time.perf_counter() - t0
        s.docs_out += len(out)
        s.chars_out += sum(len(d.text) for d in out)
        return out

    def state(self) -> tuple[StageStats, dict[str, Any]]:
        """Statistics and report counters since the last ``reset`` (sent back from a worker process)."""
        return self.stats, {a: getattr(self, a) for a in self.state_attrs}

    def reset(self) -> None:
        self.stats = StageStats()
        for a in self.state_attrs:
            setattr(self, a, type(getattr(self, a))())

    def merge_state(self, state: tuple[StageStats, dict[str, Any]]) -> None:
        """Add a worker's ``state()`` to this stage's statistics."""
        o, attrs = state
        s = self.stats
        for f in ("docs_in", "docs_out", "chars_in", "chars_out", "bytes_in", "seconds", "modified"):
            setattr(s, f, getattr(s, f) + getattr(o, f))
        for reason, (n, c) in o.removed.items():
            r = s.removed.setdefault(reason, [0, 0])
            r[0] += n
            r[1] += c
            ex = s.examples.setdefault(reason, [])
            ex.extend(o.examples.get(reason, [])[:MAX_EXAMPLES - len(ex)])
        for a, v in attrs.items():
            mine = getattr(self, a)
            if isinstance(mine, set):
                mine |= v
            elif isinstance(mine, dict):  # Counter
                mine.update(v)
            elif isinstance(mine, list):
                mine.extend(v)
            else:
                setattr(self, a, mine + v)

    def close(self) -> None:
        """Called once after the last batch."""

    def extra_report(self) -> dict[str, Any]:
        """Stage-specific report entries (e.g. PII counts, duplicate clusters)."""
        return {}

    def report(self) -> dict[str, Any]:
        s = self.stats
        rep: dict[str, Any] = {
            "stage": self.name, "documents_in": s.docs_in, "documents_out": s.docs_out,
            "documents_removed": s.docs_in - s.docs_out, "characters_in": s.chars_in, "characters_out": s.chars_out,
            "characters_removed": s.chars_in - s.chars_out, "documents_modified": s.modified,
            "removed": {k: {"documents": v[0], "characters": v[1], "examples": s.examples.get(k, [])}
                        for k, v in sorted(s.removed.items(), key=lambda kv: -kv[1][0])},
            "seconds": round(s.seconds, 4),
            "MB_per_s": round(s.bytes_in / 1e6 / s.seconds, 2) if s.seconds > 0 else None,
            "config": {k: v for k, v in self.cfg.items() if _jsonable(v)},
        }
        rep.update(self.extra_report())
        return rep


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def check_range(stage: str, key: str, v: Any, lo: float | None = None, hi: float | None = None,
                kind: type | tuple[type, ...] = (int, float)) -> None:
    """One-line error for an option of the wrong type or out of range."""
    if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LMForgeError(f"stage {stage}: {key}: expected {names}, got {v!r}")
    if v != v:  # NaN: every comparison is false, so it passed the range and the stage then decided nothing
        raise LMForgeError(f"stage {stage}: {key}: nan is not a number")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise LMForgeError(f"stage {stage}: {key}: {v!r} out of range [{lo}, {hi}]")


ScoreFn = Callable[[str], float]
