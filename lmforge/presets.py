"""Named model presets: published shapes of well-known decoder-only LLMs, as ``ModelConfig`` data.

Every preset is a set of keyword arguments for :class:`lmforge.config.ModelConfig`: the family's architectural
switches (norm kind and placement, MLP, positions, biases, tied embeddings, parallel block, kv heads) merged with
one size's shape. Each family also has a ``tiny-<family>`` preset with the same switches and a toy shape (2 layers,
width 64, vocab 512, context 128) for tests.

    >>> cfg = get_preset("llama-7b")
    >>> human_count(count_params(cfg))
    '6.74B'
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError

# ---- family switches -------------------------------------------------------------------------------------------
# Only what differs from the ModelConfig defaults (LLaMA-like: RMSNorm, pre-norm, SwiGLU, RoPE, no biases, untied).
_GPT_BIASES = dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True)

FAMILIES: dict[str, dict[str, Any]] = {
    # Radford et al. 2018; openai/finetune-transformer-lm: post-LN (no final norm), learned positions, GELU (tanh
    # approximation), biases everywhere, output layer tied to the token embedding.
    "gpt1": dict(vocab_size=40478, block_size=512, mlp="gelu_tanh", norm="layernorm", norm_eps=1e-5,
                 norm_placement="post", final_norm=False, position="learned", tie_embeddings=True, **_GPT_BIASES,
                 extra={"hf_model_type": "openai-gpt"}),
    # Radford et al. 2019: pre-LN with a final LayerNorm, otherwise as GPT-1.
    "gpt2": dict(vocab_size=50257, block_size=1024, mlp="gelu_tanh", norm="layernorm", norm_eps=1e-5,
                 norm_placement="pre", position="learned", tie_embeddings=True, **_GPT_BIASES,
                 bos_id=50256, eos_id=50256, extra={"hf_model_type": "gpt2"}),
    # Brown et al. 2020: GPT-2's model with dense and locally banded sparse attention in alternating layers. The
    # band width is not published; 256 (the default local_window) is used.
    "gpt3": dict(vocab_size=50257, block_size=2048, mlp="gelu_tanh", norm="layernorm", norm_eps=1e-5,
                 norm_placement="pre", position="learned", tie_embeddings=True, **_GPT_BIASES,
                 attn_pattern="alternating", local_window=256, bos_id=50256, eos_id=50256),
    # Touvron et al. 2023a: RMSNorm (eps 1e-6), SwiGLU with LLaMA's 2/3*4d rule rounded to 256, RoPE, no biases.
    "llama": dict(vocab_size=32000, block_size=2048, mlp="swiglu", multiple_of=256, norm="rmsnorm", norm_eps=1e-6,
                  position="rope", rope_theta=10000.0, bos_id=1, eos_id=2, extra={"hf_model_type": "llama"}),
    # Touvron et al. 2023b: as LLaMA with a 4096 context and eps 1e-5 (params.json); 70B adds GQA (see sizes).
    "llama2": dict(vocab_size=32000, block_size=4096, mlp="swiglu", multiple_of=256, norm="rmsnorm", norm_eps=1e-5,
                   position="rope", rope_theta=10000.0, bos_id=1, eos_id=2, extra={"hf_model_type": "llama"}),
    # GLM-130B (Zeng et al. 2022; THUDM/GLM-130B + SwissArmyTransformer): DeepNorm with alpha = (2N)^(1/2) applied
    # SAT-style, i.e. LN(x) feeds the sublayer and the residual: h = a*LN1(x) + attn(LN1(x)),
    # y = a*LN2(h) + mlp(LN2(h)), with a final LayerNorm. That is exactly post-LN DeepNorm shifted by one norm:
    # embedding_norm plays the first layer's input LN and each block's post norm plays the next layer's input LN
    # (the last one is the final LN), so final_norm=False. GeGLU (exact GELU), biases, tied output layer,
    # embedding gradient shrink 0.1. Positions: the released model runs 1D rotary on the full head (configs do not
    # pass --position-encoding-2d and generate.py builds 1D position ids), not GLM's 2D scheme.
    "glm": dict(vocab_size=150528, block_size=2048, mlp="geglu", norm="layernorm", norm_eps=1e-5,
                norm_placement="deepnorm", embedding_norm=True, final_norm=False, position="rope",
                rope_theta=10000.0, tie_embeddings=True, **_GPT_BIASES, embedding_grad_shrink=0.1),
    # ChatGLM-6B (THUDM/chatglm-6b): the same GLM block (alpha = (2N)^(1/2), arranged as for GLM-130B above), plain
    # GELU-tanh MLP of 16384, 2D rotary (first half of each head by position, second half by block position),
    # biases, output layer tied to the embedding (HF's tie_word_embeddings default; "6.2B" counts it once).
    "chatglm": dict(vocab_size=130528, block_size=2048, mlp="gelu_tanh", norm="layernorm", norm_eps=1e-5,
                    norm_placement="deepnorm", embedding_norm=True, final_norm=False, position="glm2d",
                    glm2d="rotary", rope_theta=10000.0, tie_embeddings=True, **_GPT_BIASES,
                    bos_id=130004, eos_id=130005, pad_id=3),
    # ChatGLM2-6B (THUDM/chatglm2-6b): pre-RMSNorm, SwiGLU, multi-query with 2 kv groups, bias on QKV only, rotary
    # on half of each head with interleaved pairs, separate output layer.
    "chatglm2": dict(vocab_size=65024, block_size=32768, mlp="swiglu", norm="rmsnorm", norm_eps=1e-5,
                     position="rope", rope_theta=10000.0, rotary_fraction=0.5, rope_interleaved=True, qkv_bias=True,
                     bos_id=1, eos_id=2, pad_id=0),
    # Chowdhery et al. 2022: parallel block with one shared LayerNorm, no biases in dense kernels or layer norms,
    # multi-query attention with head_dim 256, SwiGLU with 4d hidden, RoPE, shared input/output embeddings. LayerNorm
    # eps is not published; 1e-6 (the T5X default) is used.
    "palm": dict(vocab_size=256000, block_size=2048, mlp="swiglu", norm="layernorm", norm_eps=1e-6,
                 norm_bias=False, parallel_block=True, parallel_shared_norm=True, position="rope",
                 n_kv_head=1, tie_embeddings=True),
    # BigScience 2022: ALiBi, LayerNorm after the embedding, pre-LN, GELU-tanh, biases, tied output layer.
    "bloom": dict(vocab_size=250880, block_size=2048, mlp="gelu_tanh", norm="layernorm", norm_eps=1e-5,
                  position="alibi", embedding_norm=True, tie_embeddings=True, **_GPT_BIASES,
                  bos_id=1, eos_id=2, pad_id=3, extra={"hf_model_type": "bloom"}),
    # Qwen2 (Yang et al. 2024; Qwen/Qwen2-7B config.json): LLaMA-like with GQA, bias on QKV, rope theta 1e6.
    "qwen": dict(vocab_size=151936, block_size=32768, mlp="swiglu", norm="rmsnorm", norm_eps=1e-6, position="rope",
                 rope_theta=1_000_000.0, qkv_bias=True, bos_id=151643, eos_id=151643,
                 extra={"hf_model_type": "qwen2"}),
    # Baichuan-7B (baichuan-inc/Baichuan-7B config.json): the LLaMA architecture with a 64000 vocab, context 4096.
    "baichuan": dict(vocab_size=64000, block_size=4096, mlp="swiglu", norm="rmsnorm", norm_eps=1e-6,
                     position="rope", rope_theta=10000.0, bos_id=1, eos_id=2, pad_id=0,
                     extra={"hf_model_type": "llama"}),
}

# ---- sizes -----------------------------------------------------------------------------------------------------
# name -> (family, shape, published total). Published totals are quoted for display only (tests keep their own).
_SIZES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt1": ("gpt1", dict(n_layer=12, n_embd=768, n_head=12), "117M"),
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12), "124M"),
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16), "355M"),
    "gpt2-large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20), "774M"),
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25), "1.5B"),
    # Brown et al. table 2.1. Two rows are inconsistent as printed: 1.3B lists 24 heads with d_head 128 at width
    # 2048 (16 heads fit width, d_head and the 1.3B total), and 13B lists width 5140 with 40 heads of 128 (5120).
    "gpt3-125m": ("gpt3", dict(n_layer=12, n_embd=768, n_head=12), "125M"),
    "gpt3-350m": ("gpt3", dict(n_layer=24, n_embd=1024, n_head=16), "350M"),
    "gpt3-760m": ("gpt3", dict(n_layer=24, n_embd=1536, n_head=16), "760M"),
    "gpt3-1.3b": ("gpt3", dict(n_layer=24, n_embd=2048, n_head=16), "1.3B"),
    "gpt3-2.7b": ("gpt3", dict(n_layer=32, n_embd=2560, n_head=32), "2.7B"),
    "gpt3-6.7b": ("gpt3", dict(n_layer=32, n_embd=4096, n_head=32), "6.7B"),
    "gpt3-13b": ("gpt3", dict(n_layer=40, n_embd=5120, n_head=40), "13B"),
    "gpt3-175b": ("gpt3", dict(n_layer=96, n_embd=12288, n_head=96), "175B"),
    "llama-7b": ("llama", dict(n_layer=32, n_embd=4096, n_head=32), "6.7B"),
    "llama-13b": ("llama", dict(n_layer=40, n_embd=5120, n_head=40), "13.0B"),
    "llama-33b": ("llama", dict(n_layer=60, n_embd=6656, n_head=52), "32.5B"),
    "llama-65b": ("llama", dict(n_layer=80, n_embd=8192, n_head=64), "65.2B"),
    "llama2-7b": ("llama2", dict(n_layer=32, n_embd=4096, n_head=32), "7B"),
    "llama2-13b": ("llama2", dict(n_layer=40, n_embd=5120, n_head=40), "13B"),
    "llama2-70b": ("llama2", dict(n_layer=80, n_embd=8192, n_head=64, n_kv_head=8, ffn_dim_multiplier=1.3,
                                  multiple_of=4096), "70B"),
    "glm-130b": ("glm", dict(n_layer=70, n_embd=12288, n_head=96, intermediate_size=32768), "130B"),
    "chatglm-6b": ("chatglm", dict(n_layer=28, n_embd=4096, n_head=32, intermediate_size=16384), "6.2B"),
    "chatglm2-6b": ("chatglm2", dict(n_layer=28, n_embd=4096, n_head=32, n_kv_head=2, intermediate_size=13696),
                    "6B"),
    "palm-8b": ("palm", dict(n_layer=32, n_embd=4096, n_head=16, head_dim=256, intermediate_size=4 * 4096),
                "8.63B"),
    "palm-62b": ("palm", dict(n_layer=64, n_embd=8192, n_head=32, head_dim=256, intermediate_size=4 * 8192),
                 "62.50B"),
    "palm-540b": ("palm", dict(n_layer=118, n_embd=18432, n_head=48, head_dim=256, intermediate_size=4 * 18432),
                  "540.35B"),
    # BigScience 2022 (bigscience/bloom-* config.json)
    "bloom-560m": ("bloom", dict(n_layer=24, n_embd=1024, n_head=16), "559M"),
    "bloom-1b1": ("bloom", dict(n_layer=24, n_embd=1536, n_head=16), "1065M"),
    "bloom-1b7": ("bloom", dict(n_layer=24, n_embd=2048, n_head=16), "1722M"),
    "bloom-3b": ("bloom", dict(n_layer=30, n_embd=2560, n_head=32), "3003M"),
    "bloom-7b1": ("bloom", dict(n_layer=30, n_embd=4096, n_head=32), "7069M"),
    "bloom-176b": ("bloom", dict(n_layer=70, n_embd=14336, n_head=112), "176.2B"),
    # Qwen2-7B's shapes (the contract's qwen-7b); vocab 151936 as in the brief (HF's Qwen2-7B pads to 152064).
    "qwen-7b": ("qwen", dict(n_layer=28, n_embd=3584, n_head=28, n_kv_head=4, intermediate_size=18944), "7.6B"),
    "baichuan-7b": ("baichuan", dict(n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008), "7.0B"),
}

# Toy shapes with the family's switches. Families with an explicit MLP width keep roughly its ratio to d.
_TINY_BASE = dict(vocab_size=512, block_size=128, n_layer=2, n_embd=64, n_head=4)
_TINY: dict[str, dict[str, Any]] = {
    "gpt1": {},
    "gpt2": {},
    "gpt3": dict(local_window=16),  # so the banded layers differ from the dense ones within 128 positions
    "llama": {},
    "llama2": {},
    "glm": dict(intermediate_size=176),
    "chatglm": dict(intermediate_size=256),
    "chatglm2": dict(n_kv_head=2, intermediate_size=224),
    "palm": dict(head_dim=32, intermediate_size=256),  # heads * head_dim != width, as in palm-540b
    "bloom": {},
    "qwen": dict(n_kv_head=2, intermediate_size=336),
    "baichuan": dict(intermediate_size=176),
}


def _derive(family: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Fields that depend on the shape: the GLM residual scale alpha = (2N)^(1/2) (and GLM-130B's init gain)."""
    n = kw["n_layer"]
    if family in ("glm", "chatglm"):
        kw["deepnorm_alpha"] = (2 * n) ** 0.5
    if family == "glm":
        kw["deepnorm_beta"] = (2 * n) ** -0.5  # GLM-130B paper: Xavier init scaled by (2N)^(-1/2)
    for key in ("bos_id", "eos_id", "pad_id"):  # tiny vocabularies cannot hold the real special-token ids
        if kw.get(key) is not None and kw[key] >= kw["vocab_size"]:
            kw[key] = None
    return kw


