"""`merge_lora`: merge the LoRA adapters of a PEFT model on an hf_quant base into a float model, and
optionally quantize the result again (PEFT's own merge would add the delta into packed codes)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from ..config import QuantConfig
from ..core.layers import float_layer, set_module
from ..runtime.convert import dequantize_layer, dequantize_model
from .peft import base_layer, quantized_tuner_layers
from .transformers import quantize

logger = logging.getLogger("hf_quant")


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

    Re-quantizing uses the method's own grid and run-time scheme: for `llm_int8` / `w8a8` the merged
    weights become int8 rows with fp32 absmax scales (bitsandbytes' grid, bit for bit) and the layers
    keep their per-token int8 activations and threshold (tests/test_int8_lora.py).

    Re-quantizing puts the merged weights on a new grid, which gives back part of what the adapter
    gained (figures in the README); the float merge is exact up to the model dtype.
    """
    from peft.tuners.tuners_utils import BaseTuner

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
    for name, layer in quantized_tuner_layers(base).items():
        q = base_layer(layer)
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
