"""Model presets: published parameter totals, parity with transformers' own models, tiny presets run, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.model.decoder import Decoder
from lmforge.presets import count_params, get_preset, human_count, list_presets

REPO = Path(__file__).resolve().parents[1]

# Totals as printed in the papers / model cards (not computed here).
PUBLISHED = {
    # Radford et al. 2019 / HF model cards
    "gpt2-small": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.558e9,
    # Brown et al. 2020, table 2.1
    "gpt3-125m": 125e6, "gpt3-350m": 350e6, "gpt3-760m": 760e6, "gpt3-1.3b": 1.3e9, "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9,
    # Touvron et al. 2023a, table 2 (and 2023b for 70B)
    "llama-7b": 6.7e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9, "llama2-70b": 69.0e9,
    # Zeng et al. 2022; THUDM model cards
    "glm-130b": 130e9, "chatglm-6b": 6.2e9,
    # Chowdhery et al. 2022, table 1
    "palm-8b": 8.63e9, "palm-62b": 62.50e9, "palm-540b": 540.35e9,
    # BigScience 2022 (BLOOM paper, table of model sizes)
    "bloom-560m": 559e6, "bloom-1b1": 1065e6, "bloom-1b7": 1722e6, "bloom-3b": 3003e6, "bloom-7b1": 7069e6,
    "bloom-176b": 176.2e9,
    # Qwen2 technical report (7B: 7.6B), Baichuan-7B model card (7.0B)
    "qwen-7b": 7.6e9, "baichuan-7b": 7.0e9,
}

CONTRACT = (
    ["gpt1", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    + [f"gpt3-{s}" for s in ("125m", "350m", "760m", "1.3b", "2.7b", "6.7b", "13b", "175b")]
    + ["llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama2-7b", "llama2-13b", "llama2-70b"]
    + ["glm-130b", "chatglm-6b", "chatglm2-6b", "palm-8b", "palm-62b", "palm-540b"]
    + [f"bloom-{s}" for s in ("560m", "1b1", "1b7", "3b", "7b1", "176b")]
    + ["qwen-7b", "baichuan-7b"]
)
FAMILIES = ["gpt1", "gpt2", "gpt3", "llama", "llama2", "glm", "chatglm", "chatglm2", "palm", "bloom", "qwen",
            "baichuan"]
TINY = [f"tiny-{f}" for f in FAMILIES]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_totals(name):
    n = count_params(get_preset(name))
    assert abs(n / PUBLISHED[name] - 1) < 0.02, f"{name}: {n:,} vs published {PUBLISHED[name]:,.0f}"


def _n(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_counts_equal_transformers_models():
    """Same totals as transformers' implementations built from the released config.json values."""
    tf = pytest.importorskip("transformers")
    cases = {
        "gpt1": (tf.OpenAIGPTLMHeadModel, tf.OpenAIGPTConfig(vocab_size=40478, n_positions=512, n_embd=768,
                                                             n_layer=12, n_head=12)),
        "gpt2-xl": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48,
                                                      n_head=25)),
        "llama-7b": (tf.LlamaForCausalLM, tf.LlamaConfig(vocab_size=32000, hidden_size=4096,
                                                         intermediate_size=11008, num_hidden_layers=32,
                                                         num_attention_heads=32, tie_word_embeddings=False)),
        "llama2-70b": (tf.LlamaForCausalLM, tf.LlamaConfig(vocab_size=32000, hidden_size=8192,
                                                           intermediate_size=28672, num_hidden_layers=80,
                                                           num_attention_heads=64, num_key_value_heads=8,
                                                           tie_word_embeddings=False)),
        "bloom-176b": (tf.BloomForCausalLM, tf.BloomConfig(vocab_size=250880, hidden_size=14336, n_layer=70,
                                                           n_head=112)),
        "qwen-7b": (tf.Qwen2ForCausalLM, tf.Qwen2Config(vocab_size=151936, hidden_size=3584,
                                                        intermediate_size=18944, num_hidden_layers=28,
                                                        num_attention_heads=28, num_key_value_heads=4,
                                                        tie_word_embeddings=False)),
        "baichuan-7b": (tf.LlamaForCausalLM, tf.LlamaConfig(vocab_size=64000, hidden_size=4096,
                                                            intermediate_size=11008, num_hidden_layers=32,
                                                            num_attention_heads=32, tie_word_embeddings=False)),
    }
    for name, (cls, hf_cfg) in cases.items():
        with torch.device("meta"):
            ref = _n(cls(hf_cfg))
        assert count_params(get_preset(name)) == ref, name


