"""The one decoder: every family in lmforge is this module with a different ``ModelConfig``."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.losses import cross_entropy
from lmforge.matmul import call
from lmforge.model.attention import Attention
from lmforge.model.cache import KVCache, PrefixedKV
from lmforge.model.mlp import MLP
from lmforge.model.norms import make_norm
from lmforge.model.positions import Rotary, alibi_slopes


class Block(nn.Module):
    """Attention + MLP with the residual/norm arrangement chosen by the config."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.placement = cfg.norm_placement
        self.parallel = cfg.parallel_block
        self.alpha = cfg.alpha if cfg.norm_placement == "deepnorm" else 1.0
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        if not (self.parallel and cfg.parallel_shared_norm):
            self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        if self.placement == "sandwich":
            self.norm1_out = make_norm(cfg)
            self.norm2_out = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        # PEFT hooks (bottleneck adapters, lmforge/peft/adapter.py): None, or a module called as
        # ``adapter(sublayer_input, sublayer_output) -> new sublayer output``
        self.adapter_attn: nn.Module | None = None
        self.adapter_mlp: nn.Module | None = None

    def forward(self, x: torch.Tensor, rope, mask, cache) -> torch.Tensor:
        if self.parallel:
            h = self.norm1(x)
            h2 = self.norm2(x) if hasattr(self, "norm2") else h
            return x + self._drop(self._attn(h, rope, mask, cache)) + self._drop(self._mlp(h2))
        if self.placement == "pre":
            x = x + self._drop(self._attn(self.norm1(x), rope, mask, cache))
            return x + self._drop(self._mlp(self.norm2(x)))
        if self.placement == "sandwich":
            x = x + self._drop(self.norm1_out(self._attn(self.norm1(x), rope, mask, cache)))
            return x + self._drop(self.norm2_out(self._mlp(self.norm2(x))))
        # post-LN (GPT-1, BERT) and DeepNorm (post-LN with the residual scaled by alpha)
        x = self.norm1(self._scaled(x) + self._drop(self._attn(x, rope, mask, cache)))
        return self.norm2(self._scaled(x) + self._drop(self._mlp(x)))

    def _attn(self, h: torch.Tensor, rope, mask, cache) -> torch.Tensor:
        y = self.attn(h, rope, mask, cache)
        return y if self.adapter_attn is None else self.adapter_attn(h, y)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        y = self.mlp(h)
        return y if self.adapter_mlp is None else self.adapter_mlp(h, y)

    def _drop(self, y: torch.Tensor) -> torch.Tensor:  # no call at all when off (a decoding step is many small ops)
        return self.drop(y) if self.training and self.drop.p > 0 else y

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha if self.alpha != 1.0 else x


