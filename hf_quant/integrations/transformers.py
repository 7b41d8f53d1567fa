"""transformers glue: the `HfQuantizer` registered under quant_method "hf_quant". No math here.

Not pre-quantized (a float checkpoint + `quantization_config=QuantConfig(...)`): weights load as
usual, then `_process_model_after_weight_loading` quantizes. Pre-quantized (an hf_quant checkpoint):
empty `QuantLinear`s replace the targets on the meta device before loading, after the checkpoint's
headers were checked, and the loader fills their buffers by name.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantizer

from .. import compat
from ..calibration import quantize_model
from ..calibration.blockwise import find_blocks
from ..calibration.data import describe_dataset
from ..config import QUANT_METHOD, QuantConfig
from ..io.atomic import recover
from ..io.native import check_checkpoint
from ..methods import get_method
from ..runtime import QuantLinear
from ..runtime import experts
from ..runtime.convert import (dequantize_model, find_targets, prepare_experts, replace_with_empty_quant_linears,
                               resolve_modules_to_not_convert, warn_float_expert_weights,
                               warn_unmatched_skips)
from .. import training
from . import hub
from . import peft as peft_integration

logger = logging.getLogger("hf_quant")


def provenance(model, calibration: str) -> dict:
    """What the model card says of where a quantized model came from (no private paths)."""
    from ..version import __version__

    return {"base_model": hub.describe_source(getattr(model.config, "name_or_path", None)), "calibration": calibration,
            "hf_quant_version": __version__}


@register_quantizer(QUANT_METHOD)
class HfQuantQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: QuantConfig
    calibration_report: list[dict] = []

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """transformers calls this with the user's device_map, then (for "auto", "balanced", ...) with the map it
        inferred. Quantizing a float model that does not fit: the inferred map offloads part of it to "disk",
        and every decoder block is sent there (`_blocks_to_disk`), so that calibration holds one block at a
        time (`core.offload`) and the quantized model is held in memory at the end."""
        if isinstance(device_map, str):
            self._inferring_device_map = True
        if not (isinstance(device_map, dict) and "disk" in device_map.values()):
            return
        if self.pre_quantized:
            raise ValueError("hf_quant models cannot be offloaded to disk; use device_map without 'disk' entries (or "
                             "a max_memory that holds the quantized model). To quantize a model larger than memory, "
                             "load it with quantization_config=QuantConfig(...) and device_map='auto', or stream it "
                             "from disk to disk: hf_quant.quantize_checkpoint(src, dst, QuantConfig(...)) or "
                             "`hf-quant quantize SRC DST` (resumable).")
        blocks = getattr(self, "_blocks", None)
        if getattr(self, "_inferring_device_map", False) and blocks is not None:
            _blocks_to_disk(device_map, *blocks)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, keep_in_fp32_modules=None,
                                             **kwargs: Any):
        config = self.quantization_config
        # `None` -> transformers' defaults (output embeddings, keep-in-fp32 modules); an explicit list is
        # taken as is (plus keep-in-fp32 modules); tied weights are never quantized.
        keep = keep_in_fp32_modules if keep_in_fp32_modules is not None else compat.keep_in_fp32_modules(model)
        skip = resolve_modules_to_not_convert(model, config.modules_to_not_convert, keep)
        if config.modules_to_not_convert is None:
            config.modules_to_not_convert = skip  # saved resolved, so a reload rebuilds the same layers
        elif not self.pre_quantized:
            warn_unmatched_skips(model, config.modules_to_not_convert)
        self._skip = skip
        # MoE experts: unfused on the meta device where the checkpoint holds them per expert; a float model's are
        # unfused once its weights are loaded (`_process_model_after_weight_loading`)
        self.targets = (prepare_experts(model, config, skip, mode="load") if self.pre_quantized
                        else find_targets(model, config, skip))
        if not self.pre_quantized:
            self._blocks = _block_list(model, config)
            if kwargs.get("device_map") is None:
                _warn_if_too_big(checkpoint_files)
        if self.pre_quantized and config.latent:  # the latent state of quantization-aware training
            training_config = copy.deepcopy(config)
            training_config.latent = None
            training.prepare_layers(model, training_config, self.targets)
            model.hf_quant_training_config = training_config
        elif self.pre_quantized:
            if checkpoint_files:
                recover(Path(checkpoint_files[0]).parent)  # what a killed save left beside it
                check_checkpoint(model, self.targets, checkpoint_files)
            replace_with_empty_quant_linears(model, self.targets, config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        peft_integration.install()  # clear errors where PEFT would merge into packed weights
        config = self.quantization_config
        if self.pre_quantized:
            for name, module in model.named_modules():
                if isinstance(module, QuantLinear):
                    module.check_buffers(name)
        else:
            self.targets = prepare_experts(model, config, self._skip)  # MoE experts as per-expert layers
            warn_float_expert_weights(model, self._skip)
            try:
                # per-block summary of the calibration, readable as `model.hf_quantizer.calibration_report`
                self.calibration_report = quantize_model(model, config, self.targets)
            except BaseException:
                experts.fuse(model)  # the layers were put back in float: the experts go back to their 3-D layout
                raise
            method = get_method(config.method)
            calibration = ("none: data-free method" if not method.calibrates(method.options_from(config))
                           else describe_dataset(config.dataset, config.num_samples, config.seq_len))
            config.provenance = provenance(model, calibration)
        hub.install(model)  # atomic save_pretrained with a model card; push_to_hub with card and tokenizer
        return model

    def get_state_dict_and_metadata(self, model):
        """What save_pretrained writes: the model's own state dict (None), or the one `hf_quant.streaming` sets for a
        disk-offloaded skeleton (meta tensors, ordered as a loaded model's state dict is ordered on save)."""
        return getattr(self, "offloaded_state_dict", None), {}

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """A loaded latent checkpoint (`QuantConfig.latent`) is a model in quantization-aware training."""
        return bool(self.quantization_config.latent)

    @property
    def is_compileable(self) -> bool:
        """Every quantized layer is one custom op under torch.compile (`fullgraph=True` holds), so
        `generate` may compile the decode step with a static cache (CUDA graphs on a GPU)."""
        return True

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)


