"""Bottleneck adapters, prefix tuning, prompt tuning and P-tuning: forwards against independent formulas, the
KV-cache generator and the batched engine against full-forward greedy decoding, save/load round trips."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.infer.engine import Engine, fast_path_supported
from lmforge.infer.generate import generate, generate_batch
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Decoder, KVCache
from lmforge.peft import adapter, lora, prefix, prompt, ptuning, qlora
from lmforge.peft.base import disable_adapter, get_adapter_params, set_trainable_params

V = 97


def tiny(kind: str) -> Decoder:
    """A tiny LLaMA (rotary, RMSNorm, SwiGLU, grouped-query) or GPT-2 (learned positions, LayerNorm, GELU)."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp="swiglu",
                          intermediate_size=48, norm="rmsnorm", position="rope", tie_embeddings=False)
    else:
        cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_embd=32, n_head=4, mlp="gelu_tanh",
                          intermediate_size=128, norm="layernorm", position="learned", qkv_bias=True,
                          attn_out_bias=True, mlp_bias=True)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # away from unit norms / zero biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def perturb(model: Decoder) -> None:
    """Make the adapter weights clearly non-trivial (fresh ones start near the base model)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


METHODS = {
    "adapter-serial": (adapter, {"bottleneck_size": 8}),
    "adapter-parallel": (adapter, {"bottleneck_size": 8, "adapter_type": "parallel", "scaling": "2.0"}),
    "prefix": (prefix, {"num_virtual_tokens": 5}),
    "prefix-mlp": (prefix, {"num_virtual_tokens": 5, "prefix_projection": "true", "encoder_hidden_size": "16"}),
    "prompt": (prompt, {"num_virtual_tokens": 6}),
    "ptuning-mlp": (ptuning, {"num_virtual_tokens": 4}),
    "ptuning-lstm": (ptuning, {"num_virtual_tokens": 4, "encoder_reparameterization_type": "lstm",
                               "encoder_hidden_size": 12}),
}


def tuned(kind: str, method: str) -> Decoder:
    model = tiny(kind)
    mod, opts = METHODS[method]
    torch.manual_seed(1)
    mod.apply(model, opts)
    perturb(model)
    return model.eval()


def ids(T: int = 9, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- independent formulas ----------------------------------------------------------------------------------------
def manual_blocks(model: Decoder, x: torch.Tensor, pos: torch.Tensor, attn_fn, mlp_fn) -> torch.Tensor:
    """Pre-norm blocks written out: x += attn_fn(block, norm1 x), x += mlp_fn(block, norm2 x); final norm, head."""
    rope = model.rotary(pos) if model.cfg.position == "rope" else None
    for b in model.blocks:
        h = b.norm1(x)
        x = x + attn_fn(b, h, rope)
        h = b.norm2(x)
        x = x + mlp_fn(b, h)
    return model.lm_head(model.norm_f(x))


def plain_attn(b, h, rope, prefix_kv=None):
    a = b.attn
    B, T, _ = h.shape
    q, k, v = a.qkv(h).split([a.n_head * a.hd, a.n_kv * a.hd, a.n_kv * a.hd], dim=-1)
    q = q.view(B, T, a.n_head, a.hd).transpose(1, 2)
    k = k.view(B, T, a.n_kv, a.hd).transpose(1, 2)
    v = v.view(B, T, a.n_kv, a.hd).transpose(1, 2)
    if rope is not None:
        cos, sin = rope

        def rot(t):
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        q, k = rot(q), rot(k)
    P = 0
    if prefix_kv is not None:
        pk, pv = prefix_kv
        P = pk.shape[2]
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    rep = a.n_head // a.n_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / a.hd**0.5
    allowed = torch.ones(T, P + T, dtype=torch.bool).tril(P)  # query t sees the prefix and keys up to itself
    s = s.masked_fill(~allowed, float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    return a.proj(y)


def plain_mlp(b, h):
    m = b.mlp
    z = m.fc1(h)
    if m.gated:
        g, u = z.chunk(2, dim=-1)
        return m.fc2(F.silu(g) * u)
    return m.fc2(F.gelu(z, approximate="tanh"))


@pytest.mark.parametrize("kind", ["llama"])
@pytest.mark.parametrize("parallel", [False, True])
def test_adapter_forward_matches_formula(kind, parallel):
    model = tuned(kind, "adapter-parallel" if parallel else "adapter-serial")
    s = 2.0 if parallel else 1.0

    def bottleneck(mod, src):
        return mod.up.weight @ torch.relu(mod.down.weight @ src[..., None] + mod.down.bias[:, None]) + mod.up.bias[
            :, None]

    def attn_fn(b, h, rope):
        y = plain_attn(b, h, rope)
        return y + s * bottleneck(b.adapter_attn, h if parallel else y)[..., 0]

    def mlp_fn(b, h):
        y = plain_mlp(b, h)
        return y + s * bottleneck(b.adapter_mlp, h if parallel else y)[..., 0]

    x = ids()
    with torch.no_grad():
        ref = manual_blocks(model, model.wte(x), torch.arange(x.shape[1]), attn_fn, mlp_fn)
        assert (model(x) - ref).abs().max() < 1e-5
        base = manual_blocks(model, model.wte(x), torch.arange(x.shape[1]), plain_attn, lambda b, h: plain_mlp(b, h))
        assert (model(x) - base).abs().max() > 1e-2  # the adapters do something
        with disable_adapter(model):
            assert (model(x) - base).abs().max() < 1e-5


def test_fresh_adapter_starts_near_the_base_and_only_it_trains():
    model = tiny("llama")
    x = ids()
    with torch.no_grad():
        before = model(x)
    adapter.apply(model, {"bottleneck_size": 4})
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-2
    set_trainable_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.adapter_{t}.{w}.{p}" for i in range(2) for t in ("attn", "mlp")
                         for w in ("down", "up") for p in ("weight", "bias")}
    model.loss(x, x).backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_moves_only_the_method_s_weights_and_lowers_the_loss(method):
    """A few Adam steps on one batch (gradient checkpointing on): only adapter weights change, and the loss falls."""
    model = tiny("llama")
    mod, opts = METHODS[method]
    torch.manual_seed(1)
    mod.apply(model, opts)
    set_trainable_params(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    model.gradient_checkpointing = True
    x = ids(T=12, B=4, seed=7)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


@pytest.mark.parametrize("method", ["prefix", "prefix-mlp"])
def test_prefix_forward_matches_formula(method):
    model = tuned("llama", method)
    x = ids()
    T = x.shape[1]
    with torch.no_grad():
        pk, pv = model.kv_prefix(x.shape[0])
        P = pk.shape[3]
        layers = iter(range(2))

        def attn_fn(b, h, rope):
            i = next(layers)
            return plain_attn(b, h, rope, (pk[i], pv[i]))

        ref = manual_blocks(model, model.wte(x), torch.arange(P, P + T), attn_fn, lambda b, h: plain_mlp(b, h))
        assert (model(x) - ref).abs().max() < 1e-5
        with disable_adapter(model):
            assert model.num_virtual_tokens == 0
            base = manual_blocks(model, model.wte(x), torch.arange(T), plain_attn, lambda b, h: plain_mlp(b, h))
            assert (model(x) - base).abs().max() < 1e-5


def test_prefix_layout_is_peft_s():
    """flat (n, L * 2 * kv_heads * hd): entry 2l of the (L * 2) axis is layer l's keys, 2l + 1 its values."""
    model = tuned("llama", "prefix")
    kp = model.kv_prefix
    flat = kp.flat().detach()
    k, v = kp(3)
    n, hd, H = kp.n_tokens, model.cfg.head_size, model.cfg.kv_heads
    for layer in range(2):
        for kv, t in ((0, k), (1, v)):
            for j in range(n):
                start = (2 * layer + kv) * H * hd
                assert torch.equal(t[layer, 2, :, j].reshape(-1), flat[j, start : start + H * hd])


