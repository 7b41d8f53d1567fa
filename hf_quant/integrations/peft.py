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
The quantizer calls `install()` whenever an hf_quant model is built, when PEFT is installed; the hooks go in
when PEFT is first imported (or at once, if it is).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch.nn as nn

from .. import compat
from ..runtime import QuantLinear
from ..training import is_training_layer
from .peft_checks import check_adapter_config, is_lora, merge_refusal


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def quantized_tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> PEFT tuner layer, for every tuner layer whose base is a QuantLinear."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and isinstance(base_layer(m), QuantLinear)}


def _refuse_training_layer(target: nn.Module) -> None:
    if is_training_layer(base_layer(target)):
        raise ValueError(f"{type(base_layer(target)).__name__} ({base_layer(target).extra_repr()}) is still in "
                         "quantization-aware training (hf_quant.training.prepare): its latent weights are trained "
                         "directly. Freeze it with hf_quant.training.convert(model) first, then add adapters to the "
                         "quantized model.")


PEFT_MIN = "0.19"  # the LoRA layers' config-object API (`Linear(base, name, config=...)`, `update_layer(..., config)`)


def require_peft() -> None:
    """A clear error where the installed PEFT predates the LoRA layer API hf_quant's layer is built on (PEFT 0.18
    and older pass each option separately: the layer would fail inside PEFT with a TypeError)."""
    import peft
    from packaging.version import Version

    if Version(peft.__version__) < Version(PEFT_MIN):
        raise ImportError(f"LoRA on hf_quant layers needs peft >= {PEFT_MIN} (its LoRA layers take the config "
                          f"object); this is peft {peft.__version__}: pip install -U 'peft>={PEFT_MIN}'")


def _create_lora_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module | None:
    _refuse_training_layer(target)
    if not isinstance(base_layer(target), QuantLinear):
        return None
    require_peft()
    from .peft_lora import QuantLoraLinear

    return QuantLoraLinear(target, adapter_name, config=lora_config, **kwargs)


def _check_target(peft_config: Any, model: nn.Module, target_name: str) -> None:
    if is_lora(peft_config):
        return  # LoRA is checked per layer, with its full name, by QuantLoraLinear.update_layer
    for name, module in model.named_modules():  # PEFT passes the leaf name only
        if name.rpartition(".")[2] == target_name:
            _refuse_training_layer(module)
        if isinstance(module, QuantLinear) and name.rpartition(".")[2] == target_name:
            check_adapter_config(peft_config, name)


def _check_merge(tuner: Any) -> None:
    layers = quantized_tuner_layers(tuner.model)
    if layers:
        raise merge_refusal(layers)


def install() -> None:
    """Put hf_quant's LoRA layer and checks into PEFT (idempotent; a no-op without PEFT): now if PEFT is
    imported, else as soon as it is (PEFT is not imported for it: that costs seconds per process)."""
    if peft_available():
        compat.when_imported("peft", _patch)


def _patch() -> None:
    compat.patch_peft(_create_lora_module, _check_target, _check_merge)


def register_lora(lora_config: Any) -> Any:
    """PEFT's documented custom-module route: make `lora_config` wrap hf_quant layers in `QuantLoraLinear`
    (what `install()` already does for every config). Returns the config."""
    from .peft_lora import QuantLoraLinear

    return compat.register_custom_lora_module(lora_config, {QuantLinear: QuantLoraLinear})
