"""Quantization-aware training: `prepare` swaps the target linears for trainable fake-quantized
layers (latent float weights, a straight-through grid), the user trains with their usual loop or
`transformers.Trainer`, and `convert` freezes them into packed `QuantLinear`s.

Trainable methods are registered here by name with their differentiable grid (`register_trainable`);
RTN's grid is the first. The frozen layers are quantized by the method of the same name in
`hf_quant.methods`, so they hold exactly the codes the training forward pass used.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .. import compat
from ..config import QuantConfig
from ..core import LayerSpec
from ..core.registry import Registry
from ..core.layers import set_module
from ..methods import get_method
from ..runtime import QuantLinear
from ..runtime.convert import find_targets, resolve_modules_to_not_convert
from .fake_quant import FakeQuantLinear, rtn_grid_ste

TRAINABLE: Registry[Callable[[torch.Tensor, LayerSpec, torch.dtype], torch.Tensor]] = Registry("trainable method")
_ON_CONVERT: list[Callable[[nn.Module, QuantConfig], None]] = []


def register_trainable(name: str, fake_quantize: Callable[[torch.Tensor, LayerSpec, torch.dtype], torch.Tensor]):
    """Make method `name` trainable: `fake_quantize(W, spec, scale_dtype)` is its grid in STE form."""
    get_method(name)  # the frozen layers are quantized by the registered method of the same name
    TRAINABLE.register(name, fake_quantize)


def on_convert(hook: Callable[[nn.Module, QuantConfig], None]) -> None:
    """Run `hook(model, config)` after every `convert` (the transformers glue makes the result a
    regular hf_quant model: quantization config, save_pretrained, push_to_hub)."""
    _ON_CONVERT.append(hook)


register_trainable("rtn", rtn_grid_ste)


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap every layer `config` would quantize for a trainable `FakeQuantLinear`, in place."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"prepare: config must be an hf_quant.QuantConfig, got {type(config).__name__}")
    if config.method not in TRAINABLE:
        raise ValueError(f"prepare: QuantConfig.method={config.method!r} has no quantization-aware training; "
                         f"trainable methods: {TRAINABLE.names()}.")
    if any(isinstance(m, (QuantLinear, FakeQuantLinear)) for m in model.modules()):
        raise ValueError("prepare: the model already has quantized or fake-quantized layers; start from a float model.")
    requested = config.modules_to_not_convert
    skip = resolve_modules_to_not_convert(model, requested, compat.keep_in_fp32_modules(model))
    targets = find_targets(model, config, skip)
    if not targets:
        raise ValueError("prepare: no layer to quantize (every linear is skipped); check modules_to_not_convert.")
    for name, spec in targets.items():
        set_module(model, name, FakeQuantLinear(model.get_submodule(name), spec, config.method,
                                                TRAINABLE.get(config.method)))
    if requested is None:
        config.modules_to_not_convert = skip
    model.hf_quant_training_config = config
    return model


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Freeze every `FakeQuantLinear` into a packed `QuantLinear` holding the codes its forward used."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    if not layers:
        raise ValueError("convert: the model has no fake-quantized layers; call hf_quant.training.prepare first.")
    for name, layer in layers.items():
        state = layer.state_for_convert()
        qw = get_method(layer.method).quantize(state["W"], layer.spec, state["scale_dtype"])
        set_module(model, name, QuantLinear.from_quantized(qw, layer.spec, layer.bias, from_conv1d=layer.from_conv1d))
    config = model.__dict__.pop("hf_quant_training_config", None)
    for hook in _ON_CONVERT:
        hook(model, config)
    return model


__all__ = ["FakeQuantLinear", "convert", "on_convert", "prepare", "register_trainable"]
