"""One float layer to one QuantLinear, through the registered method."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import LayerSpec
from ..core.layers import is_conv1d, linear_weight
from ..methods import get_method
from ..runtime import QuantLinear


def quantize_layer(name: str, module: nn.Module, spec: LayerSpec, method: str, **stats) -> QuantLinear:
    """Quantize one float layer into a QuantLinear; refuses non-finite weights, naming the module."""
    W = linear_weight(module).detach()
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(
            f"{name}: weight has {bad} NaN/inf value(s) and cannot be quantized. Fix the checkpoint, "
            f"or keep the layer in float with QuantConfig(modules_to_not_convert=[{name!r}])."
        )
    scale_dtype = W.dtype if W.dtype.is_floating_point else torch.float32
    qw = get_method(method).quantize(W.float(), spec, scale_dtype, **stats)
    return QuantLinear.from_quantized(qw, spec, module.bias, from_conv1d=is_conv1d(module))
