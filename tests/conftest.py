"""Fixtures shared by several test files."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """Commands the tests run put their temporary files under pytest's own temporary directory (torchrun leaves a
    torchelastic_* directory behind on every run), which pytest prunes."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess-tmp"))
    yield
    if before is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="session")
def stories():
    """The bundled stories260K model (eval mode) and its tokenizer."""
    from lmforge.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None, None, "cpu")
    return model.eval(), tok
