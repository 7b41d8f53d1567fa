"""OmniQuant's learnable weight clipping (Shao et al., 2023), weight-only.

Each group's grid spans [sigmoid(beta) * min(W_g), sigmoid(gamma) * max(W_g)] (eq. 2), with gamma and
beta learned per group to minimise the block's output error against the float block (eq. 1), by
AdamW through a straight-through estimator for the rounding. The training loop runs in the
block-wise driver (`hf_quant.calibration.stages`); here is the differentiable fake quantizer and
the final quantization with the learned factors: "omniquant" (round-to-nearest on the learned
grids) and "omniquant+gptq" (GPTQ on them).
"""

from __future__ import annotations

import torch

from ..config import LayerSpec
from . import QuantizedWeight, grid, register_method
from .gptq import quantize_gptq
from .rtn import round_to_nearest

LWC_INIT = 4.0  # sigmoid(4) = 0.982: training starts from (nearly) the full range, as in the paper


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward."""
    return x + (torch.round(x) - x).detach()


def lwc_fake_quantize(W: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """W_hat (out, in) on grids clipped by sigmoid(gamma), sigmoid(beta) (out, n_groups); differentiable."""
    Wg = grid.group(W, spec)
    hi, lo = torch.sigmoid(gamma), torch.sigmoid(beta)
    if spec.sym:
        xmax = hi * Wg.abs().amax(-1)
        scale = (2 * xmax / spec.maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        xmax, xmin = hi * Wg.amax(-1).clamp(min=0), lo * Wg.amin(-1).clamp(max=0)
        scale = ((xmax - xmin) / spec.maxq).clamp(min=1e-8)
        zero = round_ste(-xmin / scale)
    q = torch.clamp(round_ste(Wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, spec.maxq)
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(W.shape)


@register_method("omniquant", needs_calibration=True, block_stage="lwc", options=("epochs", "learning_rate"),
                 defaults={"epochs": 2, "learning_rate": 5e-2})
def quantize_omniquant(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, H: torch.Tensor,
                       clip: tuple[torch.Tensor, torch.Tensor], epochs: int = 2,
                       learning_rate: float = 5e-2) -> QuantizedWeight:
    """Round-to-nearest on the grids clipped by the learned factors `clip` = (low, high) (out, n_groups)."""
    return round_to_nearest(W, spec, scale_dtype, clip=clip)


@register_method("omniquant+gptq", needs_calibration=True, block_stage="lwc",
                 options=("epochs", "learning_rate", "block_size", "damp_percent", "mse"),
                 defaults={"epochs": 2, "learning_rate": 5e-2, "mse": False})
def quantize_omniquant_gptq(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, H: torch.Tensor,
                            clip: tuple[torch.Tensor, torch.Tensor], epochs: int = 2, learning_rate: float = 5e-2,
                            block_size: int = 128, damp_percent: float = 0.01, mse: bool = False) -> QuantizedWeight:
    """GPTQ whose group grids are clipped by the learned factors."""
    return quantize_gptq(W, spec, scale_dtype, H, block_size=block_size, damp_percent=damp_percent, mse=mse,
                         clip=clip)
