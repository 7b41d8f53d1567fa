"""The hot path of `QuantLinear.forward`: pick (once per shape class) and run a kernel, the
autograd function for training through a frozen quantized base, and the same computation as one
`torch.library` custom op for `torch.compile` and CUDA graphs.

Per call in eager mode this does a dict lookup keyed by (device, dtype, row class) and calls the
cached kernel with its cached weight layout; nothing else (benchmarks/bench_overhead.py).
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import Any

import torch

from ..core import dequantize_weight
from .kernels.base import _CHOICE_LISTENERS, _LISTENERS, _forcing_anywhere, row_class, select_kernel


def linear(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W_hat.T + bias through the selected kernel.

    When autograd needs it (LoRA on a quantized base: gradients flow through the frozen layer to
    the adapters below it), the kernel runs inside `_QuantLinearFunction`, which keeps nothing but
    the layer for backward and dequantizes W_hat there, one layer at a time: no float copy of the
    weights stays alive between forward and backward. Under `torch.compile` the layer is one op,
    `torch.ops.hf_quant.quant_linear`, with the same forward and backward."""
    in_scales = layer._buffers["in_scales"]  # (not through nn.Module.__getattr__: this runs once per layer and token)
    if in_scales is not None:  # W_hat = W_q * g: the kernels see x * g and the weight without g
        x = x * in_scales.to(x.dtype)
    if torch.compiler.is_compiling():
        scales = layer.qweight if layer.scales is None else layer.scales  # GGUF layers: all in qweight
        return torch.ops.hf_quant.quant_linear(x, layer.qweight, scales, layer.kernel_bias, layer._op_id)
    if torch.is_grad_enabled():
        bias = layer.kernel_bias
        if x.requires_grad or (bias is not None and bias.requires_grad):
            return _QuantLinearFunction.apply(x, bias, layer)
    return run_kernel(layer, x)


def run_kernel(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """Forward through the kernel chosen for this (device, dtype, row class), no autograd."""
    if _forcing_anywhere[0]:  # use_kernel / prefer_kernel: choose anew on every call, outside the cache
        kernel = select_kernel(layer, x)
        return kernel.forward(layer, x, layer.prepared(kernel, x.device, x.dtype))
    dtype = x.dtype
    key = (x.device, dtype, row_class(dtype, x.numel() // x.shape[-1] if x.shape[-1] else 0))
    entry = layer._kernel_cache.get(key)
    if entry is None or (entry[2] and sum(map(_VERSION, entry[2])) != entry[3]):
        if entry is not None:  # a buffer was edited in place since the layout was built
            layer.invalidate_kernels()
        kernel = select_kernel(layer, x)
        prepared = layer.prepared(kernel, x.device, x.dtype)
        guarded = layer.tracked_buffers() if prepared is not None else ()
        entry = layer._kernel_cache[key] = (kernel.forward, prepared, guarded, sum(map(_VERSION, guarded)))
    return entry[0](layer, x, entry[1])


# A prepared layout is a copy of the buffers it was built from; their version counters (bumped by
# every in-place op, inference mode included, QuantLinear keeps its buffers out of inference mode)
# tell when it is stale. Counters only grow, so their sum changes exactly when one of them does. Kernels without a layout read the buffers directly and need no check.
_VERSION = operator.attrgetter("_version")


def grad_input(layer: Any, grad_y: torch.Tensor) -> torch.Tensor:
    """dy/dx = dy @ W_hat, W_hat dequantized here and dropped after (straight through any
    activation quantization). The kernels' W_hat: without `in_scales`, which `linear` applies to x."""
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features, grad_y.dtype,
                          layer.g_idx)
    return grad_y @ W


def grad_bias(layer: Any, grad_y: torch.Tensor) -> torch.Tensor:
    return grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(layer.kernel_bias.dtype)


class _QuantLinearFunction(torch.autograd.Function):
    """y = kernel(x); dy/dx = dy @ W_hat (dequantized in backward); dy/dbias = sum of dy over rows.
    The packed weights are frozen: they never get a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: Any) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            # detached: a kernel's output may be a view of its 2-D result, and autograd forbids in-place
            # ops on a custom Function's view outputs (Falcon's `mlp_output += attention_output`)
            return run_kernel(layer, x).detach()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        layer = ctx.layer
        gx = grad_input(layer, grad_y) if ctx.needs_input_grad[0] else None
        gb = grad_bias(layer, grad_y) if ctx.needs_input_grad[1] else None
        return gx, gb, None


# --- the custom op: what torch.compile sees -----------------------------------------------------------

_LAYERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_ids = itertools.count()


def register_layer(layer: Any) -> int:
    """A new process-wide id under which the custom op finds `layer` (and its prepared kernel layouts);
    taken when the layer is built or unpickled, so that compiled code only reads it."""
    key = next(_ids)
    _LAYERS[key] = layer
    return key


def layer_id(layer: Any) -> int:
    return layer._op_id


def _invalidate_all_layers() -> None:
    """A kernel was registered or removed: every live layer chooses again on its next call."""
    for layer in list(_LAYERS.values()):
        layer.invalidate_kernels()


def _drop_all_choices() -> None:
    """The choice rules changed (not the kernels): every live layer chooses again, keeping its layouts."""
    for layer in list(_LAYERS.values()):
        layer._kernel_cache.clear()


_LISTENERS.append(_invalidate_all_layers)
_CHOICE_LISTENERS.append(_drop_all_choices)


@torch.library.custom_op("hf_quant::quant_linear", mutates_args=())
def quant_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    layer: int) -> torch.Tensor:
    """x @ W_hat.T + bias for the QuantLinear registered as `layer` (whose packed buffers are
    `qweight`, `scales`: passed so that the graph depends on them)."""
    with torch.no_grad():
        return run_kernel(_LAYERS[layer], x)


@quant_linear_op.register_fake
def _(x, qweight, scales, bias, layer):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


@torch.library.custom_op("hf_quant::quant_linear_grad_input", mutates_args=())
def quant_linear_grad_input_op(grad_y: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               layer: int) -> torch.Tensor:
    """dy/dx of `quant_linear`: grad_y @ W_hat, W_hat dequantized inside the op (and dropped after)."""
    return grad_input(_LAYERS[layer], grad_y)


@quant_linear_grad_input_op.register_fake
def _(grad_y, qweight, scales, layer):
    return grad_y.new_empty((*grad_y.shape[:-1], _LAYERS[layer].in_features))


def _setup_context(ctx, inputs, output):
    x, qweight, scales, bias, layer = inputs
    ctx.layer = layer
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(qweight, scales)


def _backward(ctx, grad_y):
    qweight, scales = ctx.saved_tensors
    gx = quant_linear_grad_input_op(grad_y, qweight, scales, ctx.layer) if ctx.needs_input_grad[0] else None
    gb = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return gx, None, None, gb, None


quant_linear_op.register_autograd(_backward, setup_context=_setup_context)
