"""Hugging Face `transformers` checkpoints <-> lmforge: configs and weights, per architecture.

Each architecture is a pair of config translators plus a list of weight ``Rule``s. A rule names one lmforge tensor,
the HF tensors it is made of, and how to join (import) and split (export) them, so one table serves both directions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lmforge.config import END_IDS, ConfigFieldError, ModelConfig, named_as_in_file
from lmforge.errors import LMForgeError

Tensor = torch.Tensor

# ---- tensor transforms ------------------------------------------------------------------------


def _first(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _single(t: Tensor) -> list[Tensor]:
    return [t]


def _t_join(ts: list[Tensor]) -> Tensor:  # GPT-2 / GPT-1 Conv1D stores (in, out)
    return ts[0].t().contiguous()


def _t_split(t: Tensor) -> list[Tensor]:
    return [t.t().contiguous()]


def _cat(ts: list[Tensor]) -> Tensor:
    return torch.cat(ts, dim=0)


def _splitter(sizes: list[int]) -> Callable[[Tensor], list[Tensor]]:
    return lambda t: [x.contiguous() for x in t.split(sizes, dim=0)]


def _heads_join(n_head: int, hd: int) -> Callable[[list[Tensor]], Tensor]:
    """Per-head fused [h0: q k v, h1: q k v, ...] (NeoX, BLOOM, Falcon MHA) -> [Q | K | V]."""

    def join(ts: list[Tensor]) -> Tensor:
        t = ts[0]
        return t.reshape(n_head, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()

    return join


def _heads_split(n_head: int, hd: int) -> Callable[[Tensor], list[Tensor]]:
    def split(t: Tensor) -> list[Tensor]:
        return [t.reshape(3, n_head, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()]

    return split


def _groups_join(n_head: int, n_kv: int, hd: int) -> Callable[[list[Tensor]], Tensor]:
    """Falcon's new decoder layout [g0: q.. k v, g1: q.. k v, ...] -> [Q | K | V]."""
    rep = n_head // n_kv

    def join(ts: list[Tensor]) -> Tensor:
        t = ts[0].reshape(n_kv, rep + 2, hd, *ts[0].shape[1:])
        q, k, v = t[:, :rep], t[:, rep], t[:, rep + 1]
        return torch.cat([q.reshape(n_head * hd, *q.shape[3:]), k.reshape(n_kv * hd, *k.shape[2:]),
                          v.reshape(n_kv * hd, *v.shape[2:])]).contiguous()

    return join


def _groups_split(n_head: int, n_kv: int, hd: int) -> Callable[[Tensor], list[Tensor]]:
    rep = n_head // n_kv

    def split(t: Tensor) -> list[Tensor]:
        q, k, v = t.split([n_head * hd, n_kv * hd, n_kv * hd])
        rest = t.shape[1:]
        g = torch.cat([q.reshape(n_kv, rep, hd, *rest), k.reshape(n_kv, 1, hd, *rest),
                       v.reshape(n_kv, 1, hd, *rest)], dim=1)
        return [g.reshape(t.shape).contiguous()]

    return split


@dataclass
class Rule:
    lm: str
    hf: list[str]
    join: Callable[[list[Tensor]], Tensor] = _first
    split: Callable[[Tensor], list[Tensor]] = _single


# ---- config helpers ---------------------------------------------------------------------------

HF_ACTS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
LM_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _act(name: str) -> str:
    if name not in HF_ACTS:
        raise LMForgeError(f"config.json: activation {name!r} is not supported; known: {sorted(HF_ACTS)}")
    return HF_ACTS[name]


def _rope(d: dict[str, Any]) -> tuple[float, float]:
    """(theta, partial rotary factor) from new-style ``rope_parameters`` or legacy top-level keys."""
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    kind = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise LMForgeError(f"config.json: rope scaling {kind!r} is not supported yet")
    theta = rp.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
    frac = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", d.get("rotary_pct", 1.0)))
    return float(theta), float(frac)


def _rope_hf(cfg: ModelConfig, partial: bool = False) -> dict[str, Any]:
    rp: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if partial:
        rp["partial_rotary_factor"] = cfg.rotary_fraction
    return {"rope_parameters": rp, "rope_theta": cfg.rope_theta}


def _tokens(d: dict[str, Any]) -> dict[str, Any]:
    def one(v):
        return v[0] if isinstance(v, list) and v else v

    return {"bos_id": one(d.get("bos_token_id")), "eos_id": one(d.get("eos_token_id")),
            "pad_id": one(d.get("pad_token_id"))}


