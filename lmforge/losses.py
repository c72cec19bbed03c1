"""Every training objective as a small function on tensors: the one cross-entropy, and (as the stages arrive) SFT,
reward-model, DPO and PPO terms. Each is tested against an independent formula.

Convention: a loss used by the trainer returns a *sum* over its units (target tokens, pairs, ...) together with the
number of units, so that the trainer can normalise by the count over the whole accumulated (and distributed) batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32 over (..., V) logits and (...) targets; ``ignore_index`` targets are skipped.
    ``reduction``: ``mean`` (over counted tokens), ``sum`` or ``none`` (per position, 0 where ignored)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction).view(-1 if reduction == "none" else ())


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of counted tokens): the trainer divides by the count over the whole step."""
    return cross_entropy(logits, targets, ignore_index, "sum"), int((targets != ignore_index).sum())
