"""LLM.int8() (Dettmers et al. 2022): int8 weights with one absmax scale per output row, and at run
time int8 activations with one absmax scale per token, the few activation *outlier columns*
(any |x| >= threshold in the batch) computed apart in 16-bit against the same weight columns
dequantized. `threshold=0` turns the decomposition off: plain dynamic W8A8.

The weight grid is bitsandbytes' `int8_vectorwise_quant`, bit for bit: per row, absmax in fp32,
codes round(W * (127 / absmax)) in [-127, 127]. hf_quant stores code + 128 (8 bits, symmetric, zero
128) and the fp32 scale absmax / 127, so W_hat = (code - 128) * scale. The activation side is the
`int8_token` quantizer of `runtime.activations` (kernels in `runtime.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core import LayerSpec, QuantizedWeight
from .base import Options, check_non_negative_number, option, register_method

INT8_SPEC = {"bits": 8, "group_size": -1, "sym": True}


@dataclass
class LLMInt8Options(Options):
    threshold: float = option(6.0, check_non_negative_number("6.0"), strict=True,
                              help="LLM.int8: activation outlier threshold (0: no decomposition, plain W8A8)")


def int8_rowwise(W: torch.Tensor) -> QuantizedWeight:
    """bitsandbytes' vector-wise int8 of W (out, in): codes + 128 (uint8) and fp32 scales absmax / 127."""
    absmax = W.float().abs().amax(dim=1)
    codes = torch.round(W.float() * (127.0 / absmax).unsqueeze(1))
    codes = torch.nan_to_num(codes, nan=0.0)  # an all-zero row: absmax 0, every code 0
    scale = absmax / 127.0
    return QuantizedWeight(codes=(codes + 128).to(torch.uint8), scale=scale.unsqueeze(1), zero=None)


def int8_activation(threshold: float, **_: Any) -> tuple[str, dict[str, Any]]:
    return "int8_token", {"threshold": float(threshold)}


@register_method("llm_int8", needs_calibration=False, options=LLMInt8Options, activation=int8_activation,
                 fixed_spec=INT8_SPEC, scale_dtype=torch.float32,
                 description="LLM.int8() (int8 weights per row, int8 activations per token, outlier columns in 16-bit)")
def quantize_llm_int8(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, threshold: float = 6.0
                      ) -> QuantizedWeight:
    return int8_rowwise(W)