def _tokens_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The special ids of a transformers config; EOS is a list where the source had several end ids (kept in
    ``cfg.extra["eos_token_ids"]``), the config's EOS first."""
    ends = cfg.extra.get(END_IDS) or []
    eos = [cfg.eos_id, *(e for e in ends if e != cfg.eos_id)] if cfg.eos_id in ends else cfg.eos_id
    return {"bos_token_id": cfg.bos_id, "eos_token_id": eos, "pad_token_id": cfg.pad_id}


def _end_ids(*values: Any) -> list[int]:
    """Every end id of config.json's and generation_config.json's ``eos_token_id`` (an id or a list), in order."""
    ids = [v for x in values for v in (x if isinstance(x, list) else [x])]
    return list(dict.fromkeys(v for v in ids if isinstance(v, int) and not isinstance(v, bool) and v >= 0))


# ---- architectures ----------------------------------------------------------------------------


@dataclass
class Arch:
    model_type: str
    architecture: str
    to_lm: Callable[[dict[str, Any]], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    aliases: dict[str, str] = field(default_factory=dict)  # legacy HF key -> current key


def _layer_rules(cfg: ModelConfig, per_layer: Callable[[str, str], list[Rule]], hf_layer: str) -> list[Rule]:
    out: list[Rule] = []
    for i in range(cfg.n_layer):
        out += per_layer(f"blocks.{i}.", hf_layer.format(i=i))
    return out


def _norm_rules(lm: str, hf: str, cfg: ModelConfig) -> list[Rule]:
    rules = [Rule(lm + ".weight", [hf + ".weight"])]
    if cfg.norm == "layernorm" and cfg.norm_bias:
        rules.append(Rule(lm + ".bias", [hf + ".bias"]))
    return rules


def _lin(lm: str, hf: str, bias: bool, join=_first, split=_single) -> list[Rule]:
    rules = [Rule(lm + ".weight", [hf + ".weight"], join, split)]
    if bias:
        rules.append(Rule(lm + ".bias", [hf + ".bias"]))
    return rules


def _head_rules(cfg: ModelConfig, hf_head: str = "lm_head") -> list[Rule]:
    rules = [] if cfg.tie_embeddings else [Rule("lm_head.weight", [hf_head + ".weight"])]
    if cfg.lm_head_bias:
        rules.append(Rule("lm_head.bias", [hf_head + ".bias"]))
    return rules


# GPT-1 and GPT-2 ------------------------------------------------------------------------------


OPENAI_GPT_ACTS = {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}  # its "gelu" is gelu_new


def _gpt_to_lm(d: dict[str, Any], post: bool, act_key: str) -> ModelConfig:
    n_embd = d["n_embd"]
    act = OPENAI_GPT_ACTS.get(d.get(act_key, "gelu"), "?") if post else _act(d.get(act_key, "gelu_new"))
    if act == "?":
        known = list(OPENAI_GPT_ACTS)
        raise LMForgeError(f"config.json: activation {d.get(act_key)!r} is not supported; known: {known}")
    return ModelConfig(
        family="gpt1" if post else "gpt2", vocab_size=d["vocab_size"], block_size=d["n_positions"],
        n_layer=d["n_layer"], n_embd=n_embd, n_head=d["n_head"], mlp=act,
        intermediate_size=d.get("n_inner") or 4 * n_embd, norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5), norm_placement="post" if post else "pre", final_norm=not post,
        position="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=d.get("tie_word_embeddings", True), **_tokens(d),
    )


def _gpt_to_hf(cfg: ModelConfig, post: bool) -> dict[str, Any]:
    d = {"vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
         "n_head": cfg.n_head, "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
         "attn_pdrop": 0.0, "tie_word_embeddings": cfg.tie_embeddings, **_tokens_hf(cfg)}
    if post:
        d["afn"] = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}.get(cfg.mlp, cfg.mlp)
    else:
        d["activation_function"] = LM_ACTS.get(cfg.mlp, cfg.mlp)
        d["n_inner"] = cfg.hidden_size
    return d


