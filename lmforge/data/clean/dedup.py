"""De-duplication at three levels (sentence, document, dataset):

- ``sentence_dedup``: within a document, a sentence (or line) repeating an earlier one is removed;
- ``exact_dedup``: documents with the same normalized text (NFKC, lower case, no punctuation, collapsed spaces);
- ``near_dedup``: MinHash LSH over token n-gram shingles; a document whose estimated Jaccard similarity with an
  earlier kept document is >= ``threshold`` is removed;
- ``decontaminate``: documents sharing an n-gram (13 tokens by default) with an evaluation set are removed.

All keep the first document of a duplicate cluster, in input order, in one streaming pass."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.clean.base import Stage, check_range
from lmforge.data.clean.minhash import EMPTY, LSHIndex, MinHasher, lsh_params
from lmforge.data.clean.text import TokenHasher, normalize, tokens
from lmforge.data.io import Document, iter_documents
from lmforge.errors import LMForgeError

MAX_CLUSTERS = 200  # largest duplicate clusters listed in the report


class Clusters:
    """Duplicate clusters: kept document -> removed duplicates (with a similarity)."""

    def __init__(self) -> None:
        self.members: dict[str, list[tuple[str, float]]] = {}

    def add(self, kept: str, dup: str, sim: float = 1.0) -> None:
        self.members.setdefault(kept, []).append((dup, round(float(sim), 4)))

    def report(self) -> dict[str, Any]:
        big = sorted(self.members.items(), key=lambda kv: -len(kv[1]))[:MAX_CLUSTERS]
        return {"duplicate_clusters": {
            "count": len(self.members), "documents_in_clusters": sum(len(v) + 1 for v in self.members.values()),
            "largest": [{"kept": k, "size": len(v) + 1, "removed": [{"doc": d, "similarity": s} for d, s in v]}
                        for k, v in big]}}


# ---- sentence level -------------------------------------------------------------------------------------------

# a separator: line breaks, or the space after . ! ? (plus closing quotes), or nothing after 。！？ (plus quotes)
_SENT_SPLIT = re.compile(r"(\n+|(?<=[.!?][\"'”’)\]])[ \t]+|(?<=[.!?])[ \t]+"
                         r"|(?<=[。！？][”’」』）])|(?<=[。！？])(?![”’」』）]))")


def split_sentences(text: str) -> list[str]:
    """Alternating [sentence, separator, sentence, ...]; ``"".join`` gives back ``text``."""
    return _SENT_SPLIT.split(text)


class SentenceDedup(Stage):
    name = "sentence_dedup"
    help = "remove sentences/lines that repeat an earlier one in the same document (min_tokens tokens or longer)"
    options = {"min_tokens": 8}
    state_attrs = ("removed_sentences",)

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        check_range(self.name, "min_tokens", self.cfg["min_tokens"], 1, None, int)
        self.removed_sentences = 0

    def apply(self, doc: Document) -> Document | None:
        parts = split_sentences(doc.text)
        if len(parts) < 3:
            return doc
        seen: set[str] = set()
        keep: list[str] = []
        removed = 0
        skip_sep = False
        for i, p in enumerate(parts):
            if i % 2:  # separator
                if not skip_sep:
                    keep.append(p)
                skip_sep = False
                continue
            toks = tokens(p)
            if len(toks) >= self.cfg["min_tokens"]:
                key = " ".join(toks)
                if key in seen:
                    removed += 1
                    skip_sep = True
                    continue
                seen.add(key)
            keep.append(p)
        if removed:
            self.removed_sentences += removed
            doc.text = "".join(keep).strip()
        return doc

    def extra_report(self) -> dict[str, Any]:
        return {"sentences_removed": self.removed_sentences}


# ---- document level -------------------------------------------------------------------------------------------

class ExactDedup(Stage):
    name = "exact_dedup"
    help = "remove documents whose normalized text (or raw text with normalize: false) was seen before"
    options = {"normalize": True}
    local = False

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        check_range(self.name, "normalize", self.cfg["normalize"], kind=bool)
        self.seen: dict[bytes, str] = {}
        self.clusters = Clusters()

    def apply(self, doc: Document) -> Document | None:
        t = normalize(doc.text) if self.cfg["normalize"] else doc.text
        key = hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest()
        first = self.seen.get(key)
        if first is not None:
            self.clusters.add(first, doc.where)
            self.drop("exact_duplicate", doc)
            return None
        self.seen[key] = doc.where
        return doc

    def extra_report(self) -> dict[str, Any]:
        return self.clusters.report()


class NearDedup(Stage):
    name = "near_dedup"
    help = "MinHash LSH: remove documents with estimated Jaccard >= threshold to an earlier kept document"
    options = {"threshold": 0.8, "num_perm": 128, "ngram": 5, "bands": None, "rows": None, "seed": 1}
    local = False

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        c = self.cfg
        check_range(self.name, "threshold", c["threshold"], 0.01, 1)
        check_range(self.name, "num_perm", c["num_perm"], 2, 4096, int)
        check_range(self.name, "ngram", c["ngram"], 1, 64, int)
        check_range(self.name, "seed", c["seed"], 0, None, int)
        if (c["bands"] is None) != (c["rows"] is None):
            raise LMForgeError("stage near_dedup: bands: give both bands and rows, or neither")
        if c["bands"] is None:
            c["bands"], c["rows"] = lsh_params(c["threshold"], c["num_perm"])
        check_range(self.name, "bands", c["bands"], 1, c["num_perm"], int)
        check_range(self.name, "rows", c["rows"], 1, c["num_perm"], int)
        if c["bands"] * c["rows"] > c["num_perm"]:
            raise LMForgeError(f"stage near_dedup: bands: bands * rows = {c['bands'] * c['rows']} > num_perm")
        self.hasher = TokenHasher()
        self.minhash = MinHasher(c["num_perm"], seed=c["seed"])
        self.index = LSHIndex(c["num_perm"], c["bands"], c["rows"], seed=c["seed"] + 1)
        self.kept_sigs: list[np.ndarray] = []
        self.kept_where: list[str] = []
        self.clusters = Clusters()
        self.candidates = 0

    def shingles(self, text: str) -> np.ndarray:
        """Hashes of the distinct token n-grams of ``text`` (the whole token sequence if it is shorter)."""
        h = self.hasher.hash_tokens(tokens(text))
        n = self.cfg["ngram"]
        g = self.hasher.ngrams(h, min(n, len(h))) if len(h) else h
        return np.unique(g)

    def apply_batch(self, docs: list[Document]) -> list[Document]:
        sigs = self.minhash.signatures([self.shingles(d.text) for d in docs])
        keys = self.index.band_keys(sigs)
        out = []
        th = self.cfg["threshold"]
        for i, d in enumerate(docs):
            sig = sigs[i]
            if sig[0] == EMPTY and (sig == EMPTY).all():  # no tokens at all: nothing to compare
                out.append(d)
                continue
            cand = self.index.query(keys[i])
            if cand:
                self.candidates += len(cand)
                ids = np.fromiter(cand, dtype=np.int64, count=len(cand))
                sims = (np.stack([self.kept_sigs[j] for j in ids]) == sig).mean(axis=1)
                best = int(np.argmax(sims))
                if sims[best] >= th:
                    self.clusters.add(self.kept_where[ids[best]], d.where, sims[best])
                    self.drop("near_duplicate", d)
                    continue
            self.index.insert(len(self.kept_sigs), keys[i])
            self.kept_sigs.append(sig)
            self.kept_where.append(d.where)
            out.append(d)
        return out

    def extra_report(self) -> dict[str, Any]:
        rep = self.clusters.report()
        rep["lsh"] = {"bands": self.cfg["bands"], "rows": self.cfg["rows"], "candidates_checked": self.candidates}
        return rep


# ---- dataset level --------------------------------------------------------------------------------------------

class Decontaminate(Stage):
    name = "decontaminate"
    help = "remove documents sharing a token n-gram (13 by default) with any evaluation text in eval_files"
    options = {"eval_files": [], "ngram": 13, "min_matches": 1, "eval_field": "text", "eval_txt_split": "line"}
    state_attrs = ("hit_grams",)

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        c = self.cfg
        files = c["eval_files"]
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise LMForgeError("stage decontaminate: eval_files: expected a non-empty list of evaluation files")
        check_range(self.name, "ngram", c["ngram"], 1, 256, int)
        check_range(self.name, "min_matches", c["min_matches"], 1, None, int)
        self.hasher = TokenHasher()
        grams, self.eval_docs, self.eval_short = [], 0, 0
        for f in files:
            if not Path(f).is_file():
                what = "is a directory; name its files" if Path(f).is_dir() else "no such file"
                raise LMForgeError(f"stage decontaminate: eval_files: {f}: {what}")
        try:
            for d in iter_documents(files, field=c["eval_field"], txt_split=c["eval_txt_split"], drop_empty=True):
                self.eval_docs += 1
                h = self.hasher.hash_tokens(tokens(d.text))
                if len(h) < c["ngram"]:
                    self.eval_short += 1
                    continue
                grams.append(self.hasher.ngrams(h, c["ngram"]))
        except LMForgeError as e:  # the corpus' advice (--skip-bad, --field) does not apply to evaluation files
            msg = str(e).replace(" (use --skip-bad to skip such records)", "").replace(
                "choose one with --field", "choose one with the stage's eval_field option")
            raise LMForgeError(f"stage decontaminate: evaluation file {msg}") from None
        self.grams = np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)
        self.hit_grams: set[int] = set()

    def apply(self, doc: Document) -> Document | None:
        if not len(self.grams):
            return doc
        h = self.hasher.hash_tokens(tokens(doc.text))
        g = self.hasher.ngrams(h, self.cfg["ngram"])
        if not len(g):
            return doc
        pos = np.searchsorted(self.grams, g)
        pos[pos == len(self.grams)] = 0
        hit = self.grams[pos] == g
        k = int(hit.sum())
        if k >= self.cfg["min_matches"]:
            self.hit_grams.update(g[hit].tolist())
            self.drop("eval_overlap", doc)
            return None
        return doc

    def extra_report(self) -> dict[str, Any]:
        return {"eval": {"texts": self.eval_docs, "too_short": self.eval_short, "ngrams": int(len(self.grams)),
                         "ngrams_matched": len(self.hit_grams)}}
