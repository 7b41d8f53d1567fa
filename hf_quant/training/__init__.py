"""Quantization-aware training: `prepare` swaps the target linears for trainable layers (latent float
weights, the method's forward with a straight-through estimator), the user trains with their usual loop or
`transformers.Trainer` (`DistillationTrainer` distils from the float model), and `convert` freezes them
into packed `QuantLinear`s.

Trainable methods are registered here by name (`register_trainable` for a weight grid in STE form: RTN's;
`register_trainable_layer` for a layer class: OneBit, BitNet). The frozen layers are quantized by the method
of the same name in `hf_quant.methods`, given the trained state, so they hold exactly the codes the training
forward pass used.

A prepared model carries `QuantConfig(..., latent=True)` as its `config.quantization_config`: saving it
(`save_pretrained`, a Trainer checkpoint) writes the latent state, which `from_pretrained` (after
`import hf_quant`) loads back as the same prepared model, never as a float or a quantized one.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.nn as nn

from .. import compat
from ..config import QuantConfig
from ..core import LayerSpec
from ..core.registry import Registry
from ..core.layers import set_module
from ..methods import get_method
from ..runtime import ActivationSpec, QuantLinear
from ..runtime.convert import find_targets, resolve_modules_to_not_convert
from .distill import distillation_loss, set_ramp
from .fake_quant import FakeQuantLinear, rtn_grid_ste
from .layers import BitNetLinear, OneBitLinear, TrainableLayer

logger = logging.getLogger("hf_quant")

# method -> layer factory(module, spec, method, options) -> a trainable module with `state_for_convert()`
TRAINABLE: Registry[Callable[..., nn.Module]] = Registry("trainable method")
TRAINING_LAYERS = (FakeQuantLinear, TrainableLayer)
_ON_CONVERT: list[Callable[[nn.Module, QuantConfig], None]] = []
_ON_PREPARE: list[Callable[[nn.Module, QuantConfig], None]] = []


def register_trainable(name: str, fake_quantize: Callable[[torch.Tensor, LayerSpec, torch.dtype], torch.Tensor]):
    """Make method `name` trainable: `fake_quantize(W, spec, scale_dtype)` is its grid in STE form."""
    register_trainable_layer(name, lambda module, spec, method, options:
                             FakeQuantLinear(module, spec, method, fake_quantize))


def register_trainable_layer(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make method `name` trainable with its own layer: `factory(module, spec, method, options)` returns a module
    whose `state_for_convert()` gives `W`, `scale_dtype` and the extra keyword arguments of the method's
    `quantize`."""
    get_method(name)  # the frozen layers are quantized by the registered method of the same name
    TRAINABLE.register(name, factory)


def on_convert(hook: Callable[[nn.Module, QuantConfig], None]) -> None:
    """Run `hook(model, config)` after every `convert` (the transformers glue makes the result a
    regular hf_quant model: quantization config, save_pretrained, push_to_hub)."""
    _ON_CONVERT.append(hook)


def on_prepare(hook: Callable[[nn.Module, QuantConfig], None]) -> None:
    """Run `hook(model, config)` after every `prepare` (the PEFT glue refuses adapters on training layers)."""
    _ON_PREPARE.append(hook)


register_trainable("rtn", rtn_grid_ste)
register_trainable_layer("onebit", OneBitLinear)
register_trainable_layer("bitnet", BitNetLinear)


def is_training_layer(module: nn.Module) -> bool:
    return isinstance(module, TRAINING_LAYERS)


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap every layer `config` would quantize for its method's trainable layer, in place."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"prepare: config must be an hf_quant.QuantConfig, got {type(config).__name__}")
    if config.method not in TRAINABLE:
        raise ValueError(f"prepare: QuantConfig.method={config.method!r} has no quantization-aware training; "
                         f"trainable methods: {TRAINABLE.names()}.")
    if any(isinstance(m, QuantLinear) or is_training_layer(m) for m in model.modules()):
        raise ValueError("prepare: the model already has quantized or fake-quantized layers; start from a float model.")
    requested = config.modules_to_not_convert
    skip = resolve_modules_to_not_convert(model, requested, compat.keep_in_fp32_modules(model))
    targets = find_targets(model, config, skip)
    if not targets:
        raise ValueError("prepare: no layer to quantize (every linear is skipped); check modules_to_not_convert.")
    if requested is None:
        config.modules_to_not_convert = skip
    prepare_layers(model, config, targets)
    model.hf_quant_training_config = config
    if hasattr(model, "config"):  # what save_pretrained writes: the latent state, marked as such
        latent = copy.deepcopy(config)
        latent.latent = True
        model.config.quantization_config = latent
    for hook in _ON_PREPARE:
        hook(model, config)
    return model


def prepare_layers(model: nn.Module, config: QuantConfig, targets: dict[str, LayerSpec]) -> None:
    """Swap each of `targets` for the trainable layer of `config.method` (on the module's device: the meta
    device when a latent checkpoint is loaded)."""
    factory = TRAINABLE.get(config.method)
    method = get_method(config.method)
    options = method.options_from(config)
    for name, spec in targets.items():
        set_module(model, name, factory(model.get_submodule(name), spec, config.method, options))


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Freeze every trainable layer into a packed `QuantLinear` holding the codes its forward used."""
    layers = {n: m for n, m in model.named_modules() if is_training_layer(m)}
    if not layers:
        raise ValueError("convert: the model has no fake-quantized layers; call hf_quant.training.prepare first.")
    ramps = {m.ramp for m in layers.values() if isinstance(getattr(m, "ramp", None), float)}
    if ramps and ramps != {1.0}:
        logger.warning("hf_quant: convert: the quantization was still ramping in (lambda=%s < 1): the frozen "
                       "layers are fully quantized, so they compute what the last training step did not. Train "
                       "past the ramp (DistillationTrainer(ramp_steps=...)).", sorted(ramps))
    config = model.__dict__.pop("hf_quant_training_config", None)
    for name, layer in layers.items():
        method = get_method(layer.method)
        options = getattr(layer, "options", None)
        if options is None:
            options = method.options_from(config) if config is not None else {}
        state = layer.state_for_convert()
        W, scale_dtype = state.pop("W"), state.pop("scale_dtype")
        qw = method.quantize(W, layer.spec, scale_dtype, **options, **state)
        bias = None if layer.bias is None else layer.bias.detach()
        set_module(model, name, QuantLinear.from_quantized(
            qw, layer.spec, bias, from_conv1d=layer.from_conv1d,
            activation=ActivationSpec.of(method.activation_of(options)), output_norm=method.output_norm_of(options)))
    if config is not None and hasattr(model, "config"):
        config.latent = None
    for hook in _ON_CONVERT:
        hook(model, config)
    return model


def __getattr__(name: str):
    if name in ("DistillationTrainer", "QuantRamp"):  # transformers' Trainer, imported on first use
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BitNetLinear", "DistillationTrainer", "FakeQuantLinear", "OneBitLinear", "QuantRamp", "TrainableLayer",
           "convert", "distillation_loss", "is_training_layer", "on_convert", "on_prepare", "prepare",
           "prepare_layers", "register_trainable", "register_trainable_layer", "set_ramp"]