def _gpt_rules(cfg: ModelConfig, wte: str, wpe: str) -> list[Rule]:
    def layer(lm: str, hf: str) -> list[Rule]:
        return [
            *_norm_rules(lm + "norm1", hf + "ln_1", cfg),
            *_lin(lm + "attn.qkv", hf + "attn.c_attn", True, _t_join, _t_split),
            *_lin(lm + "attn.proj", hf + "attn.c_proj", True, _t_join, _t_split),
            *_norm_rules(lm + "norm2", hf + "ln_2", cfg),
            *_lin(lm + "mlp.fc1", hf + "mlp.c_fc", True, _t_join, _t_split),
            *_lin(lm + "mlp.fc2", hf + "mlp.c_proj", True, _t_join, _t_split),
        ]

    rules = [Rule("wte.weight", [f"transformer.{wte}.weight"]), Rule("wpe.weight", [f"transformer.{wpe}.weight"])]
    rules += _layer_rules(cfg, layer, "transformer.h.{i}.")
    if cfg.final_norm:
        rules += _norm_rules("norm_f", "transformer.ln_f", cfg)
    return rules + _head_rules(cfg)


# GPT-NeoX --------------------------------------------------------------------------------------


def _neox_to_lm(d: dict[str, Any]) -> ModelConfig:
    theta, frac = _rope(d)
    return ModelConfig(
        family="gpt-neox", vocab_size=d["vocab_size"], block_size=d.get("max_position_embeddings", 2048),
        n_layer=d["num_hidden_layers"], n_embd=d["hidden_size"], n_head=d["num_attention_heads"],
        mlp=_act(d.get("hidden_act", "gelu")), intermediate_size=d["intermediate_size"], norm="layernorm",
        norm_eps=d.get("layer_norm_eps", 1e-5), position="rope", rope_theta=theta, rotary_fraction=frac,
        parallel_block=d.get("use_parallel_residual", True), parallel_shared_norm=False,
        qkv_bias=d.get("attention_bias", True), attn_out_bias=d.get("attention_bias", True), mlp_bias=True,
        tie_embeddings=d.get("tie_word_embeddings", False), **_tokens(d),
    )


def _neox_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size, "num_hidden_layers": cfg.n_layer,
            "hidden_size": cfg.n_embd, "num_attention_heads": cfg.n_head, "hidden_act": LM_ACTS[cfg.mlp],
            "intermediate_size": cfg.hidden_size, "layer_norm_eps": cfg.norm_eps, **_rope_hf(cfg, partial=True),
            "rotary_pct": cfg.rotary_fraction, "use_parallel_residual": cfg.parallel_block,
            "attention_bias": cfg.qkv_bias, "tie_word_embeddings": cfg.tie_embeddings, "hidden_dropout": 0.0,
            "attention_dropout": 0.0, **_tokens_hf(cfg)}


def _neox_rules(cfg: ModelConfig) -> list[Rule]:
    nh, hd = cfg.n_head, cfg.head_size

    def layer(lm: str, hf: str) -> list[Rule]:
        return [
            *_norm_rules(lm + "norm1", hf + "input_layernorm", cfg),
            *_norm_rules(lm + "norm2", hf + "post_attention_layernorm", cfg),
            *_lin(lm + "attn.qkv", hf + "attention.query_key_value", False, _heads_join(nh, hd), _heads_split(nh, hd)),
            *([Rule(lm + "attn.qkv.bias", [hf + "attention.query_key_value.bias"], _heads_join(nh, hd),
                    _heads_split(nh, hd))] if cfg.qkv_bias else []),
            *_lin(lm + "attn.proj", hf + "attention.dense", cfg.attn_out_bias),
            *_lin(lm + "mlp.fc1", hf + "mlp.dense_h_to_4h", True),
            *_lin(lm + "mlp.fc2", hf + "mlp.dense_4h_to_h", True),
        ]

    rules = [Rule("wte.weight", ["gpt_neox.embed_in.weight"])] + _layer_rules(cfg, layer, "gpt_neox.layers.{i}.")
    return rules + _norm_rules("norm_f", "gpt_neox.final_layer_norm", cfg) + _head_rules(cfg)


# GPT-J -----------------------------------------------------------------------------------------


def _gptj_to_lm(d: dict[str, Any]) -> ModelConfig:
    hd = d["n_embd"] // d["n_head"]
    return ModelConfig(
        family="gpt-j", vocab_size=d["vocab_size"], block_size=d.get("n_positions", 2048), n_layer=d["n_layer"],
        n_embd=d["n_embd"], n_head=d["n_head"], mlp=_act(d.get("activation_function", "gelu_new")),
        intermediate_size=d.get("n_inner") or 4 * d["n_embd"], norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5), position="rope",
        rotary_fraction=(d.get("rotary_dim") or hd) / hd, rope_interleaved=True, parallel_block=True,
        parallel_shared_norm=True, mlp_bias=True, lm_head_bias=True,
        tie_embeddings=d.get("tie_word_embeddings", False), **_tokens(d),
    )


