"""Trainable fake-quantized linear: a latent float weight that every forward pass rounds onto its
quantization grid through a straight-through estimator, so the loss sees the quantized layer and the
gradient reaches the latent weight (quantization-aware training)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import LayerSpec, grid
from ..core.layers import is_conv1d, linear_weight


def rtn_grid_ste(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """RTN's grid in differentiable form: each group's min/max grid found from the current weights
    (no gradient through the grid), the rounding passed straight through. Its codes are exactly
    those RTN computes for the same weights, so `convert` loses nothing."""
    Wg = grid.group(W, spec)
    scale, zero = grid.find_params(Wg.detach(), spec, scale_dtype)
    return grid.fake_quantize_ste(Wg, scale, zero, spec.maxq).reshape(W.shape)


class FakeQuantLinear(nn.Module):
    """y = x @ Q_ste(W).T + bias with a trainable latent `weight` (out, in)."""

    def __init__(self, module: nn.Module, spec: LayerSpec, method: str,
                 fake_quantize: Callable[[torch.Tensor, LayerSpec, torch.dtype], torch.Tensor]) -> None:
        super().__init__()
        W = linear_weight(module).detach()
        self.in_features, self.out_features = W.shape[1], W.shape[0]
        self.spec, self.method, self.fake_quantize = spec, method, fake_quantize
        self.from_conv1d = is_conv1d(module)
        self.scale_dtype = W.dtype if W.dtype.is_floating_point else torch.float32
        self.weight = nn.Parameter(W.clone().contiguous())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())

    def quantized_weight(self) -> torch.Tensor:
        return self.fake_quantize(self.weight.float(), self.spec, self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}, method={self.method}")

    def state_for_convert(self) -> dict[str, Any]:
        return {"W": self.weight.detach().float(), "scale_dtype": self.scale_dtype}


