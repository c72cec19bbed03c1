"""Decoder features with no transformers reference, checked against a naive re-implementation from the formulas:
GLM 2D positions and blank-infilling mask, DeepNorm, sandwich/post-LN, parallel blocks, GPT-3's alternating local
attention, embedding gradient shrink, ALiBi slopes, MLP variants, KV cache, gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import Decoder, KVCache
from lmforge.model.positions import alibi_slopes

BASE = dict(vocab_size=37, block_size=32, n_layer=2, n_embd=32, n_head=4, multiple_of=16)


def model(**kw) -> Decoder:
    torch.manual_seed(0)
    m = Decoder(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():  # non-trivial norm weights and biases
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


# ---- a naive reference forward, written from the formulas, reading the same weights ------------------------------
def ref_norm(cfg, sd, name, x):
    w = sd[name + ".weight"]
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    y = (x - mu) / torch.sqrt(var + cfg.norm_eps) * w
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def ref_rotate(x, pos, dim, theta=10000.0):
    """Rotate-half RoPE on the first ``dim`` channels: pairs (i, i + dim/2) turned by pos * theta^(-2i/dim)."""
    half = dim // 2
    out = x.clone()
    for i in range(half):
        ang = pos.double() * theta ** (-2 * i / dim)
        c, s = torch.cos(ang).float()[:, None, :], torch.sin(ang).float()[:, None, :]
        a, b = x[..., :, i], x[..., :, i + half]
        out[..., :, i] = a * c - b * s
        out[..., :, i + half] = b * c + a * s
    return out


def ref_mlp(cfg, sd, p, x):
    acts = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu, "silu": F.silu,
            "swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}
    h = x @ sd[p + "mlp.fc1.weight"].T
    if cfg.gated:
        g, u = h.split(cfg.hidden_size, dim=-1)
        h = acts[cfg.mlp](g) * u
    else:
        h = acts[cfg.mlp](h)
    return h @ sd[p + "mlp.fc2.weight"].T


def ref_attn(cfg, sd, p, x, allowed, pos):
    B, T, _ = x.shape
    H, KV, hd = cfg.n_head, cfg.kv_heads, cfg.head_size
    qkv = x @ sd[p + "attn.qkv.weight"].T
    q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
    v = v.view(B, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
    if cfg.position == "rope":
        q, k = ref_rotate(q, pos, cfg.rotary_dim), ref_rotate(k, pos, cfg.rotary_dim)
    if cfg.position == "glm2d" and cfg.glm2d == "rotary":
        h2 = hd // 2
        q = torch.cat([ref_rotate(q[..., :h2], pos[:, 0], h2), ref_rotate(q[..., h2:], pos[:, 1], h2)], -1)
        k = torch.cat([ref_rotate(k[..., :h2], pos[:, 0], h2), ref_rotate(k[..., h2:], pos[:, 1], h2)], -1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return y.transpose(1, 2).reshape(B, T, H * hd) @ sd[p + "attn.proj.weight"].T


def ref_forward(m, x, pos=None, allowed_fn=None):
    cfg, sd = m.cfg, {k: v.detach() for k, v in m.state_dict().items()}
    B, T = x.shape
    if pos is None:
        pos = torch.arange(T)[None].expand(B, T)
    h = sd["wte.weight"][x]
    if cfg.position == "glm2d" and cfg.glm2d == "learned":
        h = h + sd["wpe.weight"][pos[:, 0]] + sd["wpe_block.weight"][pos[:, 1]]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for layer in range(cfg.n_layer):
        p = f"blocks.{layer}."
        allowed = (j <= i) if allowed_fn is None else allowed_fn(layer)
        if cfg.layer_is_local(layer):
            allowed = allowed & (j > i - cfg.local_window)

        def attn(t, p=p, allowed=allowed):
            return ref_attn(cfg, sd, p, t, allowed, pos)

        def mlp(t, p=p):
            return ref_mlp(cfg, sd, p, t)

        if cfg.parallel_block:
            n1 = ref_norm(cfg, sd, p + "norm1", h)
            n2 = n1 if cfg.parallel_shared_norm else ref_norm(cfg, sd, p + "norm2", h)
            h = h + attn(n1) + mlp(n2)
        elif cfg.norm_placement == "pre":
            h = h + attn(ref_norm(cfg, sd, p + "norm1", h))
            h = h + mlp(ref_norm(cfg, sd, p + "norm2", h))
        elif cfg.norm_placement == "sandwich":
            h = h + ref_norm(cfg, sd, p + "norm1_out", attn(ref_norm(cfg, sd, p + "norm1", h)))
            h = h + ref_norm(cfg, sd, p + "norm2_out", mlp(ref_norm(cfg, sd, p + "norm2", h)))
        else:  # post-LN; DeepNorm: LN(alpha * x + G(x)), alpha = (2M)^(1/4)
            a = (2 * cfg.n_layer) ** 0.25 if cfg.norm_placement == "deepnorm" else 1.0
            h = ref_norm(cfg, sd, p + "norm1", a * h + attn(h))
            h = ref_norm(cfg, sd, p + "norm2", a * h + mlp(h))
    if cfg.final_norm:
        h = ref_norm(cfg, sd, "norm_f", h)
    return h @ sd["wte.weight" if cfg.tie_embeddings else "lm_head.weight"].T


X = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(3))
TOL = 2e-5


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_kv_head=1, mlp="geglu"),
    dict(norm="layernorm", norm_placement="post", final_norm=False, mlp="gelu"),
    dict(norm="layernorm", norm_placement="deepnorm", mlp="gelu_tanh"),
    dict(norm_placement="sandwich", mlp="reglu"),
    dict(parallel_block=True, parallel_shared_norm=True, n_kv_head=1, tie_embeddings=True),  # PaLM's block
    dict(parallel_block=True, parallel_shared_norm=False, rotary_fraction=0.5, mlp="relu"),
    dict(attn_pattern="alternating", local_window=4, norm="layernorm", mlp="gelu"),  # GPT-3 sparse layers
])
def test_forward_matches_formula(kw):
    m = model(**kw)
    with torch.no_grad():
        assert (m(X) - ref_forward(m, X)).abs().max().item() < TOL


def test_deepnorm_constants_and_init():
    cfg = ModelConfig(**{**BASE, "n_layer": 6, "n_embd": 256, "n_head": 4, "norm_placement": "deepnorm",
                         "norm": "layernorm", "mlp": "gelu"})
    assert cfg.alpha == pytest.approx(12 ** 0.25) and cfg.beta == pytest.approx(48 ** -0.25)
    torch.manual_seed(0)
    m = Decoder(cfg)
    d = 256
    w = m.blocks[0].attn.qkv.weight.detach()
    xavier = math.sqrt(2 / (d + d))
    assert w[:d].std().item() == pytest.approx(xavier, rel=0.05)  # q: gain 1
    assert w[2 * d :].std().item() == pytest.approx(cfg.beta * xavier, rel=0.05)  # v: gain beta
    fc1 = m.blocks[0].mlp.fc1.weight.detach()
    assert fc1.std().item() == pytest.approx(cfg.beta * math.sqrt(2 / (d + 4 * d)), rel=0.05)


def test_gpt3_local_layers_equal_dense_when_window_covers_sequence():
    local, dense = model(attn_pattern="alternating", local_window=64), model()
    with torch.no_grad():
        assert torch.allclose(local(X), dense(X), atol=1e-6)
        narrow = model(attn_pattern="alternating", local_window=3)
        assert not torch.allclose(narrow(X), dense(X), atol=1e-3)


def glm_example():
    """The GLM paper's example: x1..x6, spans {x3} and {x5, x6}. Part A = [x1, x2, M, x4, M];
    part B = [S, x5, x6, S, x3]. Position 1 (paper, 1-based): 1 2 3 4 5 5 5 5 3 3; position 2: 0 0 0 0 0 1 2 3 1 2."""
    ids = torch.tensor([[1, 2, 30, 4, 30, 31, 5, 6, 31, 3]])
    pos1 = torch.tensor([1, 2, 3, 4, 5, 5, 5, 5, 3, 3]) - 1  # 0-based for the tables
    pos2 = torch.tensor([0, 0, 0, 0, 0, 1, 2, 3, 1, 2])
    return ids, torch.stack([pos1, pos2])[None], torch.tensor([5])


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_glm_2d_positions_and_blank_infilling_mask(kind):
    m = model(position="glm2d", glm2d=kind, norm="layernorm", mlp="gelu")
    ids, pos, prefix = glm_example()
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    allowed = (j <= i) | (j < 5)  # A attends bidirectionally within A; B is causal and sees all of A
    assert allowed[:5, :5].all() and not allowed[5, 6] and allowed[9, :].all()
    with torch.no_grad():
        out = m(ids, position_ids=pos, prefix_len=prefix)
        ref = ref_forward(m, ids, pos=pos, allowed_fn=lambda layer: allowed)
        assert (out - ref).abs().max().item() < TOL
        changed_b = ids.clone()
        changed_b[0, 7] = 9  # a part-B token: part-A outputs do not move
        out_b = m(changed_b, position_ids=pos, prefix_len=prefix)
        assert torch.allclose(out_b[:, :5], out[:, :5], atol=1e-6) and not torch.allclose(out_b[:, 8:], out[:, 8:])
        changed_a = ids.clone()
        changed_a[0, 3] = 9  # a part-A token: every position moves, earlier A positions included
        out_a = m(changed_a, position_ids=pos, prefix_len=prefix)
        assert not torch.allclose(out_a[:, 0], out[:, 0], atol=1e-5)
        shifted = pos.clone()
        shifted[0, 1, 5:] = 0  # block positions matter
        assert not torch.allclose(m(ids, position_ids=shifted, prefix_len=prefix), out, atol=1e-5)


def test_embedding_gradient_shrink_scales_only_the_gradient():
    a = 0.1
    plain, egs = model(), model(embedding_grad_shrink=a)
    egs.load_state_dict(plain.state_dict())
    plain.loss(X, X).backward()
    egs.loss(X, X).backward()
    assert torch.allclose(egs(X), plain(X))
    gp, ge = plain.wte.weight.grad, egs.wte.weight.grad
    # the output layer is separate (untied): the embedding's gradient comes only through the shrunk input path
    assert torch.allclose(ge, a * gp, atol=1e-7)


@pytest.mark.parametrize("n", [8, 12, 16, 20, 24, 6])
def test_alibi_slopes(n):
    def slopes_pow2(k):
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        expect = slopes_pow2(n)
    else:  # ALiBi paper / BLOOM: the power-of-2 below, then every other slope of the next power of 2
        c = 2 ** math.floor(math.log2(n))
        expect = slopes_pow2(c) + slopes_pow2(2 * c)[0::2][: n - c]
    assert torch.allclose(alibi_slopes(n), torch.tensor(expect), rtol=1e-6)


def test_llama_hidden_size_rule():
    assert ModelConfig(n_embd=4096, n_head=32, mlp="swiglu", multiple_of=256).hidden_size == 11008
    assert ModelConfig(n_embd=8192, n_head=64, mlp="swiglu", multiple_of=4096, ffn_dim_multiplier=1.3).hidden_size \
        == 28672  # Llama-2-70B
    assert ModelConfig(n_embd=64, n_head=4, mlp="gelu").hidden_size == 256


@pytest.mark.parametrize("kw", [dict(n_kv_head=2), dict(n_kv_head=1), dict(position="alibi"),
                                dict(position="learned"), dict(position="glm2d", glm2d="rotary"),
                                dict(attn_pattern="alternating", local_window=5)])
def test_kv_cache_decoding_equals_full_forward(kw):
    m = model(**kw)
    with torch.no_grad():
        full = m(X)
        cache = KVCache(m.cfg, 2, 32)
        parts = [m(X[:, :5], cache=cache), m(X[:, 5:8], cache=cache)]
        parts += [m(X[:, t : t + 1], cache=cache) for t in range(8, 12)]
        assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_gradient_checkpointing_gives_identical_gradients():
    a, b = model(dropout=0.0), model(dropout=0.0)
    b.gradient_checkpointing = True
    a.train(), b.train()
    la, lb = a.loss(X, X), b.loss(X, X)
    la.backward(), lb.backward()
    assert la.item() == lb.item()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7), n
