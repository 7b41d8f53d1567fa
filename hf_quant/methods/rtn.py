"""Round-to-nearest: data-free, each group on its own min/max grid (the baseline of every paper)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import LayerSpec, QuantizedWeight, gguf, grid
from .base import Options, check_bool, option, register_method


def mse_option(default: bool) -> bool:
    """`QuantConfig.mse`: search a clipped grid per group (None in the config = the method's default)."""
    return option(default, check_bool, unused=False,
                  help="search a clipped grid per group (default: on for GPTQ, off for RTN)")


@dataclass
class RTNOptions(Options):
    mse: bool = mse_option(False)  # off: the plain min/max baseline


def round_to_nearest(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, mse: bool = False,
                     clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedWeight:
    """Each group on its own min/max grid (optionally shrunk by `clip` factors, or by the `mse` search);
    GGUF layers on their block type's grid (core/gguf.py)."""
    if spec.gguf is not None:
        t = gguf.block_type(spec.gguf)
        gguf.check_shape(t, W.shape[1], "RTN")
        return gguf.quantized_weight(gguf.quantize_rtn(W, t, clip, mse), t)
    Wg = grid.group(W, spec)
    scale, zero = grid.find_params(Wg, spec, scale_dtype, mse, clip)
    q = grid.quantize(Wg, scale, zero, spec.maxq)
    return QuantizedWeight(
        codes=q.reshape(W.shape).to(torch.uint8),
        scale=scale.to(scale_dtype),
        zero=None if spec.sym else zero.to(torch.uint8),
    )


@register_method("rtn", needs_calibration=False, options=RTNOptions, description="RTN (round-to-nearest, data-free)",
                 gguf=True, one_bit=True)
def quantize_rtn(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, mse: bool = False) -> QuantizedWeight:
    return round_to_nearest(W, spec, scale_dtype, mse)