def test_count_params_matches_a_real_build():
    cfg = get_preset("tiny-palm")
    assert count_params(cfg) == _n(Decoder(cfg))
    tied = get_preset("tiny-gpt2")  # tied: the embedding matrix counted once
    assert count_params(tied) == count_params(tied.replace(tie_embeddings=False)) - 512 * 64


# ---- hand-computed architecture totals (independent formulas) -------------------------------------------------
def test_palm_540b_shape_formula():
    # PaLM-540B: q and out projections 18432 x (48 * 256), one shared k and v head, SwiGLU with 4d, no biases,
    # bias-free LayerNorm (weight only) shared by both branches, tied 256k embedding, final norm.
    d, L, h, hd, v = 18432, 118, 48, 256, 256000
    per_layer = 2 * d * h * hd + 2 * d * hd + 3 * d * 4 * d + d
    assert count_params(get_preset("palm-540b")) == L * per_layer + v * d + d


def test_chatglm2_shape_formula():
    d, L, v, ffn, hd, groups = 4096, 28, 65024, 13696, 128, 2
    qkv = d * (d + 2 * groups * hd) + (d + 2 * groups * hd)  # QKV with bias
    per_layer = qkv + d * d + 3 * d * ffn + 2 * d  # dense, SwiGLU, two RMSNorms
    assert count_params(get_preset("chatglm2-6b")) == L * per_layer + 2 * v * d + d  # untied output, final norm


# ---- switches ---------------------------------------------------------------------------------------------------
SWITCHES = ("mlp", "norm", "norm_eps", "norm_bias", "norm_placement", "final_norm", "position", "glm2d",
            "rope_theta", "rotary_fraction", "rope_interleaved", "parallel_block", "parallel_shared_norm",
            "attn_pattern", "qkv_bias", "attn_out_bias", "mlp_bias", "lm_head_bias", "tie_embeddings",
            "embedding_norm", "embedding_grad_shrink", "embedding_scale")


def _attention_kind(cfg) -> str:
    return "mha" if cfg.kv_heads == cfg.n_head else "mqa" if cfg.kv_heads == 1 else "gqa"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_has_the_family_switches(family):
    tiny = get_preset(f"tiny-{family}")
    full = [get_preset(n) for n in list_presets(family) if not n.startswith("tiny-")]
    assert full and tiny.family == family
    for cfg in full:
        assert {k: getattr(tiny, k) for k in SWITCHES} == {k: getattr(cfg, k) for k in SWITCHES}, cfg.name
    assert _attention_kind(tiny) in {_attention_kind(c) for c in full}
    assert tiny.n_layer <= 2 and tiny.n_embd == 64 and 256 <= tiny.vocab_size <= 1000 and tiny.block_size == 128


def test_family_switches_spot_checks():
    c = get_preset("gpt1")
    assert (c.norm_placement, c.final_norm, c.position, c.tie_embeddings) == ("post", False, "learned", True)
    c = get_preset("gpt3-175b")
    assert c.attn_pattern == "alternating" and c.block_size == 2048 and c.head_size == 128
    c = get_preset("llama-65b")
    assert (c.norm, c.norm_eps, c.mlp, c.hidden_size, c.tie_embeddings) == ("rmsnorm", 1e-6, "swiglu", 22016, False)
    c = get_preset("llama2-70b")
    assert (c.kv_heads, c.hidden_size, c.block_size) == (8, 28672, 4096)
    c = get_preset("palm-62b")
    assert c.parallel_block and c.parallel_shared_norm and c.kv_heads == 1 and c.head_size == 256
    assert not (c.qkv_bias or c.attn_out_bias or c.mlp_bias or c.norm_bias)
    c = get_preset("bloom-176b")
    assert (c.position, c.embedding_norm, c.mlp) == ("alibi", True, "gelu_tanh")
    c = get_preset("chatglm-6b")
    assert (c.position, c.glm2d, c.rotary_dim) == ("glm2d", "rotary", 64)
    assert math.isclose(c.alpha, math.sqrt(2 * 28))  # ChatGLM-6B: alpha = (2 * num_layers) ** 0.5
    c = get_preset("glm-130b")
    assert c.embedding_grad_shrink == 0.1 and c.mlp == "geglu" and math.isclose(c.alpha, math.sqrt(140))
    c = get_preset("chatglm2-6b")
    assert c.rotary_dim == 64 and c.rope_interleaved and c.kv_heads == 2 and c.block_size == 32768
    c = get_preset("qwen-7b")
    assert (c.rope_theta, c.qkv_bias, c.attn_out_bias, c.kv_heads) == (1e6, True, False, 4)


