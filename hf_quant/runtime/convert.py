"""Finding the layers to quantize, and swapping float layers and QuantLinears in a model (no math here)."""

from __future__ import annotations

import logging

from typing import Any

import torch
import torch.nn as nn

from ..config import LayerSpec, QuantConfig
from ..core import gguf
from ..core.layers import FLOAT_LINEARS, float_layer, is_conv1d, linear_shape, set_module
from ..methods import get_method
from . import experts, multimodal
from .quant_linear import QuantLinear
from .scheme import ActivationSpec

logger = logging.getLogger("hf_quant")


def _skipped(name: str, modules_to_not_convert: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in modules_to_not_convert)


def incompatibility(in_features: int, spec: LayerSpec) -> str | None:
    """Why a layer with `in_features` cannot take `spec`, or None."""
    if spec.gguf is not None:
        block = gguf.block_type(spec.gguf).block
        if in_features % block:
            return (f"in_features={in_features} is not a multiple of {spec.gguf}'s block width {block}; "
                    "keep it in float or give it a 32-wide type through QuantConfig.dynamic (e.g. {'gguf': 'Q8_0'})")
        return None
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


def mix_context(model_config: Any) -> tuple[int | None, int]:
    """(layer count, heads per KV head) of a transformers config: what a GGUF mix's types depend on."""
    if model_config is None:
        return None, 1
    model_config = multimodal.text_config(model_config)  # a multimodal model's language model
    get = model_config.get if isinstance(model_config, dict) else lambda k, d=None: getattr(model_config, k, d)
    n_layers = get("num_hidden_layers") or get("n_layer")
    heads = get("num_attention_heads") or get("n_head") or 1
    return n_layers, max(1, heads // (get("num_key_value_heads") or heads))


def find_targets(model: nn.Module, config: QuantConfig, modules_to_not_convert: list[str]) -> dict[str, LayerSpec]:
    """Module name -> spec of every layer to quantize, after skips and `dynamic` overrides.

    Incompatible layers raise (on_incompatible="error") or are skipped with a warning ("skip").
    """
    targets: dict[str, LayerSpec] = {}
    n_layers, n_gqa = mix_context(getattr(model, "config", None))
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or not isinstance(module, FLOAT_LINEARS):
            continue
        if _skipped(name, modules_to_not_convert):
            continue
        in_features, _ = linear_shape(module)
        spec = config.layer_spec(name, n_layers, n_gqa, in_features)
        if spec is None:
            continue
        why = incompatibility(in_features, spec)
        if why is not None:
            if config.on_incompatible == "error":
                raise ValueError(f"{name}: cannot quantize: {why}, or set QuantConfig(on_incompatible='skip').")
            logger.warning("hf_quant: keeping %s in float: %s.", name, why)
            continue
        targets[name] = spec
    return targets


EXPERTS_FORMAT_VERSION = 4  # the on-disk format of a model with per-expert quantized layers (runtime.experts)


def prepare_experts(model: nn.Module, config: QuantConfig, modules_to_not_convert: list[str],
                    mode: str = "quantize") -> dict[str, LayerSpec]:
    """Unfuse the fused MoE experts of `model` (`runtime.experts`) whose projections `config` quantizes, and
    return the targets (`find_targets`) of the model so prepared.

    Every fused experts module is unfused, the targets are found, and each projection none of whose experts is a
    target is fused back: its 3-D weight stays in float under its usual name. A projection quantized for some
    experts only is refused.

    mode: "quantize" (a loaded float model: an experts module whose weights are not in memory, offloaded to disk by
    accelerate, stays fused, in float), "stream" (the streaming quantizer's meta skeleton, filled block by block:
    `experts.load_fused`), or "load" (the meta skeleton of an hf_quant checkpoint). Quantizing or streaming, where
    experts were unfused, `config.format_version` becomes EXPERTS_FORMAT_VERSION, which is what tells a reload to
    unfuse them again; an older checkpoint (lower format_version) had its experts in float: they stay fused."""
    if mode not in ("quantize", "stream", "load"):
        raise ValueError(f"prepare_experts: mode={mode!r} must be 'quantize', 'stream' or 'load'.")
    if mode != "load" or (config.format_version or 0) >= EXPERTS_FORMAT_VERSION:
        for name, module in list(model.named_modules()):
            if not experts.is_fused_experts(module):
                continue
            if mode == "quantize" and any(p.is_meta for p in module.parameters(recurse=False)):
                logger.warning("hf_quant: keeping %s in float: its weights are offloaded (not in memory); quantize "
                               "the model with a device_map that holds the experts, or stream it from disk with "
                               "hf_quant.quantize_checkpoint.", name)
                continue
            experts.unfuse(module)
    try:
        targets = find_targets(model, config, modules_to_not_convert)
        for name, module in experts.unfused_experts(model).items():
            for proj in experts.projections(module):
                layers = [f"{name}.{e}.{proj}" for e in range(module.num_experts)] if experts.expert_layers(
                    module, proj) else []
                chosen = [n for n in layers if n in targets]
                if chosen and len(chosen) < len(layers):
                    kept = next(n for n in layers if n not in targets)
                    raise ValueError(
                        f"{kept}: hf_quant quantizes an MoE projection for all of its experts or for none, and "
                        f"{len(chosen)} of the {len(layers)} experts' {proj} layers are quantized; make "
                        f"modules_to_not_convert / dynamic select all of {name}.<expert>.{proj} or none of them.")
                if not chosen:
                    experts.fuse_projection(module, proj)
    except BaseException:
        experts.fuse(model)  # a refused config leaves the model as it was
        raise
    if experts.unfused_experts(model) and mode != "load":
        config.format_version = max(config.format_version or 0, EXPERTS_FORMAT_VERSION)
    return targets


def warn_float_expert_weights(model: nn.Module, modules_to_not_convert: list[str] = ()) -> list[str]:
    """Log a warning naming the weight tensors of 3 or more dimensions outside convolutions (transformers 5
    stacks MoE experts that way: `experts.gate_up_proj` (experts, 2 x ffn, hidden)) of modules hf_quant cannot
    quantize (an experts class `runtime.experts` does not know) and `modules_to_not_convert` does not name, with
    their share of the model's parameters. Returns their names."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    names, count = [], 0
    for mod_name, module in model.named_modules():
        if (isinstance(module, convs) or _skipped(mod_name, list(modules_to_not_convert))
                or experts.is_fused_experts(module)):  # experts hf_quant could quantize: kept in float as asked
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
                count += p.numel()
    if names:
        total = sum(p.numel() for p in model.parameters())
        logger.warning("hf_quant: %d weight tensor(s) of 3 dimensions (fused MoE experts, e.g. %s) hold %.0f%% of "
                       "the model's parameters and stay in float: hf_quant quantizes linear layers, and the "
                       "experts of transformers' `@use_experts_implementation` classes.", len(names), names[0],
                       100 * count / max(total, 1))
    return names


def activation_spec(config: QuantConfig) -> ActivationSpec | None:
    """The run-time activation quantization of the layers `config` quantizes (None: weight-only)."""
    method = get_method(config.method)
    return ActivationSpec.of(method.activation_of(method.options_from(config)))


def replace_with_empty_quant_linears(model: nn.Module, targets: dict[str, LayerSpec],
                                     config: QuantConfig | None = None) -> None:
    """Swap each target for an empty QuantLinear (same device, e.g. meta) for a checkpoint to fill,
    with the scheme and scale dtype of `config`'s method."""
    activation = None if config is None else activation_spec(config)
    scale_dtype = None if config is None else get_method(config.method).scale_dtype
    output_norm = config is not None and get_method(config.method).output_norm_of(
        get_method(config.method).options_from(config))
    for name, spec in targets.items():
        old = model.get_submodule(name)
        in_features, out_features = linear_shape(old)
        new = QuantLinear(in_features, out_features, old.bias is not None, spec, dtype=old.weight.dtype,
                          device=old.weight.device, from_conv1d=is_conv1d(old), activation=activation,
                          scale_dtype=scale_dtype, output_norm=output_norm)
        set_module(model, name, new)


def dequantize_layer(module: QuantLinear, dtype: torch.dtype | None = None, as_conv1d: bool | None = None) -> nn.Module:
    """The float layer a QuantLinear stands for: a transformers Conv1D where it came from one (unless
    `as_conv1d=False`), else an nn.Linear; in `dtype` (default: the dtype of its scales). A layer that
    normalises its product (OneBit's output_norm) is no float linear: refused."""
    if module.scheme.output_norm:
        raise ValueError(f"QuantLinear({module.extra_repr()}) normalises its product (OneBit's output_norm: "
                         "LN(x @ W_hat^T) + bias), which no float nn.Linear computes; keep the quantized model (LoRA "
                         "adapters train on it unmerged), or quantize with QuantConfig(method='onebit', "
                         "output_norm=False) for layers that dequantize.")
    W = module.dequantize().to(dtype or module.float_dtype)
    return float_layer(W, module.bias, module.from_conv1d if as_conv1d is None else as_conv1d)


def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every QuantLinear by the float layer it stands for (Conv1D where it came from one).

    dtype: a floating torch dtype, or its name as a config stores it ("bfloat16", "torch.bfloat16":
    transformers passes `config.dtype`, a string after `save_pretrained`); None or "auto" = each
    layer's scale dtype (the dtype the model was loaded in)."""
    if isinstance(dtype, str):
        dtype_name = dtype.removeprefix("torch.")
        if dtype_name == "auto":
            dtype = None
        else:
            resolved = getattr(torch, dtype_name, None)
            if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
                raise ValueError(f"dequantize: dtype={dtype!r} is not a floating torch dtype; use e.g. "
                                 "torch.bfloat16, 'bfloat16', 'float16', 'float32' or 'auto'.")
            dtype = resolved
    elif dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dequantize: dtype={dtype!r} is not a floating torch dtype; use e.g. torch.bfloat16.")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(model, name, dequantize_layer(module, dtype))
    experts.fuse(model)  # MoE experts back in transformers' 3-D layout
    return model


def resolve_modules_to_not_convert(model: nn.Module, requested: list[str] | None,
                                   keep_in_fp32: list[str] | None) -> list[str]:
    """The modules kept in float: `requested` if given, else transformers' defaults (output embeddings,
    the last module) and, in a multimodal model, every module outside its language model (vision / audio
    encoders and projectors: `multimodal.non_text_modules`); plus the model's keep-in-fp32 modules and tied
    weights, which are never quantized."""
    from transformers.quantizers import HfQuantizer

    skip = HfQuantizer.get_modules_to_not_convert(model, requested, keep_in_fp32)
    if requested is None:
        skip += multimodal.non_text_modules(model)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    skip += [k.removesuffix(".weight") for k in set(tied) | set(tied.values())]
    return sorted(set(skip))


def warn_unmatched_skips(model: nn.Module, requested: list[str] | None) -> list[str]:
    """Warn of each entry of a user's `modules_to_not_convert` that matches no linear layer of `model` (its full
    name, a dotted suffix of it, or a prefix ending at a module boundary: `_skipped`, as transformers matches
    them), and return those entries. The usual slip is an inner module's bare name such as 'vision_tower': it
    names `model.vision_tower` but none of the linears below it, whose names go on (`model.vision_tower.encoder.
    ...`); the warning names the prefix that keeps them in float."""
    layers = [n for n, m in model.named_modules() if isinstance(m, FLOAT_LINEARS) or experts.is_fused_experts(m)]
    unmatched = [k for k in requested or [] if not any(_skipped(n, [k]) for n in layers)]
    for k in unmatched:
        above = sorted({n[: n.index(f".{k}.") + len(k) + 1] for n in layers if f".{k}." in n}, key=len)
        hint = f"to keep the layers below {above[0]} in float, name it in full: {above[0]!r}" if above else (
            "entries match a layer's full name, a dotted suffix of it, or a prefix ending at a module boundary")
        logger.warning("hf_quant: QuantConfig.modules_to_not_convert entry %r matches no linear layer of %s; %s.",
                       k, type(model).__name__, hint)
    return unmatched


def quantized_specs(model: nn.Module) -> dict[str, LayerSpec]:
    """Name -> spec of every QuantLinear in `model`."""
    return {name: m.spec for name, m in model.named_modules() if isinstance(m, QuantLinear)}
