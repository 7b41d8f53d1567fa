"""PEFT (LoRA) on hf_quant models: merging adapters back, and clear refusals where PEFT would
silently corrupt packed weights.

Training needs nothing from here: `QuantLinear` subclasses `nn.Linear` and exposes its packed
codes as `weight`, so PEFT's standard `lora.Linear` wraps it, and gradients flow through the
frozen quantized layer by the kernels' autograd function (`kernels.dispatch.linear`).

What PEFT cannot do on packed weights, and what this module does instead:
- Merging: PEFT adds the LoRA delta into `base_layer.weight.data`, here the packed uint8 codes
  (its safe merge would even cast the delta to uint8 and write it back). `merge_lora` dequantizes
  the wrapped layers, lets PEFT merge into the float weights, and optionally re-quantizes.
- DoRA, the initialisations that rewrite the base weight (PiSSA, OLoRA, CorDA, MiCA, LoftQ,
  LoRA-GA), and PEFT's other adapter types (LoHa, LoKr, IA3, OFT, ...) read or write the float
  weight: refused on hf_quant layers with an error that names the module.

`install()` adds these checks to PEFT by wrapping three methods: `BaseTuner._check_merge_allowed`,
which every tuner's merge runs, and `BaseTuner._check_target_module_compatiblity` and
`LoraModel._create_and_replace`, which run for every target module. The quantizer calls it whenever
an hf_quant model is built, when PEFT is installed. Each wrapper defers to PEFT's own code for every
model without hf_quant layers.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any

import torch
import torch.nn as nn

from ..nn.convert import dequantize_layer, dequantize_model, float_layer, set_module
from ..nn.quant_linear import QuantLinear

logger = logging.getLogger("hf_quant")

# LoRA initialisations that read the base weight as floats and write a modified one back.
_WEIGHT_REWRITING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _quantized_tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> PEFT tuner layer, for every tuner layer whose base is a QuantLinear."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and isinstance(_base_layer(m), QuantLinear)}


def _peft_type(config: Any) -> str:
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind or type(config).__name__))


def _is_lora(config: Any) -> bool:
    return _peft_type(config).upper() == "LORA"


def check_adapter_config(config: Any, module_name: str) -> None:
    """Raise if PEFT `config` asks for something an adapter on packed weights cannot do."""
    if not _is_lora(config):
        kind = _peft_type(config)
        raise ValueError(
            f"{module_name}: PEFT {kind} adapters cannot wrap an hf_quant layer (their "
            "layers read the base weight as a float matrix, which hf_quant stores as packed codes). Use LoRA "
            "(peft.LoraConfig), or leave hf_quant layers out of target_modules.")
    if getattr(config, "use_dora", False):
        raise ValueError(
            f"{module_name}: LoRA with use_dora=True cannot wrap an hf_quant layer: DoRA needs the float base "
            "weight's column norms on every step. Use plain LoRA (use_dora=False), or target only float modules.")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_WEIGHT_REWRITING_INITS):
        raise ValueError(
            f"{module_name}: LoraConfig(init_lora_weights={init!r}) rewrites the base layer's float weight, "
            "which an hf_quant layer stores as packed integer codes. Use init_lora_weights=True (or 'gaussian'), "
            "or apply that initialisation to the float model before quantizing.")


def install() -> None:
    """Add hf_quant's checks to PEFT (idempotent; a no-op without PEFT)."""
    if not peft_available():
        return
    from peft.tuners.tuners_utils import BaseTuner

    if getattr(BaseTuner, "_hf_quant_installed", False):
        return

    check_merge = getattr(BaseTuner, "_check_merge_allowed", None)  # LoRA's own check calls this one first
    if check_merge is not None:
        @functools.wraps(check_merge)
        def _check_merge_allowed(self):
            layers = _quantized_tuner_layers(self.model)
            if layers:
                first = next(iter(layers))
                raise ValueError(
                    f"Cannot merge adapters into {len(layers)} hf_quant layer(s) (e.g. {first}) in place: their weights "
                    "are packed integer codes. Use `hf_quant.merge_lora(model)` for a float model with the adapter "
                    "merged, or `hf_quant.merge_lora(model, requantize=True)` to quantize the merged model again.")
            return check_merge(self)

        BaseTuner._check_merge_allowed = _check_merge_allowed

    check_target = getattr(BaseTuner, "_check_target_module_compatiblity", None)  # [sic], PEFT's spelling
    if check_target is not None:  # every adapter type, per target; PEFT passes the leaf name only
        @functools.wraps(check_target)
        def _check_target_module_compatiblity(self, peft_config, model, target_name):
            if not _is_lora(peft_config):
                for name, module in model.named_modules():
                    if isinstance(module, QuantLinear) and name.rpartition(".")[2] == target_name:
                        check_adapter_config(peft_config, name)
            return check_target(self, peft_config, model, target_name)

        BaseTuner._check_target_module_compatiblity = _check_target_module_compatiblity

    from peft.tuners.lora import LoraModel

    create = getattr(LoraModel, "_create_and_replace", None)
    if create is not None:  # LoRA, per target, with its full name
        @functools.wraps(create)
        def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, *args,
                                **kwargs):
            if isinstance(_base_layer(target), QuantLinear):
                check_adapter_config(lora_config, current_key)
            return create(self, lora_config, adapter_name, target, target_name, parent, current_key, *args, **kwargs)

        LoraModel._create_and_replace = _create_and_replace
    BaseTuner._hf_quant_installed = True


