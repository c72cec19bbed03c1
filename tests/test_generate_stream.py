"""`lmforge generate` writes text through the incremental detokenizer: the same text as decoding the whole sequence,
at a constant decoding cost per token (it decoded the whole sequence for every token: quadratic)."""

from __future__ import annotations

import io
import time

from lmforge.commands.generate import write_generation
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams


class CountingTokenizer:
    """A tokenizer wrapper counting the ids it is asked to decode."""

    def __init__(self, tok) -> None:
        self._tok, self.decoded = tok, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def decode_bytes(self, ids):
        self.decoded += len(ids)
        return self._tok.decode_bytes(ids)


def test_generate_text_is_the_whole_decode_at_linear_cost(stories):
    model, tok = stories
    prompt = [tok.bos_id] + tok.encode("Once upon a time")
    params = SamplingParams(temperature=0, max_new_tokens=200, stop_ids=[])  # run to the end: a long sequence
    counting = CountingTokenizer(tok)
    out = io.StringIO()
    before = time.perf_counter()
    n, first = write_generation(model, counting, prompt, params, out)
    assert before < first < time.perf_counter()
    ids = generate(model, prompt, params)
    assert n == len(ids) == 200
    assert out.getvalue() == tok.decode_bytes(prompt + ids).decode("utf-8", errors="replace") + "\n"
    # whole-sequence decoding would be ~n^2/2 = 20,000 ids; a sliding window is a few ids per token
    assert counting.decoded <= 20 * (len(prompt) + n), counting.decoded
