"""Small reference implementations written from the papers' formulas, independent of ``lmforge.model``.

They read an lmforge ``state_dict`` (by parameter name and the documented fused layouts: ``attn.qkv`` is [Q | K | V],
a gated ``mlp.fc1`` is [gate | up]) and recompute the forward pass with explicit matrices, explicit masks built by
loops, explicit 2x2 rotations and closed-form activations. No lmforge module code is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# ---- activations (closed forms) -------------------------------------------------------------------------------


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """GELU (Hendrycks & Gimpel): x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (GPT-2): x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / Swish-1: x * sigmoid(x)."""
    return x / (1.0 + torch.exp(-x))


# activation applied to the (gate half of the) first projection; gated: act(x W_gate) * (x W_up) (Shazeer 2020)
ACTIVATION = {
    "gelu": gelu_erf,
    "gelu_tanh": gelu_tanh,
    "relu": relu,
    "silu": silu,
    "swiglu": silu,
    "geglu": gelu_erf,
    "geglu_tanh": gelu_tanh,
    "reglu": relu,
}
GATED = {"swiglu", "geglu", "geglu_tanh", "reglu"}


# ---- norms ----------------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y if b is None else y + b


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


# ---- positions ------------------------------------------------------------------------------------------------


def rope(
    x: torch.Tensor, pos: torch.Tensor, dim: int, theta: float = 10000.0, interleaved: bool = False
) -> torch.Tensor:
    """RoFormer rotation of the first ``dim`` channels of x (B, H, T, D) at positions pos (B, T).

    Pair i (channels (2i, 2i+1) when interleaved, else (i, i + dim/2)) is multiplied by the 2x2 rotation matrix
    [[cos a, -sin a], [sin a, cos a]] with a = pos * theta^(-2i/dim). Channels >= dim pass through.
    """
    out = x.clone()
    for i in range(dim // 2):
        a_idx, b_idx = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
        ang = pos.double() * theta ** (-2.0 * i / dim)  # (B, T)
        c, s = torch.cos(ang).to(x.dtype)[:, None], torch.sin(ang).to(x.dtype)[:, None]  # (B, 1, T)
        a, b = x[..., a_idx], x[..., b_idx]
        out[..., a_idx] = c * a - s * b
        out[..., b_idx] = s * a + c * b
    return out


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi (Press et al. 2022, sec. 3): for n a power of two the slopes are 2^(-8k/n), k = 1..n (a geometric
    sequence starting at 2^(-8/n) with that ratio). Otherwise (the paper's footnote, BLOOM's build_alibi_tensor):
    the slopes of the largest power of two c < n, then every other slope of the 2c sequence (k = 1, 3, 5, ...)."""

    def pow2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    c = 1
    while c * 2 <= n_head:
        c *= 2
    if c == n_head:
        return pow2(n_head)
    return pow2(c) + pow2(2 * c)[0::2][: n_head - c]


# ---- masks (True = the query may attend to the key), built element by element ---------------------------------


def causal_mask(T: int) -> torch.Tensor:
    return torch.tensor([[j <= i for j in range(T)] for i in range(T)])


def prefix_lm_mask(T: int, prefix: int) -> torch.Tensor:
    """GLM blank infilling / prefix LM: the first ``prefix`` tokens (part A) see all of A; the rest (part B) see A and
    themselves and earlier B tokens."""
    return torch.tensor([[j < prefix or j <= i for j in range(T)] for i in range(T)])


def banded_mask(base: torch.Tensor, window: int) -> torch.Tensor:
    """GPT-3's locally banded layers: query i only sees keys i - window < j (on top of ``base``)."""
    T = base.shape[0]
    band = torch.tensor([[i - window < j for j in range(T)] for i in range(T)])
    return base & band


# ---- the decoder --------------------------------------------------------------------------------------------------


