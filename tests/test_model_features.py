"""Decoder features with no transformers reference, checked against independent computations from the formulas
(``tests/reference_impls.py``: explicit-matrix forward pass in float64, masks built element by element, closed-form
activations, ALiBi slopes from the paper): GLM 2D positions and blank-infilling mask, DeepNorm, sandwich/post/pre-LN,
parallel blocks, GPT-3's alternating banded attention, embedding gradient shrink, MLP variants, KV cache and
gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import reference_impls as ref
import torch

from lmforge.config import ModelConfig
from lmforge.model import Decoder, KVCache
from lmforge.model.mlp import MLP
from lmforge.model.positions import alibi_slopes

BASE = dict(vocab_size=37, block_size=32, n_layer=2, n_embd=32, n_head=4, multiple_of=16)
GPT_BIASES = dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True)
X = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(3))
TOL = 1e-4  # fp32 model vs float64 reference; logits are O(1..10) with the weights below


@torch.no_grad()
def randomize(m: Decoder, seed: int = 1) -> Decoder:
    """Weights large enough that attention is far from uniform and activations leave their linear region, so a wrong
    mask, rotation or activation moves the logits by much more than TOL; non-trivial norm gains and biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() == 2:
            p.copy_(r if name.startswith(("wte", "wpe")) else r / math.sqrt(p.shape[1]))
        elif name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        else:
            p.copy_(0.2 * r)
    return m


def model(seed: int = 1, **kw) -> Decoder:
    torch.manual_seed(0)
    return randomize(Decoder(ModelConfig(**{**BASE, **kw})).eval(), seed)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- block arrangements, MLPs, positions: the whole forward pass against the reference -------------------------
FORWARD_CONFIGS = {
    "llama_pre_rms_swiglu_rope": dict(),
    "pre_layernorm_no_bias": dict(norm="layernorm", norm_bias=False, mlp="gelu", position="none"),
    "gqa_geglu_qkv_bias": dict(n_kv_head=2, mlp="geglu", qkv_bias=True),
    "mqa_interleaved_partial_rope": dict(n_kv_head=1, rope_interleaved=True, rotary_fraction=0.5, mlp="silu"),
    "post_ln_learned": dict(norm="layernorm", norm_placement="post", final_norm=False, mlp="gelu",
                            position="learned", **GPT_BIASES),
    "deepnorm": dict(norm="layernorm", norm_placement="deepnorm", mlp="gelu_tanh", n_layer=3),
    "deepnorm_glm_like": dict(norm="layernorm", norm_placement="deepnorm", deepnorm_alpha=2.0, mlp="geglu",
                              embedding_norm=True, final_norm=False, tie_embeddings=True, **GPT_BIASES),
    "sandwich_reglu": dict(norm_placement="sandwich", mlp="reglu", norm="layernorm"),
    "parallel_shared_norm_palm": dict(parallel_block=True, parallel_shared_norm=True, n_kv_head=1,
                                      tie_embeddings=True),
    "parallel_separate_norms_neox": dict(parallel_block=True, parallel_shared_norm=False, rotary_fraction=0.25,
                                         norm="layernorm", mlp="gelu", **GPT_BIASES),
    "gpt3_alternating": dict(attn_pattern="alternating", local_window=4, n_layer=4, norm="layernorm",
                             mlp="gelu_tanh", position="learned", tie_embeddings=True, **GPT_BIASES),
    "alibi_bloom": dict(position="alibi", norm="layernorm", embedding_norm=True, mlp="gelu", **GPT_BIASES),
    "alibi_gqa_6_heads": dict(position="alibi", n_embd=48, n_head=6, n_kv_head=2, mlp="geglu_tanh"),
    "glm2d_learned": dict(position="glm2d", glm2d="learned", norm="layernorm", mlp="gelu"),
    "glm2d_rotary": dict(position="glm2d", glm2d="rotary", norm="layernorm", mlp="gelu_tanh"),
    "scales_and_lm_head_bias": dict(attn_scale=0.2, embedding_scale=2.5, lm_head_bias=True, head_dim=12),
}