def _gptj_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "n_head": cfg.n_head, "activation_function": LM_ACTS[cfg.mlp], "n_inner": cfg.hidden_size,
            "layer_norm_epsilon": cfg.norm_eps, "rotary_dim": cfg.rotary_dim, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "tie_word_embeddings": cfg.tie_embeddings, **_tokens_hf(cfg)}


def _gptj_rules(cfg: ModelConfig) -> list[Rule]:
    qkv = [cfg.n_head * cfg.head_size] * 3

    def layer(lm: str, hf: str) -> list[Rule]:
        return [
            *_norm_rules(lm + "norm1", hf + "ln_1", cfg),
            Rule(lm + "attn.qkv.weight", [hf + f"attn.{p}_proj.weight" for p in "qkv"], _cat, _splitter(qkv)),
            Rule(lm + "attn.proj.weight", [hf + "attn.out_proj.weight"]),
            *_lin(lm + "mlp.fc1", hf + "mlp.fc_in", True),
            *_lin(lm + "mlp.fc2", hf + "mlp.fc_out", True),
        ]

    rules = [Rule("wte.weight", ["transformer.wte.weight"])] + _layer_rules(cfg, layer, "transformer.h.{i}.")
    return rules + _norm_rules("norm_f", "transformer.ln_f", cfg) + _head_rules(cfg)


# Falcon (PaLM's layout: parallel attention + MLP, multi-query) ---------------------------------


def _falcon_to_lm(d: dict[str, Any]) -> ModelConfig:
    theta, _ = _rope(d)
    nh = d["num_attention_heads"]
    new = d.get("new_decoder_architecture", False)
    n_kv = d.get("num_kv_heads", nh) if new else (1 if d.get("multi_query", True) else nh)
    return ModelConfig(
        family="falcon", vocab_size=d["vocab_size"], block_size=d.get("max_position_embeddings", 2048),
        n_layer=d["num_hidden_layers"], n_embd=d["hidden_size"], n_head=nh, n_kv_head=n_kv,
        mlp=_act(d.get("activation", "gelu")), intermediate_size=d.get("ffn_hidden_size") or 4 * d["hidden_size"],
        norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
        position="alibi" if d.get("alibi") else "rope", rope_theta=theta,
        parallel_block=d.get("parallel_attn", True) or new,
        parallel_shared_norm=not (new and d.get("num_ln_in_parallel_attn", 2) == 2),
        qkv_bias=d.get("bias", False), attn_out_bias=d.get("bias", False), mlp_bias=d.get("bias", False),
        tie_embeddings=d.get("tie_word_embeddings", True), **_tokens(d),
    )


def _falcon_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    new = cfg.kv_heads not in (1, cfg.n_head) or not cfg.parallel_shared_norm
    return {"vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
            "num_hidden_layers": cfg.n_layer, "hidden_size": cfg.n_embd, "num_attention_heads": cfg.n_head,
            "num_kv_heads": cfg.kv_heads, "new_decoder_architecture": new, "multi_query": cfg.kv_heads == 1,
            "num_ln_in_parallel_attn": 1 if cfg.parallel_shared_norm else 2,
            "activation": LM_ACTS[cfg.mlp], "ffn_hidden_size": cfg.hidden_size, "layer_norm_epsilon": cfg.norm_eps,
            "alibi": cfg.position == "alibi", **_rope_hf(cfg), "parallel_attn": cfg.parallel_block,
            "bias": cfg.qkv_bias, "tie_word_embeddings": cfg.tie_embeddings, "hidden_dropout": 0.0,
            "attention_dropout": 0.0, **_tokens_hf(cfg)}