def _norm(cfg, sd: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    if cfg.norm == "rmsnorm":
        return rms_norm(x, sd[name + ".weight"], cfg.norm_eps)
    return layer_norm(x, sd[name + ".weight"], sd.get(name + ".bias"), cfg.norm_eps)


def _linear(sd: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def mlp(cfg, sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    h = _linear(sd, prefix + "fc1", x)
    act = ACTIVATION[cfg.mlp]
    if cfg.mlp in GATED:
        n = h.shape[-1] // 2
        h = act(h[..., :n]) * h[..., n:]
    else:
        h = act(h)
    return _linear(sd, prefix + "fc2", h)


def attention(cfg, sd, prefix: str, x: torch.Tensor, allowed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T * scale + alibi + mask) V head by head; ``allowed`` (B, T, T) bool, pos (B, T) or (B, 2, T)."""
    B, T, _ = x.shape
    H, KV, hd = cfg.n_head, cfg.kv_heads, cfg.head_size
    qkv = _linear(sd, prefix + "qkv", x)
    q = qkv[..., : H * hd].reshape(B, T, H, hd).transpose(1, 2)
    k = qkv[..., H * hd : (H + KV) * hd].reshape(B, T, KV, hd).transpose(1, 2)
    v = qkv[..., (H + KV) * hd :].reshape(B, T, KV, hd).transpose(1, 2)
    if cfg.position == "rope":
        dim = int(hd * cfg.rotary_fraction)
        dim -= dim % 2
        q = rope(q, pos, dim, cfg.rope_theta, cfg.rope_interleaved)
        k = rope(k, pos, dim, cfg.rope_theta, cfg.rope_interleaved)
    elif cfg.position == "glm2d" and cfg.glm2d == "rotary":  # ChatGLM-6B: halves by position / block position
        h2 = hd // 2

        def rot2d(t: torch.Tensor) -> torch.Tensor:
            first = rope(t[..., :h2], pos[:, 0], h2, cfg.rope_theta, cfg.rope_interleaved)
            second = rope(t[..., h2:], pos[:, 1], h2, cfg.rope_theta, cfg.rope_interleaved)
            return torch.cat([first, second], -1)

        q, k = rot2d(q), rot2d(k)
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(hd)
    slopes = alibi_slopes(H) if cfg.position == "alibi" else None
    i_idx = torch.arange(T)[:, None].to(x.dtype)
    j_idx = torch.arange(T)[None, :].to(x.dtype)
    heads = []
    for h in range(H):
        g = h // (H // KV)  # query head h reads kv group h // (H / KV)
        s = q[:, h] @ k[:, g].transpose(-1, -2) * scale  # (B, T, T)
        if slopes is not None:
            s = s + slopes[h] * (j_idx - i_idx)  # -m * (i - j) (the softmax ignores a per-row constant)
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.exp(s - s.max(-1, keepdim=True).values)
        p = p / p.sum(-1, keepdim=True)
        heads.append(p @ v[:, g])
    y = torch.cat(heads, -1)  # (B, T, H*hd), heads concatenated in order
    return _linear(sd, prefix + "proj", y)


def forward(
    model: torch.nn.Module,
    ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    allowed: Callable[[int], torch.Tensor] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of an lmforge ``Decoder`` recomputed from its weights. ``allowed``: (T, T) or (B, T, T) bool mask, or a
    function layer -> mask; default causal. GPT-3's banded layers (odd layers when attn_pattern='alternating') get
    ``banded_mask`` on top."""
    cfg = model.cfg
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}  # computed in float64
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    B, T = ids.shape
    if position_ids is None:
        p = torch.arange(T)[None].expand(B, T)
        position_ids = torch.stack([p, torch.zeros_like(p)], 1) if cfg.position == "glm2d" else p
    h = sd["wte.weight"][ids] * cfg.embedding_scale
    if cfg.position == "learned":
        h = h + sd["wpe.weight"][position_ids]
    elif cfg.position == "glm2d" and cfg.glm2d == "learned":  # GLM: token + position + block position tables
        h = h + sd["wpe.weight"][position_ids[:, 0]] + sd["wpe_block.weight"][position_ids[:, 1]]
    if cfg.embedding_norm:
        h = _norm(cfg, sd, "emb_norm", h)
    alpha = (cfg.deepnorm_alpha or (2 * cfg.n_layer) ** 0.25) if cfg.norm_placement == "deepnorm" else 1.0
    for layer in range(cfg.n_layer):
        p = f"blocks.{layer}."
        if allowed is None:
            mask = causal_mask(T)
        else:
            mask = allowed(layer) if callable(allowed) else allowed
        if cfg.attn_pattern == "alternating" and layer % 2 == 1:
            mask = banded_mask(mask, cfg.local_window) if mask.dim() == 2 else torch.stack(
                [banded_mask(m, cfg.local_window) for m in mask])
        mask = mask.expand(B, T, T) if mask.dim() == 2 else mask

        def attn(t: torch.Tensor, p: str = p, mask: torch.Tensor = mask) -> torch.Tensor:
            return attention(cfg, sd, p + "attn.", t, mask, position_ids)

        def ffn(t: torch.Tensor, p: str = p) -> torch.Tensor:
            return mlp(cfg, sd, p + "mlp.", t)

        def norm(name: str, t: torch.Tensor, p: str = p) -> torch.Tensor:
            return _norm(cfg, sd, p + name, t)

        if cfg.parallel_block:  # GPT-J / PaLM: x + attn(LN(x)) + mlp(LN(x)); NeoX: two separate norms
            n1 = norm("norm1", h)
            n2 = n1 if cfg.parallel_shared_norm else norm("norm2", h)
            h = h + attn(n1) + ffn(n2)
        elif cfg.norm_placement == "pre":  # x + F(LN(x))
            h = h + attn(norm("norm1", h))
            h = h + ffn(norm("norm2", h))
        elif cfg.norm_placement == "sandwich":  # CogView: x + LN(F(LN(x)))
            h = h + norm("norm1_out", attn(norm("norm1", h)))
            h = h + norm("norm2_out", ffn(norm("norm2", h)))
        else:  # post-LN: LN(x + F(x)); DeepNorm: LN(alpha x + F(x))
            h = norm("norm1", alpha * h + attn(h))
            h = norm("norm2", alpha * h + ffn(h))
    if cfg.final_norm:
        h = _norm(cfg, sd, "norm_f", h)
    return _linear(sd, "lm_head", h)


# ---- llama2.c tokenizer ----------------------------------------------------------------------------------------


def run_c_encode(tok, text: str) -> list[int]:
    """llama2.c run.c's encode() for a tokenizer with ``pieces`` (bytes) and ``scores``, transcribed as literally as
    Python allows (O(n^2) merges), without BOS/EOS."""
    vocab = {}
    for i, p in enumerate(tok.pieces):
        vocab.setdefault(p, i)
    ids = [vocab[b" "]] if text else []
    for ch in text:
        b = ch.encode("utf-8")
        ids += [vocab[b]] if b in vocab else [x + 3 for x in b]
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(ids) - 1):
            j = vocab.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]], -1)
            if j != -1 and tok.scores[j] > best_score:
                best_score, best_id, best_idx = tok.scores[j], j, i
        if best_idx == -1:
            return ids
        ids[best_idx : best_idx + 2] = [best_id]


