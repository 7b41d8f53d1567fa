"""PEFT on hf_quant models: LoRA trains through the frozen quantized base, and everything PEFT would
do to the packed weights as if they were floats is refused with an error naming the module.

- LoRA on an hf_quant layer is `QuantLoraLinear` (`peft_lora.py`), a subclass of PEFT's own
  `lora.Linear` built the way PEFT builds its layers for bitsandbytes / HQQ / torchao: forward and
  backward as PEFT's, but `update_layer` refuses DoRA, KaSA and the initialisations that rewrite the
  base weight (PiSSA, OLoRA, CorDA, MiCA, LoftQ, LoRA-GA), and `merge`/`unmerge` refuse to add a
  delta into packed codes (`hf_quant.merge_lora` merges into a float copy instead).
- PEFT's other adapter types (LoHa, LoKr, IA3, OFT, ...) read or write the base weight as a float
  matrix: refused on hf_quant layers.

PEFT chooses layer classes without a public hook (see `hf_quant.compat.patch_peft`), so `install()`
puts these in place, and `register_lora(lora_config)` offers PEFT's documented custom-module route.
The quantizer calls `install()` whenever an hf_quant model is built, when PEFT is installed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch.nn as nn

from .. import compat
from ..runtime import QuantLinear

# LoRA initialisations that read the base weight as floats and write a modified one back.
_WEIGHT_REWRITING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def quantized_tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> PEFT tuner layer, for every tuner layer whose base is a QuantLinear."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and isinstance(base_layer(m), QuantLinear)}


def _peft_type(config: Any) -> str:
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind or type(config).__name__))


def check_adapter_config(config: Any, module_name: str) -> None:
    """Raise if PEFT `config` asks for something an adapter on packed weights cannot do."""
    if _peft_type(config).upper() != "LORA":
        raise ValueError(
            f"{module_name}: PEFT {_peft_type(config)} adapters cannot wrap an hf_quant layer (their "
            "layers read the base weight as a float matrix, which hf_quant stores as packed codes). Use LoRA "
            "(peft.LoraConfig), or leave hf_quant layers out of target_modules.")
    if getattr(config, "use_dora", False):
        raise ValueError(
            f"{module_name}: LoRA with use_dora=True cannot wrap an hf_quant layer: DoRA needs the float base "
            "weight's column norms on every step. Use plain LoRA (use_dora=False), or target only float modules.")
    if getattr(config, "kasa_config", None) is not None:
        raise ValueError(
            f"{module_name}: LoRA with kasa_config (KaSA) cannot wrap an hf_quant layer: it truncates the base "
            "layer's float weight by SVD and writes it back, which an hf_quant layer stores as packed codes.")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_WEIGHT_REWRITING_INITS):
        raise ValueError(
            f"{module_name}: LoraConfig(init_lora_weights={init!r}) rewrites the base layer's float weight, "
            "which an hf_quant layer stores as packed integer codes. Use init_lora_weights=True (or 'gaussian'), "
            "or apply that initialisation to the float model before quantizing.")


def merge_refusal(layers: dict[str, nn.Module] | list[str]) -> ValueError:
    first = next(iter(layers))
    return ValueError(
        f"Cannot merge adapters into {len(layers)} hf_quant layer(s) (e.g. {first}) in place: their weights "
        "are packed integer codes. Use `hf_quant.merge_lora(model)` for a float model with the adapter "
        "merged, or `hf_quant.merge_lora(model, requantize=True)` to quantize the merged model again.")


def _create_lora_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module | None:
    if not isinstance(base_layer(target), QuantLinear):
        return None
    from .peft_lora import QuantLoraLinear

    return QuantLoraLinear(target, adapter_name, config=lora_config, **kwargs)


def _check_target(peft_config: Any, model: nn.Module, target_name: str) -> None:
    if _peft_type(peft_config).upper() == "LORA":
        return  # LoRA is checked per layer, with its full name, by QuantLoraLinear.update_layer
    for name, module in model.named_modules():  # PEFT passes the leaf name only
        if isinstance(module, QuantLinear) and name.rpartition(".")[2] == target_name:
            check_adapter_config(peft_config, name)


def _check_merge(tuner: Any) -> None:
    layers = quantized_tuner_layers(tuner.model)
    if layers:
        raise merge_refusal(layers)


def install() -> None:
    """Put hf_quant's LoRA layer and checks into PEFT (idempotent; a no-op without PEFT)."""
    if peft_available():
        compat.patch_peft(_create_lora_module, _check_target, _check_merge)


def register_lora(lora_config: Any) -> Any:
    """PEFT's documented custom-module route: make `lora_config` wrap hf_quant layers in `QuantLoraLinear`
    (what `install()` already does for every config). Returns the config."""
    from .peft_lora import QuantLoraLinear

    return compat.register_custom_lora_module(lora_config, {QuantLinear: QuantLoraLinear})
