"""Log-likelihood scoring with a shared prefix: every choice of a question reuses the KV cache of its context.

The tokenization follows lm-evaluation-harness (``_encode_pair``): trailing spaces of the context move to the
continuation, the continuation's tokens are ``encode(context + continuation)[len(encode(context)):]``, an empty
context is replaced by a prefix token (BOS, else EOS), and no BOS is added otherwise unless asked.

Questions are sorted by context length and batched (left padding, a key mask, positions counted from the mask, as
``infer.generate.generate_batch`` does); the contexts run once, then all multi-token continuations of the batch run
on copies of their question's cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.errors import LMForgeError
from lmforge.losses import cross_entropy
from lmforge.model import Decoder, KVCache


@dataclass
class Group:
    """One question: its context ids and the ids of every continuation to score after it."""

    context: list[int]
    continuations: list[list[int]]


def prefix_token(tokenizer) -> int:
    """Token an empty context is replaced with (lm-evaluation-harness: BOS if the tokenizer has one, else EOS)."""
    tid = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if tid is None:
        raise LMForgeError("the tokenizer has neither BOS nor EOS: an empty context cannot be scored")
    return tid


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-evaluation-harness does for causal models."""
    if not context:
        return [prefix_token(tokenizer)], tokenizer.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    cont = whole[len(ctx):]
    if add_bos and tokenizer.bos_id is not None:
        ctx = [tokenizer.bos_id, *ctx]
    return ctx, cont


def _device_dtype(model: Decoder) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    dtype = p.dtype if p.is_floating_point() else torch.float32
    return p.device, dtype


def _positions(model: Decoder, pos: torch.Tensor) -> torch.Tensor:
    return torch.stack([pos, torch.zeros_like(pos)], dim=1) if model.cfg.position == "glm2d" else pos


def _logprobs_of(model: Decoder, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log p(target) per position from final hidden states (..., T, d) and targets (..., T); the output layer runs
    on ``chunk`` positions at a time so (T, vocab) logits never exist for long windows."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = [-cross_entropy(model.lm_head(flat_h[i : i + chunk]), flat_t[i : i + chunk], reduction="none")
           for i in range(0, flat_h.shape[0], chunk)]
    return torch.cat(out).view(targets.shape)


