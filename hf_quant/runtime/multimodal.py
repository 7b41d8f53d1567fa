"""Multimodal models: which part is the language model (model structure, no math).

transformers builds a vision-language (or audio-language) model as a composite: a config with a `text_config`
sub-config, and a module holding the text decoder (`get_decoder()`: `model.language_model` for Llava, Gemma 3,
Mistral 3, Qwen2.5-VL, Qwen3-VL, Qwen3.5, PaliGemma; `model.text_model` for Idefics3; `language_model` for
Llama 4) beside the encoders and projectors of the other modalities (`model.vision_tower`, `model.visual`,
`model.multi_modal_projector`, `model.connector`, `audio_tower`, ...).

hf_quant quantizes the language model and keeps the rest in float by default (`non_text_modules`), as GPTQ and
AWQ engines do: the calibration text never reaches those encoders, they are a few percent of the parameters, and
a vision tower's errors feed every image token. Nothing here is keyed to a model type: the decoder is the one
the model names through `get_decoder()`, the rest is every sibling of it (or of one of its ancestors) that holds
a linear layer, except the output head.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .. import compat
from ..core.layers import FLOAT_LINEARS


def text_config(config: Any) -> Any:
    """The text part of a transformers config (the config itself for a text-only model); `config` may be a
    config object or a config.json dict."""
    if config is None:
        return None
    if isinstance(config, dict):
        sub = config.get("text_config")
        return sub if isinstance(sub, dict) else config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def is_multimodal(model: nn.Module) -> bool:
    """A composite model: its config has a text sub-config other than itself."""
    config = getattr(model, "config", None)
    return config is not None and text_config(config) is not config


def language_model_name(model: nn.Module) -> str | None:
    """The qualified name of a multimodal model's text decoder (`get_decoder()`), or None (a text-only model,
    or one that does not name its decoder)."""
    if not is_multimodal(model):
        return None
    try:
        decoder = model.get_decoder()
    except Exception:  # a model without the accessor: no split is made
        return None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return None
    return next((name for name, module in model.named_modules() if module is decoder), None)


def non_text_modules(model: nn.Module) -> list[str]:
    """The qualified names of a multimodal model's modules outside its language model that hold linear layers
    (vision / audio encoders, multimodal projectors), except the output head: what hf_quant keeps in float by
    default. Empty for a text-only model."""
    decoder = language_model_name(model)
    if not decoder:
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parts = decoder.split(".")
    found = []
    for depth in range(len(parts)):  # the siblings of the decoder and of each of its ancestors
        parent_name = ".".join(parts[:depth])
        parent = model.get_submodule(parent_name) if parent_name else model
        on_path = parts[depth]
        for child_name, child in parent.named_children():
            if child_name == on_path or child is head:
                continue
            if any(isinstance(m, FLOAT_LINEARS) for m in child.modules()):
                found.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return found


_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")


def auto_class(config: Any) -> Any:
    """The transformers auto class that builds the generative model of `config`. Of AutoModelForCausalLM,
    AutoModelForImageTextToText and AutoModelForMultimodalLM (where this transformers has it), the one that maps
    the config to the class its `architectures` names; else the first that knows the config. So a vision-language
    checkpoint is rebuilt whole (Llava, Qwen2.5-VL: AutoModelForImageTextToText; Qwen3.5 and Llama 4, whose
    AutoModelForCausalLM class is their text model alone: their ...ForConditionalGeneration), and a text model as
    AutoModelForCausalLM builds it. AutoModelForCausalLM for a config none of them knows (its error names it)."""
    import transformers

    autos = [getattr(transformers, name) for name in _AUTO_CLASSES if hasattr(transformers, name)]
    knows = [auto for auto in autos if compat.auto_class_model(auto, config) is not None]
    named = set(getattr(config, "architectures", None) or [])
    for auto in knows:
        if compat.auto_class_model(auto, config).__name__ in named:
            return auto
    return knows[0] if knows else autos[0]
