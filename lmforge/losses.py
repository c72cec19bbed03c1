"""Every training objective as a small function on tensors: the one cross-entropy, and (as the stages arrive) SFT,
reward-model, DPO and PPO terms. Each is tested against an independent formula.

Convention: a loss used by the trainer returns a *sum* over its units (target tokens, pairs, ...) together with the
number of units, so that the trainer can normalise by the count over the whole accumulated (and distributed) batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.matmul import linear, matmul

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


# ---- masked statistics ----------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is true (over ``dim``, or over everything)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim) / m.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var needs at least two unmasked values")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions. ``shift_mean=False`` adds the mean back: the scale is normalised
    but the mean is kept (PPO whitens rewards this way; advantages with ``shift_mean=True``)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


# ---- log-probabilities and entropy ---------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) at each position, in fp32, from logits (..., V) that predict ``tokens`` (...) at the same
    position. ``temperature``: the logits are divided by the temperature the tokens were sampled with."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the softmax at each position: logsumexp(z) - sum p z, in fp32."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean entropy over the masked positions (the PPO entropy bonus and its metric)."""
    return masked_mean(entropy_from_logits(logits, temperature), mask)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                      normalize: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """Sum of log p(response tokens) per sequence (B,), from the logits of a forward pass over ``input_ids``.

    ``loss_mask`` (B, T) marks the tokens of ``input_ids`` to count (the response): prompt and padding are
    excluded. Logits at position t predict token t + 1 (the shift is done here). ``normalize`` divides each sum
    by its number of counted tokens (length-normalised log-probability)."""
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    m = loss_mask[:, 1:].to(lp.dtype)
    total = (lp * m).sum(-1)
    return total / m.sum(-1).clamp_min(1) if normalize else total


# ---- reward model ---------------------------------------------------------------------------------------------


def _reduce(values: dict[str, torch.Tensor], w: torch.Tensor, reduction: str) -> dict[str, float]:
    """Weighted sums of per-unit metric values (``sum``) or weighted means (``mean``)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    denom = 1.0 if reduction == "sum" else w.sum()
    return {k: float((v.detach().float() * w).sum() / denom) for k, v in values.items()}


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                         weights: torch.Tensor | None = None, reduction: str = "mean"
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry reward loss -log sigmoid(r_w - r_l - margin) over pairs (N,).

    ``weights`` (N,) scale each pair (``ranked_pair_index`` gives InstructGPT's 1 / pairs-per-prompt).
    ``reduction``: ``mean`` (weighted mean) or ``sum`` (weighted sum; the metrics are then sums too, ready for the
    trainer's (loss_sum, count, metric_sums) convention with count = N or the sum of the weights).
    Metrics: accuracy (r_w > r_l), margin r_w - r_l, chosen and rejected scores."""
    diff = chosen.float() - rejected.float()
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)
    w = torch.ones_like(losses) if weights is None else weights.to(losses)
    metrics = _reduce({"accuracy": (diff > 0).float(), "margin": diff, "chosen": chosen, "rejected": rejected}, w,
                      reduction)
    total = (losses * w).sum()
    return (total if reduction == "sum" else total / w.sum()), metrics


def ranked_pairs(k: int) -> list[tuple[int, int]]:
    """All K(K-1)/2 (better, worse) index pairs of a list ranked best to worst."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def ranked_pair_index(group_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For prompts with ``group_sizes[g]`` ranked responses laid out one group after another in a flat score
    vector: (better indices, worse indices, weights), one entry per pair; weights are 1 / (pairs of that prompt),
    so every prompt counts once however many responses it has (InstructGPT's per-prompt normalisation)."""
    win, lose, w = [], [], []
    start = 0
    for k in group_sizes:
        if k < 2:
            raise ValueError(f"a ranked list needs at least 2 responses, got {k}")
        pairs = ranked_pairs(k)
        win += [start + i for i, _ in pairs]
        lose += [start + j for _, j in pairs]
        w += [1.0 / len(pairs)] * len(pairs)
        start += k
    return torch.tensor(win), torch.tensor(lose), torch.tensor(w)


