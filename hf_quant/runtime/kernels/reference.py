"""Dequantize-then-matmul kernels, for any device, layout and scheme.

`reference` (fp32 dequantization, and the scheme's activation fake-quantization) is the oracle
every kernel is tested against and is only run when forced; `dequant_matmul` dequantizes into the
activation dtype and is the general fallback for weight-only layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...core import dequantize_weight
from ..scheme import fake_quantize_input
from .base import Kernel, register_kernel


class _AnyFloat(Kernel):
    gguf = True  # through dequantize_weight, which reads GGUF blocks
    one_bit = True  # and 1-bit signs

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point


class ReferenceKernel(_AnyFloat):
    """The oracle: fp32 dequantization. Never chosen automatically; force it with `use_kernel`.
    Runs every scheme: the input goes through the scheme's activation quantizer first."""

    name = "reference"
    priority = -1

    def runs(self, layer: Any, device: torch.device, dtype: torch.dtype, rows: int) -> bool:
        return self.accepts(layer, device, dtype)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features,
                              g_idx=layer.g_idx)
        bias = None if layer.kernel_bias is None else layer.kernel_bias.to(x.dtype)
        return F.linear(fake_quantize_input(layer.scheme, x), W.to(x.dtype), bias)


class DequantMatmulKernel(_AnyFloat):
    """Any device, layout and batch: dequantize into the activation dtype, then one `F.linear`.

    The fallback where no packed kernel applies, and the faster choice for large batches (prefill),
    where one dequantization is amortised over many rows.
    """

    name = "dequant_matmul"
    priority = 0
    measured = True  # a candidate of the measured CPU dispatch (cpu_measure.py) too

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features, x.dtype,
                              layer.g_idx)
        bias = None if layer.kernel_bias is None else layer.kernel_bias.to(x.dtype)
        return F.linear(x, W, bias)


register_kernel(ReferenceKernel())
register_kernel(DequantMatmulKernel())
