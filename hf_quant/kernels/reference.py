"""The oracle: dequantize the whole weight in fp32, then `F.linear`. Runs on any device and layout."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..config import LayerSpec
from ..formats.packing import unpack_codes
from .dispatch import Kernel, register_kernel


def zero_points(qzeros: torch.Tensor | None, spec: LayerSpec, like: torch.Tensor) -> torch.Tensor:
    """Per-group integer zero points as fp32 (out, n_groups); implicit 2**(bits-1) when symmetric."""
    if qzeros is None:
        return torch.full(like.shape, 2 ** (spec.bits - 1), dtype=torch.float32, device=like.device)
    return qzeros.float()


def dequantize_weight(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, spec: LayerSpec, in_features: int
) -> torch.Tensor:
    """W_hat = (q - zero) * scale, fp32 (out, in)."""
    q = unpack_codes(qweight, spec.bits, in_features).float()
    out_f = q.shape[0]
    gs = spec.effective_group_size(in_features)
    z = zero_points(qzeros, spec, scales)
    W = (q.reshape(out_f, -1, gs) - z.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return W.reshape(out_f, in_features)


class ReferenceKernel(Kernel):
    name = "reference"
    priority = 0

    def supports(self, layer: Any, x: torch.Tensor) -> bool:
        return x.is_floating_point()

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, W.to(x.dtype), bias)


register_kernel(ReferenceKernel())
