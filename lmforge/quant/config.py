"""``QuantConfig`` and the constants of the quantized checkpoint format (``quantization.json``)."""

from __future__ import annotations

from dataclasses import dataclass

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