def _falcon_rules(cfg: ModelConfig) -> list[Rule]:
    nh, nkv, hd = cfg.n_head, cfg.kv_heads, cfg.head_size
    new = nkv not in (1, nh) or not cfg.parallel_shared_norm
    if new:
        join, split = _groups_join(nh, nkv, hd), _groups_split(nh, nkv, hd)
    elif nkv == nh:
        join, split = _heads_join(nh, hd), _heads_split(nh, hd)
    else:
        join, split = _first, _single

    def layer(lm: str, hf: str) -> list[Rule]:
        if new and not cfg.parallel_shared_norm:
            norms = _norm_rules(lm + "norm1", hf + "ln_attn", cfg) + _norm_rules(lm + "norm2", hf + "ln_mlp", cfg)
        else:
            norms = _norm_rules(lm + "norm1", hf + "input_layernorm", cfg)
            if not cfg.parallel_block:
                norms += _norm_rules(lm + "norm2", hf + "post_attention_layernorm", cfg)
        b = cfg.qkv_bias
        return [
            *norms,
            Rule(lm + "attn.qkv.weight", [hf + "self_attention.query_key_value.weight"], join, split),
            *([Rule(lm + "attn.qkv.bias", [hf + "self_attention.query_key_value.bias"], join, split)] if b else []),
            *_lin(lm + "attn.proj", hf + "self_attention.dense", b),
            *_lin(lm + "mlp.fc1", hf + "mlp.dense_h_to_4h", b),
            *_lin(lm + "mlp.fc2", hf + "mlp.dense_4h_to_h", b),
        ]

    rules = [Rule("wte.weight", ["transformer.word_embeddings.weight"])]
    rules += _layer_rules(cfg, layer, "transformer.h.{i}.")
    return rules + _norm_rules("norm_f", "transformer.ln_f", cfg) + _head_rules(cfg)


# BLOOM -----------------------------------------------------------------------------------------


def _bloom_to_lm(d: dict[str, Any]) -> ModelConfig:
    if d.get("apply_residual_connection_post_layernorm"):
        raise LMForgeError("config.json: BLOOM with apply_residual_connection_post_layernorm=true is not supported")
    return ModelConfig(
        family="bloom", vocab_size=d["vocab_size"], block_size=d.get("seq_length", 2048),
        n_layer=d.get("n_layer", d.get("num_hidden_layers")), n_embd=d.get("hidden_size", d.get("n_embed")),
        n_head=d.get("n_head", d.get("num_attention_heads")), mlp="gelu_tanh", norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5), position="alibi", embedding_norm=True, qkv_bias=True,
        attn_out_bias=True, mlp_bias=True, tie_embeddings=d.get("tie_word_embeddings", True), **_tokens(d),
    )


def _bloom_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "seq_length": cfg.block_size, "n_layer": cfg.n_layer,
            "hidden_size": cfg.n_embd, "n_head": cfg.n_head, "layer_norm_epsilon": cfg.norm_eps,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
            **_tokens_hf(cfg)}


def _bloom_rules(cfg: ModelConfig) -> list[Rule]:
    nh, hd = cfg.n_head, cfg.head_size
    j, s = _heads_join(nh, hd), _heads_split(nh, hd)

    def layer(lm: str, hf: str) -> list[Rule]:
        return [
            *_norm_rules(lm + "norm1", hf + "input_layernorm", cfg),
            Rule(lm + "attn.qkv.weight", [hf + "self_attention.query_key_value.weight"], j, s),
            Rule(lm + "attn.qkv.bias", [hf + "self_attention.query_key_value.bias"], j, s),
            *_lin(lm + "attn.proj", hf + "self_attention.dense", True),
            *_norm_rules(lm + "norm2", hf + "post_attention_layernorm", cfg),
            *_lin(lm + "mlp.fc1", hf + "mlp.dense_h_to_4h", True),
            *_lin(lm + "mlp.fc2", hf + "mlp.dense_4h_to_h", True),
        ]

    rules = [Rule("wte.weight", ["transformer.word_embeddings.weight"])]
    rules += _norm_rules("emb_norm", "transformer.word_embeddings_layernorm", cfg)
    rules += _layer_rules(cfg, layer, "transformer.h.{i}.")
    return rules + _norm_rules("norm_f", "transformer.ln_f", cfg) + _head_rules(cfg)


# LLaMA, Qwen2, Mistral, GLM (transformers' GlmForCausalLM) --------------------------------------


