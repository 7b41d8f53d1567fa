"""AWQ (Lin et al., 2023): activation-aware weight quantization.

Salient weights are the input channels with large activations. Scaling channel j of W up by s_j
and its input down by s_j leaves W x unchanged in float but shrinks channel j's relative rounding
error (Section 3.2):  Q(W diag(s)) (diag(s)^-1 X) ~ W X.  The scales are s = s_X^alpha, with s_X the
mean |x| per input channel and alpha in [0, 1) found by grid search (eq. 5); the block-wise driver
runs that search on the block's output (`hf_quant.calibration.stages`) and folds diag(s)^-1 into
the operation before (a norm's weight, or the previous linear's rows), so no runtime op remains.

Then each layer's weight range is clipped: per group, the shrink factor of its min/max (1 down to
0.5) that minimises the layer's output error on the calibration inputs, || (W_hat - W) X ||^2 =
sum_groups dW_g H_gg dW_g^T, from the diagonal blocks of the Hessian H = 2/N X X^T.

Methods: "awq" (scales + clipping + round-to-nearest) and "awq+gptq" (scales, then GPTQ).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import LayerSpec
from . import QuantizedWeight, grid, register_method
from .gptq import quantize_gptq
from .rtn import round_to_nearest

SCALE_GRID = 20  # alpha in {0, 1/20, ..., 19/20}
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # clip factors 1, 0.975, ..., 0.525


def candidate_scales(x_abs_mean: torch.Tensor) -> Iterator[tuple[float, torch.Tensor]]:
    """(alpha, s) for each grid point: s = s_X^alpha, normalised so that max(s) * min(s) = 1."""
    base = x_abs_mean.float().clamp(min=1e-4)
    for i in range(SCALE_GRID):
        alpha = i / SCALE_GRID
        s = base.pow(alpha)
        yield alpha, s / (s.max() * s.min()).sqrt()


def scaled_fake_quantize(W: torch.Tensor, s: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1: the layer as it acts on the unscaled input once s is folded in."""
    return grid.fake_quantize(W.float() * s, spec, scale_dtype) / s


def clip_search(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """Per (row, group) shrink factor of the weight range minimising the output error dW_g H_gg dW_g^T."""
    Wg = grid.group(W, spec)  # (out, G, gs)
    n_groups, gs = Wg.shape[1], Wg.shape[2]
    Hg = torch.stack([H[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(n_groups)]).float()
    best_err = torch.full(Wg.shape[:2], float("inf"), device=W.device)
    best = torch.ones(Wg.shape[:2], device=W.device)
    for i in range(CLIP_GRID):
        p = torch.full(Wg.shape[:2], 1 - CLIP_MAX_SHRINK * i / CLIP_GRID, device=W.device)
        scale, zero = grid.find_params(Wg, spec, scale_dtype, clip=(p, p))
        dW = grid.dequantize(grid.quantize(Wg, scale, zero, spec.maxq), scale, zero) - Wg
        err = torch.einsum("ogi,gij,ogj->og", dW, Hg, dW)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, p, best)
    return best


@register_method("awq", needs_calibration=True, block_stage="awq")
def quantize_awq(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, H: torch.Tensor) -> QuantizedWeight:
    """Round-to-nearest of the (already AWQ-scaled) W on grids clipped by `clip_search`."""
    p = clip_search(W, H, spec, scale_dtype)
    return round_to_nearest(W, spec, scale_dtype, clip=(p, p))


# AWQ's scaling, then GPTQ on the scaled layers (GPTQ's own options and defaults).
register_method("awq+gptq", needs_calibration=True, act_order=True, block_stage="awq",
                options=("block_size", "damp_percent", "desc_act", "static_groups", "mse"),
                defaults={"mse": True})(quantize_gptq)