@pytest.mark.parametrize("name", list(FORWARD_CONFIGS))
def test_forward_matches_reference(name):
    m = model(**FORWARD_CONFIGS[name])
    with torch.no_grad():
        out = m(X)
    expect = ref.forward(m, X)
    assert out.abs().max().item() > 1.0  # logits are not vanishingly small: TOL is a strict bound
    assert max_diff(out, expect) < TOL


def test_reference_detects_wrong_arrangements():
    """The forward comparison can fail: a reference with a different arrangement is far away from the model."""
    m = model(**FORWARD_CONFIGS["deepnorm"])
    with torch.no_grad():
        out = m(X)
    m.cfg.deepnorm_alpha = 1.0  # plain post-LN instead of DeepNorm's alpha = (2M)^(1/4)
    assert max_diff(out, ref.forward(m, X)) > 100 * TOL
    m = model(**FORWARD_CONFIGS["gpt3_alternating"])
    with torch.no_grad():
        out = m(X)
    m.cfg.attn_pattern = "dense"  # no banded layers
    assert max_diff(out, ref.forward(m, X)) > 100 * TOL
    m = model(**FORWARD_CONFIGS["parallel_separate_norms_neox"])
    with torch.no_grad():
        out = m(X)
    m.cfg.parallel_shared_norm = True
    assert max_diff(out, ref.forward(m, X)) > 100 * TOL


# ---- MLP variants -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh", "reglu"])
def test_mlp_variant_matches_formula(kind):
    cfg = ModelConfig(**{**BASE, "mlp": kind, "mlp_bias": True})
    torch.manual_seed(0)
    mlp = MLP(cfg)
    with torch.no_grad():
        for p in mlp.parameters():  # pre-activations ~ N(0, 4): well outside every activation's linear region
            p.copy_(torch.randn(p.shape) * (2 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.3))
    x = torch.randn(3, 5, cfg.n_embd)
    sd = {f"mlp.{k}": v.detach() for k, v in mlp.state_dict().items()}
    with torch.no_grad():
        out = mlp(x)
    assert mlp.fc1.out_features == cfg.hidden_size * (2 if kind in ref.GATED else 1)
    assert max_diff(out, ref.mlp(cfg, sd, "mlp.", x)) < 1e-5
    # the comparison tells every activation apart from the others
    for other in ref.ACTIVATION:
        if ref.ACTIVATION[other] is not ref.ACTIVATION[kind] and (other in ref.GATED) == (kind in ref.GATED):
            assert max_diff(out, ref.mlp(cfg.replace(mlp=other), sd, "mlp.", x)) > 1e-3, other


def test_activation_formulas_at_known_points():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    # Phi(1) = 0.841344746..., Phi(2) = 0.977249868...; sigmoid(1) = 0.731058578...
    assert torch.allclose(ref.gelu_erf(x), torch.tensor([-1 + 0.841344746, 0, 0.841344746, 2 * 0.977249868],
                                                        dtype=torch.float64), atol=1e-8)
    assert torch.allclose(ref.silu(x), torch.tensor([-(1 - 0.731058578), 0, 0.731058578, 2 * 0.880797078],
                                                    dtype=torch.float64), atol=1e-8)
    assert (ref.gelu_tanh(x) - ref.gelu_erf(x)).abs().max() < 1e-3


def test_llama_hidden_size_rule():
    # LLaMA: hidden = multiple_of * ceil(int(2 * 4d / 3) / multiple_of)
    assert ModelConfig(n_embd=4096, n_head=32, mlp="swiglu", multiple_of=256).hidden_size == 11008  # LLaMA-7B
    assert ModelConfig(n_embd=5120, n_head=40, mlp="swiglu", multiple_of=256).hidden_size == 13824  # LLaMA-13B
    assert ModelConfig(n_embd=8192, n_head=64, mlp="swiglu", multiple_of=4096,
                       ffn_dim_multiplier=1.3).hidden_size == 28672  # Llama-2-70B
    assert ModelConfig(n_embd=64, n_head=4, mlp="gelu").hidden_size == 256  # plain MLPs: 4d


# ---- GLM: 2D positions and the blank-infilling mask ----------------------------------------------------------------
M_ID, S_ID = 30, 31