class Decoder(nn.Module):
    """Decoder-only transformer language model.

    forward(input_ids) -> logits (B, T, vocab). Optional inputs:
      position_ids  (B, T), or (B, 2, T) for GLM's 2D positions (position, block position);
      prefix_len    (B,) tokens of bidirectional prefix (prefix LM / GLM part A);
      key_mask      (B, S) bool, False for padding keys (S = cached + new positions);
      segment_ids   (B, T) packed documents: a token attends only within its own segment (no cache);
      branch_ids    (B, T) a shared trunk (0) followed by branches (1, 2, ...; -1 padding): a token attends to the
                    trunk and its own branch only, so several continuations of one prompt share a single pass over
                    it (needs ``position_ids``; no cache; causal dense attention, see ``supports_branches``);
      cache         a KVCache: keys/values are appended and ``cache.pos`` advanced.

    PEFT hooks (None by default; modules with a ``disabled`` flag and ``n_tokens``):
      kv_prefix     prefix tuning: ``kv_prefix(B) -> (k, v)``, each (n_layer, B, kv_heads, n_tokens, head_dim),
                    keys/values every layer attends to before the real tokens (already rotated, as in HF's cache);
      soft_prompt   prompt/P-tuning: ``soft_prompt(B) -> (B, n_tokens, n_embd)``, embeddings placed before the
                    first real token (at the start of a sequence: no cache or an empty one).
    Virtual tokens take the first ``num_virtual_tokens`` positions (as HF with PEFT numbers them): real tokens sit
    at positions n_tokens + t. With a cache, they occupy the start of the cache. Explicit ``position_ids`` and
    ``prefix_len`` count real tokens only (shifted here, as PEFT shifts position ids for prefix tuning); a
    ``key_mask`` may cover all keys or only the real ones. Outputs hold the real tokens only.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.wte = _embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.position == "learned" or (cfg.position == "glm2d" and cfg.glm2d == "learned"):
            self.wpe = _embedding(cfg.block_size, cfg.n_embd)
        if cfg.position == "glm2d" and cfg.glm2d == "learned":
            self.wpe_block = _embedding(cfg.block_size, cfg.n_embd)
        if cfg.embedding_norm:
            self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        if cfg.final_norm:
            self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.position == "rope" or (cfg.position == "glm2d" and cfg.glm2d == "rotary"):
            self.rotary = Rotary(cfg.rotary_dim, cfg.block_size, cfg.rope_theta, cfg.rope_interleaved)
        if cfg.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_head), persistent=False)
        self.kv_prefix: nn.Module | None = None
        self.soft_prompt: nn.Module | None = None
        if self.wte.weight.device.type != "meta":  # a meta model (loaded next) needs no init; see _embedding
            self.reset_parameters()

    def _hook(self, name: str) -> nn.Module | None:
        m = getattr(self, name, None)
        return m if m is not None and not m.disabled else None

    @property
    def num_virtual_tokens(self) -> int:
        """Positions taken before the first real token by an active prefix (``kv_prefix``/``soft_prompt``)."""
        return sum(m.n_tokens for m in (self._hook("kv_prefix"), self._hook("soft_prompt")) if m is not None)

    # ---- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=cfg.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=cfg.init_std)
            elif hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:  # norms
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:
            if cfg.norm_placement == "deepnorm":  # DeepNet: xavier, gain beta on v, out, ffn; gain 1 on q, k
                d, nq, nkv, hd = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size
                w = b.attn.qkv.weight
                _xavier(w[: nq * hd], d, nq * hd, 1.0)
                _xavier(w[nq * hd : (nq + nkv) * hd], d, nkv * hd, 1.0)
                _xavier(w[(nq + nkv) * hd :], d, nkv * hd, cfg.beta)
                for lin in (b.attn.proj, b.mlp.fc2):
                    nn.init.xavier_normal_(lin.weight, gain=cfg.beta)
                h = cfg.hidden_size  # a gated fc1 is two (h, d) matrices side by side: each gets its own xavier
                for part in b.mlp.fc1.weight.split(h) if cfg.gated else [b.mlp.fc1.weight]:
                    _xavier(part, d, h, cfg.beta)
            elif cfg.scaled_residual_init:
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
                nn.init.normal_(b.attn.proj.weight, std=std)
                nn.init.normal_(b.mlp.fc2.weight, std=std)

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        head: bool = True,
        branch_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); ``head=False``: the final hidden states instead (for a fused output loss)."""
        h = self.hidden_states(input_ids, position_ids, prefix_len, key_mask, cache, segment_ids, branch_ids)
        return call(self.lm_head, h) if head else h

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        branch_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the final norm), shape (B, T, n_embd)."""
        cfg = self.cfg
        B, T = input_ids.shape
        if branch_ids is not None and (position_ids is None or cache is not None or segment_ids is not None
                                       or prefix_len is not None or not supports_branches(cfg)):
            raise ValueError("branch_ids need position_ids, no cache, segments or prefix, and a model with causal "
                             "dense attention by position (supports_branches)")
        kv_prefix, soft = self._hook("kv_prefix"), self._hook("soft_prompt")
        nv = self.num_virtual_tokens
        if nv and segment_ids is not None:
            raise ValueError("packed sequences (segment_ids) cannot be combined with prefix/prompt tuning")
        if kv_prefix is not None:
            if cache is None:  # a forward without a cache: the prefix is concatenated before each layer's keys
                cache = PrefixedKV(*kv_prefix(B))
            elif cache.pos == 0:  # a new sequence: the prefix takes the start of the cache
                pk, pv = kv_prefix(B)
                for i in range(cfg.n_layer):
                    cache.update(i, pk[i], pv[i])
                cache.pos = kv_prefix.n_tokens
        offset = cache.pos if cache is not None else 0
        n_soft = soft.n_tokens if soft is not None and offset == 0 else 0
        T += n_soft
        span = offset + T
        if branch_ids is not None:  # a row holds several branches: its positions must fit, not its length
            span = int(position_ids.max()) + 1 + nv
        if span > cfg.block_size and cfg.position in ("learned", "rope", "glm2d"):
            raise ValueError(f"sequence of {span} positions exceeds block_size {cfg.block_size}")
        if position_ids is None:
            pos = torch.arange(offset, offset + T, device=input_ids.device)
            position_ids = pos[None] if cfg.position != "glm2d" else torch.stack([pos, torch.zeros_like(pos)])[None]
        elif nv:
            position_ids = _shift_positions(position_ids, nv, n_soft, cfg.position == "glm2d")
        if prefix_len is not None and nv:
            prefix_len = prefix_len + nv
        if key_mask is not None and key_mask.shape[-1] == offset + T - nv:  # covers the real keys only
            key_mask = torch.cat([key_mask.new_ones(key_mask.shape[0], nv), key_mask], dim=1)
        if branch_ids is not None and nv:  # virtual tokens belong to the trunk
            branch_ids = torch.cat([branch_ids.new_zeros(B, nv), branch_ids], dim=1)

        if cfg.position == "glm2d" and (position_ids.dim() != 3 or position_ids.shape[1] != 2):
            raise ValueError("glm2d models take position_ids of shape (B, 2, T): positions and block positions")
        x = self.wte(input_ids)
        if n_soft:
            x = torch.cat([soft(B).to(x.dtype), x], dim=1)
        if cfg.embedding_scale != 1.0:
            x = x * cfg.embedding_scale
        if cfg.embedding_grad_shrink != 1.0:  # GLM-130B: shrink the gradient reaching the word embeddings
            a = cfg.embedding_grad_shrink
            x = x * a + x.detach() * (1 - a)
        if cfg.position == "learned":
            x = x + self.wpe(position_ids)
        elif cfg.position == "glm2d" and cfg.glm2d == "learned":
            x = x + self.wpe(position_ids[:, 0]) + self.wpe_block(position_ids[:, 1])
        if cfg.embedding_norm:
            x = self.emb_norm(x)
        if self.training and self.drop.p > 0:
            x = self.drop(x)

        rope = None
        if cfg.position == "rope":
            rope = self.rotary(position_ids)
        elif cfg.position == "glm2d" and cfg.glm2d == "rotary":
            rope = (*self.rotary(position_ids[:, 0]), *self.rotary(position_ids[:, 1]))

        masks = self._masks(B, T, offset, prefix_len, key_mask, segment_ids, x.device, x.dtype, branch_ids)
        for i, block in enumerate(self.blocks):
            mask = masks[cfg.layer_is_local(i)]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.pos += T
        if n_soft:  # outputs for the real tokens only
            x = x[:, n_soft:]
        return self.norm_f(x) if cfg.final_norm else x

    def _masks(self, B, T, offset, prefix_len, key_mask, segment_ids, device, dtype,
               branch_ids=None) -> dict[bool, torch.Tensor | None]:
        """Additive attention masks for dense (False) and local (True) layers; None = plain causal in SDPA."""
        cfg = self.cfg
        S = offset + T
        plain = (prefix_len is None and key_mask is None and segment_ids is None and branch_ids is None
                 and cfg.position != "alibi")
        if plain and (offset == 0 or T == 1):
            need_local = cfg.attn_pattern == "alternating" and S > 1
            if not need_local:
                return {False: None, True: None}
        q_pos = torch.arange(offset, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if prefix_len is not None:  # bidirectional attention inside the prefix
            in_prefix = k_pos[None, None] < prefix_len.to(device).view(-1, 1, 1, 1)
            allowed = allowed | in_prefix
        if key_mask is not None:
            allowed = allowed & key_mask.to(device).bool()[:, None, None, :]
        if segment_ids is not None:  # packed documents do not see each other
            seg = segment_ids.to(device)
            allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
        if branch_ids is not None:  # the trunk and the query's own branch (trunk < branches in the row: causal holds)
            bk = branch_ids.to(device)
            bq = bk[:, offset:]  # the queries: the last T of the S keys
            allowed = allowed & ((bq[:, None, :, None] == bk[:, None, None, :]) | (bk[:, None, None, :] == 0))
        neg = torch.finfo(dtype).min
        bias = None
        if cfg.position == "alibi":  # -slope * |key - query|: 0 on the diagonal, more negative further away
            bias = -self.alibi.to(dtype).view(1, -1, 1, 1) * (k_pos - q_pos).abs().to(dtype)[None, None]
        out = {}
        for local in (False, True):
            ok = allowed & (k_pos > q_pos - cfg.local_window)[None, None] if local else allowed
            m = torch.zeros(ok.shape, device=device, dtype=dtype).masked_fill(~ok, neg)
            out[local] = m if bias is None else (m + bias).clamp_min(neg)
            if cfg.attn_pattern != "alternating":
                out[True] = out[False]
                break
        return out

    # ---- utilities ----------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            for table in ("wte", "wpe", "wpe_block"):
                if hasattr(self, table):
                    n -= sum(p.numel() for p in getattr(self, table).parameters())
        return n

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, **kw) -> torch.Tensor:
        """Mean next-token cross-entropy; ``targets`` are already shifted, -100 marks ignored positions."""
        return cross_entropy(self(input_ids, **kw), targets, ignore_index)


def supports_branches(cfg: ModelConfig) -> bool:
    """Whether ``branch_ids`` apply: attention masked causally by row and biased by position only (no ALiBi, whose
    bias uses row distances, no local windows, no GLM 2D positions)."""
    return cfg.position in ("rope", "learned", "none") and cfg.attn_pattern == "dense"


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at each segment start: (B, T) -> (B, T)."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    new = torch.ones_like(segment_ids, dtype=torch.bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start


def _shift_positions(position_ids: torch.Tensor, nv: int, n_soft: int, glm2d: bool) -> torch.Tensor:
    """Caller positions (real tokens counted from 0) moved past ``nv`` virtual tokens; the ``n_soft`` soft tokens
    prepended in this forward get positions 0..n_soft-1 (block position 0 for GLM)."""
    if glm2d:
        shifted = position_ids.clone()
        shifted[:, 0] += nv
        if n_soft:
            head = torch.arange(n_soft, device=position_ids.device).expand(position_ids.shape[0], n_soft)
            head = torch.stack([head, torch.zeros_like(head)], dim=1)
            shifted = torch.cat([head, shifted], dim=2)
        return shifted
    shifted = position_ids + nv
    if n_soft:
        head = torch.arange(n_soft, device=position_ids.device).expand(position_ids.shape[0], n_soft)
        shifted = torch.cat([head, shifted], dim=1)
    return shifted


def _xavier(w: torch.Tensor, fan_in: int, fan_out: int, gain: float) -> None:
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    w.normal_(0.0, std)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding``, uninitialised on the meta device (where checkpoints are built before loading): its own init
    there would import torch._dynamo (~1 s, ~80 MB). Elsewhere its init runs as before, so the random stream, and
    with it every seeded run, stays the same (``reset_parameters`` draws the weights used)."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)