def test_prefix_projection_folds_to_the_same_prefix():
    model = tuned("llama", "prefix-mlp")
    x = ids()
    with torch.no_grad():
        before = model(x)
        cfg, tensors = prefix.to_peft(model, {"prefix_projection": True, "encoder_hidden_size": 16})
        model.kv_prefix.fold()
        assert not any("transform" in n for n in get_adapter_params(model))
        assert (model(x) - before).abs().max() < 1e-6
    assert tensors["prompt_embeddings"].shape == (5, 2 * 2 * 2 * 8)
    assert cfg["num_attention_heads"] == 2 and cfg["token_dim"] == 16  # grouped-query: the key/value heads


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp"])
def test_soft_prompt_forward_matches_formula(kind, method):
    model = tuned(kind, method)
    x = ids()
    with torch.no_grad():
        sp = model.soft_prompt
        if method == "ptuning-mlp":  # PEFT's MLP encoder written out
            lin = [m for m in sp.mlp_head if isinstance(m, torch.nn.Linear)]
            e = sp.embedding.weight
            soft = lin[2](torch.relu(lin[1](torch.relu(lin[0](e)))))
            assert (sp.embeddings() - soft).abs().max() < 1e-6
        else:
            soft = sp.weight
        P, T = soft.shape[0], x.shape[1]
        emb = torch.cat([soft[None].expand(2, -1, -1), model.wte(x)], 1)
        pos = torch.arange(P + T)
        if kind == "gpt2":
            emb = emb + model.wpe(pos)
        ref = manual_blocks(model, emb, pos, plain_attn, lambda b, h: plain_mlp(b, h))[:, P:]
        out = model(x)
        assert out.shape == (2, T, V)  # real tokens only
        assert (out - ref).abs().max() < 1e-5