def glm_corrupt(x: list[int], spans: list[tuple[int, int]], order: list[int]):
    """GLM (Du et al. 2022, sec. 2.1): part A = x with each span replaced by one [M]; part B = the spans in ``order``,
    each opened by [S]. Position 1: positions in A, and for a B token the position of its span's [M]; position 2: 0
    over A, 1..len+1 inside a span. Positions counted from 0 (the paper's figure counts position 1 from 1)."""
    a, mask_at, i = [], {}, 0
    starts = {s: (k, e) for k, (s, e) in enumerate(spans)}
    while i < len(x):
        if i in starts:
            k, e = starts[i]
            mask_at[k] = len(a)
            a.append(M_ID)
            i = e
        else:
            a.append(x[i])
            i += 1
    ids, pos1, pos2 = list(a), list(range(len(a))), [0] * len(a)
    for k in order:
        s, e = spans[k]
        ids += [S_ID] + x[s:e]
        pos1 += [mask_at[k]] * (e - s + 1)
        pos2 += list(range(1, e - s + 2))
    return ids, pos1, pos2, len(a)


def glm_example():
    x = [1, 2, 3, 4, 5, 6]  # x1..x6 (token id = index)
    ids, pos1, pos2, n_a = glm_corrupt(x, spans=[(2, 3), (4, 6)], order=[1, 0])
    # the paper's Figure 2: [x1 x2 M x4 M] + [S x5 x6 S x3]; Position 1 / Position 2 rows
    assert ids == [1, 2, M_ID, 4, M_ID, S_ID, 5, 6, S_ID, 3]
    assert [p + 1 for p in pos1] == [1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert pos2 == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    return torch.tensor([ids]), torch.tensor([[pos1, pos2]]), torch.tensor([n_a])


# the paper's Figure 2(d) self-attention mask (rows: queries x1 x2 M x4 M S x5 x6 S x3; 1 = may attend)
GLM_FIGURE_MASK = """
1111100000
1111100000
1111100000
1111100000
1111100000
1111110000
1111111000
1111111100
1111111110
1111111111
"""


def figure_mask() -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in GLM_FIGURE_MASK.split()])


def test_glm_figure_mask_is_the_prefix_lm_mask():
    assert torch.equal(figure_mask(), ref.prefix_lm_mask(10, 5))


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_glm_model_consumes_the_mask_of_the_figure(kind):
    """With one layer, the output at i depends on the token at j exactly when i may attend to j: changing each token
    in turn recovers the model's attention mask, which must be the paper's figure."""
    m = model(n_layer=1, position="glm2d", glm2d=kind, norm="layernorm", mlp="gelu")
    ids, pos, prefix = glm_example()
    with torch.no_grad():
        out = m(ids, position_ids=pos, prefix_len=prefix)
        seen = torch.zeros(10, 10, dtype=torch.bool)
        for j in range(10):
            changed = ids.clone()
            changed[0, j] = 17
            seen[:, j] = (m(changed, position_ids=pos, prefix_len=prefix) - out)[0].abs().amax(-1) > 1e-6
    assert torch.equal(seen, figure_mask()), seen.int()


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_glm_blank_infilling_matches_reference(kind):
    m = model(position="glm2d", glm2d=kind, norm="layernorm", mlp="gelu")
    ids, pos, prefix = glm_example()
    with torch.no_grad():
        out = m(ids, position_ids=pos, prefix_len=prefix)
    assert max_diff(out, ref.forward(m, ids, pos, ref.prefix_lm_mask(10, 5))) < TOL
    # a plain causal reference is far away (the bidirectional part A matters), and so is one that swaps the roles
    # of position and block position (first half / second half of each head, or the two tables)
    assert max_diff(out, ref.forward(m, ids, pos, ref.causal_mask(10))) > 100 * TOL
    assert max_diff(out, ref.forward(m, ids, pos.flip(1), ref.prefix_lm_mask(10, 5))) > 100 * TOL
    with torch.no_grad():
        changed_b = ids.clone()
        changed_b[0, 7] = 9  # a part-B token (x6): part-A outputs and earlier B outputs do not move, later ones do
        out_b = m(changed_b, position_ids=pos, prefix_len=prefix)
        assert max_diff(out_b[:, :7], out[:, :7]) < 1e-6
        assert (out_b[0, 7:] - out[0, 7:]).abs().amax(-1).min() > 1e-4
        changed_a = ids.clone()
        changed_a[0, 3] = 9  # a part-A token (x4): every position moves, earlier A positions included
        out_a = m(changed_a, position_ids=pos, prefix_len=prefix)
        assert (out_a - out)[0].abs().amax(-1).min() > 1e-4


