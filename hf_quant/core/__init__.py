"""The leaf of hf_quant: what a quantized weight is, its grid, packing and dequantization, and the
float layers it replaces. Imports nothing else from hf_quant (tests/test_architecture.py)."""

from . import gguf
from .dequant import MAX_WEIGHT, check_values, codes_by_group, dequantize_weight, zero_points
from .layout import QUANT_BUFFERS, buffer_specs, packed_bytes
from .packing import pack_codes, packed_in_features, unpack_codes
from .spec import SUPPORTED_BITS, LayerSpec, QuantizedWeight

__all__ = ["MAX_WEIGHT", "gguf", "QUANT_BUFFERS", "check_values", "SUPPORTED_BITS", "LayerSpec", "QuantizedWeight", "buffer_specs", "codes_by_group",
           "dequantize_weight", "pack_codes", "packed_bytes", "packed_in_features", "unpack_codes", "zero_points"]
