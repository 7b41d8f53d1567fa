"""hf_quant's own checkpoint format (README "On-disk format"): the QuantLinear buffers under their
own names (layout in `hf_quant.core.layout`) plus `quantization_config` in config.json.

The codec is the identity: a QuantLinear's state dict is what is stored. What this module adds is
the file handling around transformers' own saving and loading: the headers of a checkpoint are
checked against the modules it will fill before any weight is read, and a save is written into a
temporary directory and moved into place only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core import LayerSpec, buffer_specs
from ..core.layers import linear_shape
from .atomic import atomic_directory
from .checkpoint import check_module_tensors, index_checkpoint


def check_checkpoint(model: nn.Module, targets: dict[str, LayerSpec], checkpoint_files: list[str]) -> None:
    """Refuse a checkpoint whose files are not whole safetensors, or whose tensors do not fit the
    QuantLinears `targets` will become (named, from the headers only)."""
    entries = index_checkpoint(checkpoint_files)
    prefix = getattr(model, "base_model_prefix", "")
    prefixes = ["", f"{prefix}."] if prefix else [""]
    for name, spec in targets.items():
        in_f, out_f = linear_shape(model.get_submodule(name))
        check_module_tensors(entries, name, buffer_specs(in_f, out_f, spec, None), prefixes)


def write_checkpoint(model: nn.Module, directory: str | os.PathLike, *args: Any, tokenizer: Any = None,
                     add_files: Callable[[Path], None] | None = None, **save_kwargs: Any) -> Path:
    """transformers' `save_pretrained` of `model`, the tokenizer, and `add_files(tmp)` (e.g. the model
    card), written all-or-nothing into `directory`."""
    with atomic_directory(directory) as tmp:
        type(model).save_pretrained(model, tmp, *args, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if add_files is not None:
            add_files(tmp)
    return Path(directory)


def export_native(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None, **kwargs: Any) -> Path:
    """An hf_quant model's own `save_pretrained` (atomic, with its model card), plus the tokenizer."""
    if getattr(model, "hf_quantizer", None) is None:
        raise ValueError("export: this model is not an hf_quant model; quantize it with hf_quant first.")
    model.save_pretrained(out_dir, tokenizer=tokenizer, **kwargs)
    return Path(out_dir)
