"""Weight-only quantization: formats and formulas (``packing``), modules (``modules``), whole models (``quantize``,
``gptq``) and checkpoints (``io``). The public names are re-exported here."""

from lmforge.infer.clib import REFINE_TOP
from lmforge.quant.gptq import gptq_int4, gptq_model, self_calibration
from lmforge.quant.io import load_quantized, quantized_state_dict, read_quant_config, save_quantized, weight_bytes
from lmforge.quant.modules import (
    COMPUTE_MODES,
    DECODE_ROWS,
    QuantEmbedding,
    QuantLinear,
    head_is_tied,
    tie_head,
)
from lmforge.quant.packing import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    padded_k,
    quantize_int4,
    quantize_int8,
    refit_int4_params,
    search_int4_params,
    unpack_int4,
)
from lmforge.quant.quantize import mark_head, quantizable_layers, quantize_model, set_compute, weight_count
from lmforge.quant_config import FORMAT, GROUP_SIZES, METHODS, QUANT_FILE, VERSION, QuantConfig

__all__ = [
    "COMPUTE_MODES", "DECODE_ROWS", "FORMAT", "GROUP_SIZES", "METHODS", "QUANT_FILE", "REFINE_TOP", "VERSION",
    "QuantConfig", "QuantEmbedding", "QuantLinear", "dequantize_int4", "dequantize_int8", "gptq_int4", "gptq_model",
    "head_is_tied", "load_quantized", "mark_head", "pack_int4", "padded_k", "quantizable_layers", "quantize_int4",
    "quantize_int8", "quantize_model", "quantized_state_dict", "read_quant_config", "refit_int4_params",
    "save_quantized", "search_int4_params", "self_calibration", "set_compute", "tie_head", "unpack_int4",
    "weight_bytes", "weight_count",
]