def test_prompt_init_from_text_and_vocab():
    model = tiny("llama")

    class Tok:
        def encode(self, text):
            return [ord(c) % V for c in text]

    opts = prompt.apply(model, {"num_virtual_tokens": 7, "prompt_tuning_init": "text",
                                "prompt_tuning_init_text": "abc"}, tokenizer=Tok())
    assert opts["prompt_tuning_init"] == "TEXT"
    want = [ord(c) % V for c in "abcabca"]
    assert torch.equal(model.soft_prompt.weight.detach(), model.wte.weight.detach()[want])
    model2 = tiny("llama")
    prompt.apply(model2, {"num_virtual_tokens": 5})
    rows = model2.wte.weight.detach()
    assert all(any(torch.equal(r, w) for w in rows) for r in model2.soft_prompt.weight.detach())


def test_bad_options_are_one_line_errors():
    with pytest.raises(LMForgeError, match="peft.rank"):
        prompt.apply(tiny("llama"), {"rank": 3})
    with pytest.raises(LMForgeError, match="peft.num_virtual_tokens"):
        prefix.apply(tiny("llama"), {"num_virtual_tokens": "x"})
    with pytest.raises(LMForgeError, match="MLP or LSTM"):
        ptuning.apply(tiny("llama"), {"encoder_reparameterization_type": "GRU"})
    with pytest.raises(LMForgeError, match="serial or parallel"):
        adapter.apply(tiny("llama"), {"adapter_type": "sideways"})
    model = tiny("llama")
    prompt.apply(model, {"num_virtual_tokens": 2})
    with pytest.raises(LMForgeError, match="one virtual-token method"):
        prefix.apply(model, {"num_virtual_tokens": 2})
    block = tiny("llama").cfg.block_size
    for mod, opts, says in (  # each reached PyTorch (naming no option), was ignored or rounded, or exhausted memory
            (adapter, {"init_std": -1}, "peft.init_std -1: must be >= 0"),
            (adapter, {"scaling": "nan"}, "peft.scaling nan: must be a finite number"),
            (prefix, {"num_virtual_tokens": block}, f"peft.num_virtual_tokens {block}: must be less than the model"),
            (ptuning, {"encoder_num_layers": 0}, "peft.encoder_num_layers 0: must be >= 1"),
            (ptuning, {"encoder_dropout": 2.0}, "peft.encoder_dropout 2.0: must be in [0, 1)"),
            (prompt, {"num_virtual_tokens": 2.5}, "peft.num_virtual_tokens 2.5: expected an integer"),
            (lora, {"r": 2.5}, "peft.r 2.5: the rank must be a positive integer"),
            (lora, {"alpha": float("inf")}, "peft.alpha inf: must be a finite number"),
            (lora, {"r": 100000}, "peft.r 100000: larger than the adapted layers allow"),
            (qlora, {"group_size": 7}, "peft.group_size 7: applies to --peft.quant int4")):
        with pytest.raises(LMForgeError, match=re.escape(says)):
            mod.apply(tiny("llama"), opts)
    assert prompt.apply(tiny("llama"), {"num_virtual_tokens": 3.0})["num_virtual_tokens"] == 3


# ---- KV cache, generation, engine --------------------------------------------------------------------------------
ALL = list(METHODS)


