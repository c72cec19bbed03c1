"""Rollout batches for PPO: prompts left-padded, responses right-padded and cut after the stop token.

Layout of a ``Rollout`` (B rows, P prompt columns, R response columns)::

    input_ids       [pad pad p p p | r r r EOS pad]     prompt right-aligned at column P, response from column P
    attention_mask  [ 0   0  1 1 1 | 1 1 1  1   0 ]
    position_ids    [ 0   0  0 1 2 | 3 4 5  6   6 ]     counting real tokens only (padding does not move them)
    response_mask                  [ 1 1 1  1   0 ]     the tokens the policy chose, stop token included

The logits (and values) for response token t are read at column P - 1 + t. ``score`` reads a reward model at the
last real token of prompt + response, which is the stop token when the response ended, never the padding after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams
from lmforge.losses import entropy_from_logits, token_logprobs
from lmforge.matmul import call
from lmforge.model import Decoder


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R) bool
    position_ids: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R) bool
    ended: torch.Tensor  # (B,) bool: the response ends with a stop token
    prompt_len: int  # P

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def response_lists(self) -> list[list[int]]:
        """Each row's response ids (stop token included when it ended)."""
        return [r[m].tolist() for r, m in zip(self.responses, self.response_mask)]

    def to(self, device) -> Rollout:
        return Rollout(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                       self.response_mask.to(device), self.ended.to(device), self.prompt_len)

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """A minibatch of rows (same columns)."""
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                       self.response_mask[rows], self.ended[rows], self.prompt_len)


def truncate_after_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first stop token; (kept, whether a stop token was found)."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return list(tokens[: i + 1]), True
    return list(tokens), False


def make_rollout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], stop_ids: Sequence[int] = (),
                 pad_id: int = 0, device: torch.device | str | None = None) -> Rollout:
    """Build the batch from token lists; responses are cut after their first stop token."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("make_rollout needs one response per prompt and at least one prompt")
    if any(not p for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    cut = [truncate_after_stop(r, stop_ids) for r in responses]
    if any(not r for r, _ in cut):
        raise ValueError("every response must hold at least one token")
    B, P, R = len(prompts), max(map(len, prompts)), max(len(r) for r, _ in cut)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, P + R, dtype=torch.bool)
    for i, (p, (r, _)) in enumerate(zip(prompts, cut)):
        ids[i, P - len(p) : P] = torch.tensor(list(p))
        ids[i, P : P + len(r)] = torch.tensor(r)
        mask[i, P - len(p) : P + len(r)] = True
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    ended = torch.tensor([e for _, e in cut], dtype=torch.bool)
    out = Rollout(ids, mask, pos, mask[:, P:].clone(), ended, P)
    return out.to(device) if device is not None else out


def sample_rollout(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
                   stop_ids: Sequence[int] = (), seed: int | None = None, pad_id: int = 0) -> Rollout:
    """Sample one response per prompt with the KV-cache batched generator (plain temperature sampling, so that
    ``token_logprobs(logits, tokens, temperature)`` is the probability the tokens were drawn with) and build the
    rollout. Row i uses seed ``seed + i`` (reproducible, rows independent)."""
    if temperature <= 0:
        raise ValueError("PPO rollouts sample with temperature > 0 (their log-probs must be those of the sampler)")
    stop_ids = list(stop_ids)
    # generate_batch drops the stop token it stops at; with one stop id it is known and put back, otherwise the
    # rows run to max_new_tokens and are cut after their first stop token here
    gen_stops = stop_ids if len(stop_ids) == 1 else []
    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop_ids=gen_stops,
                             seed=None if seed is None else seed + i) for i in range(len(prompts))]
    outs = generate_batch(model, [list(p) for p in prompts], params)
    P = max(map(len, prompts))
    # the generator's room (virtual tokens of prefix/prompt tuning take the start of the context)
    limit = min(max_new_tokens, model.cfg.block_size - getattr(model, "num_virtual_tokens", 0) - P)
    responses = [o + gen_stops if gen_stops and len(o) < limit else o for o in outs]
    if any(not r for r in responses):  # nothing generated (no room): a row needs one token to be scored
        raise ValueError(f"no room to generate: prompts of {P} tokens in a context of {model.cfg.block_size}")
    return make_rollout(prompts, responses, stop_ids, pad_id, next(model.parameters()).device)


def _response_slice(rollout: Rollout, x: torch.Tensor) -> torch.Tensor:
    """Columns P - 1 .. P + R - 2 of per-position outputs: the ones predicting the response tokens."""
    P, R = rollout.prompt_len, rollout.response_mask.shape[1]
    return x[:, P - 1 : P + R - 1]


def response_hidden(model: Decoder, rollout: Rollout) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token (B, R, n_embd)."""
    h = model.hidden_states(rollout.input_ids, position_ids=rollout.position_ids, key_mask=rollout.attention_mask)
    return _response_slice(rollout, h)


def response_logits(model: Decoder, rollout: Rollout) -> torch.Tensor:
    """Logits predicting each response token (B, R, V)."""
    return call(model.lm_head, response_hidden(model, rollout))


def policy_logprobs(model: Decoder, rollout: Rollout, temperature: float = 1.0, with_entropy: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(response token) per position (B, R) at the sampling temperature (0 where the response mask is
    off); with ``with_entropy`` also the per-position entropy of the tempered distribution."""
    logits = response_logits(model, rollout)
    m = rollout.response_mask
    lp = token_logprobs(logits, rollout.responses, temperature).masked_fill(~m, 0.0)
    if not with_entropy:
        return lp
    return lp, entropy_from_logits(logits, temperature).masked_fill(~m, 0.0)


def rollout_values(value_model, rollout: Rollout) -> torch.Tensor:
    """A value model's (``ScalarHeadModel``) estimate at each response token's state (B, R), 0 off the mask."""
    h = response_hidden(value_model.decoder, rollout)
    return value_model.head(h).squeeze(-1).float().masked_fill(~rollout.response_mask, 0.0)


def rollout_scores(reward_model, rollout: Rollout) -> torch.Tensor:
    """A reward model's (normalised) score of each prompt + response, read at its last real token (B,)."""
    return reward_model.score(rollout.input_ids, rollout.attention_mask)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (nn.Dropout modules and attention-probability dropout), so that the
    policy, value, reference and reward models compute the same thing in train and eval mode."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model
