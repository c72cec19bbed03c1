"""Parameters, training FLOPs and per-device memory of a model configuration under data, tensor and pipeline
parallelism with ZeRO / FSDP sharding.

- Parameters: an analytic count from the config (checked against the decoder built on the meta device).
- FLOPs per token: 6 N for the weights (forward 2N, backward 4N) plus 12 L d_attn T for the attention scores and
  their use (Chowdhery et al. 2022, PaLM, appendix B), N without the embedding table.
- Model states (Rajbhandari et al. 2020, ZeRO, section 3.1): with mixed-precision Adam, 2 bytes of 16-bit weights,
  2 of gradients and K = 12 of optimizer state (fp32 master weights, momentum, variance) per parameter; in fp32,
  4 + 4 + 8. ZeRO stage 1 shards the optimizer state over the data-parallel ranks, stage 2 also the gradients,
  stage 3 (= FSDP full sharding) also the weights. Tensor and pipeline parallelism divide all three.
- Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 2-5),
  per layer with 16-bit activations: s b h (34 + 5 a s / h) bytes; tensor parallel with sequence parallelism
  divides it by t; full recomputation keeps only each layer's 2 s b h input. With 1F1B pipelining the first stage
  holds p microbatches of its L/p layers: L layers' worth, whatever p. fp32 activations take twice the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError

GB = 1024**3


def analytic_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count by part, from the config alone (tied output layer counted once)."""
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    nh, nkv, hd, h = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.hidden_size
    norm = d * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    emb = V * d
    if cfg.position == "learned":
        emb += cfg.block_size * d
    elif cfg.position == "glm2d" and cfg.glm2d == "learned":
        emb += 2 * cfg.block_size * d
    attn = d * (nh + 2 * nkv) * hd + nh * hd * d
    attn += (nh + 2 * nkv) * hd * cfg.qkv_bias + d * cfg.attn_out_bias
    mlp = (3 if cfg.gated else 2) * d * h + ((2 * h if cfg.gated else h) + d) * cfg.mlp_bias
    norms = norm * (1 if cfg.parallel_block and cfg.parallel_shared_norm else 2)
    if cfg.norm_placement == "sandwich":
        norms += 2 * norm
    layer = attn + mlp + norms
    other = norm * (cfg.final_norm + cfg.embedding_norm)
    head = 0 if cfg.tie_embeddings else V * d + V * cfg.lm_head_bias
    total = emb + L * layer + other + head
    return {"embedding": emb, "per_layer": layer, "layers": L * layer, "head": head, "other": other, "total": total}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    p = analytic_params(cfg)
    n = p["total"] - p["embedding"]
    T = seq_len or cfg.block_size
    attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T
    return {"non_embedding_params": n, "train": 6 * n + attn, "forward": 2 * n + attn / 3}


@dataclass
class Parallel:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0  # 0, 1, 2, 3 (3 = FSDP full sharding)
    sequence_parallel: bool = True
    recompute: str = "none"  # none | full

    def check(self) -> None:
        if min(self.dp, self.tp, self.pp) < 1:
            raise LMForgeError("--dp, --tp and --pp must be >= 1")
        if self.zero not in (0, 1, 2, 3):
            raise LMForgeError("--zero must be 0, 1, 2 or 3")
        if self.recompute not in ("none", "full"):
            raise LMForgeError("--recompute must be none or full")


def memory_estimate(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "bf16",
                    par: Parallel | None = None) -> dict:
    """Bytes per device for weights, gradients, optimizer state and activations (see the module docstring)."""
    par = par or Parallel()
    par.check()
    if precision not in ("fp32", "bf16", "fp16"):
        raise LMForgeError("--precision must be fp32, bf16 or fp16")
    if batch < 1 or seq_len < 1:
        raise LMForgeError("--batch and --seq-len must be >= 1")
    if cfg.n_head % par.tp:  # Megatron splits the attention heads (and the MLP) across the tensor-parallel ranks
        raise LMForgeError(f"--tp {par.tp} must divide the {cfg.n_head} attention heads")
    if cfg.n_layer % par.pp:  # and gives each pipeline stage the same number of layers
        raise LMForgeError(f"--pp {par.pp} must divide the {cfg.n_layer} layers")
    n = analytic_params(cfg)["total"]
    mixed = precision != "fp32"
    w_b, g_b, o_b = (2, 2, 12) if mixed else (4, 4, 8)
    local = n / (par.tp * par.pp)
    shard = par.dp
    weights = w_b * local / (shard if par.zero >= 3 else 1)
    grads = g_b * local / (shard if par.zero >= 2 else 1)
    optim = o_b * local / (shard if par.zero >= 1 else 1)
    s, b, h, a, L = seq_len, batch, cfg.n_embd, cfg.n_head, cfg.n_layer
    act_bytes = 1 if mixed else 2  # the 34/5 coefficients count 16-bit bytes
    if par.recompute == "full":
        per_layer = 2 * s * b * h / par.tp
    else:  # eq. 3 (tensor parallel: 10 s b h of norms and dropouts stay whole) and eq. 4 (with sequence parallel)
        t = par.tp
        per_layer = s * b * h * ((34 / t if par.sequence_parallel else 10 + 24 / t) + 5 * a * s / (h * t))
    activations = per_layer * act_bytes * L
    total = weights + grads + optim + activations
    return {"params": n, "precision": precision, "parallel": par.__dict__,
            "bytes": {"weights": weights, "gradients": grads, "optimizer": optim, "activations": activations,
                      "total": total},
            "gb": {"weights": weights / GB, "gradients": grads / GB, "optimizer": optim / GB,
                   "activations": activations / GB, "total": total / GB}}
