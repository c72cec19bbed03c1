"""llama2.c model files: the legacy float32 ``.bin`` (read and write) and version-1 exports (read).

llama2.c stores Meta's interleaved-pair rotary layout; lmforge (like Hugging Face) rotates halves, so the query and
key rows are permuted on import and permuted back on export. Both directions are exact.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.files import public_modes

MAGIC_V1 = 0x616B3432  # "ak42"
HEADER = struct.Struct("7i")

LLAMA2C_EPS = 1e-5  # run.c's RMSNorm epsilon (not in the file)


def _to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved pairs to rotate-half order (HF's convert_llama permute)."""
    out, d = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d).transpose(1, 2).reshape(out, d)


def _to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, d = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d).transpose(1, 2).reshape(out, d)


def _config(dim: int, hidden: int, n_layers: int, n_heads: int, n_kv: int, vocab: int, seq_len: int,
            shared: bool, name: str) -> ModelConfig:
    return ModelConfig(
        name=name, family="llama", vocab_size=vocab, block_size=seq_len, n_layer=n_layers, n_embd=dim,
        n_head=n_heads, n_kv_head=n_kv, mlp="swiglu", intermediate_size=hidden, norm="rmsnorm", norm_eps=LLAMA2C_EPS,
        position="rope", tie_embeddings=shared, bos_id=1, eos_id=2,
        extra={"hf_model_type": "llama", "source_format": "llama2c"},
    )


def read_llama2c(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a llama2.c checkpoint into (config, lmforge state dict)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LMForgeError(f"{path}: cannot read: {e}") from None
    if len(raw) < HEADER.size:
        raise LMForgeError(f"{path}: truncated llama2.c file ({len(raw)} bytes, shorter than its header)")
    if struct.unpack_from("I", raw)[0] == MAGIC_V1:
        return _read_v1(path, raw)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(raw)
    shared = vocab > 0
    vocab = abs(vocab)
    _check_header(path, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)
    hd = dim // n_heads
    kv = n_kv * hd
    sizes = [
        ("tok", vocab * dim), ("att_norm", n_layers * dim), ("wq", n_layers * dim * dim),
        ("wk", n_layers * kv * dim), ("wv", n_layers * kv * dim), ("wo", n_layers * dim * dim),
        ("ffn_norm", n_layers * dim), ("w1", n_layers * hidden * dim), ("w2", n_layers * dim * hidden),
        ("w3", n_layers * hidden * dim), ("norm", dim), ("freqs", seq_len * hd),
    ]
    if not shared:
        sizes.append(("cls", vocab * dim))
    need = HEADER.size + 4 * sum(n for _, n in sizes)
    if len(raw) != need:
        what = "truncated" if len(raw) < need else "has trailing bytes"
        raise LMForgeError(f"{path}: {what}: the header (dim={dim}, layers={n_layers}, vocab={vocab}) needs "
                           f"{need} bytes, the file has {len(raw)}")
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=HEADER.size).copy())
    parts = dict(zip([k for k, _ in sizes], flat.split([n for _, n in sizes])))
    cfg = _config(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared, path.stem)
    L = n_layers
    layers = {
        "att_norm": parts["att_norm"].view(L, dim), "wq": parts["wq"].view(L, dim, dim),
        "wk": parts["wk"].view(L, kv, dim), "wv": parts["wv"].view(L, kv, dim), "wo": parts["wo"].view(L, dim, dim),
        "ffn_norm": parts["ffn_norm"].view(L, dim), "w1": parts["w1"].view(L, hidden, dim),
        "w2": parts["w2"].view(L, dim, hidden), "w3": parts["w3"].view(L, hidden, dim),
    }
    cls = None if shared else parts["cls"].view(vocab, dim)
    return cfg, _state_dict(cfg, parts["tok"].view(vocab, dim), layers, parts["norm"], cls)


