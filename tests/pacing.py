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
    real, real_finish = runner.decode, getattr(runner, "finish", None)

    def slow(tokens):
        time.sleep(seconds)
        return real(tokens)

    def slow_finish():  # a step begun in the background (SlotRunner.start) ends at its finish
        time.sleep(seconds)
        return real_finish()

    runner.decode = slow
    if real_finish is not None:
        runner.finish = slow_finish
    try:
        yield
    finally:
        del runner.decode
        if real_finish is not None:
            del runner.finish