def _llama_to_lm(d: dict[str, Any], family: str) -> ModelConfig:
    theta, frac = _rope(d)
    nh = d["num_attention_heads"]
    attn_bias = d.get("attention_bias", family in ("qwen2", "glm"))
    if d.get("use_sliding_window"):
        raise LMForgeError("config.json: sliding-window attention is not supported")
    context = d.get("max_position_embeddings", 2048)
    window = d.get("sliding_window") if family == "mistral" else None
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < context:
        context = window  # within its window, sliding attention is dense attention: exact up to that length
    return ModelConfig(
        family=family, vocab_size=d["vocab_size"], block_size=context,
        n_layer=d["num_hidden_layers"], n_embd=d["hidden_size"], n_head=nh,
        n_kv_head=d.get("num_key_value_heads") or nh, head_dim=d.get("head_dim"), mlp="swiglu"
        if _act(d.get("hidden_act", "silu")) == "silu" else "geglu", intermediate_size=d["intermediate_size"],
        norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), position="rope", rope_theta=theta,
        rotary_fraction=frac if family == "glm" else 1.0, rope_interleaved=family == "glm", qkv_bias=attn_bias,
        attn_out_bias=attn_bias and family == "llama", mlp_bias=d.get("mlp_bias", False),
        tie_embeddings=d.get("tie_word_embeddings", False), **_tokens(d),
    )


def _llama_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
    d = {"vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size, "num_hidden_layers": cfg.n_layer,
         "hidden_size": cfg.n_embd, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
         "head_dim": cfg.head_size, "hidden_act": "silu" if cfg.mlp == "swiglu" else "gelu",
         "intermediate_size": cfg.hidden_size, "rms_norm_eps": cfg.norm_eps,
         **_rope_hf(cfg, partial=family == "glm"), "tie_word_embeddings": cfg.tie_embeddings,
         "attention_dropout": 0.0, **_tokens_hf(cfg)}
    if family in ("llama", "glm"):
        d["attention_bias"] = cfg.qkv_bias
    if family == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    if family == "glm":
        d["partial_rotary_factor"] = cfg.rotary_fraction
    return d


def _llama_rules(cfg: ModelConfig, fused_mlp: bool = False) -> list[Rule]:
    nq, nkv = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    qkv_split = _splitter([nq, nkv, nkv])
    h = cfg.hidden_size

    def layer(lm: str, hf: str) -> list[Rule]:
        a = hf + "self_attn."
        rules = [
            *_norm_rules(lm + "norm1", hf + "input_layernorm", cfg),
            Rule(lm + "attn.qkv.weight", [a + f"{p}_proj.weight" for p in "qkv"], _cat, qkv_split),
            *([Rule(lm + "attn.qkv.bias", [a + f"{p}_proj.bias" for p in "qkv"], _cat, qkv_split)]
              if cfg.qkv_bias else []),
            *_lin(lm + "attn.proj", a + "o_proj", cfg.attn_out_bias),
            *_norm_rules(lm + "norm2", hf + "post_attention_layernorm", cfg),
            *_lin(lm + "mlp.fc2", hf + "mlp.down_proj", cfg.mlp_bias),
        ]
        if fused_mlp:
            rules += _lin(lm + "mlp.fc1", hf + "mlp.gate_up_proj", cfg.mlp_bias)
        else:
            rules.append(Rule(lm + "mlp.fc1.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"], _cat,
                              _splitter([h, h])))
            if cfg.mlp_bias:
                rules.append(Rule(lm + "mlp.fc1.bias", [hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"], _cat,
                                  _splitter([h, h])))
        return rules

    rules = [Rule("wte.weight", ["model.embed_tokens.weight"])] + _layer_rules(cfg, layer, "model.layers.{i}.")
    return rules + _norm_rules("norm_f", "model.norm", cfg) + _head_rules(cfg)


ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch("openai-gpt", "OpenAIGPTLMHeadModel", lambda d: _gpt_to_lm(d, True, "afn"),
             lambda c: _gpt_to_hf(c, True), lambda c: _gpt_rules(c, "tokens_embed", "positions_embed")),
        Arch("gpt2", "GPT2LMHeadModel", lambda d: _gpt_to_lm(d, False, "activation_function"),
             lambda c: _gpt_to_hf(c, False), lambda c: _gpt_rules(c, "wte", "wpe")),
        Arch("gpt_neox", "GPTNeoXForCausalLM", _neox_to_lm, _neox_to_hf, _neox_rules,
             aliases={"embed_out.weight": "lm_head.weight"}),
        Arch("gptj", "GPTJForCausalLM", _gptj_to_lm, _gptj_to_hf, _gptj_rules),
        Arch("falcon", "FalconForCausalLM", _falcon_to_lm, _falcon_to_hf, _falcon_rules),
        Arch("bloom", "BloomForCausalLM", _bloom_to_lm, _bloom_to_hf, _bloom_rules),
        Arch("llama", "LlamaForCausalLM", lambda d: _llama_to_lm(d, "llama"), lambda c: _llama_to_hf(c, "llama"),
             _llama_rules),
        Arch("mistral", "MistralForCausalLM", lambda d: _llama_to_lm(d, "mistral"),
             lambda c: _llama_to_hf(c, "mistral"), _llama_rules),
        Arch("qwen2", "Qwen2ForCausalLM", lambda d: _llama_to_lm(d, "qwen2"), lambda c: _llama_to_hf(c, "qwen2"),
             _llama_rules),
        Arch("glm", "GlmForCausalLM", lambda d: _llama_to_lm(d, "glm"), lambda c: _llama_to_hf(c, "glm"),
             lambda c: _llama_rules(c, fused_mlp=True)),
    ]
}