def test_glm_prefix_len_per_sample():
    m = model(position="glm2d", glm2d="rotary", norm="layernorm", mlp="gelu")
    prefix = torch.tensor([5, 2])
    p = torch.arange(12)[None].expand(2, 12)
    pos = torch.stack([p, (p * 7) % 4], 1)  # arbitrary block positions
    with torch.no_grad():
        out = m(X, position_ids=pos, prefix_len=prefix)
    allowed = torch.stack([ref.prefix_lm_mask(12, 5), ref.prefix_lm_mask(12, 2)])
    assert max_diff(out, ref.forward(m, X, pos, allowed)) < TOL


def test_glm2d_learned_embedding_is_token_plus_position_plus_block_position():
    m = model(position="glm2d", glm2d="learned", norm="layernorm", mlp="gelu")
    ids, pos, prefix = glm_example()
    seen = {}

    def hook(module, args):
        seen["x"] = args[0].detach()

    m.blocks[0].register_forward_pre_hook(hook)
    with torch.no_grad():
        m(ids, position_ids=pos, prefix_len=prefix)
    w = m.state_dict()
    expect = w["wte.weight"][ids] + w["wpe.weight"][pos[:, 0]] + w["wpe_block.weight"][pos[:, 1]]
    assert torch.allclose(seen["x"], expect, atol=1e-6)


def test_glm2d_rotary_is_relative_in_both_coordinates():
    """ChatGLM-6B's two rotary halves: q.k depends only on the differences of positions and of block positions, so
    shifting either row by a constant leaves the outputs unchanged; swapping the two rows does not."""
    m = model(position="glm2d", glm2d="rotary", norm="layernorm", mlp="gelu")
    ids, pos, prefix = glm_example()
    with torch.no_grad():
        out = m(ids, position_ids=pos, prefix_len=prefix)
        for row in (0, 1):
            shifted = pos.clone()
            shifted[:, row] += 7
            assert max_diff(m(ids, position_ids=shifted, prefix_len=prefix), out) < 1e-4
        assert max_diff(m(ids, position_ids=pos.flip(1), prefix_len=prefix), out) > 100 * TOL
        block_off = pos.clone()
        block_off[:, 1] = 0
        assert max_diff(m(ids, position_ids=block_off, prefix_len=prefix), out) > 100 * TOL


def test_glm2d_learned_is_absolute():
    m = model(position="glm2d", glm2d="learned", norm="layernorm", mlp="gelu")
    ids, pos, prefix = glm_example()
    with torch.no_grad():
        out = m(ids, position_ids=pos, prefix_len=prefix)
        for row in (0, 1):
            shifted = pos.clone()
            shifted[:, row] += 7
            assert max_diff(m(ids, position_ids=shifted, prefix_len=prefix), out) > 100 * TOL


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_glm2d_rejects_one_dimensional_position_ids(kind):
    """(1, T) ids would be read as position_ids[:, 0] = one position for every token: it must be an error."""
    m = model(position="glm2d", glm2d=kind)
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        m(X[:1], position_ids=torch.arange(12)[None])


# ---- DeepNorm ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layer", [1, 6, 24, 70])
def test_deepnorm_constants(n_layer):
    cfg = ModelConfig(**{**BASE, "n_layer": n_layer, "norm_placement": "deepnorm", "norm": "layernorm"})
    # DeepNet (Wang et al. 2022), decoder-only: alpha = (2M)^(1/4), beta = (8M)^(-1/4)
    assert cfg.alpha == pytest.approx(math.sqrt(math.sqrt(2 * n_layer)), rel=1e-12)
    assert cfg.beta == pytest.approx(1 / math.sqrt(math.sqrt(8 * n_layer)), rel=1e-12)
    m = Decoder(cfg)
    assert all(b.alpha == pytest.approx(cfg.alpha) for b in m.blocks)


