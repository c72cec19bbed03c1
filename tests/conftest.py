"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stories():
    """The bundled stories260K model (eval mode) and its tokenizer."""
    from lmforge.commands.common import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None, None, "cpu")
    return model.eval(), tok