# Fields that decide the computation; export requires them to survive lmforge -> HF -> lmforge unchanged.
_SHAPE_FIELDS = ("vocab_size", "n_layer", "n_embd", "n_head", "kv_heads", "head_size", "mlp", "hidden_size", "norm",
                 "norm_eps", "norm_bias", "norm_placement", "final_norm", "position", "rope_theta", "rotary_dim",
                 "rope_interleaved", "parallel_block", "parallel_shared_norm", "attn_pattern", "attn_scale",
                 "qkv_bias", "attn_out_bias", "mlp_bias", "lm_head_bias", "tie_embeddings", "embedding_norm",
                 "embedding_scale", "rmsnorm_unit_offset")
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias")


def guess_arch(cfg: ModelConfig) -> Arch:
    """The transformers architecture that computes what ``cfg`` computes."""
    hf_type = cfg.extra.get("hf_model_type")
    if hf_type in ARCHS:
        return ARCHS[hf_type]
    if cfg.position == "learned":
        name = "openai-gpt" if cfg.norm_placement == "post" else "gpt2"
    elif cfg.position == "alibi":
        name = "bloom"
    elif cfg.parallel_block:
        name = "gpt_neox" if not cfg.parallel_shared_norm else ("gptj" if cfg.rope_interleaved else "falcon")
    elif cfg.rope_interleaved:
        name = "glm"
    else:
        name = "qwen2" if cfg.qkv_bias and not cfg.attn_out_bias else "llama"
    return ARCHS[name]


def check_exportable(cfg: ModelConfig, arch: Arch) -> None:
    try:
        back = arch.to_lm(arch.to_hf(cfg))
    except (KeyError, LMForgeError) as e:
        raise LMForgeError(f"cannot export {cfg.name!r} as HF {arch.model_type}: no equivalent for {e}") from None
    diff = [f"{k}={getattr(cfg, k)!r} (HF {arch.model_type} gives {getattr(back, k)!r})"
            for k in _SHAPE_FIELDS if getattr(cfg, k) != getattr(back, k)]
    if diff:
        raise LMForgeError(f"cannot export {cfg.name!r} as HF {arch.model_type}: " + "; ".join(diff))


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> tuple[ModelConfig, Arch]:
    mt = d.get("model_type")
    if mt not in ARCHS:
        raise LMForgeError(f"{source}: unknown architecture model_type={mt!r}; supported: {sorted(ARCHS)}")
    try:
        cfg = ARCHS[mt].to_lm(d)
    except KeyError as e:
        raise LMForgeError(f"{source}: missing field {e.args[0]!r} for model_type={mt!r}") from None
    except ConfigFieldError as e:
        raise named_as_in_file(e, d, source) from None
    cfg.name = d.get("_name_or_path") or mt
    cfg.extra["hf_model_type"] = mt
    return cfg, ARCHS[mt]


def state_dict_from_hf(hf_sd: dict[str, Tensor], cfg: ModelConfig, arch: Arch, source: str) -> dict[str, Tensor]:
    hf_sd = {arch.aliases.get(k, k): v for k, v in hf_sd.items()}
    # some checkpoints keep a "base_model." style prefix (e.g. exported without the LM head wrapper)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for r in arch.rules(cfg):
        missing = [k for k in r.hf if k not in hf_sd]
        if missing:
            raise LMForgeError(f"{source}: tensor {missing[0]!r} is missing (model_type={arch.model_type})")
        out[r.lm] = r.join([hf_sd[k] for k in r.hf])
        used.update(r.hf)
    extra = [k for k in hf_sd if k not in used and not k.endswith(_BUFFER_SUFFIXES)]
    extra = [k for k in extra if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if extra:
        raise LMForgeError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unused) for "
                           f"model_type={arch.model_type}; does config.json match the weights?")
    return out


