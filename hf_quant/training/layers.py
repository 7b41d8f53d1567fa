"""Trainable layers of the quantization-aware methods that are more than a weight grid: OneBit's signs with
two value vectors, and BitNet b1.58's ternary weights with int8 activations. Each holds latent float weights
(and its method's extra parameters), computes in its forward what the frozen layer will compute, passes
gradients through the rounding by a straight-through estimator, and gives `convert` the arguments of its
method's `quantize` (`state_for_convert`), so the frozen layer holds exactly the codes the last forward used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import LayerSpec, grid
from ..core.layers import is_conv1d, linear_weight
from ..methods import bitnet as bitnet_method
from ..methods import onebit as onebit_method
from ..runtime.activations import fake_quantize_int8_token
from ..runtime.quant_linear import OUTPUT_NORM_EPS


class TrainableLayer(nn.Module):
    """Common state: the latent weight (out, in) as a Parameter, the bias, and what `convert` needs."""

    def __init__(self, module: nn.Module, spec: LayerSpec, method: str, options: dict[str, Any]) -> None:
        super().__init__()
        W = linear_weight(module).detach()
        self.in_features, self.out_features = W.shape[1], W.shape[0]
        self.spec, self.method, self.options = spec, method, dict(options)
        self.from_conv1d = is_conv1d(module)
        self.scale_dtype = W.dtype if W.dtype.is_floating_point else torch.float32
        self.weight = nn.Parameter(W.clone().contiguous())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())

    def _bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def state_for_convert(self) -> dict[str, Any]:
        return {"W": self.weight.detach().float(), "scale_dtype": self.scale_dtype}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}")


class OneBitLinear(TrainableLayer):
    """y = LN(((x * g) @ sign(W)^T) * h) + bias (the LayerNorm when `output_norm`), with the latent W, g (in,)
    and h (out,) trained; sign passes its gradient straight through (|W| <= 1). g and h start from SVID (or
    absmean, `init`) of the float weight, computed in fp32 and stored in the weight's dtype."""

    def __init__(self, module: nn.Module, spec: LayerSpec, method: str, options: dict[str, Any]) -> None:
        super().__init__(module, spec, method, options)
        W = self.weight.detach()
        if W.is_meta:  # a checkpoint fills them
            h, g = torch.empty(W.shape[0], device="meta"), torch.empty(W.shape[1], device="meta")
        else:
            h, g = (onebit_method.svid if options.get("init", "svid") == "svid" else onebit_method.absmean_vectors)(W)
        self.h = nn.Parameter(h.to(W.dtype))
        self.g = nn.Parameter(g.to(W.dtype))
        self.output_norm = bool(options.get("output_norm", True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signs = grid.sign_ste(self.weight).to(x.dtype)
        y = F.linear(x * self.g.to(x.dtype), signs) * self.h.to(x.dtype)
        if self.output_norm:
            y = F.layer_norm(y, (self.out_features,), eps=OUTPUT_NORM_EPS)
        return self._bias(y)

    def state_for_convert(self) -> dict[str, Any]:
        return {**super().state_for_convert(), "h": self.h.detach().float(), "g": self.g.detach().float()}


class BitNetLinear(TrainableLayer):
    """y = Q_a(x) @ Q_w(W)^T + bias: W ternary on its absmean scale, x int8 per token (absmax), each passed
    through by a straight-through estimator and mixed in by `ramp` (lambda: 0 = float, 1 = fully quantized;
    the published fine-tuning recipes raise it from 0 to 1 over the first steps, `training.QuantRamp`)."""

    def __init__(self, module: nn.Module, spec: LayerSpec, method: str, options: dict[str, Any]) -> None:
        super().__init__(module, spec, method, options)
        self.ramp = 1.0  # a plain attribute: the step counter sets it (QuantRamp), checkpoints need not hold it

    def quantized_weight(self) -> torch.Tensor:
        W = self.weight.float()
        gamma = bitnet_method.absmean_scale(W, self.scale_dtype).detach()
        return bitnet_method.ternary(W, gamma) * gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = _ste(self.weight.float(), self.quantized_weight(), self.ramp)
        xq = _ste(x, fake_quantize_int8_token(x.detach(), 0.0), self.ramp)
        return self._bias(F.linear(xq, W.to(x.dtype)))


def _ste(t: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """lerp(t, q, lam) forward (exactly q at lam = 1, exactly t at 0), identity gradient to t."""
    t0 = t.detach()
    return torch.lerp(t0, q.detach().to(t.dtype), float(lam)) + (t - t0)
