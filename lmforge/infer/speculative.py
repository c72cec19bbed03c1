"""Speculative decoding with a draft made from the model itself (its int4 copy).

A float32 model on a CPU decodes at the speed its weights stream from memory: each token reads every weight once
(SmolLM2-135M: 540 MB a token; two cores here stream about 21 GB/s). Checking several tokens in one forward reads
them once too, so a cheap draft proposes ``k`` tokens and the model checks them all in one step of ``k + 1`` rows
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"). The draft is the model's own
weights rounded to int4 in groups of 32 (``lmforge.quant``, its C kernel five times faster a token): it proposes
what the model would choose almost always (SmolLM2: 98% of greedy tokens).

Greedy decoding and penalized sampling choose every emitted token by the model's own logits, at its position, with
the sequence's own sampler (one choice per emitted token, in order, with the same random generator): the tokens,
penalties and log-probabilities of plain decoding. A drafted token is kept while the model's choice equals it; the
first choice that differs is emitted instead and the round ends (after ``k`` kept tokens the last row gives one
more). Sampling without penalties is speculative sampling (``accept``): the tokens follow the model's distribution,
but a seed draws other samples than without a draft. The logits of a checked row come from a product of several
rows, which rounds differently from one row's product: a near tie between two tokens can break the other way than
in plain decoding.

``k`` adapts (HF transformers' assisted generation rule: +2 after a round that kept every drafted token, -1
otherwise, within 1..``MAX_DRAFT``), and drafting stops for the rest of a sequence whose drafted tokens are kept less
than half the time (sampling at a high temperature), where it would cost more than it saves.
"""

from __future__ import annotations

import copy
import functools
import itertools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lmforge.infer.engine import SlotRunner
from lmforge.infer.native import library
from lmforge.infer.sampling import chosen, draw, select, sparse_distribution
from lmforge.memory import release_free_memory
from lmforge.model import Decoder
from lmforge.quant import QuantConfig, QuantEmbedding, QuantLinear, quantize_model

DRAFT_MIN_BYTES = 64 << 20  # float32 block weights from which a draft pays (beyond CPU caches: bandwidth-bound)
MAX_DRAFT = 15  # drafted tokens per round at most
START_DRAFT = 4
MIN_KEPT = 0.5  # below this share of drafted tokens kept (after CHECK_AFTER drafted), drafting stops
CHECK_AFTER = 32
_DRAFTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its draft, while the model lives