# ---- alignment objectives as the peers write them (transcribed, each names its source) --------------------------
# OpenRLHF: OpenRLHF/OpenRLHF@02a26057 openrlhf/models/utils.py (compute_approx_kl, compute_reward, masked_mean) and
# @09f5acef openrlhf/models/loss.py (PolicyLoss, ValueLoss, PairWiseLoss, DPOLoss). TRL before 0.12: trl/core.py
# (masked_var, masked_whiten) and trl/trainer/utils.py (AdaptiveKLController); TRL 1.16 trl/trainer/dpo_trainer.py
# (_compute_loss: the sigmoid, hinge and length-normalised ipo branches). Only the formulas are kept.


def openrlhf_masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    if kl_estimator == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio


def openrlhf_compute_reward(r, kl_coef, kl, action_mask):
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    return last_reward + kl_reward


def openrlhf_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps=0.2):
    ratio = (log_probs - old_log_probs).exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.min(surr1, surr2)
    loss = openrlhf_masked_mean(loss, action_mask, dim=None)
    clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    return loss, clip_ratio


def openrlhf_value_loss(values, old_values, returns, action_mask, clip_eps=0.2):
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    surr1 = (values_clipped - returns) ** 2
    surr2 = (values - returns) ** 2
    loss = torch.max(surr1, surr2)
    return 0.5 * openrlhf_masked_mean(loss, action_mask, dim=None)


def openrlhf_pairwise_loss(chosen_reward, reject_reward, margin=None):
    if margin is not None:
        loss = -torch.nn.functional.logsigmoid(chosen_reward - reject_reward - margin)
    else:
        loss = -torch.nn.functional.logsigmoid(chosen_reward - reject_reward)
    return loss.mean()


def openrlhf_dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.0, ipo=False):
    logits = (pc - pr) - (rc - rr)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing)
    return losses.mean(), beta * (pc - rc), beta * (pr - rr)


def trl_dpo_per_sequence_loss(chosen_logratios, rejected_logratios, beta, loss_type, chosen_len=None,
                              rejected_len=None):
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -torch.nn.functional.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    ipo_delta = chosen_logratios / chosen_len.clamp(min=1.0) - rejected_logratios / rejected_len.clamp(min=1.0)
    return (ipo_delta - 1 / (2 * beta)) ** 2


def trl_masked_var(values, mask, unbiased=True):
    mean = (values * mask).sum() / mask.sum()
    centered_values = values - mean
    variance = (centered_values**2 * mask).sum() / mask.sum()
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = (values * mask).sum() / mask.sum(), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


class TrlAdaptiveKLController:
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = min(max(current / target - 1, -0.2), 0.2)  # np.clip in the original
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


# torchtune: pytorch/torchtune@26ffccfb torchtune/rlhf/rewards.py (get_rewards_ppo; estimate_advantages up to the
# returns: its whitening is left out, as its whiten() adds the mean back when shift_mean=True, the reverse of TRL's)


def torchtune_get_rewards_ppo(scores, logprobs, ref_logprobs, kl_coeff, valid_score_idxs):
    kl = logprobs - ref_logprobs
    kl_reward = -kl_coeff * kl
    total_reward = kl_reward.clone()
    total_reward[torch.arange(scores.shape[0]), valid_score_idxs] += scores
    return total_reward, kl, kl_reward


def torchtune_gae(values, rewards, gamma, lmbda):
    last_gae_lam = 0
    advantages_reversed = []
    response_length = values.shape[-1]
    for t in reversed(range(response_length)):
        next_values = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae_lam = delta + gamma * lmbda * last_gae_lam
        advantages_reversed.append(last_gae_lam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values