def _stats(w: torch.Tensor) -> tuple[float, float, float]:
    w = w.detach().double().flatten()
    mu, sd = w.mean().item(), w.std().item()
    kurt = (((w - mu) / sd) ** 4).mean().item()
    return mu, sd, kurt


def test_deepnorm_init_statistics():
    """Xavier normal: std = gain * sqrt(2 / (fan_in + fan_out)) per projection; gain beta on V, out-proj, fc1, fc2 and
    1 on Q, K. GQA makes the Q and K/V slices of the fused weight different shapes."""
    d, nq, nkv, hd, M = 256, 8, 2, 32, 6
    cfg = ModelConfig(**{**BASE, "n_layer": M, "n_embd": d, "n_head": nq, "n_kv_head": nkv, "norm": "layernorm",
                         "norm_placement": "deepnorm", "mlp": "gelu", **GPT_BIASES})
    beta = (8 * M) ** -0.25
    torch.manual_seed(0)
    m = Decoder(cfg)

    def xavier(fan_in, fan_out, gain):
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    for b in (m.blocks[0], m.blocks[-1]):
        w = b.attn.qkv.weight
        q, k, v = w[: nq * hd], w[nq * hd : (nq + nkv) * hd], w[(nq + nkv) * hd :]
        expect = [(q, xavier(d, nq * hd, 1.0)), (k, xavier(d, nkv * hd, 1.0)), (v, xavier(d, nkv * hd, beta)),
                  (b.attn.proj.weight, xavier(nq * hd, d, beta)), (b.mlp.fc1.weight, xavier(d, 4 * d, beta)),
                  (b.mlp.fc2.weight, xavier(4 * d, d, beta))]
        for i, (t, std) in enumerate(expect):
            mu, sd, kurt = _stats(t)
            assert sd == pytest.approx(std, rel=0.03), i
            assert abs(mu) < 4 * std / math.sqrt(t.numel()), i
            assert kurt == pytest.approx(3.0, abs=0.2), i  # normal (a uniform init has kurtosis 1.8)
        for bias in (b.attn.qkv.bias, b.attn.proj.bias, b.mlp.fc1.bias, b.mlp.fc2.bias):
            assert torch.count_nonzero(bias) == 0


def test_deepnorm_init_gated_mlp_per_projection():
    """A gated MLP has three projections (gate, up, down); DeepNet's xavier_normal_(gain=beta) applies to each, so
    gate and up each get beta * sqrt(2 / (d + hidden)) -- not the std of one fused (2*hidden, d) matrix."""
    d, M, hidden = 256, 6, 512
    cfg = ModelConfig(**{**BASE, "n_layer": M, "n_embd": d, "n_head": 4, "norm": "layernorm",
                         "norm_placement": "deepnorm", "mlp": "geglu", "intermediate_size": hidden})
    beta = (8 * M) ** -0.25
    torch.manual_seed(0)
    fc1 = Decoder(cfg).blocks[0].mlp.fc1.weight
    for part in (fc1[:hidden], fc1[hidden:]):
        assert _stats(part)[1] == pytest.approx(beta * math.sqrt(2.0 / (d + hidden)), rel=0.03)


# ---- GPT-3 alternating dense / locally banded attention -------------------------------------------------------------
def test_gpt3_banded_layers_equal_dense_when_the_window_covers_the_sequence():
    T = X.shape[1]
    dense = model(n_layer=4)
    with torch.no_grad():
        full = dense(X)
        assert torch.allclose(model(n_layer=4, attn_pattern="alternating", local_window=T)(X), full, atol=1e-6)
        assert torch.allclose(model(n_layer=4, attn_pattern="alternating", local_window=64)(X), full, atol=1e-6)
        assert max_diff(model(n_layer=4, attn_pattern="alternating", local_window=T - 1)(X), full) > 1e-3


def test_gpt3_first_layer_is_dense():
    """Layer 0 (even) is dense: a one-layer alternating model with window 1 is the dense model."""
    with torch.no_grad():
        assert torch.allclose(model(n_layer=1, attn_pattern="alternating", local_window=1)(X), model(n_layer=1)(X),
                              atol=1e-6)


