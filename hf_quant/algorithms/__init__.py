"""Quantization algorithms behind one small interface, and the registry that names them.

An algorithm turns a float weight `W` (out_features x in_features), plus any statistics it needs,
into integer codes, scales and zeros (`QuantizedWeight`). Adding a method = one file here + one
`register_method` call in it + its import below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..config import LayerSpec


@dataclass
class QuantizedWeight:
    """Integer codes and their grid, the result of every algorithm.

    codes: uint8 (out, in), values in [0, maxq]; `W_hat = (codes - zero) * scale` per group.
    scale: (out, n_groups) in the dtype it will be stored in (codes were rounded against it).
    zero:  uint8 (out, n_groups) integer zero points, or None for a symmetric grid.
    g_idx: int32 (in,) group of each input channel when groups are not contiguous (act-order), else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None = None


class Method(Protocol):
    name: str
    needs_calibration: bool

    def quantize(self, W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, **stats) -> QuantizedWeight: ...


@dataclass(frozen=True)
class _Registered:
    name: str
    needs_calibration: bool
    act_order: bool
    options: tuple[str, ...]
    defaults: dict
    quantize: Callable[..., QuantizedWeight]
    block_stage: str | None = None

    def options_from(self, config) -> dict:
        """The QuantConfig fields this method takes as keyword arguments."""
        return {k: getattr(config, k) for k in self.options}


_METHODS: dict[str, _Registered] = {}


def register_method(
    name: str,
    *,
    needs_calibration: bool,
    act_order: bool = False,
    options: tuple[str, ...] = (),
    defaults: dict | None = None,
    block_stage: str | None = None,
) -> Callable:
    """Decorator registering `fn(W, spec, scale_dtype, **stats) -> QuantizedWeight` under `name`.

    needs_calibration: the method takes a Hessian `H` from the block-wise driver.
    act_order: the method honours `desc_act`/`static_groups` and returns a `g_idx` when `spec.g_idx`.
    options: names of `QuantConfig` fields passed to `fn` as keyword arguments.
    defaults: values for `QuantConfig` fields left at `None` ("the method's default"), e.g. `mse`.
    block_stage: a stage of the block-wise driver (`hf_quant.calibration.stages`) run on each float
        block before its layers are quantized (AWQ's scaling, OmniQuant's clipping); what it returns
        per layer is passed to `fn` as keyword arguments.
    """

    def deco(fn: Callable[..., QuantizedWeight]) -> Callable[..., QuantizedWeight]:
        if name in _METHODS:
            raise ValueError(f"quantization method {name!r} is already registered")
        _METHODS[name] = _Registered(name, needs_calibration, act_order, tuple(options), dict(defaults or {}), fn,
                                     block_stage)
        return fn

    return deco


def get_method(name: str) -> _Registered:
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; available: {available_methods()}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)


from . import awq, gptq, omniquant, rtn  # noqa: E402,F401  (register the methods)
