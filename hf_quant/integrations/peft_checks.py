"""What an adapter on an hf_quant layer may not do, as errors that name the module (no PEFT import)."""

from __future__ import annotations

from typing import Any

# LoRA initialisations that read the base weight as floats and write a modified one back.
_WEIGHT_REWRITING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")


def _peft_type(config: Any) -> str:
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind or type(config).__name__))


def is_lora(config: Any) -> bool:
    return _peft_type(config).upper() == "LORA"


def check_adapter_config(config: Any, module_name: str) -> None:
    """Raise if PEFT `config` asks for something an adapter on packed weights cannot do."""
    if not is_lora(config):
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


def merge_refusal(layers: dict[str, Any] | list[str]) -> ValueError:
    first = next(iter(layers))
    return ValueError(
        f"Cannot merge adapters into {len(layers)} hf_quant layer(s) (e.g. {first}) in place: their weights "
        "are packed integer codes. Use `hf_quant.merge_lora(model)` for a float model with the adapter "
        "merged, or `hf_quant.merge_lora(model, requantize=True)` to quantize the merged model again.")
