"""Weight-only quantization (W8A16 / W4A16): RTN, AWQ, GPTQ, runtime QuantLinear / QuantEmbedding modules,
checkpoints."""

from slimlm.quant.calibration import calibration_batches, calibration_text, eval_text, load_text
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.format import load_quantized_state, quantized_state_dict, save_quantized
from slimlm.quant.linear import QuantLinear, make_quant_linear
from slimlm.quant.quantize import (
    LayerInputs,
    capture_layer0_inputs,
    quantize_model,
    quantized_weight_bytes,
    run_layer,
)
from slimlm.quant.scheme import QuantizedWeight, check_scheme

__all__ = [
    "LayerInputs",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedWeight",
    "calibration_batches",
    "calibration_text",
    "capture_layer0_inputs",
    "check_scheme",
    "eval_text",
    "load_quantized_state",
    "load_text",
    "make_quant_linear",
    "quantize_model",
    "quantized_state_dict",
    "quantized_weight_bytes",
    "run_layer",
    "save_quantized",
]
