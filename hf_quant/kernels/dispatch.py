"""Kernel registry and selection by device, dtype, bits and layout.

Each kernel says whether it `supports` a (layer, activation) pair; the highest-priority one that
does runs. Kernel-specific weight layouts are built on first use by `prepare` and cached on the
layer (keyed by kernel, device, dtype and the version of the packed buffers), never saved.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch


class Kernel:
    """Base class: override `supports`, `forward`, and `prepare` if the kernel needs its own layout."""

    name: str = ""
    priority: int = 0

    def supports(self, layer: Any, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def prepare(self, layer: Any, x: torch.Tensor) -> Any:
        return None

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        raise NotImplementedError


_KERNELS: dict[str, Kernel] = {}
_forced = threading.local()


def register_kernel(kernel: Kernel) -> Kernel:
    if kernel.name in _KERNELS:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    return kernel


def available_kernels() -> list[str]:
    return [k.name for k in sorted(_KERNELS.values(), key=lambda k: -k.priority)]


@contextlib.contextmanager
def _thread_setting(attr: str, name: str) -> Iterator[None]:
    """Set `_forced.<attr>` to kernel `name` for this thread inside the block."""
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; available: {available_kernels()}")
    prev = getattr(_forced, attr, None)
    setattr(_forced, attr, name)
    try:
        yield
    finally:
        setattr(_forced, attr, prev)


def use_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Force one kernel (e.g. "reference") inside the block; errors if it cannot run a layer."""
    return _thread_setting("name", name)


def prefer_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Inside the block, run kernel `name` wherever it supports the layer and input, and the usual
    choice elsewhere (e.g. a decode-only kernel during `generate`, whose prompt it cannot run)."""
    return _thread_setting("preferred", name)


def select_kernel(layer: Any, x: torch.Tensor) -> Kernel:
    preferred = getattr(_forced, "preferred", None)
    if preferred is not None and getattr(_forced, "name", None) is None and _KERNELS[preferred].supports(layer, x):
        return _KERNELS[preferred]
    forced = getattr(_forced, "name", None)
    if forced is not None:
        kernel = _KERNELS[forced]
        if not kernel.supports(layer, x):
            raise ValueError(
                f"kernel {forced!r} cannot run {layer.extra_repr()} on {x.device.type}/{x.dtype} inputs; "
                f"use one of {[k for k in available_kernels() if _KERNELS[k].supports(layer, x)]}."
            )
        return kernel
    for kernel in sorted(_KERNELS.values(), key=lambda k: -k.priority):
        if kernel.supports(layer, x):
            return kernel
    raise RuntimeError(f"no kernel supports {layer.extra_repr()} on {x.device.type}/{x.dtype}")


def _buffers_version(layer: Any) -> tuple:
    # Inference tensors (made under torch.inference_mode) carry no version counter: key on storage only.
    return tuple(
        (t.data_ptr(), -1 if t.is_inference() else t._version)
        for t in (layer.qweight, layer.scales, layer.qzeros, layer.g_idx)
        if t is not None
    )


def linear(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W_hat.T + bias through the selected kernel.

    When autograd needs it (LoRA on a quantized base: gradients flow through the frozen layer to
    the adapters below it), the kernel runs inside `_QuantLinearFunction`, which keeps nothing but
    the layer for backward and dequantizes W_hat there, one layer at a time: no float copy of the
    weights stays alive between forward and backward."""
    bias = layer.bias
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantLinearFunction.apply(x, bias, layer)
    return _kernel_forward(layer, x)


def _kernel_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    kernel = select_kernel(layer, x)
    key = (kernel.name, x.device, x.dtype)
    version = _buffers_version(layer)
    cached = layer._kernel_cache.get(key)
    if cached is None or cached[0] != version:
        cached = (version, kernel.prepare(layer, x))
        layer._kernel_cache[key] = cached
    return kernel.forward(layer, x, cached[1])


class _QuantLinearFunction(torch.autograd.Function):
    """y = kernel(x); dy/dx = dy @ W_hat (dequantized in backward); dy/dbias = sum of dy over rows.
    The packed weights are frozen: they never get a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: Any) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return _kernel_forward(layer, x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        from .reference import dequantize_weight

        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features,
                                  grad_y.dtype, layer.g_idx)
            grad_x = grad_y @ W
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(layer.bias.dtype)
        return grad_x, grad_bias, None
