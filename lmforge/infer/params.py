"""What a request asks of sampling (``SamplingParams``) and what it got (``Choice``), without PyTorch: the server,
its protocol and the lean runtime use them in a process that never imports it (``lmforge.infer.sampling`` selects
tokens with PyTorch, ``lmforge.infer.lean_sampling`` with NumPy)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_TEMPERATURE = 1e-20  # the least temperature above 0 (float32 logits of up to 3e18 divided by it stay finite)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = 256
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0  # CTRL: logits of tokens in the prompt or output: positive / r, negative * r
    frequency_penalty: float = 0.0  # OpenAI: logit - count_in_output * f
    presence_penalty: float = 0.0  # OpenAI: logit - p if the token is in the output
    stop: list[str] = field(default_factory=list)  # stop strings (text-level: need a tokenizer)
    logprobs: bool = False  # report the log-probability of each chosen token
    top_logprobs: int = 0  # and of this many most likely tokens at each step
    prompt_logprobs: int | None = None  # the prompt's tokens' log-probabilities too, with this many alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def check(self) -> None:
        """Raise ValueError naming the first field out of range."""
        if not 0 <= self.temperature < math.inf:  # (inf sampled uniformly: random bytes with exit 0)
            raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0")
        if 0 < self.temperature < MIN_TEMPERATURE:  # (the logits divided by it overflow: NaN probabilities)
            raise ValueError(f"temperature={self.temperature:g}: below {MIN_TEMPERATURE:g} the logits divided by it "
                             "overflow; such a temperature samples as greedy does: give 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1]")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 0")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs={self.top_logprobs}: must be >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs={self.prompt_logprobs}: must be >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must not be empty")


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) the first of the ``stops`` strings that occurs in it."""
    return text[: min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))]


@dataclass(slots=True)
class Choice:
    token: int
    logprob: float | None = None  # log-probability under the model (before penalties, temperature, truncation)
    top_logprobs: list[tuple[int, float]] | None = None


__all__ = ["MIN_TEMPERATURE", "Choice", "SamplingParams", "cut_at_stop"]
