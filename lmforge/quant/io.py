"""Quantized checkpoints: config.json + quantization.json + model.safetensors (+ tokenizer files)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.manifest import verify_manifest, write_manifest
from lmforge.mapped import SafetensorsMap, write_aligned
from lmforge.model import Decoder
from lmforge.model.swap import set_module
from lmforge.model.weights import CONFIG, WEIGHTS, check_finite, reinit_buffers, replace_dir
from lmforge.quant.modules import QuantEmbedding, QuantLinear, head_is_tied, tie_head
from lmforge.quant.quantize import mark_head, set_compute
from lmforge.quant_config import FORMAT, QUANT_FILE, VERSION, QuantConfig, read_quant_config

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
_ST_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings and not isinstance(model.lm_head, QuantLinear):
        sd.pop("lm_head.weight", None)
    if head_is_tied(model):  # stored once, as the embedding table
        sd.pop("lm_head.qweight"), sd.pop("lm_head.scales")
    return sd


def save_quantized(model: nn.Module, path: str | Path, tokenizer=None, extra_files: list[Path] | None = None) -> Path:
    """Write config.json + quantization.json + model.safetensors (+ tokenizer files) into ``path`` atomically."""
    qcfg: QuantConfig | None = getattr(model, "quant_config", None)
    if qcfg is None:
        raise LMForgeError("save_quantized: the model is not quantized (run quantize_model first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.cfg.save(tmp / CONFIG)
        layers = [n for n, m in model.named_modules()
                  if isinstance(m, QuantLinear) and not (n == "lm_head" and head_is_tied(model))]
        meta = {"format": FORMAT, "version": VERSION, **asdict(qcfg), "layers": layers,
                "dequantize": "int8: w = q * scale[n]; int4: w = (q - 8) * scale[n, k // G] + zero[n, k // G]",
                "embedding_format": "int8, one scale per row (wte.qweight, wte.scales); a tied lm_head uses it",
                "int4_packing": "two per byte along K, even column in the low nibble; K zero-padded to G"}
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _save_weights(quantized_state_dict(model), tmp / WEIGHTS)
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        for f in extra_files or []:
            if not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        write_manifest(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    """``sd`` as a safetensors file whose tensors are 64-byte aligned (``lmforge.mapped.write_aligned``): loading
    maps it and uses its tensors in place."""
    tensors = {}
    for k, t in sd.items():
        t = t.detach().cpu().contiguous()
        tensors[k] = (_ST_DTYPES[t.dtype], tuple(t.shape), memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    write_aligned(path, tensors, {"format": "pt", "lmforge": FORMAT})


def _mapped_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` as views of a private (copy-on-write) mapping of it: nothing is
    read until used, and pages whose contents were copied into a kernel's layout can be given back
    (``lmforge.memory.drop_file_pages``). A tensor not 64-byte aligned in the file (files written before
    ``write_aligned``, or by other tools) is copied into memory of its own: PyTorch's packed kernels need the
    alignment."""
    wf = SafetensorsMap(path, writable=True)
    sd = {}
    for k in wf.header:
        dtype, shape, offset, nbytes = wf.entry(k)
        if dtype not in _TORCH_DTYPES:
            raise LMForgeError(f"{path}: tensor {k!r} has dtype {dtype}, which lmforge does not load")
        t = torch.frombuffer(wf.mm, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
        t = t.view(_TORCH_DTYPES[dtype]).view(shape)
        sd[k] = t if t.data_ptr() % 64 == 0 else t.clone()
    return sd


def load_quantized(path: str | Path, compute: str | None = None):
    """Load a directory written by ``save_quantized`` (``lmforge quantize``) into a Decoder with QuantLinear layers.
    Its weights stay on a mapping of the file (``_mapped_weights``)."""
    path = Path(path)
    problem = verify_manifest(path)  # (directories written before manifests were: none to check)
    if problem:
        raise LMForgeError(f"{path}: damaged quantized directory: {problem}")
    cfg = ModelConfig.load(path / CONFIG)
    qcfg, layers = read_quant_config(path)
    sd = _mapped_weights(path / WEIGHTS)
    with torch.device("meta"):
        model = Decoder(cfg)
    for name in layers:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise LMForgeError(f"{path / QUANT_FILE}: layer {name!r} does not exist in this config") from None
        if not isinstance(lin, nn.Linear):
            raise LMForgeError(f"{path / QUANT_FILE}: layer {name!r} is not a linear layer")
        set_module(model, name, QuantLinear(lin.in_features, lin.out_features, qcfg.bits, qcfg.group_size,
                                             qcfg.symmetric, lin.bias is not None, device="meta"))
    if qcfg.embedding:
        model.wte = QuantEmbedding(cfg.vocab_size, cfg.n_embd, device="meta")
    tied_quant = qcfg.embedding and cfg.tie_embeddings
    if tied_quant:
        tie_head(model)
    tied_float = cfg.tie_embeddings and "lm_head" not in layers and not tied_quant
    shared = {"lm_head.weight"} if tied_float else {"lm_head.qweight", "lm_head.scales"} if tied_quant else set()
    expected = {k: v for k, v in model.state_dict().items() if k not in shared}
    for k, v in expected.items():
        if k not in sd:
            raise LMForgeError(f"{path / WEIGHTS}: tensor {k!r} is missing")
        if tuple(sd[k].shape) != tuple(v.shape) or sd[k].dtype != v.dtype:
            raise LMForgeError(f"{path / WEIGHTS}: tensor {k!r} is {sd[k].dtype} {tuple(sd[k].shape)}; the config "
                               f"and quantization.json need {v.dtype} {tuple(v.shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise LMForgeError(f"{path / WEIGHTS}: unexpected tensor {extra[0]!r} ({len(extra)} unused)")
    check_finite(sd, str(path / WEIGHTS))
    # assign: the loaded tensors become the buffers (no meta-device allocation, see positions.py)
    model.load_state_dict(sd, strict=False, assign=True)
    if tied_float:
        model.lm_head.weight = model.wte.weight
    if tied_quant:
        tie_head(model)
    mark_head(model)
    reinit_buffers(model)
    model.quant_config = qcfg
    if compute is not None:
        set_compute(model, compute)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` stores (float or quantized; tied weights once)."""
    return sum(t.numel() * t.element_size() for t in quantized_state_dict(model).values())