def merge_lora(model: nn.Module, requantize: Any = None, *, dtype: torch.dtype | None = None,
               adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Merge the LoRA adapters of a PEFT model on an hf_quant base; returns the merged transformers model.

    - `requantize=None` (default): a float model in `dtype` (default: the model config's dtype, the
      one it was quantized from, even if training cast parts of it to fp32). Every hf_quant layer is
      dequantized, the adapters are added in fp32 by PEFT's own merge, and the quantization config
      is removed: `save_pretrained` writes a float checkpoint.
    - `requantize=True`: the merged float model is quantized again with the base model's
      `QuantConfig` (method, bits, groups; GPTQ calibrates on the packaged text); or pass a
      `QuantConfig` to choose another method, width or calibration `dataset`.

    Re-quantizing puts the merged weights on a new grid, which gives back part of what the adapter
    gained (figures in the README); the float merge is exact up to the model dtype.
    """
    from peft.tuners.tuners_utils import BaseTuner

    from ..config import QuantConfig
    from ..quantizer import quantize

    tuner = model.base_model if isinstance(getattr(model, "base_model", None), BaseTuner) else model
    if not isinstance(tuner, BaseTuner):
        raise TypeError(f"merge_lora: expected a PEFT model (peft.get_peft_model / PeftModel.from_pretrained), "
                        f"got {type(model).__name__}")
    base = tuner.model
    quantizer = getattr(base, "hf_quantizer", None)
    if requantize is True:
        if quantizer is None:
            raise ValueError("merge_lora(requantize=True): the base model is not an hf_quant model; "
                             "pass requantize=hf_quant.QuantConfig(...) instead.")
        requantize = QuantConfig.from_dict(quantizer.quantization_config.to_dict())
    elif requantize is not None and not isinstance(requantize, QuantConfig):
        raise TypeError(f"merge_lora: requantize must be None, True or an hf_quant.QuantConfig, got {requantize!r}")

    # PEFT merges into `base_layer.weight`: give it float weights, in fp32 for an exact sum.
    dtype = dtype or getattr(base.config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    restore = {}  # name -> came from a Conv1D
    for name, layer in _quantized_tuner_layers(base).items():
        q = _base_layer(layer)
        restore[name] = q.from_conv1d
        layer.base_layer = dequantize_layer(q, torch.float32, as_conv1d=False)
    merged = tuner.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    for name, from_conv1d in restore.items():
        if from_conv1d:  # PEFT merged an (out, in) Linear; the architecture expects a Conv1D
            layer = merged.get_submodule(name)
            set_module(merged, name, float_layer(layer.weight.detach(), layer.bias, as_conv1d=True))
    dequantize_model(merged, dtype)  # hf_quant layers the adapters did not target
    merged.to(dtype)  # one dtype throughout (prepare_model_for_kbit_training left norms etc. in fp32)
    if quantizer is not None:
        quantizer.remove_quantization_config(merged)
    if requantize is not None:
        if requantize.method == "rtn" and requantize.bits <= 4:
            logger.warning(
                "hf_quant.merge_lora: RTN at %d bits rounds most of a LoRA delta back onto the grid it came from "
                "(README: merging); keep the adapter unmerged, or re-quantize with method='gptq' or bits=8.",
                requantize.bits)
        quantize(merged, requantize)
    return merged
