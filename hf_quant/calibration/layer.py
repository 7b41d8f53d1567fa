"""One float layer to one QuantLinear, through the registered method."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import LayerSpec
from ..core import offload
from ..core.layers import all_finite, is_conv1d, linear_weight
from ..methods import get_method
from ..runtime import ActivationSpec, QuantLinear


def quantize_layer(name: str, module: nn.Module, spec: LayerSpec, method: str, scale_dtype: torch.dtype | None = None,
                   **stats) -> QuantLinear:
    """Quantize one float layer into a QuantLinear. Refuses non-finite weights and a non-finite
    Hessian `H` (NaN/inf calibration inputs), naming the module; a ValueError of the method (e.g.
    GPTQ's Hessian not positive-definite) is re-raised with the module's name. scale_dtype: the scales' dtype
    (default: the weight's; the model's when a block calibrates in another dtype), the bias's too. A layer that
    accelerate offloads (device_map with "disk") is read for the call and offloaded again after it."""
    records = offload.onload(module)
    try:
        return _quantize_layer(name, module, spec, method, scale_dtype, **stats)
    finally:
        offload.offload_again(records)


def _quantize_layer(name: str, module: nn.Module, spec: LayerSpec, method: str, scale_dtype: torch.dtype | None,
                    **stats) -> QuantLinear:
    W = linear_weight(module).detach()
    keep_in_float = f"QuantConfig(modules_to_not_convert=[{name!r}])"
    if not all_finite(W):
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(
            f"{name}: weight has {bad} NaN/inf value(s) and cannot be quantized. Fix the checkpoint, "
            f"or keep the layer in float with {keep_in_float}."
        )
    H = stats.get("H")
    if H is not None and not all_finite(H):
        bad = (~torch.isfinite(H)).sum().item()
        raise ValueError(
            f"{name}: the calibration inputs of {name} contain NaN/inf ({bad} non-finite Hessian entries): the "
            "model produces non-finite activations before this layer. Check the checkpoint (e.g. its norm "
            f"weights) and the calibration data, or keep the layer in float with {keep_in_float}."
        )
    bias = module.bias
    if scale_dtype is None:
        scale_dtype = W.dtype if W.dtype.is_floating_point else torch.float32
    elif bias is not None and bias.dtype != scale_dtype:
        bias = bias.detach().to(scale_dtype)
    try:
        # inplace (GPTQ, from the calibration driver): the method overwrites W's float copy, so make one
        Wf = W.clone() if stats.get("inplace") and W.dtype == torch.float32 else W.float()
        qw = get_method(method).quantize(Wf, spec, scale_dtype, **stats)
    except ValueError as e:
        if str(e).startswith(f"{name}:"):
            raise
        raise ValueError(f"{name}: {e}") from e
    m = get_method(method)
    return QuantLinear.from_quantized(qw, spec, bias, from_conv1d=is_conv1d(module),
                                      activation=ActivationSpec.of(m.activation_of(stats)),
                                      output_norm=m.output_norm_of(stats))
