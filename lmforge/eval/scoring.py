"""Log-likelihood scoring with a shared prefix: every choice of a question reuses the KV cache of its context.

The tokenization follows lm-evaluation-harness (``_encode_pair``): trailing spaces of the context move to the
continuation, the continuation's tokens are ``encode(context + continuation)[len(encode(context)):]``, an empty
context is replaced by a prefix token (BOS, else EOS), and no BOS is added otherwise unless asked.

Questions are sorted by context length and batched (left padding, a key mask, positions counted from the mask, as
``infer.generate.generate_batch`` does); the contexts run once, then all multi-token continuations of the batch run
on copies of their question's cache.

Contexts that share a long prefix (few-shot demonstrations: MMLU's five dev questions before every test question of a
subject) run it once. Questions whose contexts share at least ``MIN_SHARED`` tokens with a neighbour in token order
form a family; a family's batches each run their common prefix once for the whole batch, the last prefix's keys and
values are kept, and the next batch computes only what its prefix does not share with it (a prefix tree walked in
order). The suffixes then run left-padded after the prefix. The scores are those of the plain path up to float
rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.data.preference import common_prefix
from lmforge.errors import LMForgeError
from lmforge.infer.native import flash_attention_in
from lmforge.losses import cross_entropy
from lmforge.matmul import call, packed_weights_in
from lmforge.model import Decoder, KVCache

MIN_SHARED = 32  # tokens two contexts must share to run their prefix once (about one demonstration)
CPU_BATCH_TOKENS = 1024  # measured on SmolLM2, 2 cores: 1024 tokens a forward run 19 % faster per token than 4096
GPU_BATCH_TOKENS = 4096
JOIN_SLACK = 32  # tokens a question may add to a batch beyond running it alone next (a forward's fixed cost)


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
    out = [-cross_entropy(call(model.lm_head, flat_h[i : i + chunk]), flat_t[i : i + chunk], reduction="none")
           for i in range(0, flat_h.shape[0], chunk)]
    return torch.cat(out).view(targets.shape)


class Scorer:
    """Batched log-likelihoods of continuations after contexts, and rolling log-likelihoods of long texts."""

    def __init__(self, model: Decoder, tokenizer, batch_tokens: int | None = None, max_batch: int = 32,
                 cache_bytes: int = 256 << 20, add_bos: bool = False) -> None:
        """``batch_tokens``: tokens per forward (None: ``CPU_BATCH_TOKENS`` on a CPU, where the activations of
        larger batches fall out of the caches, else ``GPU_BATCH_TOKENS``); long prefixes run in pieces of it."""
        self.model, self.tok = model.eval(), tokenizer
        if batch_tokens is None:
            cpu = _device_dtype(model)[0].type == "cpu"
            batch_tokens = CPU_BATCH_TOKENS if cpu else GPU_BATCH_TOKENS
        self.batch_tokens, self.max_batch, self.cache_bytes = batch_tokens, max_batch, cache_bytes
        self.add_bos = add_bos
        self.want_greedy = False  # also compute whether each continuation is the greedy one (the harness adapter)
        self.share_prefixes = True  # run a prefix shared by several contexts once (see the module docstring)
        self.tokens = 0  # tokens run through the model (for tokens/s)
        self._pre: tuple[list[int], torch.Tensor, torch.Tensor] | None = None  # last prefix: ids, keys, values

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
        with flash_attention_in(self.model), packed_weights_in(self.model):
            return self._score_greedy(groups)

    def _score_greedy(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        prepared, where = [], []  # groups whose continuations all fit after the same context; (group, choices)
        for n, g in enumerate(groups):
            for sub, idx in self._truncate(g):
                prepared.append(sub)
                where.append((n, idx))
        out: list[list] = [[] for _ in prepared]
        self._score_prepared(prepared, out)
        res: list[list] = [[None] * len(g.continuations) for g in groups]
        for (n, idx), row in zip(where, out):
            for c, (lp, greedy) in zip(idx, row):
                res[n][c] = (lp, greedy)
        return res

    def _score_prepared(self, prepared: list[Group], out: list[list]) -> None:
        families, alone = self._families(prepared)
        for fam in families:
            self._score_family(fam, prepared, out)
        self._pre = None
        order = sorted(alone, key=lambda i: -len(prepared[i].context))
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

    def _families(self, prepared: list[Group]) -> tuple[list[list[int]], list[int]]:
        """(families: runs of questions in token order whose neighbouring contexts share >= MIN_SHARED tokens,
        the other questions)."""
        n = len(prepared)
        cfg = self.model.cfg
        # the suffixes run after padding that follows the prefix: only position ids may carry distances (not ALiBi's
        # or a local window's key slots), and no virtual tokens may sit before the prefix
        if (not self.share_prefixes or self.model.num_virtual_tokens or n < 2 or cfg.position == "alibi"
                or cfg.attn_pattern == "alternating"):
            return [], list(range(n))
        order = sorted(range(n), key=lambda i: prepared[i].context)
        families, alone, run = [], [], [order[0]]
        for a, b in zip(order, order[1:]):
            if common_prefix((prepared[a].context, prepared[b].context)) >= MIN_SHARED:
                run.append(b)
                continue
            (families.append(run) if len(run) > 1 else alone.extend(run))
            run = [b]
        (families.append(run) if len(run) > 1 else alone.extend(run))
        return families, alone

    def _score_family(self, fam: list[int], prepared: list[Group], out: list[list]) -> None:
        """Batches of a family in token order. A question joins the batch when that costs at most ``JOIN_SLACK``
        more tokens than closing the batch and running it next on its own, counting what the question after it
        can then reuse: a batch keeps only its common prefix for the next one, a question alone its whole
        context (so questions sharing more with each other than with the batch run one after the other)."""
        def prefix_len(b: list[int], lcp: int) -> int:  # every context keeps at least one token after the prefix
            return min(lcp, min(len(prepared[j].context) for j in b) - 1)

        def cost(b: list[int], lcp: int) -> int:
            lp = prefix_len(b, lcp)
            reused = min(lp, common_prefix((self._pre[0], prepared[b[0]].context)) if self._pre else 0)
            return lp - reused + len(b) * (max(len(prepared[j].context) for j in b) - lp)

        def after(kept: int, ref: list[int], nxt: int | None) -> int:  # tokens the next question adds to a prefix
            if nxt is None:
                return 0
            ctx = prepared[nxt].context
            return len(ctx) - min(kept, common_prefix((ref, ctx)))

        batch, lcp = [fam[0]], len(prepared[fam[0]].context)
        for n, i in enumerate(fam[1:], start=2):
            ctx = prepared[i].context
            nxt = fam[n] if n < len(fam) else None
            shared = min(lcp, common_prefix((prepared[batch[-1]].context, ctx)))
            joined = batch + [i]
            width = max(len(prepared[j].context) for j in joined)
            tail = max(len(c) for j in joined for c in prepared[j].continuations)
            fits = (len(joined) <= self.max_batch and len(joined) * (width - prefix_len(joined, shared))
                    <= self.batch_tokens and width + tail - 1 <= self.block_size)
            if fits:
                kept = prefix_len(batch, lcp)  # the prefix the batch leaves when closed now
                alone = len(ctx) - min(kept, common_prefix((prepared[batch[0]].context, ctx)))
                join = cost(joined, shared) + after(prefix_len(joined, shared), prepared[batch[0]].context, nxt)
                split = cost(batch, lcp) + alone + after(len(ctx) - 1, ctx, nxt)
                if join <= split + JOIN_SLACK:
                    batch, lcp = joined, shared
                    continue
            self._score_batch([prepared[j] for j in batch], [out[j] for j in batch], prefix_len(batch, lcp))
            batch, lcp = [i], len(ctx)
        self._score_batch([prepared[j] for j in batch], [out[j] for j in batch], prefix_len(batch, lcp))

    def _prefix_cache(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (layers, 1, kv_heads, len(ids), head_dim) of ``ids`` run from the start, reusing the
        part shared with the last prefix; ``ids`` becomes the last prefix."""
        model = self.model
        device, dtype = _device_dtype(model)
        n = len(ids)
        reused = min(n, common_prefix((self._pre[0], ids))) if self._pre else 0
        if reused == n and self._pre is not None and len(self._pre[0]) == n:
            return self._pre[1], self._pre[2]
        cache = KVCache(model.cfg, 1, n, device=device, dtype=dtype)
        if reused:
            cache.k[:, :, :, :reused] = self._pre[1][:, :, :, :reused]
            cache.v[:, :, :, :reused] = self._pre[2][:, :, :, :reused]
            cache.pos = reused
        for a in range(reused, n, self.batch_tokens):  # in pieces: long sequences run slower per token
            b = min(a + self.batch_tokens, n)
            x = torch.tensor([ids[a:b]], device=device)
            pos = torch.arange(a, b, device=device)[None]
            model.hidden_states(x, position_ids=_positions(model, pos), cache=cache)
            self.tokens += b - a
        self._pre = (list(ids), cache.k, cache.v)
        return cache.k, cache.v

    def _truncate(self, g: Group) -> list[tuple[Group, list[int]]]:
        """Split a question into groups of its continuations that share one context, each with the indices of its
        continuations. As lm-evaluation-harness (``(context + continuation)[-(block_size + 1):][:-1]`` per request),
        a continuation that fits after the whole context keeps it; one that would overflow the model's context
        is scored after the context left-truncated to fit it alone (continuations of one length share one)."""
        if any(not c for c in g.continuations):
            raise LMForgeError("a continuation encodes to no tokens")
        longest = max(len(c) for c in g.continuations)
        if longest > self.block_size:
            raise LMForgeError(f"a continuation of {longest} tokens does not fit the context of {self.block_size}")
        by_keep: dict[int, list[int]] = {}
        for c, cont in enumerate(g.continuations):
            by_keep.setdefault(min(len(g.context), self.block_size + 1 - len(cont)), []).append(c)
        return [(Group(g.context[len(g.context) - keep:], [g.continuations[c] for c in idx]), idx)
                for keep, idx in by_keep.items()]

    def _score_batch(self, groups: list[Group], out: list[list[float]], shared: int = 0) -> None:
        """Score a batch; its contexts' first ``shared`` tokens (the same in each) run once as a prefix."""
        model = self.model
        device, dtype = _device_dtype(model)
        B, P = len(groups), max(len(g.context) for g in groups) - shared
        ids = torch.zeros(B, P, dtype=torch.long, device=device)
        mask = torch.ones(B, P, dtype=torch.bool, device=device)
        for b, g in enumerate(groups):
            ids[b, P - len(g.context) + shared:] = torch.tensor(g.context[shared:], device=device)
            mask[b, : P - len(g.context) + shared] = False
        padded = not bool(mask.all())
        self.tokens += int(mask.sum())  # the prefix counts where it runs (_prefix_cache)
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0) + shared
        cache = KVCache(model.cfg, B, shared + P, device=device, dtype=dtype)
        if shared:
            pk, pv = self._prefix_cache(groups[0].context[:shared])
            cache.k[:, :, :, :shared] = pk[:, :, :, :shared]
            cache.v[:, :, :, :shared] = pv[:, :, :, :shared]
            cache.pos = shared
            mask = torch.cat([torch.ones(B, shared, dtype=torch.bool, device=device), mask], dim=1)
            P += shared
        h = model.hidden_states(ids, position_ids=_positions(model, pos), key_mask=mask if padded else None,
                                cache=cache)
        first = torch.log_softmax(call(model.lm_head, h[:, -1]).float(), dim=-1)
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
            greedy = ((call(model.lm_head, h2).argmax(-1) == tgt) | ~valid).all(-1) if self.want_greedy else None
            for r, (b, c) in enumerate(part):
                out[b][c][0] += float(lp[r])
                out[b][c][1] = bool(out[b][c][1] and (greedy is None or greedy[r]))

    # ---- perplexity ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def rolling(self, ids: list[int], context: int | None = None, stride: int | None = None) -> tuple[float, int]:
        """(sum of negative log-likelihoods in nats, tokens predicted) of ``ids``: the first token is predicted
        from the prefix token, each window holds ``context`` inputs and scores the tokens it adds."""
        with flash_attention_in(self.model), packed_weights_in(self.model):
            return self._rolling(ids, context, stride)

    def _rolling(self, ids: list[int], context: int | None, stride: int | None) -> tuple[float, int]:
        L = min(context or self.block_size, self.block_size)
        seq = [prefix_token(self.tok), *ids]
        wins = rolling_windows(len(ids), L, L if stride is None else stride)  # (0 is refused, not the default)
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


def safe_exp(x: float) -> float:
    """``math.exp`` that gives ``inf`` where the result overflows a float (exponents above ~709)."""
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def perplexity_metrics(nll: float, tokens: int, n_bytes: int, n_words: int) -> dict[str, float]:
    """Token perplexity (exp of mean NLL per token), nats/token, bits/byte and word perplexity; a perplexity too
    large for a float (e.g. word perplexity of Chinese text, which has few whitespace words) is ``inf``."""
    return {
        "ppl": safe_exp(nll / tokens) if tokens else float("nan"),
        "nats_per_token": nll / tokens if tokens else float("nan"),
        "bits_per_byte": nll / (n_bytes * math.log(2)) if n_bytes else float("nan"),
        "word_perplexity": safe_exp(nll / n_words) if n_words else float("nan"),
    }
