"""Finding the layers to quantize and swapping modules in a model (no math here)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerSpec, QuantConfig
from .quant_linear import QuantLinear

logger = logging.getLogger("hf_quant")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whichever layer type holds it."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_linear_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write an (out, in) weight into an nn.Linear or a transformers Conv1D, in place, in its dtype."""
    with torch.no_grad():
        module.weight.copy_(W.t() if isinstance(module, Conv1D) else W)


def _skipped(name: str, modules_to_not_convert: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in modules_to_not_convert)


def incompatibility(in_features: int, spec: LayerSpec) -> str | None:
    """Why a layer with `in_features` cannot take `spec`, or None."""
    gs = spec.group_size
    if gs != -1 and gs > in_features:
        return (f"group_size={gs} is larger than in_features={in_features}; use group_size=-1 "
                "(per channel) or a smaller power of two that divides in_features")
    if gs != -1 and in_features % gs:
        return (f"in_features={in_features} is not divisible by group_size={gs}; use group_size=-1 "
                "or a power of two that divides in_features")
    if in_features % 8:
        return f"in_features={in_features} is not a multiple of 8, which the packed layout needs"
    return None


def find_targets(model: nn.Module, config: QuantConfig, modules_to_not_convert: list[str]) -> dict[str, LayerSpec]:
    """Module name -> spec of every layer to quantize, after skips and `dynamic` overrides.

    Incompatible layers raise (on_incompatible="error") or are skipped with a warning ("skip").
    """
    targets: dict[str, LayerSpec] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if _skipped(name, modules_to_not_convert):
            continue
        spec = config.layer_spec(name)
        if spec is None:
            continue
        in_features, _ = linear_shape(module)
        why = incompatibility(in_features, spec)
        if why is not None:
            if config.on_incompatible == "error":
                raise ValueError(f"{name}: cannot quantize: {why}, or set QuantConfig(on_incompatible='skip').")
            logger.warning("hf_quant: keeping %s in float: %s.", name, why)
            continue
        targets[name] = spec
    return targets


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_with_empty_quant_linears(model: nn.Module, targets: dict[str, LayerSpec]) -> None:
    """Swap each target for an empty QuantLinear (same device, e.g. meta) for a checkpoint to fill."""
    for name, spec in targets.items():
        old = model.get_submodule(name)
        in_features, out_features = linear_shape(old)
        new = QuantLinear(in_features, out_features, old.bias is not None, spec, dtype=old.weight.dtype,
                          device=old.weight.device, from_conv1d=isinstance(old, Conv1D))
        set_module(model, name, new)


def float_layer(W: torch.Tensor, bias: torch.Tensor | None, as_conv1d: bool) -> nn.Module:
    """A float layer computing x @ W.T + bias for an (out, in) weight `W`: a transformers Conv1D
    (which stores W transposed) or an nn.Linear, on W's device and in its dtype."""
    out_features, in_features = W.shape
    if as_conv1d:
        new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(W.t().contiguous())
    else:
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(W)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(W.dtype))
    return new.to(W.device)


def dequantize_layer(module: QuantLinear, dtype: torch.dtype | None = None, as_conv1d: bool | None = None) -> nn.Module:
    """The float layer a QuantLinear stands for: a transformers Conv1D where it came from one (unless
    `as_conv1d=False`), else an nn.Linear; in `dtype` (default: the dtype of its scales)."""
    W = module.dequantize().to(dtype or module.scales.dtype)
    return float_layer(W, module.bias, module.from_conv1d if as_conv1d is None else as_conv1d)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear by the float layer it stands for (Conv1D where it came from one)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(model, name, dequantize_layer(module, dtype))
    return model