def draft_unsupported(model: Decoder, any_size: bool = False) -> str | None:
    """Why ``model`` gets no int4 draft by default (``--draft auto``; ``any_size``: whatever its size, as
    ``--draft int4``), or None if it does."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32:
        return "not a float32 model on the CPU"
    if model.num_virtual_tokens:
        return "virtual tokens (prefix/prompt tuning)"
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) or hasattr(m, "adapter_params") for m in model.modules()):
        return "a quantized or adapted model"
    size = sum(m.weight.numel() * 4 for m in model.blocks.modules() if isinstance(m, nn.Linear))
    if size < DRAFT_MIN_BYTES and not any_size:
        return f"block weights of {size / 2**20:.0f} MiB (a draft pays from {DRAFT_MIN_BYTES >> 20} MiB)"
    lib = library()
    if lib is None or not lib.lmf_vnni_ok():
        return "no int4 kernel here (AVX512-VNNI and a C compiler)"
    return None


def resolve_draft(model: Decoder, draft: Decoder | str | None, lazy: bool = False):
    """``draft`` as given, or for "auto" the model's int4 copy where that pays (None where it does not); ``lazy``:
    a function building that copy (``speculative_steps`` builds it after the first token)."""
    if isinstance(draft, str):  # "auto"
        if draft_unsupported(model) is not None:
            return None
        return functools.partial(make_draft, model) if lazy else make_draft(model)
    return draft


def make_draft(model: Decoder) -> Decoder:
    """The model's int4 copy (groups of 32, asymmetric, round to nearest; int8 embedding table), sharing its
    norms and other small tensors; built once per model and kept while the model lives (its weights are rounded from
    the model's at that time: a changed model keeps correct output, the draft only proposes worse)."""
    draft = _DRAFTS.get(model)
    if draft is None:
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        with torch.inference_mode(False):  # (stream_steps runs in inference mode: the C step's layouts need normal
            draft = copy.deepcopy(model, memo)  # tensors) module objects of its own, the model's tensors
            for key in [k for k in draft.__dict__ if k.startswith("_lmforge")]:  # the model's decode plans, ...
                del draft.__dict__[key]
            quantize_model(draft, QuantConfig(bits=4, group_size=32, symmetric=False))
        draft.eval().requires_grad_(False)
        release_free_memory()  # the rounding's temporaries (a layer's float copies)
        _DRAFTS[model] = draft  # (not on the model: no state dict, not copied with it)
    return draft


def accept(p: torch.Tensor, q: torch.Tensor, d: int, gen: torch.Generator) -> tuple[bool, int]:
    """Speculative sampling's step: ``d`` drawn from the draft's distribution ``q`` is kept with probability
    min(1, p(d) / q(d)), else a token is drawn from max(p - q, 0) normalised; the token is then distributed as ``p``
    (Leviathan et al. 2023, appendix A.1). (kept, token)."""
    if torch.rand(1, generator=gen).item() * float(q[d]) < float(p[d]):
        return True, d
    rest = (p - q).clamp_(min=0)
    return False, draw(rest if float(rest.sum()) > 0 else p, gen)


class Speculator:
    """The draft's side of speculative decoding, for one sequence at a time: its own cache (of ``max_len``
    positions), caught up with whichever sequence it is asked to continue, and the adaptive draft length."""

    def __init__(self, draft: Decoder, max_len: int) -> None:
        self.small = SlotRunner(draft, 1, max_len)
        self.owner = None  # the Sequence the draft's cache holds the start of
        self.k, self.drafted, self.kept = START_DRAFT, 0, 0
        self.rounds = 0  # rounds that drafted (for tests and statistics)

    @classmethod
    def auto(cls, model: Decoder, max_len: int, draft: Decoder | str | None = "auto") -> Speculator | None:
        """A Speculator for ``model`` with ``draft`` ("auto": its int4 copy where that pays; None: none)."""
        draft = resolve_draft(model, draft)
        return cls(draft, max_len) if draft is not None and not model.num_virtual_tokens else None

    def round(self, target: SlotRunner, slot: int, seq, tok: int) -> Iterator:
        """The next choices of ``seq`` in ``slot`` of ``target``, whose last emitted token ``tok`` is in no cache
        yet: one plain decoding step, or the draft's proposals checked in one step of ``target``. The caller accepts
        each choice into ``seq`` before the next is made; a finished ``seq`` ends the round."""
        params, sampler = seq.params, seq.sampler
        sampling = not params.greedy and not params.penalized  # else the model's own choice is compared
        gen, small = sampler.generator, self.small
        if self.owner is not seq:
            self.owner, small.lens[0] = seq, 0
            self.k, self.drafted, self.kept = START_DRAFT, 0, 0
        base = target.lens[slot]
        room = min(target.max_len - 1 - base, seq.limit - len(seq.out_ids) - 1)
        worth = self.drafted < CHECK_AFTER or self.kept >= MIN_KEPT * self.drafted
        n = min(self.k, room) if worth else 0
        if n <= 0:
            yield select(target.decode([None] * slot + [tok]), [sampler])[0]
            return

        def propose(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
            if not sampling:
                return int(logits.argmax()), None
            q = sparse_distribution(logits, params)
            return draw(q, gen), q

        ids = seq.prompt_ids + seq.out_ids  # ends with tok
        x, q = propose(small.extend(0, ids[small.lens[0] :], every=False)[-1])  # what the draft has not seen yet
        proposal, qs = [x], [q]
        for _ in range(n - 1):
            x, q = propose(small.decode([x])[0])
            proposal.append(x)
            qs.append(q)
        rows = target.extend(slot, [tok] + proposal)
        self.drafted += n
        self.rounds += 1
        try:
            for i in range(n + 1):
                d = proposal[i] if i < n else -1
                if i < n and sampling:
                    ok, d = accept(sparse_distribution(rows[i], params), qs[i], d, gen)
                    choice = chosen(rows[i], sampler, d)
                else:
                    choice = select(rows[i : i + 1], [sampler])[0]
                    ok = choice.token == d
                yield choice
                if not ok or i == n or seq.finish_reason is not None:
                    break
                self.kept += 1
        finally:  # tok and the kept tokens stay in the caches; the last choice is in neither
            target.lens[slot] = base + 1 + i
            small.lens[0] = min(small.lens[0], base + 1 + i)
        self.k = min(self.k + 2, MAX_DRAFT) if i == n else max(self.k - 1, 1)


def speculative_steps(model: Decoder, draft: Decoder | Callable[[], Decoder], seq, cap: int) -> Iterator:
    """Decode ``seq`` (a ``lmforge.infer.sequence.Sequence``) with ``model``, ``draft`` proposing (or a function
    making it, called after the first token: the first token does not wait for the draft, 0.4 s for SmolLM2); a
    cache of ``cap`` positions. Yields ``Step``s as ``lmforge.infer.generate.stream_steps`` does."""
    target = SlotRunner(model, 1, cap)
    choice = select(target.prefill(0, seq.prompt_ids)[None], [seq.sampler])[0]
    step = seq.accept(choice)
    if step is not None:
        yield step
    if seq.finish_reason is not None:
        return
    spec = Speculator(draft if isinstance(draft, nn.Module) else draft(), cap)
    while seq.finish_reason is None:
        for c in spec.round(target, 0, seq, choice.token):
            choice, step = c, seq.accept(c)
            if step is not None:
                yield step