# ---- tiny presets run -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_forward_and_backward(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = Decoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    logits = model(ids)
    assert logits.shape == (2, 40, cfg.vocab_size) and torch.isfinite(logits).all()
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in model.parameters())


def _glm_reference(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """GLM-130B / ChatGLM-6B layer as written in THUDM's code, on the decoder's own weights:
    x_ln = LN1(h); h = alpha*x_ln + attn(x_ln); m_ln = LN2(h); h = alpha*m_ln + mlp(m_ln); then a final LN,
    with alpha = (2 * num_layers) ** 0.5.
    GLM's LN1 of layer 0 is our embedding norm, LN2 of layer i is block i's norm1, LN1 of layer i+1 (or the final
    LN) is block i's norm2."""
    cfg = model.cfg
    alpha = (2 * cfg.n_layer) ** 0.5
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    if cfg.position == "glm2d":
        rope = (*model.rotary(pos), *model.rotary(torch.zeros_like(pos)))
    else:
        rope = model.rotary(pos)
    in_norms = [model.emb_norm] + [b.norm2 for b in model.blocks[:-1]]
    h = model.wte(ids)
    for ln1, block in zip(in_norms, model.blocks):
        x = ln1(h)
        h = alpha * x + block.attn(x, rope, None, None)
        m = block.norm1(h)
        h = alpha * m + block.mlp(m)
    return model.lm_head(model.blocks[-1].norm2(h))


@pytest.mark.parametrize("name", ["tiny-glm", "tiny-chatglm"])
def test_glm_presets_compute_the_glm_block(name):
    torch.manual_seed(0)
    model = Decoder(get_preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from identity so a misplaced norm shows
            p.add_(torch.randn_like(p) * 0.1)
        ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
        torch.testing.assert_close(model(ids), _glm_reference(model, ids), rtol=1e-4, atol=1e-4)


# ---- lookup -----------------------------------------------------------------------------------------------------
def test_get_preset_unknown_name_suggests_close_names():
    with pytest.raises(LMForgeError) as e:
        get_preset("llama7b")
    msg = str(e.value)
    assert "\n" not in msg and "llama-7b" in msg and "llama2-7b" in msg
    with pytest.raises(LMForgeError, match="lmforge models"):
        get_preset("zzzz")
    with pytest.raises(LMForgeError, match="no_such_field"):
        get_preset("tiny-llama", no_such_field=1)


def test_get_preset_returns_fresh_configs_and_overrides():
    a = get_preset("LLaMA_7B")
    a.extra["x"] = 1
    a.n_layer = 1
    b = get_preset("llama-7b")
    assert b.name == "llama-7b" and b.n_layer == 32 and "x" not in b.extra
    assert get_preset("tiny-llama", block_size=64, n_layer=3).n_layer == 3
    assert math.isclose(get_preset("glm-130b", n_layer=8).alpha, 4.0)  # alpha = sqrt(2N) follows N
    assert set(CONTRACT + TINY) <= set(list_presets())
    assert list_presets("palm") == ["palm-8b", "palm-62b", "palm-540b", "tiny-palm"]


def test_human_count():
    assert [human_count(n) for n in (124_439_808, 6_738_415_616, 13_015_864_320, 540_356_474_880, 999_999,
                                     141_056, 12)] == ["124M", "6.74B", "13.0B", "540B", "1.00M", "141K", "12"]


# ---- CLI --------------------------------------------------------------------------------------------------------
def test_cli_models_json():
    out = subprocess.run([sys.executable, "-m", "lmforge", "models", "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    by_name = {d["name"]: d for d in data}
    assert set(CONTRACT + TINY) <= set(by_name)
    for d in data:
        assert isinstance(d["params"], int) and d["params"] > 0 and d["family"]
    assert by_name["llama-7b"]["params"] == count_params(get_preset("llama-7b"))
    assert by_name["llama2-70b"]["kv_heads"] == 8


def test_cli_models_table(capsys):
    from lmforge.cli import main

    main(["models", "--family", "palm"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "params"]
    assert [ln.split()[0] for ln in lines[1:]] == ["palm-8b", "palm-62b", "palm-540b", "tiny-palm"]
    assert lines[1].split()[2] == "8.63B"
    with pytest.raises(SystemExit) as e:
        main(["models", "palm-9b"])
    assert e.value.code == 1
    assert "palm-8b" in capsys.readouterr().err
    for argv, msg in ((["models", "--family", "gpt3", "gpt2-small"], "none of gpt2-small is of --family 'gpt3'"),
                      (["models", "--config"], "give --json too")):  # an empty table / nothing printed, exit 0
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1 and msg in capsys.readouterr().err