class Scorer:
    """Batched log-likelihoods of continuations after contexts, and rolling log-likelihoods of long texts."""

    def __init__(self, model: Decoder, tokenizer, batch_tokens: int = 4096, max_batch: int = 32,
                 cache_bytes: int = 256 << 20, add_bos: bool = False) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.batch_tokens, self.max_batch, self.cache_bytes = batch_tokens, max_batch, cache_bytes
        self.add_bos = add_bos
        self.want_greedy = False  # also compute whether each continuation is the greedy one (the harness adapter)
        self.tokens = 0  # tokens run through the model (for tokens/s)

    @property
    def block_size(self) -> int:
        return self.model.cfg.block_size

    def encode_group(self, context: str, continuations: list[str]) -> Group:
        pairs = [encode_pair(self.tok, context, c, self.add_bos) for c in continuations]
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):  # cannot happen: the context is encoded alone
            raise AssertionError("contexts of one question differ")
        return Group(ctx, [p[1] for p in pairs])

    # ---- multiple choice ------------------------------------------------------------------------------------------
    def score(self, groups: list[Group]) -> list[list[float]]:
        """Sum of log-probabilities of each continuation given its group's context."""
        return [[lp for lp, _ in g] for g in self.score_greedy(groups)]

    @torch.inference_mode()
    def score_greedy(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        """(sum of log-probabilities, whether greedy decoding would produce it) of each continuation."""
        out: list[list] = [[] for _ in groups]
        prepared = [self._truncate(g) for g in groups]
        order = sorted(range(len(groups)), key=lambda i: -len(prepared[i].context))
        batch: list[int] = []
        tail = 0  # longest continuation in the batch: padded context + its rest must fit the model's context
        for i in order:
            width = len(prepared[batch[0]].context) if batch else len(prepared[i].context)
            longest = max(len(c) for c in prepared[i].continuations)
            if batch and (len(batch) >= self.max_batch or (len(batch) + 1) * width > self.batch_tokens
                          or width + max(tail, longest) - 1 > self.block_size):
                self._score_batch([prepared[j] for j in batch], [out[j] for j in batch])
                batch, tail = [], 0
            batch.append(i)
            tail = max(tail, longest)
        if batch:
            self._score_batch([prepared[j] for j in batch], [out[j] for j in batch])
        return [[(lp, g) for lp, g in row] for row in out]

    def _truncate(self, g: Group) -> Group:
        """Left-truncate the context so that context + longest continuation - 1 fits the model's context."""
        if any(not c for c in g.continuations):
            raise LMForgeError("a continuation encodes to no tokens")
        longest = max(len(c) for c in g.continuations)
        room = self.block_size + 1 - longest
        if room < 1:
            raise LMForgeError(f"a continuation of {longest} tokens does not fit the context of {self.block_size}")
        return Group(g.context[-room:], g.continuations)

    def _score_batch(self, groups: list[Group], out: list[list[float]]) -> None:
        model = self.model
        device, dtype = _device_dtype(model)
        B, P = len(groups), max(len(g.context) for g in groups)
        ids = torch.zeros(B, P, dtype=torch.long, device=device)
        mask = torch.ones(B, P, dtype=torch.bool, device=device)
        for b, g in enumerate(groups):
            ids[b, P - len(g.context):] = torch.tensor(g.context, device=device)
            mask[b, : P - len(g.context)] = False
        padded = not bool(mask.all())
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cache = KVCache(model.cfg, B, P, device=device, dtype=dtype)
        h = model.hidden_states(ids, position_ids=_positions(model, pos), key_mask=mask if padded else None,
                                cache=cache)
        self.tokens += int(mask.sum())
        first = torch.log_softmax(model.lm_head(h[:, -1]).float(), dim=-1)
        best = first.argmax(-1).tolist()
        rows: list[tuple[int, int]] = []  # (group, choice) of continuations longer than one token
        for b, g in enumerate(groups):
            for c, cont in enumerate(g.continuations):
                out[b].append([float(first[b, cont[0]]), best[b] == cont[0]])
                if len(cont) > 1:
                    rows.append((b, c))
        if not rows:
            return
        # the rest of each long continuation runs on a copy of its question's cache, a chunk of rows at a time
        cfg = model.cfg
        per_pos = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_size * torch.finfo(dtype).bits // 8
        longest = max(len(groups[b].continuations[c]) - 1 for b, c in rows)
        chunk = max(1, self.cache_bytes // max(1, per_pos * (P + longest)))
        ctx_len = mask.sum(-1)
        for s in range(0, len(rows), chunk):
            part = rows[s : s + chunk]
            R = len(part)
            L = max(len(groups[b].continuations[c]) - 1 for b, c in part)
            qi = torch.tensor([b for b, _ in part], device=device)
            sub = KVCache(cfg, R, P + L, device=device, dtype=dtype)
            sub.k[:, :, :, :P] = cache.k[:, qi, :, :P]
            sub.v[:, :, :, :P] = cache.v[:, qi, :, :P]
            sub.pos = P
            x = torch.zeros(R, L, dtype=torch.long, device=device)
            tgt = torch.full((R, L), -100, dtype=torch.long, device=device)
            for r, (b, c) in enumerate(part):
                cont = groups[b].continuations[c]
                x[r, : len(cont) - 1] = torch.tensor(cont[:-1], device=device)
                tgt[r, : len(cont) - 1] = torch.tensor(cont[1:], device=device)
            p2 = ctx_len[qi, None] + torch.arange(L, device=device)[None]
            km = torch.cat([mask[qi], torch.ones(R, L, dtype=torch.bool, device=device)], dim=1) if padded else None
            h2 = model.hidden_states(x, position_ids=_positions(model, p2), key_mask=km, cache=sub)
            self.tokens += int((tgt != -100).sum())
            valid = tgt != -100
            lp = _logprobs_of(model, h2, tgt.clamp_min(0)).masked_fill(~valid, 0.0).sum(-1)
            greedy = ((model.lm_head(h2).argmax(-1) == tgt) | ~valid).all(-1) if self.want_greedy else None
            for r, (b, c) in enumerate(part):
                out[b][c][0] += float(lp[r])
                out[b][c][1] = bool(out[b][c][1] and (greedy is None or greedy[r]))

    # ---- perplexity ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def rolling(self, ids: list[int], context: int | None = None, stride: int | None = None) -> tuple[float, int]:
        """(sum of negative log-likelihoods in nats, tokens predicted) of ``ids``: the first token is predicted
        from the prefix token, each window holds ``context`` inputs and scores the tokens it adds."""
        L = min(context or self.block_size, self.block_size)
        seq = [prefix_token(self.tok), *ids]
        wins = rolling_windows(len(ids), L, stride or L)
        device, _ = _device_dtype(self.model)
        total, n = 0.0, 0
        by_len: dict[int, list[tuple[int, int, int]]] = {}
        for w in wins:
            by_len.setdefault(w[1] - w[0], []).append(w)
        for T, ws in by_len.items():
            step = max(1, min(self.max_batch, self.batch_tokens // max(T, 1)))
            for s in range(0, len(ws), step):
                part = ws[s : s + step]
                x = torch.tensor([seq[a:b] for a, b, _ in part], device=device)
                y = torch.tensor([seq[a + 1 : b + 1] for a, b, _ in part], device=device)
                k = max(w[2] for w in part)
                h = self.model.hidden_states(x)[:, -k:]
                lp = _logprobs_of(self.model, h, y[:, -k:])
                self.tokens += x.numel()
                for r, w in enumerate(part):
                    total -= float(lp[r, k - w[2]:].sum())
                    n += w[2]
        return total, n


def rolling_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over ``[prefix] + tokens`` (length n + 1) predicting each of the n tokens exactly once.

    Each window is (start, end, scored): inputs ``seq[start:end]`` (at most ``context``) predict ``seq[start+1:end+1]``
    and only the last ``scored`` predictions count. The first window scores min(context, n) tokens, each next one
    ``stride`` new tokens with the ``context`` tokens before them as inputs (stride = context: lm-evaluation-harness'
    disjoint rolling windows; a smaller stride gives every token more context, at more cost).
    """
    if context < 1 or not 1 <= stride <= context:
        raise LMForgeError(f"stride must be between 1 and the context ({context}), got {stride}")
    wins: list[tuple[int, int, int]] = []
    if n <= 0:
        return wins
    done = min(context, n)
    wins.append((0, done, done))
    while done < n:
        b = min(done + stride, n)
        wins.append((max(0, b - context), b, b - done))
        done = b
    return wins


def perplexity_metrics(nll: float, tokens: int, n_bytes: int, n_words: int) -> dict[str, float]:
    """Token perplexity (exp of mean NLL per token), nats/token, bits/byte and word perplexity."""
    return {
        "ppl": math.exp(nll / tokens) if tokens else float("nan"),
        "nats_per_token": nll / tokens if tokens else float("nan"),
        "bits_per_byte": nll / (n_bytes * math.log(2)) if n_bytes else float("nan"),
        "word_perplexity": math.exp(nll / n_words) if n_words else float("nan"),
    }
