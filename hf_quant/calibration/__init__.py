"""Drives a quantization method over a model's layers.

Data-free methods (RTN) quantize each target layer from its weight alone. Methods that need
activation statistics (GPTQ, AWQ, OmniQuant) run through the block-wise driver in `blockwise.py`.
"""

from __future__ import annotations

import logging
import time

import torch.nn as nn
from transformers.utils import logging as hf_logging

from ..config import LayerSpec, QuantConfig
from ..core import offload
from ..core.layers import set_module
from ..methods import get_method
from .blockwise import quantize_blockwise
from .layer import quantize_layer

logger = logging.getLogger("hf_quant")


def quantize_model(model: nn.Module, config: QuantConfig, targets: dict[str, LayerSpec]) -> list[dict]:
    """Replace every target layer of `model` in place. On any failure the original layers are put
    back, so the model is left as it was. Returns the calibration driver's per-block summary
    (empty for data-free methods).

    A model that accelerate offloads (`from_pretrained(..., device_map=...)` with "disk" entries, when the float
    model does not fit) is quantized a block (or, data-free, a layer) at a time, each read from disk when its
    turn comes; the quantized model is then held in memory like any other (`offload.keep_onloaded`)."""
    method = get_method(config.method)
    start = time.perf_counter()
    originals = {name: model.get_submodule(name) for name in targets}
    if method.needs_calibration:  # a bool, or a function of the options (the driver asks `calibrates`)
        modes = [(m, m.training) for m in model.modules()]  # calibrated in eval mode: no dropout in the statistics
        model.eval()
        try:
            report = quantize_blockwise(model, config, targets)
        except BaseException:
            for name, module in originals.items():
                set_module(model, name, module)
            raise
        finally:
            for m, training in modes:
                m.training = training
            known = {id(m) for m, _ in modes}
            for m in model.modules():  # the new layers take the mode of the model
                if id(m) not in known:
                    m.training = model.training
        _keep_onloaded(model)
        return report
    new_layers = {}
    for name in hf_logging.tqdm(list(targets), desc="hf_quant: quantizing", disable=not hf_logging.is_progress_bar_enabled()):
        new_layers[name] = quantize_layer(name, originals[name], targets[name], config.method,
                                          **method.options_from(config))
    for name, layer in new_layers.items():
        set_module(model, name, layer)
    _keep_onloaded(model)
    logger.info("hf_quant: %s quantized %d layers in %.1f s", config.method, len(targets), time.perf_counter() - start)
    return []


def _keep_onloaded(model: nn.Module) -> None:
    if getattr(model, "hf_device_map", None) is not None and offload.is_offloaded(model):
        offload.keep_onloaded(model)
