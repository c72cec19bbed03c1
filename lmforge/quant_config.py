"""``QuantConfig`` and the quantized checkpoint format's ``quantization.json``: its constants and reader (no PyTorch:
``lmforge.infer.lean`` reads it too)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LMForgeError

QUANT_FILE = "quantization.json"
FORMAT = "lmforge-weight-only"
VERSION = 1
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")


@dataclass
class QuantConfig:
    bits: int = 8
    group_size: int | None = None  # int4 only
    symmetric: bool = True
    lm_head: bool = False  # also quantize an untied output projection
    embedding: bool = True  # int8 token embedding table; a tied output projection shares it (int8 whatever bits is)
    method: str = "rtn"  # "rtn": round to nearest; "gptq": error-compensating GPTQ on calibration data (int4)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LMForgeError(f"--method {self.method!r}: allowed values are {list(METHODS)}")
        if self.method == "gptq" and self.bits != 4:
            raise LMForgeError("--method gptq: GPTQ is implemented for --bits 4; int8 uses round to nearest")
        if self.bits not in (4, 8):
            raise LMForgeError(f"--bits {self.bits}: allowed values are 8 and 4")
        if self.bits == 8:
            if not self.symmetric:
                raise LMForgeError("--asymmetric: int8 is symmetric per channel; asymmetric is for --bits 4")
            if self.group_size is not None:
                raise LMForgeError("--group-size: int8 uses one scale per output channel; groups are for --bits 4")
        elif self.group_size not in GROUP_SIZES:
            raise LMForgeError(f"--group-size {self.group_size}: allowed values are {list(GROUP_SIZES)}")


def read_quant_config(path: Path) -> tuple[QuantConfig, list[str]]:
    """The QuantConfig and quantized layer names of a quantized directory's quantization.json, checked."""
    f = Path(path) / QUANT_FILE
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{f}: cannot read: {e}") from None
    if not isinstance(d, dict):
        raise LMForgeError(f"{f}: expected a JSON object")
    if d.get("format") != FORMAT:
        raise LMForgeError(f"{f}: field format={d.get('format')!r}: expected {FORMAT!r}")
    if d.get("version") != VERSION:
        raise LMForgeError(f"{f}: field version={d.get('version')!r}: this lmforge reads version {VERSION}")
    for key in ("bits", "layers"):
        if key not in d:
            raise LMForgeError(f"{f}: missing field {key!r}")
    kinds = {"bits": int, "group_size": (int, type(None)), "symmetric": bool, "lm_head": bool, "embedding": bool,
             "method": str}
    for key, kind in kinds.items():
        if key in d and (not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool))):
            raise LMForgeError(f"{f}: field {key}={d[key]!r}: wrong type")
    layers = d["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise LMForgeError(f"{f}: field layers: expected a list of layer names")
    qcfg = QuantConfig(bits=d["bits"], group_size=d.get("group_size"), symmetric=d.get("symmetric", True),
                       lm_head=d.get("lm_head", False), embedding=d.get("embedding", False))
    try:
        qcfg.validate()
    except LMForgeError as e:
        msg = str(e)
        for flag, field in (("--group-size ", "group_size="), ("--bits ", "bits="), ("--method ", "method="),
                            ("--asymmetric", "symmetric=false"), ("--group-size", "group_size")):
            msg = msg.replace(flag, "field " + field, 1)
        raise LMForgeError(f"{f}: {msg}") from None
    return qcfg, list(layers)