def state_dict_to_hf(sd: dict[str, Tensor], cfg: ModelConfig, arch: Arch) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for r in arch.rules(cfg):
        for k, t in zip(r.hf, r.split(sd[r.lm])):
            out[k] = t.contiguous()
    return out


def hf_config_dict(cfg: ModelConfig, arch: Arch) -> dict[str, Any]:
    d = arch.to_hf(cfg)
    d.update({"model_type": arch.model_type, "architectures": [arch.architecture], "torch_dtype": "float32"})
    return d


def read_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read a HF checkpoint directory (config.json + safetensors, sharded or not, or weights-only .bin)."""
    cfg_path = path / "config.json"
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{cfg_path}: cannot read: {e}") from None
    cfg, arch = config_from_hf(d, str(cfg_path))
    cfg.name = path.name
    gen_path = path / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{gen_path}: cannot read: {e}") from None
    ends = _end_ids(d.get("eos_token_id"), gen.get("eos_token_id") if isinstance(gen, dict) else None)
    if cfg.eos_id is None and ends:  # (some models name their end only in generation_config.json)
        cfg.eos_id = ends[0]
    if len(ends) > 1:  # several ends (Llama 3's, Qwen2.5's): generation stops at each; kept for the export
        cfg.extra[END_IDS] = ends
    hf_sd = read_weights(path)
    return cfg, state_dict_from_hf(hf_sd, cfg, arch, str(path))


def read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = _weight_files(path, "model.safetensors", "*.safetensors")
    if files:
        sd: dict[str, Tensor] = {}
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError) as e:
                raise LMForgeError(f"{f}: cannot read safetensors: {e}") from None
        return sd
    bins = _weight_files(path, "pytorch_model.bin", "pytorch_model*.bin")
    if bins:
        sd = {}
        for f in bins:
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
                raise LMForgeError(f"{f}: cannot read weights (weights_only): {e}") from None
        return sd
    raise LMForgeError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")


def _weight_files(path: Path, single: str, pattern: str) -> list[Path]:
    """The weight files transformers loads from ``path``: ``single`` where it exists, else the shards its index
    names, else (no index) every file matching ``pattern``. Other weight files beside them are not the model's:
    Mistral's repositories also ship consolidated.safetensors (its own names for the same weights), a PEFT adapter
    may sit beside its base (adapter_model.safetensors); they were read with the model's and refused as unexpected
    tensors, or a stale shard's tensors mixed in."""
    if (path / single).is_file():
        return [path / single]
    index = path / f"{single}.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LMForgeError(f"{index}: cannot read the weight map: {type(e).__name__}: {e}") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise LMForgeError(f"{index}: names {missing[0]}, which is not in {path} ({len(missing)} missing)")
        return [path / n for n in names]
    skip = ("consolidated", "adapter_model")
    return sorted(f for f in path.glob(pattern) if not f.name.startswith(skip))


def write_hf_dir(path: Path, cfg: ModelConfig, sd: dict[str, Tensor], tok=None) -> str | None:
    """A transformers directory: config.json, generation_config.json, model.safetensors, and with ``tok`` the
    tokenizer, whose special tokens config.json names (the ids text starts and ends at, not the model config's own).
    Returns a warning when transformers cannot read the tokenizer written (lmforge's own format only)."""
    from safetensors.torch import save_file

    from lmforge.model.weights import replace_dir

    if tok is not None:
        cfg = replace(cfg, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    arch = guess_arch(cfg)
    check_exportable(cfg, arch)
    hf_sd = state_dict_to_hf(sd, cfg, arch)
    # written whole in a directory beside ``path``, then renamed over it: an existing directory (--overwrite) is
    # replaced, none of its files kept (another model's chat_template.jinja, tokenizer or weight shards were)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(hf_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, arch), indent=2) + "\n")
        gen = {k: v for k, v in _tokens_hf(cfg).items() if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tok is not None:
            tok.save(str(tmp))
        replace_dir(tmp, path)  # (public_modes: safetensors writes 0600, the user's umask instead)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tok is None or (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
        return None
    kind = getattr(tok, "kind", "")
    return (f"{path}: the {kind} tokenizer is written in lmforge's format only: lmforge reads the directory, "
            "transformers' AutoTokenizer cannot (its weights and config load)")