def _warn_if_too_big(checkpoint_files) -> None:
    """A float checkpoint larger than the memory available now, loaded whole: say how to calibrate it from disk."""
    from ..core.devices import available_memory_bytes

    available = available_memory_bytes()
    try:
        size = sum(Path(f).stat().st_size for f in checkpoint_files or [])
    except OSError:
        return
    if available is not None and size > 0.9 * available:
        logger.warning("hf_quant: the float checkpoint (%.1f GiB) is larger than the memory available now (%.1f GiB). "
                       "Pass device_map='auto' to calibrate it a block at a time from disk, or stream it disk to disk "
                       "with hf_quant.quantize_checkpoint(src, dst, config) / `hf-quant quantize`.", size / 2**30,
                       available / 2**30)


def _block_list(model, config: QuantConfig):
    """(model, name of the decoder blocks' ModuleList) where there is one, for `_blocks_to_disk`."""
    try:
        return model, find_blocks(model, config.block_name_to_quantize)[0]
    except ValueError:
        return None


def _blocks_to_disk(device_map: dict, model, blocks: str) -> None:
    """Place every module under `blocks` on "disk" in the inferred `device_map` (in place: transformers goes on
    with this dict), splitting an entry that holds the blocks with other modules into its children."""
    while True:
        whole = next((k for k, v in device_map.items() if v != "disk" and (k == "" or blocks.startswith(k + "."))),
                     None)
        if whole is None:
            break
        where = device_map.pop(whole)
        parent = model.get_submodule(whole)
        for child, _ in parent.named_children():
            device_map[f"{whole}.{child}" if whole else child] = where
        for param, _ in parent.named_parameters(recurse=False):
            device_map[f"{whole}.{param}" if whole else param] = where
    for key in device_map:
        if key == blocks or key.startswith(blocks + "."):
            device_map[key] = "disk"


def quantize(model, config: QuantConfig):
    """Quantize a float transformers model already in memory, in place, exactly as
    `from_pretrained(path, quantization_config=config)` would have; returns the model.

    The result is a regular hf_quant model: `save_pretrained` writes an hf_quant checkpoint, and
    `model.hf_quantizer.calibration_report` holds the calibration summary.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize: config must be an hf_quant.QuantConfig, got {type(config).__name__}")
    if getattr(model, "hf_quantizer", None) is not None or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("quantize: this model is already quantized; start from a float model "
                         "(e.g. `model.dequantize()` or `hf_quant.merge_lora(...)` give one).")
    quantizer = HfQuantQuantizer(config, pre_quantized=False)
    try:
        quantizer.preprocess_model(model=model, dtype=getattr(model.config, "dtype", None), device_map=None)
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)  # the layers are put back if calibration fails
    except BaseException:
        quantizer.remove_quantization_config(model)
        raise
    return model


def attach(model, config: QuantConfig):
    """Make a model whose layers hf_quant has already replaced (e.g. by `hf_quant.training.convert`) a
    regular hf_quant model: its quantizer, config and the atomic save / push with a model card."""
    quantizer = HfQuantQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    peft_integration.install()
    hub.install(model)
    return model


def _after_training_convert(model, config: QuantConfig | None) -> None:
    if config is None or not hasattr(model, "config") or any(training.is_training_layer(m) for m in model.modules()):
        return
    config.provenance = provenance(model, "quantization-aware training (hf_quant.training), data chosen by the user")
    attach(model, config)


def _after_training_prepare(model, config: QuantConfig) -> None:
    peft_integration.install()  # adapters on training layers are refused clearly


training.on_convert(_after_training_convert)
training.on_prepare(_after_training_prepare)
