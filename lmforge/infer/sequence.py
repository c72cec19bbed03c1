"""One sequence being generated: its ``Step``s (a token and the text it made visible) and ``Sequence`` state
(sampler, stop rules, limits, text), shared by ``lmforge.infer.generate``, the serving engine and speculative
decoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.infer.params import Choice, SamplingParams
from lmforge.infer.text import TextStream


@dataclass(slots=True)
class Step:
    """One generated token and the text it made visible (may be empty while a character or a possible stop
    string is incomplete; ``text`` of the last step also carries any text held back until the end)."""

    token: int
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class PromptScores:
    """The prompt's tokens scored by the model (``SamplingParams.prompt_logprobs``): a ``Step`` per prompt token, the
    first without a log-probability (nothing comes before it). Sent once, before the first generated step."""

    steps: list[Step]


def prompt_scores(logits, ids: list[int], top: int, rows: int = 256) -> PromptScores:
    """``PromptScores`` of ``ids`` from ``logits`` (len(ids), V): row i predicts token i + 1 (a torch tensor or a
    NumPy array; log-softmax in float64, ``rows`` rows at a time)."""
    x = logits.detach().float().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits, np.float32)
    steps = [Step(ids[0])]
    for a in range(0, len(ids) - 1, rows):
        z = x[a : min(a + rows, len(ids) - 1)].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        for r, row in enumerate(z):
            tok = ids[a + r + 1]
            tops = None
            if top:
                k = min(top, row.shape[0])
                ix = np.argpartition(-row, k - 1)[:k]
                ix = ix[np.argsort(-row[ix], kind="stable")]
                tops = [(int(i), float(row[i])) for i in ix]
            steps.append(Step(tok, "", float(row[tok]), tops))
    return PromptScores(steps)


class Sequence:
    """Per-sequence generation state: sampler, stop ids/strings, limits, output ids, text and finish reason.
    ``sampler_type``: ``lmforge.infer.sampling.TokenSampler`` (PyTorch) or ``lean_sampling.LeanSampler`` (NumPy)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, max_len: int | None,
                 vocab_size: int | None, sampler_type: type) -> None:
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.prompt_ids, self.params = list(prompt_ids), params
        self.sampler = sampler_type(params, prompt_ids, vocab_size or 1 << 20)
        self.stop_ids = set(params.stop_ids)
        room = (max_len - len(prompt_ids)) if max_len is not None else params.max_new_tokens
        self.limit = min(params.max_new_tokens, room)
        self.text = TextStream(tokenizer, prompt_ids, params.stop) if tokenizer is not None else None
        self.out_ids: list[int] = []
        self.finish_reason: str | None = None if self.limit > 0 else "length"

    def accept(self, choice: Choice) -> Step | None:
        """Take the sampled token; return the step to report (None if it ended generation without output)."""
        tok = choice.token
        if tok in self.stop_ids:
            self.finish_reason = "stop"
            if self.text is not None:
                tail = self.text.flush()
                if tail:  # held-back text is still output; attach it to an empty step
                    return Step(-1, tail)
            return None
        self.out_ids.append(tok)
        step = Step(tok, "", choice.logprob, choice.top_logprobs)
        if self.text is not None:
            step.text = self.text.push(tok)
            if self.text.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.out_ids) >= self.limit:
            self.finish_reason = "length"
        if self.finish_reason == "length" and self.text is not None:
            step.text += self.text.flush()
        return step

    @property
    def output_text(self) -> str:
        return self.text.text if self.text is not None else ""