def test_gpt3_band_is_i_minus_w_exclusive():
    """Layer 1 (odd) sees keys i - w < j <= i: the reference with that band matches, one a key wider does not."""
    for w in (1, 2, 3, 5):
        m = model(n_layer=2, attn_pattern="alternating", local_window=w, position="learned")
        with torch.no_grad():
            out = m(X)
        assert max_diff(out, ref.forward(m, X)) < TOL, w
        m.cfg.local_window = w + 1  # an off-by-one band is detected
        assert max_diff(out, ref.forward(m, X)) > 100 * TOL, w


# ---- embedding gradient shrink (GLM-130B) -------------------------------------------------------------------------
@pytest.mark.parametrize("a, kw", [
    (0.1, dict()),
    (0.37, dict(n_kv_head=1, norm="layernorm")),
    # GLM-130B (sec. 3): word_embedding = word_embedding * a + word_embedding.detach() * (1 - a): the shrink is on the
    # token embedding; the first LayerNorm (lmforge's embedding_norm in the glm preset) and position tables keep
    # their full gradient
    (0.1, dict(embedding_norm=True)),
    (0.1, dict(position="learned")),
])
def test_embedding_gradient_shrink_scales_only_the_embedding_gradient(a, kw):
    plain, egs = model(**kw), model(embedding_grad_shrink=a, **kw)
    egs.load_state_dict(plain.state_dict())
    lp, le = plain.loss(X, X), egs.loss(X, X)
    lp.backward()
    le.backward()
    assert torch.allclose(le, lp, rtol=0, atol=1e-6)  # forward unchanged
    gp, ge = dict(plain.named_parameters()), dict(egs.named_parameters())
    for name in gp:
        if name == "wte.weight":  # untied: the embedding's gradient comes only through the shrunk input path
            assert torch.allclose(ge[name].grad, a * gp[name].grad, rtol=1e-4, atol=1e-7)
            assert gp[name].grad.abs().max() > 1e-3
        else:
            assert torch.allclose(ge[name].grad, gp[name].grad, rtol=1e-4, atol=1e-6), name


def test_embedding_gradient_shrink_with_tied_output_layer():
    """Tied (GLM-130B): only the input path is shrunk, grad(a) = grad_out + a * grad_in, with grad_out the gradient
    of the a = 0 model and grad_in = grad(a = 1) - grad_out."""
    a = 0.1
    grads = {}
    for shrink in (1.0, 0.0, a):
        m = model(tie_embeddings=True, embedding_grad_shrink=shrink)
        m.loss(X, X).backward()
        grads[shrink] = m.wte.weight.grad
    g_out, g_in = grads[0.0], grads[1.0] - grads[0.0]
    assert g_in.abs().max() > 1e-3 and g_out.abs().max() > 1e-3
    assert torch.allclose(grads[a], g_out + a * g_in, rtol=1e-5, atol=1e-6)  # fp32 summation order


# ---- ALiBi ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 112])
def test_alibi_slopes(n):
    assert torch.allclose(alibi_slopes(n).double(), torch.tensor(ref.alibi_slopes(n), dtype=torch.float64),
                          rtol=1e-6, atol=0)