def _read_v1(path: Path, raw: bytes) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    version = struct.unpack_from("i", raw, 4)[0]
    if version != 1:
        raise LMForgeError(f"{path}: llama2.c export version {version} is not supported (only legacy and version 1)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(raw, 8)
    shared = bool(raw[8 + HEADER.size])
    _check_header(path, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)
    hd, L = dim // n_heads, n_layers
    kv = n_kv * hd
    sizes = [("att_norm", L * dim), ("ffn_norm", L * dim), ("norm", dim), ("tok", vocab * dim),
             ("wq", L * dim * dim), ("wk", L * kv * dim), ("wv", L * kv * dim), ("wo", L * dim * dim),
             ("w1", L * hidden * dim), ("w2", L * dim * hidden), ("w3", L * hidden * dim)]
    if not shared:
        sizes.append(("cls", vocab * dim))
    need = 256 + 4 * sum(n for _, n in sizes)
    if len(raw) != need:
        raise LMForgeError(f"{path}: truncated or corrupt: header needs {need} bytes, the file has {len(raw)}")
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=256).copy())
    parts = dict(zip([k for k, _ in sizes], flat.split([n for _, n in sizes])))
    cfg = _config(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared, path.stem)
    shapes = {"att_norm": (dim,), "ffn_norm": (dim,), "wq": (dim, dim), "wk": (kv, dim), "wv": (kv, dim),
              "wo": (dim, dim), "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    layers = {k: parts[k].view(L, *s) for k, s in shapes.items()}
    cls = None if shared else parts["cls"].view(vocab, dim)
    return cfg, _state_dict(cfg, parts["tok"].view(vocab, dim), layers, parts["norm"], cls)


def _check_header(path: Path, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) -> None:
    ok = all(v > 0 for v in (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len))
    if not ok or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2 or dim > 1 << 16 or n_layers > 1024:
        raise LMForgeError(f"{path}: not a llama2.c model file (implausible header: dim={dim}, hidden={hidden}, "
                           f"layers={n_layers}, heads={n_heads}, kv_heads={n_kv}, vocab={vocab}, seq_len={seq_len})")


def _state_dict(cfg: ModelConfig, tok, layers, norm, cls) -> dict[str, torch.Tensor]:
    sd = {"wte.weight": tok.clone(), "norm_f.weight": norm.clone()}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        wq = _to_halves(layers["wq"][i], cfg.n_head)
        wk = _to_halves(layers["wk"][i], cfg.kv_heads)
        sd[p + "norm1.weight"] = layers["att_norm"][i].clone()
        sd[p + "attn.qkv.weight"] = torch.cat([wq, wk, layers["wv"][i]])
        sd[p + "attn.proj.weight"] = layers["wo"][i].clone()
        sd[p + "norm2.weight"] = layers["ffn_norm"][i].clone()
        sd[p + "mlp.fc1.weight"] = torch.cat([layers["w1"][i], layers["w3"][i]])
        sd[p + "mlp.fc2.weight"] = layers["w2"][i].clone()
    if cls is not None:
        sd["lm_head.weight"] = cls.clone()
    return sd


def check_llama2c_compatible(cfg: ModelConfig) -> None:
    wanted = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "norm_placement": "pre", "rotary_dim":
              cfg.head_size, "rope_theta": 10000.0, "rope_interleaved": False, "parallel_block": False,
              "qkv_bias": False, "attn_out_bias": False, "mlp_bias": False, "lm_head_bias": False,
              "final_norm": True, "embedding_norm": False, "attn_pattern": "dense", "head_size": cfg.n_embd //
              cfg.n_head}
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if bad:
        raise LMForgeError(f"cannot export {cfg.name!r} to llama2.c: " + "; ".join(bad))


def write_llama2c(path: str | Path, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> None:
    """Write llama2.c's legacy float32 format (run.c reads it). RMSNorm eps is fixed at 1e-5 there."""
    check_llama2c_compatible(cfg)
    path = Path(path)
    L, dim, hd = cfg.n_layer, cfg.n_embd, cfg.head_size
    nq, nkv, h = cfg.n_head * hd, cfg.kv_heads * hd, cfg.hidden_size
    blocks = [{k.split(".", 2)[2]: v.float() for k, v in sd.items() if k.startswith(f"blocks.{i}.")} for i in range(L)]
    qkv = [b["attn.qkv.weight"].split([nq, nkv, nkv]) for b in blocks]
    fc1 = [b["mlp.fc1.weight"].split([h, h]) for b in blocks]
    vocab = cfg.vocab_size if cfg.tie_embeddings else -cfg.vocab_size
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(cfg.block_size).float(), inv_freq)
    tensors = [
        sd["wte.weight"],
        *[b["norm1.weight"] for b in blocks],
        *[_to_pairs(q, cfg.n_head) for q, _, _ in qkv],
        *[_to_pairs(k, cfg.kv_heads) for _, k, _ in qkv],
        *[v for _, _, v in qkv],
        *[b["attn.proj.weight"] for b in blocks],
        *[b["norm2.weight"] for b in blocks],
        *[w1 for w1, _ in fc1],
        *[b["mlp.fc2.weight"] for b in blocks],
        *[w3 for _, w3 in fc1],
        sd["norm_f.weight"],
        freqs.cos(),
        freqs.sin(),
    ]
    if not cfg.tie_embeddings:
        tensors.append(sd["lm_head.weight"])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:  # (a failure left PATH.tmp behind, and a directory PATH made it 'PATH.tmp: Is a directory')
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.pack(dim, h, L, cfg.n_head, cfg.kv_heads, vocab, cfg.block_size))
            for t in tensors:
                f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())
        public_modes(Path(tmp))  # (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
