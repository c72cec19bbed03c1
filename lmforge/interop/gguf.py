"""llama.cpp GGUF files: LLaMA-architecture models (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors) and their tokenizers.

The container (``read_metadata``, ``read_tensors``), the exact numpy dequantization and the embedded tokenizers
live in ``lmforge.interop.gguf_file``, which needs no torch; their names are importable from here too. This module
builds the model: llama.cpp's converter permutes the query and key rows of LLaMA models for interleaved-pair rotary
(Meta's layout); lmforge rotates halves like Hugging Face, so the rows are permuted back on import (the exact inverse
of ``convert_hf_to_gguf.LlamaModel.permute``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.config import ConfigFieldError, ModelConfig, named_as_in_file
from lmforge.errors import LMForgeError
from lmforge.interop.gguf_file import (
    BF16,
    BYTE,
    CONTROL,
    F16,
    F32,
    NORMAL,
    PRE_TOKENIZERS,
    Q4_0,
    Q4_1,
    Q8_0,
    QK,
    TOKENIZER_FILE,
    TYPE_NAMES,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    GGUFBPETokenizer,
    GGUFSPMTokenizer,
    GGUFTensor,
    _opt_int,
    bytes_to_unicode,
    dequantize,
    gguf_block_weight_types,
    llama2c_tokenizer_metadata,
    load_gguf_tokenizer,
    read_metadata,
    read_tensors,
    tokenizer_from_metadata,
)
from lmforge.model.weights import build_model


def tensor_to_torch(t, source: str = "gguf") -> torch.Tensor:
    """A ``GGUFTensor`` (or a ``gguf.ReaderTensor``) as a float32 torch tensor in PyTorch's (outer, ..., inner)
    order."""
    shape = tuple(int(x) for x in reversed(list(t.shape)))  # GGUF lists ne0 (the contiguous dim) first
    try:
        flat = dequantize(t.data, int(t.tensor_type), int(t.n_elements))
    except ValueError as e:
        raise LMForgeError(f"{source}: tensor {t.name!r} ({getattr(t.tensor_type, 'name', t.tensor_type)}): "
                           f"{e}") from None
    return torch.from_numpy(flat.reshape(shape))


# ---- model ------------------------------------------------------------------------------------


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute: interleaved-pair rows back to rotate-half order."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute (rotate-half rows -> interleaved pairs); for writers and tests."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()


def _get(meta: dict[str, Any], key: str, source: str, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise LMForgeError(f"{source}: metadata field {key!r} is missing")
    return default


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LMForgeError(f"{source}: field general.architecture={arch!r}: only 'llama' GGUF models are supported")
    a = "llama."
    n_embd = int(_get(meta, a + "embedding_length", source))
    n_head = int(_get(meta, a + "attention.head_count", source))
    n_kv = int(_get(meta, a + "attention.head_count_kv", source, n_head))
    head_dim = int(meta.get(a + "attention.key_length", n_embd // n_head))
    if int(meta.get(a + "attention.value_length", head_dim)) != head_dim:
        raise LMForgeError(f"{source}: field {a}attention.value_length differs from key_length (not supported)")
    rot = int(meta.get(a + "rope.dimension_count", head_dim))
    scaling = meta.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise LMForgeError(f"{source}: field {a}rope.scaling.type={scaling!r}: rope scaling is not supported yet")
    vocab = int(meta.get(a + "vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
    if vocab <= 0:
        raise LMForgeError(f"{source}: no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)")
    tok = "tokenizer.ggml."
    try:
        return ModelConfig(
            name=str(meta.get("general.name", Path(source).stem)), family="llama", vocab_size=vocab,
            block_size=int(_get(meta, a + "context_length", source)),
            n_layer=int(_get(meta, a + "block_count", source)),
            n_embd=n_embd, n_head=n_head, n_kv_head=n_kv,
            head_dim=None if head_dim * n_head == n_embd else head_dim, mlp="swiglu",
            intermediate_size=int(_get(meta, a + "feed_forward_length", source)), norm="rmsnorm",
            norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)), position="rope",
            rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)), rotary_fraction=rot / head_dim,
            tie_embeddings="output.weight" not in tensor_names,
            bos_id=_opt_int(meta.get(tok + "bos_token_id")), eos_id=_opt_int(meta.get(tok + "eos_token_id")),
            pad_id=_opt_int(meta.get(tok + "padding_token_id")),
            extra={"hf_model_type": "llama", "source_format": "gguf", "gguf_file_type": meta.get("general.file_type")},
        )
    except ConfigFieldError as e:  # named as the file names it (llama.block_count, not n_layer)
        raise named_as_in_file(e, meta, source) from None


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, lmforge float32 state dict, metadata) of a LLaMA-architecture GGUF file."""
    path = Path(path)
    src = str(path)
    meta, found = read_tensors(path)
    tensors = {t.name: t for t in found}
    cfg = config_from_gguf(meta, set(tensors), src)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise LMForgeError(f"{src}: tensor {name!r} is missing")
        return tensor_to_torch(tensors.pop(name), src)

    sd = {"wte.weight": get("token_embd.weight"), "norm_f.weight": get("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("output.weight")
    for i in range(cfg.n_layer):
        g, p = f"blk.{i}.", f"blocks.{i}."
        q = _unpermute(get(g + "attn_q.weight"), cfg.n_head)
        k = _unpermute(get(g + "attn_k.weight"), cfg.kv_heads)
        sd[p + "norm1.weight"] = get(g + "attn_norm.weight")
        sd[p + "attn.qkv.weight"] = torch.cat([q, k, get(g + "attn_v.weight")])
        sd[p + "attn.proj.weight"] = get(g + "attn_output.weight")
        sd[p + "norm2.weight"] = get(g + "ffn_norm.weight")
        sd[p + "mlp.fc1.weight"] = torch.cat([get(g + "ffn_gate.weight"), get(g + "ffn_up.weight")])
        sd[p + "mlp.fc2.weight"] = get(g + "ffn_down.weight")
    tensors.pop("rope_freqs.weight", None)
    if tensors:
        extra = sorted(tensors)
        raise LMForgeError(f"{src}: unexpected tensor {extra[0]!r} ({len(extra)} unused); biases and other "
                           f"LLaMA variants are not supported")
    return cfg, sd, meta


def load_gguf_model(path: str | Path):
    """A float32 ``Decoder`` from a LLaMA-architecture GGUF file (quantized tensors dequantized exactly)."""
    cfg, sd, _ = read_gguf(path)
    return build_model(cfg, sd, str(path))


__all__ = [  # this module's model functions, and the public names that moved to gguf_file
    "BF16", "BYTE", "CONTROL", "F16", "F32", "NORMAL", "PRE_TOKENIZERS", "Q4_0", "Q4_1", "Q8_0", "QK", "TOKENIZER_FILE",
    "TYPE_NAMES", "UNKNOWN", "UNUSED", "USER_DEFINED", "GGUFBPETokenizer", "GGUFSPMTokenizer", "GGUFTensor",
    "bytes_to_unicode", "config_from_gguf", "dequantize", "gguf_block_weight_types",
    "llama2c_tokenizer_metadata", "load_gguf_model", "load_gguf_tokenizer", "read_gguf", "read_metadata",
    "read_tensors", "tensor_to_torch", "tokenizer_from_metadata",
]
