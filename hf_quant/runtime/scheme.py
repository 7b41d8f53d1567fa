"""A quantized linear's scheme: its weight format, plus an optional activation quantization.

Weight-only layers (every method so far) have `activation=None`. A scheme that also quantizes the
activations at run time (dynamic int8 per token, LLM.int8's outlier decomposition) registers an
`ActivationQuantizer` by name here, and kernels that run it list that name in
`Kernel.activations`; the `reference` kernel applies the quantizer's `fake_quantize` to the input,
so every such kernel has an oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core import LayerSpec
from ..core.registry import Registry


@dataclass(frozen=True)
class ActivationSpec:
    """Which activation quantizer a layer uses, and its parameters (hashable: part of the dispatch key)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @classmethod
    def of(cls, found: tuple[str, dict[str, Any]] | None) -> ActivationSpec | None:
        """From a method's (name, params) (`Method.activation_of`), or None."""
        return None if found is None else cls(found[0], tuple(sorted(found[1].items())))


@dataclass(frozen=True)
class Scheme:
    """weight: the stored layout; activation: the run-time input quantization (None: weight-only);
    output_norm: a LayerNorm without affine parameters on the product, before the bias (OneBit's layer:
    y = LN((x * g) @ W_hat^T) + bias), applied by `QuantLinear.forward` around the kernels."""

    weight: LayerSpec
    activation: ActivationSpec | None = None
    output_norm: bool = False

    @property
    def activation_name(self) -> str | None:
        return None if self.activation is None else self.activation.name


@dataclass(frozen=True)
class ActivationQuantizer:
    """fake_quantize(x, **params) -> x as the layer's kernels see it (same shape and dtype)."""

    name: str
    fake_quantize: Callable[..., torch.Tensor]


ACTIVATIONS: Registry[ActivationQuantizer] = Registry("activation quantizer")


def register_activation(quantizer: ActivationQuantizer) -> ActivationQuantizer:
    return ACTIVATIONS.register(quantizer.name, quantizer)


def get_activation(name: str) -> ActivationQuantizer:
    return ACTIVATIONS.get(name)


def fake_quantize_input(scheme: Scheme, x: torch.Tensor) -> torch.Tensor:
    """The input as the scheme's kernels see it (unchanged for weight-only schemes)."""
    if scheme.activation is None:
        return x
    return get_activation(scheme.activation.name).fake_quantize(x, **scheme.activation.kwargs())
