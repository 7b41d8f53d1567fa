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

from ..compat import checkpoint_key_renamer
from ..core import QUANT_BUFFERS, LayerSpec, buffer_specs
from ..core.layers import FLOAT_LINEARS, linear_shape
from ..runtime import QuantLinear
from .atomic import atomic_directory
from .checkpoint import check_module_tensors, index_checkpoint


_EXTRA_HINT = {"qzeros": "the config says sym=True (QuantConfig.sym or a dynamic rule), but the checkpoint stores "
                         "zero points",
               "g_idx": "the config says no act-order (QuantConfig.desc_act / static_groups, or group_size=-1), but "
                        "the checkpoint stores a g_idx"}


def check_checkpoint(model: nn.Module, targets: dict[str, LayerSpec], checkpoint_files: list[str]) -> None:
    """Refuse, before any weight is read, a checkpoint that does not match its quantization_config
    exactly (from the safetensors headers only):

    - each module the config quantizes has exactly the tensors its spec stores, of the right shapes;
    - no other module holds quantized tensors (the config would load it as a random float layer);
    - every linear the config keeps in float has its float weight (unless it is tied).

    Keys are compared under the model's names, after transformers' renaming of this architecture's
    checkpoint keys (`compat.checkpoint_key_renamer`, e.g. GPT-NeoX's `embed_out` -> `lm_head`).
    """
    rename = checkpoint_key_renamer(model)
    entries = {rename(k)[0]: v for k, v in index_checkpoint(checkpoint_files).items()}
    prefix = getattr(model, "base_model_prefix", "")
    prefixes = ["", f"{prefix}."] if prefix else [""]
    quantized = {}  # checkpoint module name -> model module name
    for name, spec in targets.items():
        in_f, out_f = linear_shape(model.get_submodule(name))
        expected = buffer_specs(in_f, out_f, spec, None)
        key_prefix = check_module_tensors(entries, name, expected, prefixes)
        extra = [t for t in QUANT_BUFFERS if t not in expected and f"{key_prefix}.{t}" in entries]
        if extra:
            raise ValueError(f"{name}: the checkpoint stores '{extra[0]}' for this module, which its quantization "
                             f"settings do not use: {_EXTRA_HINT.get(extra[0], 'the config does not match it')}. The "
                             "checkpoint does not match its quantization_config; use the config it was saved with.")
        quantized[key_prefix] = name
    for key in entries:
        module, _, tensor = key.rpartition(".")
        if tensor == "qweight" and module not in quantized:
            raise ValueError(f"{module}: the checkpoint quantizes this module, but its quantization_config keeps it in "
                             "float (modules_to_not_convert, a '-:' dynamic rule, or a layer the config cannot "
                             "quantize), so it would load as a randomly initialised layer. The checkpoint does not "
                             "match its quantization_config; use the config it was saved with.")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # public; tied copies are not saved
    floats = [n for n, m in model.named_modules() if isinstance(m, FLOAT_LINEARS) and not isinstance(m, QuantLinear)
              and n not in targets and f"{n}.weight" not in tied]
    found = {n: any(f"{p}{n}.weight" in entries for p in prefixes) for n in floats}
    if quantized or any(found.values()):  # keys follow module names (no renaming on load): a missing one is missing
        missing = [n for n, ok in found.items() if not ok]
        if missing:
            raise ValueError(f"{missing[0]}: the quantization_config keeps this layer in float, but the checkpoint has "
                             f"no '{missing[0]}.weight' (nor a quantized one), so it would load randomly initialised. "
                             "The checkpoint is incomplete or does not match its quantization_config.")


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
