"""Planted activation outliers: a copy of a Llama-family model whose normalised hidden states carry a
few large channels, like the emergent outliers of large models that LLM.int8() and SmoothQuant are
built for, with the float function unchanged.

`plant_outliers` scales chosen hidden channels of every decoder RMSNorm weight up by `factor` and
the matching input columns of the linears that read that norm (q/k/v after `input_layernorm`,
gate/up after `post_attention_layernorm`) down by the same factor: norm(x)_j * factor reaches the
linears, whose column j is divided by factor, so W x is the same. A power of two (e.g. 32) keeps a
bf16 / fp32 model's float function bit for bit, as long as no weight underflows.
Used by the w8a8 tests and `benchmarks/ppl_int8.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .core.layers import linear_weight

_PAIRS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


def _sub(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def plant_outliers(model: nn.Module, channels: Sequence[int], factor: float) -> int:
    """Scale `channels` of every decoder norm's weight up by `factor` and the same input columns of
    the linears that read it down by `factor`, in place; returns the number of norms changed.
    Llama-family blocks (`model.model.layers`: Llama, Mistral, Qwen2, ...); raises ValueError otherwise."""
    channels = list(channels)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ValueError(f"plant_outliers: factor={factor!r} must be a number > 0.")
    layers = _sub(model, "model.layers")
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"plant_outliers: {type(model).__name__} has no model.layers of Llama-family blocks.")
    changed = 0
    for i, layer in enumerate(layers):
        for norm_name, linear_names in _PAIRS:
            norm = _sub(layer, norm_name)
            linears = [_sub(layer, n) for n in linear_names]
            if norm is None or any(m is None for m in linears):
                raise ValueError(f"plant_outliers: model.layers.{i} has no {norm_name} feeding {list(linear_names)} "
                                 "(Llama-family blocks only).")
            width = norm.weight.shape[0]
            if channels and not all(0 <= c < width for c in channels):
                raise ValueError(f"plant_outliers: channels {channels} outside the hidden size {width}.")
            norm.weight[channels] *= factor
            if getattr(norm, "bias", None) is not None:
                norm.bias[channels] *= factor
            for lin in linears:
                linear_weight(lin)[:, channels] /= factor
            changed += 1
    return changed
