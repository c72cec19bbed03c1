"""Perplexity filter: drop documents a reference language model finds too surprising (or suspiciously easy).

The scorer is any callable ``score(text) -> perplexity``; in a YAML config give it as ``scorer: "module:function"``
(imported when the stage is built; a factory called with ``scorer_args`` if ``scorer_factory: true``)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lmforge.data.clean.base import Stage, check_range
from lmforge.data.io import Document
from lmforge.errors import LMForgeError


def load_callable(spec: str) -> Callable[..., Any]:
    """``"package.module:attr"`` -> the attribute (a one-line error if it cannot be imported)."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise LMForgeError(f"stage perplexity: scorer: {spec!r} is not of the form 'module:function'")
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise LMForgeError(f"stage perplexity: scorer: cannot import {spec!r} ({e})") from None
    if not callable(obj):
        raise LMForgeError(f"stage perplexity: scorer: {spec!r} is not callable")
    return obj


class PerplexityFilter(Stage):
    name = "perplexity"
    help = "drop documents whose perplexity under `scorer` is above max_perplexity (or below min_perplexity)"
    state_attrs = ("values",)
    options = {"scorer": None, "scorer_factory": False, "scorer_args": {}, "max_perplexity": None,
               "min_perplexity": None, "max_chars": None}

    def __init__(self, score: Callable[[str], float] | None = None, **opts: Any) -> None:
        super().__init__(**opts)
        c = self.cfg
        if score is None:
            if not c["scorer"]:
                raise LMForgeError("stage perplexity: scorer: required ('module:function' returning a perplexity)")
            score = load_callable(c["scorer"])
            if c["scorer_factory"]:
                if not isinstance(c["scorer_args"], dict):
                    raise LMForgeError("stage perplexity: scorer_args: expected a mapping")
                score = score(**c["scorer_args"])
        elif not callable(score):
            raise LMForgeError("stage perplexity: score must be callable")
        if c["max_perplexity"] is None and c["min_perplexity"] is None:
            raise LMForgeError("stage perplexity: max_perplexity: give max_perplexity and/or min_perplexity")
        for k in ("max_perplexity", "min_perplexity"):
            if c[k] is not None:
                check_range(self.name, k, c[k], 0, None)
        if c["max_chars"] is not None:
            check_range(self.name, "max_chars", c["max_chars"], 1, None, int)
        self.score = score
        self.values: list[float] = []

    def apply(self, doc: Document) -> Document | None:
        c = self.cfg
        text = doc.text[:c["max_chars"]] if c["max_chars"] else doc.text
        try:
            ppl = float(self.score(text))
        except Exception as e:  # the scorer is user code
            raise LMForgeError(f"{doc.where}: stage perplexity: scorer failed ({type(e).__name__}: {e})") from None
        self.values.append(ppl)
        if math.isnan(ppl):
            self.drop("perplexity_nan", doc)
            return None
        if c["max_perplexity"] is not None and ppl > c["max_perplexity"]:
            self.drop("perplexity_high", doc)
            return None
        if c["min_perplexity"] is not None and ppl < c["min_perplexity"]:
            self.drop("perplexity_low", doc)
            return None
        return doc

    def extra_report(self) -> dict[str, Any]:
        if not self.values:
            return {}
        v = np.asarray(self.values)
        v = v[~np.isnan(v)]
        if not len(v):
            return {}
        q = np.percentile(v, [10, 50, 90])
        return {"perplexity": {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}}
