"""Float layers as hf_quant sees them: nn.Linear and transformers' Conv1D (GPT-2), which stores its
weight transposed. Helpers that read, write, build and swap them, and walk cached inputs."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

FLOAT_LINEARS = (nn.Linear, Conv1D)


FINITE_TILE = 1 << 22  # elements per step of `all_finite`


def all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all() a slice of rows at a time: no boolean copy of a large matrix (an
    11008-wide Hessian's would be 121 MB)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + FINITE_TILE]).all()) for i in range(0, flat.numel(), FINITE_TILE))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whichever layer type holds it."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_linear_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write an (out, in) weight into an nn.Linear or a transformers Conv1D, in place, in its dtype."""
    with torch.no_grad():
        module.weight.copy_(W.t() if isinstance(module, Conv1D) else W)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def float_layer(W: torch.Tensor, bias: torch.Tensor | None, as_conv1d: bool) -> nn.Module:
    """A float layer computing x @ W.T + bias for an (out, in) weight `W`: a transformers Conv1D
    (which stores W transposed) or an nn.Linear, on W's device and in its dtype."""
    out_features, in_features = W.shape
    if as_conv1d:
        new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(W.t().contiguous())
    else:
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(W)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(W.dtype))
    return new.to(W.device)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` with `fn` applied to every tensor inside (tuples, lists, dicts): cached block inputs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj
