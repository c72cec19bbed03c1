"""A check shared by the decode-step tests: slots at their own lengths decode random tokens together, and each row's
logits are compared with a full forward of that slot's sequence."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def decode_against_full_forward(runner, model, seqs: dict[int, list[int]], steps: int = 5,
                                vocab: int = 97) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Prefill slot s with ``seqs[s]`` (other slots idle), then decode ``steps`` random tokens in every such slot at
    once; yields (slot, the runner's logits, the full forward's logits) for every slot and step."""
    for slot, ids in seqs.items():
        runner.prefill(slot, ids)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        new = {s: int(torch.randint(0, vocab, (1,), generator=g)) for s in seqs}
        logits = runner.decode([new.get(i) for i in range(runner.n_slots)])  # a row per given slot, in slot order
        row = {s: k for k, s in enumerate(sorted(new))}
        for s, t in new.items():
            seqs[s].append(t)
            with torch.no_grad():
                ref = model(torch.tensor([seqs[s]]))[0, -1]
            yield s, logits[row[s]], ref