def ranked_reward_loss(scores: torch.Tensor, group_sizes: list[int], margin: float | None = None,
                       reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """Reward loss over ranked lists: ``scores`` (sum of group_sizes,) holds each prompt's responses best to worst.
    Every pair of a prompt is compared; each prompt's pairs are averaged, then prompts are averaged (``mean``) or
    summed (``sum``; the count is then the number of prompts). Metrics are weighted the same way."""
    win, lose, w = ranked_pair_index(group_sizes)
    dev = scores.device
    loss, metrics = pairwise_reward_loss(scores[win.to(dev)], scores[lose.to(dev)], margin, w.to(dev), "sum")
    if reduction == "sum":
        return loss, metrics
    n = len(group_sizes)
    return loss / n, {k: v / n for k, v in metrics.items()}


# ---- DPO ------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """DPO on summed response log-probs (B,) of the policy and the reference.

    - ``sigmoid``: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d), d = chosen log-ratio - rejected
      log-ratio; eps = ``label_smoothing`` (conservative DPO; 0 is plain DPO, Rafailov et al. eq. 7).
    - ``ipo``: (d' - 1 / (2 beta))^2 with each log-ratio divided by its response length (``chosen_lengths``,
      ``rejected_lengths``: the counted response tokens, ``loss_mask[:, 1:].sum(-1)`` of ``sequence_logprobs``), IPO
      eq. 17 as TRL and the IPO authors apply it.
    - ``hinge``: max(0, 1 - beta d) (SLiC).
    Metrics: implicit rewards beta * log-ratio (chosen, rejected), their accuracy and margin; means, or sums with
    ``reduction="sum"`` (the trainer's convention, count = B)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (expected one of {', '.join(DPO_LOSS_TYPES)})")
    chosen_lr = policy_chosen.float() - ref_chosen.float()
    rejected_lr = policy_rejected.float() - ref_rejected.float()
    d = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths (response token counts)")
        d_norm = chosen_lr / chosen_lengths.float().clamp_min(1) - rejected_lr / rejected_lengths.float().clamp_min(1)
        losses = (d_norm - 1 / (2 * beta)) ** 2
    rc, rr = beta * chosen_lr, beta * rejected_lr
    metrics = _reduce({"rewards_chosen": rc, "rewards_rejected": rr, "reward_accuracy": (rc > rr).float(),
                       "reward_margin": rc - rr}, torch.ones_like(d), reduction)
    return (losses.sum() if reduction == "sum" else losses.mean()), metrics


# ---- PPO ------------------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy
    (Schulman, "Approximating KL divergence"): with log r = ref - policy, k1 = -log r, k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r (unbiased and non-negative)."""
    log_r = ref_logprobs.float() - logprobs.float()
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (expected one of {', '.join(KL_ESTIMATORS)})")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true position of each row of ``mask`` (B, T); -1 for an empty row."""
    T = mask.shape[-1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).amax(-1)


def ppo_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                kl_coef: float, kl_estimator: str = "k1", ended: torch.Tensor | None = None,
                missing_eos_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T) of PPO for RLHF: -kl_coef * KL at every response token, plus the sequence score
    at the last true token of each response (``mask`` marks response tokens, stop token included; padding after
    it gets nothing). Responses that never ended (``ended`` false) have ``missing_eos_penalty`` subtracted from
    their score. Returns (rewards, per-token KL), both 0 outside the mask."""
    m = mask.to(torch.float32)
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * m
    score = scores.float()
    if ended is not None and missing_eos_penalty:
        score = score - missing_eos_penalty * (~ended.bool()).float()
    last = last_token_index(mask)
    if (last < 0).any():
        raise ValueError("every response needs at least one token in the mask")
    rewards = -kl_coef * kl
    rewards = rewards.scatter_add(1, last[:, None], score[:, None])
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A zero after the last
    true token of each response (``mask``). Returns (advantages, returns = advantages + values), 0 outside the
    mask; neither carries gradient."""
    m = mask.to(torch.float32)
    r, v = rewards.detach().float() * m, values.detach().float() * m
    T = r.shape[1]
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in range(T - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate: mean over response tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = exp(logprobs - old_logprobs). Metrics: clip fraction (tokens where the clipped term is the larger), approx
    KL to the rollout policy (k3 estimator, masked mean), mean ratio."""
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
                   "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
                   "ratio": masked_mean(ratio, mask).item()}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float | None = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss: 0.5 * mean over response tokens of max((V - R)^2, (V_clip - R)^2) with
    V_clip = V_old + clip(V - V_old, -eps, eps) (no clipping when ``clip_eps`` is None). Metric: value clip
    fraction (tokens where the clipped error is the larger)."""
    v = values.float()
    err = (v - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(err, mask), {"vf_clipfrac": 0.0}
    v_clip = old_values + (v - old_values).clamp(-clip_eps, clip_eps)
    err_clip = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((err_clip > err).float(), mask).item()}
    return loss, metrics


def ptx_loss(ppo_loss: torch.Tensor, pretrain_loss: torch.Tensor, ptx_coef: float) -> torch.Tensor:
    """InstructGPT's PPO-ptx objective as a loss: the PPO loss plus gamma times the pretraining cross-entropy
    (maximising gamma * E[log pi(x_pretrain)])."""
    return ppo_loss + ptx_coef * pretrain_loss


class FixedKLController:
    """A constant KL coefficient ``value``."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        """No change."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon)."""

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        """``current``: the measured KL to the reference; ``n_steps``: samples (or steps) since the last update."""
        error = min(max(float(current) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = (float(state[k]) for k in ("value", "target", "horizon"))


# ---- the output projection and cross-entropy fused, in chunks (Liger Kernel's idea) -----------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over counted rows of CE(h @ W.T + b, y), computed in row chunks: the (N, V) logits never exist whole. The
    gradients are computed in the forward pass (chunk by chunk) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, chunk: int):
        n = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # bf16/fp16 logits are computed on in fp32
        loss = torch.zeros((), dtype=acc, device=h.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=acc) if need_w else None
        gb = torch.zeros_like(bias, dtype=acc) if need_b else None
        for s in range(0, n, chunk):
            hc, yc = h[s : s + chunk], targets[s : s + chunk]
            logits = linear(hc, weight).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            valid = yc != ignore_index
            safe = yc.clamp_min(0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            loss += ((lse - picked) * valid).sum()
            if need_h or need_w or need_b:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g[torch.arange(len(yc), device=g.device), safe] -= 1.0
                g *= valid[:, None]
                g = g.to(h.dtype)
                if need_h:
                    gh[s : s + chunk] = matmul(g, weight)
                if need_w:
                    gw += matmul(g.t(), hc).to(acc)
                if need_b:
                    gb += g.to(acc).sum(0)
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad):
        gh, gw, gb = ctx.saved_tensors
        return (None if gh is None else gh * grad.to(gh.dtype), None if gw is None else gw * grad.to(gw.dtype),
                None if gb is None else gb * grad.to(gb.dtype), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE,
                         chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of token losses, counted tokens) of ``CE(hidden @ weight.T + bias, targets)`` without materialising the
    logits: equal to ``token_loss_sum(F.linear(hidden, weight, bias), targets)``, in far less memory (a 49k-token
    vocabulary makes the logits the largest tensor of a fine-tuning step). Rows with nothing to predict are
    skipped."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    keep = (y != ignore_index).nonzero().squeeze(1)
    n = int(keep.numel())
    if n < len(y):  # prompt and padding rows never reach the head
        h, y = h.index_select(0, keep), y.index_select(0, keep)
    if n == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0, 0
    return _LinearCrossEntropy.apply(h, weight, bias, y, ignore_index, chunk), n


FUSED_MIN_VOCAB = 8192  # below this the logits are small and the plain path is as fast


def lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Next-token loss of a batch {input_ids, targets, model_kwargs?} as (sum, counted tokens). With a large
    vocabulary and a plain float output layer the head and the loss run fused in chunks (``linear_cross_entropy``);
    otherwise logits then ``token_loss_sum``. ``model`` may be wrapped (DDP's ``.module``)."""
    base = getattr(model, "module", model)
    head = getattr(base, "lm_head", None)
    kwargs = batch.get("model_kwargs", {})
    fused = (type(head) is torch.nn.Linear and head.out_features >= FUSED_MIN_VOCAB
             and not hasattr(head.weight, "full_tensor"))  # FSDP shards it: the plain path gathers it in forward
    if fused:
        h = model(batch["input_ids"], head=False, **kwargs)
        return linear_cross_entropy(h, head.weight, batch["targets"], head.bias)
    return token_loss_sum(model(batch["input_ids"], **kwargs), batch["targets"])
