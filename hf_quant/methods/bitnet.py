"""BitNet b1.58 (Ma et al., 2024): ternary weights {-1, 0, +1} times one absmean scale per matrix, and
int8 activations per token (absmax), both at run time and in training.

  gamma = mean |W| (rounded to the model dtype, as stored);  w_t = clamp(round(W / gamma), -1, 1)  (eq. 1-3)
  x_q = round(x * 127 / max|x|) per token  (the `int8_token` activation quantizer, threshold 0)

Stored as 2-bit symmetric codes w_t + 2 in {1, 2, 3} (zero 2) with gamma in every row's scale; the
int8_token kernels compute the product in integers (int8 activations x ternary weights, int32 sums). Rounding
a trained float model this way loses most of it: BitNet is trained afterwards (`hf_quant.training.prepare`,
with the quantization ramped in), and `convert` stores the latent weights' ternary codes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import LayerSpec, QuantizedWeight
from .base import register_method

BITNET_SPEC = {"bits": 2, "group_size": -1, "sym": True}


def absmean_scale(W: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """gamma = mean|W| over the whole matrix, rounded to `scale_dtype` (the smallest normal for an all-zero
    W), as fp32 (a 0-dim tensor); differentiable in W."""
    finfo = torch.finfo(scale_dtype)
    gamma = W.float().abs().mean().clamp(min=finfo.tiny, max=finfo.max)
    return gamma + (gamma.to(scale_dtype).float() - gamma).detach()


def ternary(W: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """clamp(round(W / gamma), -1, 1) in fp32."""
    return torch.clamp(torch.round(W.float() / gamma), -1, 1)


def int8_activation(**_: Any) -> tuple[str, dict[str, Any]]:
    return "int8_token", {"threshold": 0.0}


@register_method("bitnet", needs_calibration=False, activation=int8_activation, fixed_spec=BITNET_SPEC,
                 strict_spec=True,
                 description="BitNet b1.58 (ternary absmean weights, int8 activations; train with hf_quant.training)")
def quantize_bitnet(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> QuantizedWeight:
    gamma = absmean_scale(W, scale_dtype).detach()
    codes = (ternary(W, gamma) + 2).to(torch.uint8)
    return QuantizedWeight(codes=codes, scale=gamma.to(scale_dtype).expand(W.shape[0], 1).contiguous(), zero=None)
