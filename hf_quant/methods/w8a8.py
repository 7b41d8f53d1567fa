"""Dynamic W8A8 (int8 weights, int8 activations), with optional SmoothQuant smoothing (Xiao et al., 2023).

Weights: int8 per output row, bitsandbytes' vector-wise grid (`llm_int8.int8_rowwise`), fp32 scales.
Activations: int8 per token at run time (`int8_token` with threshold 0: no outlier decomposition).

Per-token int8 loses the small channels of a token whose few *outlier channels* set its absmax.
SmoothQuant migrates that range into the weights, per input channel j of a group of linears that
read the same input (q/k/v; gate/up):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(alpha = `smooth`; max|X_j| over the calibration windows of the driver's reference pass, max|W_j| over
the rows of every linear of the group). X diag(s)^-1 and diag(s) W^T leave the product unchanged in
float; after it max|X'_j| = (max|X_j| max|W_j|)^(1 - alpha) and max|W'_j| = (max|X_j| max|W_j|)^alpha:
alpha = 0.5 equalises the two ranges channel by channel, 0 leaves the activations' range, 1 moves it
all into the weights. diag(s)^-1 folds into the op before (a norm's weight and bias, or a
linear's rows) through AWQ's fold machinery (`awq.foldable_groups` / `awq.fold_scales`), each change
recorded in the undo log, so no runtime op remains and a failure leaves the model as it was.

`smooth=None` (the default) skips smoothing: plain dynamic W8A8, data-free (no calibration pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core import LayerSpec, QuantizedWeight
from .awq import fold_scales, foldable_groups
from .base import BlockContext, Options, option, register_method
from .llm_int8 import INT8_SPEC, int8_rowwise

# Floor of max|X_j|, max|W_j| and s_j, as SmoothQuant's reference code: a dead channel (all zero) keeps
# a finite scale instead of 0 or inf.
EPS = 1e-5


def check_smooth(name: str, value: Any) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1
    if not ok:
        raise ValueError(f"QuantConfig.{name}={value!r} must be a number in [0, 1] (SmoothQuant's migration "
                         "strength alpha, e.g. 0.5), or None for no smoothing.")


@dataclass
class W8A8Options(Options):
    smooth: float | None = option(None, check_smooth, strict=True, type=float,
                                  help="w8a8: SmoothQuant migration strength alpha in [0, 1] (e.g. 0.5; needs "
                                       "calibration data); unset: no smoothing, data-free")


def needs_data(smooth: float | None = None, **_: Any) -> bool:
    """w8a8 calibrates (block by block, on `QuantConfig.dataset`) only to smooth."""
    return smooth is not None


def w8a8_activation(**_: Any) -> tuple[str, dict[str, Any]]:
    return "int8_token", {"threshold": 0.0}


# --- the block stage: SmoothQuant scales, folded into the previous op --------------------------------

def observe_abs_max(values: dict, head: str, x: torch.Tensor, n_windows: int) -> None:
    """max|X_j|: the largest |x| per input channel of each group over the reference windows (a NaN
    propagates, and is refused by the stage)."""
    m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    values[head] = m if head not in values else torch.maximum(values[head], m)


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (fp32), each floored at EPS."""
    x = x_max.float().clamp(min=EPS)
    w = w_max.float().clamp(min=EPS)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=EPS)


@torch.no_grad()
def smooth_scales(ctx: BlockContext) -> dict[str, dict]:
    """Compute each group's SmoothQuant scales and fold them in (undo log in `ctx.undo`). Raises a
    ValueError naming the group when its scales or the folded weights are not finite."""
    alpha = ctx.config.smooth
    if alpha is None:
        return {}
    for group, target, layers, W in foldable_groups(ctx, "smoothing"):
        head = group[0]
        short = head[len(ctx.prefix):]
        w_max = torch.stack([w.abs().amax(dim=0) for w in W.values()]).amax(dim=0)
        x_max = ctx.observed[head].to(w_max.device)
        s = smoothing_scales(x_max, w_max, alpha)
        if not torch.isfinite(s).all():
            raise ValueError(f"{head}: SmoothQuant scales are not finite ({(~torch.isfinite(s)).sum().item()} "
                             "channel(s)): the model produces NaN/inf activations before this layer (check the "
                             "checkpoint and the calibration data), or use QuantConfig(smooth=None), or keep the "
                             f"layer in float with QuantConfig(modules_to_not_convert=[{head!r}]).")
        fold_scales(ctx, target, layers, W, s)
        changed = [target.producer.weight] + [m.weight for m in layers.values()]
        if getattr(target.producer, "bias", None) is not None:
            changed.append(target.producer.bias)
        if not all(torch.isfinite(t).all() for t in changed):
            raise ValueError(f"{head}: smoothing with smooth={alpha} overflows the {target.producer.weight.dtype} weights of "
                             f"{target.local} / {short} (scales in [{s.min().item():.3g}, {s.max().item():.3g}]); "
                             "use a smaller QuantConfig.smooth, load the model in a wider dtype, or smooth=None.")
        ctx.notes.append(f"{','.join(n.rsplit('.', 1)[-1] for n in group)} <- {target.local}: smooth={alpha:g}, "
                         f"s in [{s.min().item():.3g}, {s.max().item():.3g}]")
    return {}


@register_method("w8a8", needs_calibration=needs_data, options=W8A8Options, stage=smooth_scales,
                 observe=observe_abs_max, activation=w8a8_activation, fixed_spec=INT8_SPEC, scale_dtype=torch.float32,
                 description="W8A8 (int8 weights per row, dynamic int8 activations per token, "
                             "optional SmoothQuant smoothing folded into the previous op)")
def quantize_w8a8(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, smooth: float | None = None,
                  H: torch.Tensor | None = None) -> QuantizedWeight:
    """int8 rows of the (already smoothed) W, as `llm_int8` (the Hessian of the driver is not used)."""
    return int8_rowwise(W)