def test_alibi_slopes_quoted_in_the_paper():
    # Press et al. 2022, sec. 3: "For models with 8 heads, the slopes that we used are the geometric sequence
    # 1/2^1, 1/2^2, ..., 1/2^8. For models that require 16 heads, we ... 1/2^0.5, 1/2^1, 1/2^1.5, ..., 1/2^8."
    assert torch.allclose(alibi_slopes(8).double(), 2.0 ** -torch.arange(1, 9, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(alibi_slopes(16).double(), 2.0 ** -(torch.arange(1, 17, dtype=torch.float64) / 2), rtol=1e-6)


# ---- KV cache -------------------------------------------------------------------------------------------------------
CACHE_CONFIGS = {
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "alibi": dict(position="alibi", norm="layernorm", mlp="gelu"),
    "alibi_gqa": dict(position="alibi", n_kv_head=2, embedding_norm=True),
    "learned": dict(position="learned", norm="layernorm", mlp="gelu_tanh", tie_embeddings=True, **GPT_BIASES),
    "glm2d_rotary": dict(position="glm2d", glm2d="rotary", norm="layernorm", norm_placement="deepnorm"),
    "glm2d_learned": dict(position="glm2d", glm2d="learned", norm="layernorm"),
    "gpt3_alternating": dict(attn_pattern="alternating", local_window=5, n_layer=3, position="learned"),
    "parallel_partial_rope": dict(parallel_block=True, rotary_fraction=0.5, rope_interleaved=True),
    "sandwich": dict(norm_placement="sandwich"),
}


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_kv_cache_decoding_equals_full_forward(name):
    m = model(**CACHE_CONFIGS[name])
    with torch.no_grad():
        full = m(X)
        cache = KVCache(m.cfg, 2, 32)
        parts = [m(X[:, :5], cache=cache), m(X[:, 5:8], cache=cache)]  # prefill, then a 3-token chunk
        parts += [m(X[:, t : t + 1], cache=cache) for t in range(8, 12)]  # then one token at a time
    assert cache.pos == 12
    assert max_diff(torch.cat(parts, 1), full) <= 1e-5


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_kv_cache_glm_infilling_decode(kind):
    """Prefill part A (bidirectional, prefix_len) then decode part B with its 2D positions, as GLM generates."""
    m = model(position="glm2d", glm2d=kind, norm="layernorm", mlp="gelu")
    ids, pos, prefix = glm_example()
    with torch.no_grad():
        full = m(ids, position_ids=pos, prefix_len=prefix)
        cache = KVCache(m.cfg, 1, 16)
        parts = [m(ids[:, :5], position_ids=pos[..., :5], prefix_len=prefix, cache=cache),
                 m(ids[:, 5:8], position_ids=pos[..., 5:8], prefix_len=prefix, cache=cache)]
        parts += [m(ids[:, t : t + 1], position_ids=pos[..., t : t + 1], prefix_len=prefix, cache=cache)
                  for t in range(8, 10)]
    assert max_diff(torch.cat(parts, 1), full) <= 1e-5


# ---- gradient checkpointing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(dropout=0.1, position="glm2d", glm2d="rotary", norm="layernorm"),
                                dict(dropout=0.1, attn_pattern="alternating", local_window=3, n_kv_head=1)])
def test_gradient_checkpointing_gives_identical_loss_and_gradients(kw):
    a, b = model(**kw).train(), model(**kw).train()
    b.gradient_checkpointing = True
    extra = {}
    if kw.get("position") == "glm2d":
        p = torch.arange(12)[None].expand(2, 12)
        extra = dict(position_ids=torch.stack([p, p % 3], 1), prefix_len=torch.tensor([4, 7]))
    losses = []
    for m in (a, b):
        torch.manual_seed(123)  # same dropout masks; checkpointing must replay them in the recomputation
        loss = m.loss(X, X, **extra)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-6, atol=1e-7), n


def test_rmsnorm_small_input_path_is_the_rms_formula_and_follows_weight_updates():
    from lmforge.model.norms import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.mul_(torch.randn(48))
    x = torch.randn(3, 1, 48) * 0.1  # a decoding step: few rows
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    with torch.inference_mode():
        got = norm(x)
    assert norm._w2 is not None  # the small-input path ran
    assert torch.allclose(got.double(), want, atol=2e-6)
    with torch.no_grad():
        norm.weight.mul_(2.0)  # an update in place must not be missed
    with torch.inference_mode():
        assert torch.allclose(norm(x).double(), 2 * want, atol=4e-6)
    big = torch.randn(2, 100, 48)  # whole sequences and training: rms_norm itself, gradients flow
    big.requires_grad_(True)
    norm(big).sum().backward()
    assert big.grad is not None and norm.weight.grad is not None

    with torch.inference_mode():  # weights made under inference mode (a model loaded for sampling) have no version
        inf = RMSNorm(48, eps=1e-5)
        assert torch.allclose(inf(x), F_rms(x, inf.weight), atol=2e-6)


def F_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