def greedy_full(model: Decoder, prompt_ids: list[int], n: int) -> list[int]:
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt_ids):]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ALL)
def test_cached_forward_and_generation_match_full_forward(kind, method):
    model = tuned(kind, method)
    x = ids(T=11)
    with torch.no_grad():
        ref = model(x)
        cache = KVCache(model.cfg, 2, 40)
        steps = [model(x[:, :5], cache=cache), model(x[:, 5:7], cache=cache)]
        steps += [model(x[:, i : i + 1], cache=cache) for i in range(7, 11)]
        assert (torch.cat(steps, 1) - ref).abs().max() < 1e-5
    p = [3, 14, 15, 92, 6]
    want = greedy_full(model, p, 12)
    assert generate(model, p, SamplingParams(temperature=0, max_new_tokens=12)) == want
    assert len(set(want)) > 1 or method.startswith("adapter")  # not a degenerate sequence
    prompts = [p, [7, 1, 8]]
    assert generate_batch(model, prompts, SamplingParams(temperature=0, max_new_tokens=6)) == [
        want[:6], greedy_full(model, prompts[1], 6)]


@pytest.mark.parametrize("method", ["adapter-serial", "prefix", "prompt", "ptuning-lstm"])
def test_engine_matches_full_forward(method):
    model = tuned("llama", method)
    assert fast_path_supported(model) == (not method.startswith("adapter"))
    prompts = [[3, 14, 15], [9, 2, 6, 5, 3, 5], [8]]
    eng = Engine(model, max_batch=2, max_len=40)
    assert eng.max_len == 40 - model.num_virtual_tokens  # the context requests (and the server) get
    try:
        reqs = [eng.submit(p, SamplingParams(temperature=0, max_new_tokens=8)) for p in prompts]
        got = [[s.token for s in r.result() if s.token >= 0] for r in reqs]
    finally:
        eng.close()
    assert got == [greedy_full(model, p, 8) for p in prompts]
    # the prompt's own tokens scored (a completion's echo with logprobs): after the virtual tokens, as a full forward
    eng = Engine(model, max_batch=2, max_len=40)
    try:
        scores = eng.submit(prompts[1], SamplingParams(temperature=0, max_new_tokens=0, prompt_logprobs=0)).result()
    finally:
        eng.close()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompts[1]]))[0], -1)
    want = [float(logp[i - 1, t]) for i, t in enumerate(prompts[1]) if i]
    assert [s.logprob for s in scores[0].steps[1:]] == pytest.approx(want, abs=1e-5)


def test_virtual_tokens_take_room_in_the_context():
    model = tuned("llama", "prefix")  # block_size 64, 5 virtual tokens
    out = generate(model, list(range(50)), SamplingParams(temperature=0, max_new_tokens=30))
    assert len(out) == 64 - 5 - 50
    with pytest.raises(ValueError, match="no room"):
        generate(model, list(range(59)), SamplingParams(temperature=0, max_new_tokens=3))


# ---- save / load -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
def test_to_peft_from_peft_round_trip(method):
    model = tuned("gpt2", method)
    mod, opts = METHODS[method]
    resolved = mod.apply(tiny("gpt2"), opts)
    config, tensors = mod.to_peft(model, resolved)
    fresh = tiny("gpt2")
    loaded = mod.from_peft(fresh, config, tensors)
    assert set(loaded) <= set(mod.DEFAULTS)
    x = ids()
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max() < 1e-6
    if method.startswith("adapter"):
        assert config["peft_type"] == "LMFORGE_ADAPTER" and "blocks.0.adapter_attn.down.weight" in tensors
    else:
        assert list(tensors) == ["prompt_embeddings"]


def test_methods_on_a_quantized_base(tmp_path):
    """int8 base (int8 embedding table without ``weight``, QuantLinear layers), made by the quantize command: each
    method applies, trains only its own weights and generates as the full forward does."""
    import subprocess
    import sys

    from lmforge.checkpoint import load_model

    out = tmp_path / "q8"
    subprocess.run([sys.executable, "-m", "lmforge", "quantize", "--bits", "8", "--output", str(out)], check=True,
                   capture_output=True)
    for method in ("adapter-parallel", "prefix", "prompt", "ptuning-lstm"):
        model = load_model(out).eval()
        mod, opts = METHODS[method]
        torch.manual_seed(1)
        mod.apply(model, opts)
        perturb(model)
        set_trainable_params(model)
        assert all(p.dtype == torch.float32 for p in get_adapter_params(model).values())
        p = [1, 400, 30, 7]
        got = generate(model, p, SamplingParams(temperature=0, max_new_tokens=6))
        # The int kernels pick their compute by CPU (bf16 on some), so the cached and full forwards may break a
        # near-tie differently: each generated token must be the full forward's best within a small margin.
        assert len(got) == 6
        with torch.no_grad():
            for i, tok in enumerate(got):
                logits = model(torch.tensor([p + got[:i]]))[0, -1]
                assert logits[tok] >= logits.max() - 0.05, (method, i, tok, int(logits.argmax()))
