"""Decode steps of a minimum length, for serving tests."""

from __future__ import annotations

import contextlib
import time

from lmforge.infer.engine import Engine


@contextlib.contextmanager
def paced(engine: Engine, seconds: float = 0.002):
    """Decode steps of at least ``seconds``: a test that acts while a request still runs does not depend on how fast
    the model decodes (stories260K: 500 tokens in about 70 ms)."""
    runner = engine.runner
    real = runner.decode

    def slow(tokens):
        time.sleep(seconds)
        return real(tokens)

    runner.decode = slow
    try:
        yield
    finally:
        del runner.decode