def _build_table() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name, (family, shape, published) in _SIZES.items():
        kw = copy.deepcopy(FAMILIES[family]) | shape
        kw["extra"] = {**kw.get("extra", {}), "published_params": published}
        table[name] = _derive(family, {"family": family, **kw})
    for family, shape in _TINY.items():
        kw = copy.deepcopy(FAMILIES[family]) | _TINY_BASE | shape
        table[f"tiny-{family}"] = _derive(family, {"family": family, **kw})
    return table


PRESETS: dict[str, dict[str, Any]] = _build_table()
"""name -> ModelConfig keyword arguments (without ``name``)."""


def list_presets(family: str | None = None) -> list[str]:
    """Preset names in display order (published sizes by family, then the tiny ones), optionally one family."""
    return [n for n, kw in PRESETS.items() if family is None or kw["family"] == family]


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh ModelConfig for preset ``name`` (case-insensitive, '_' = '-'), with optional field overrides."""
    key = _normalise(name)
    if key not in PRESETS:
        raise LMForgeError(f"unknown model preset {name!r}; {_suggest(key)}")
    kw = copy.deepcopy(PRESETS[key])
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise LMForgeError(f"preset {key}: unknown config field(s) {unknown}")
    if overrides:  # shape-dependent fields follow an overridden shape unless given explicitly
        kw = _derive(kw["family"], kw | overrides) | overrides
    return ModelConfig(name=key, **kw)


def _suggest(key: str) -> str:
    names = list(PRESETS)
    close = difflib.get_close_matches(key, names, n=6, cutoff=0.6)
    close += [n for n in names if key and key in n and n not in close]
    if not close:
        return f"run `lmforge models` for the {len(names)} presets"
    return "close names: " + ", ".join(close[:8])


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of ``Decoder(cfg)`` (tied weights once), built on the meta device: no memory used."""
    from lmforge.model.decoder import Decoder

    with torch.device("meta"), _SkipInit():
        model = Decoder(cfg)
    return sum(p.numel() for p in model.parameters())


class _SkipInit(TorchFunctionMode):
    """Turns the in-place random fills of weight init into no-ops (on meta tensors they only cost time)."""

    _SKIP = frozenset({"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                       "xavier_uniform_", "xavier_normal_", "fill_", "zero_", "zeros_", "ones_", "constant_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self._SKIP:  # torch.nn.init.* (tensor= keyword) and Tensor.*_
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def human_count(n: int) -> str:
    """124439808 -> '124M', 6738415616 -> '6.74B' (three significant digits)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale * 0.9995:
            v = n / scale
            digits = 2 if v < 9.995 else 1 if v < 99.95 else 0
            return f"{v:.{digits}f}{unit}"
    return str(n)
