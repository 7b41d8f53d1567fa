"""The runtime layer: schemes (the activation-quantization slot), kernels registered per scheme, and the
custom op that torch.compile sees."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import hf_quant
from hf_quant import kernels
from hf_quant.calibration import quantize_layer
from hf_quant.core import LayerSpec
from hf_quant.runtime import ActivationQuantizer, ActivationSpec, QuantLinear, register_activation
from hf_quant.runtime.kernels import base as kernel_base
from hf_quant.runtime.scheme import ACTIVATIONS


def _round_per_token(x: torch.Tensor, levels: int = 8) -> torch.Tensor:
    """A test double for an activation quantizer: per-token absmax grid with `levels` steps."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / levels
    return torch.round(x / scale) * scale


class _ActKernel(kernels.Kernel):
    """A kernel for the test scheme only: quantize x per token, then the dequantized weight."""

    name = "test_act_kernel"
    priority = 5
    activations = ("test_round",)
    calls = 0

    def supports(self, layer, device, dtype):
        return dtype.is_floating_point

    def forward(self, layer, x, prepared):
        type(self).calls += 1
        W = layer.dequantize().to(x.dtype)
        return torch.nn.functional.linear(_round_per_token(x, **layer.scheme.activation.kwargs()), W, layer.bias)


@pytest.fixture()
def activation_scheme():
    register_activation(ActivationQuantizer("test_round", _round_per_token))
    kernels.register_kernel(_ActKernel())
    yield ActivationSpec("test_round", (("levels", 8),))
    ACTIVATIONS.unregister("test_round")
    kernel_base.unregister_kernel("test_act_kernel")


def _layer(activation=None, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=bias)
    q = quantize_layer("fc", lin, LayerSpec(4, 32, False), "rtn")
    if activation is None:
        return q
    act = QuantLinear(128, 48, bias, q.spec, dtype=q.scales.dtype, activation=activation)
    act.load_state_dict(q.state_dict())
    return act


def test_activation_scheme_runs_its_kernel_and_matches_the_reference(activation_scheme):
    layer = _layer(activation_scheme)
    x = torch.randn(5, 128)
    assert kernels.select_kernel(layer, x).name == "test_act_kernel"  # weight-only kernels do not take it
    out = layer(x)
    assert _ActKernel.calls == 1
    with kernels.use_kernel("reference"):  # the oracle applies the scheme's activation quantizer
        ref = layer(x)
    torch.testing.assert_close(out, ref)
    plain = _layer()
    with kernels.use_kernel("reference"):
        assert not torch.allclose(plain(x), ref)  # the activation quantization changed the result
    with kernels.use_kernel("cpu_int4"), pytest.raises(ValueError, match="cannot run.*activation=test_round"):
        layer(x)
    assert "activation=test_round" in repr(layer)


def test_registering_a_kernel_resets_cached_choices():
    layer = _layer()
    x = torch.randn(1, 128)
    layer(x)
    assert [entry[0].__self__.name for entry in layer._kernel_cache.values()] == ["cpu_int4"]

    class Better(_ActKernel):
        name, priority, activations = "test_better", 50, (None,)

        def forward(self, layer, x, prepared):
            return torch.nn.functional.linear(x, layer.dequantize().to(x.dtype), layer.bias)

    kernels.register_kernel(Better())
    try:
        layer(x)
        assert [entry[0].__self__.name for entry in layer._kernel_cache.values()] == ["test_better"]
    finally:
        kernel_base.unregister_kernel("test_better")
    layer(x)
    assert [entry[0].__self__.name for entry in layer._kernel_cache.values()] == ["cpu_int4"]


def test_weight_only_layers_never_pick_an_activation_kernel(activation_scheme):
    layer = _layer()
    assert kernels.select_kernel(layer, torch.randn(1, 128)).name == "cpu_int4"


def test_autograd_through_an_activation_scheme_is_straight_through(activation_scheme):
    layer = _layer(activation_scheme, bias=False)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(3, -1))


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _layer()
        self.b = quantize_layer("b", nn.Linear(48, 128, bias=False), LayerSpec(4, 16, True), "rtn")

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_torch_compile_sees_one_op_per_layer_and_matches_eager():
    model = _TwoLayers()
    x = torch.randn(4, 128)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend=backend, fullgraph=True)(x)
    assert torch.equal(compiled, eager)
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.hf_quant.quant_linear) == 2  # the dynamo graph holds the op packet
    assert not any("unpack" in str(t) or "dequant" in str(t) for t in ops)


def test_torch_compile_backward_matches_eager():
    model = _TwoLayers()
    x = torch.randn(4, 128, requires_grad=True)
    model(x).pow(2).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, expected)


def test_custom_op_passes_torch_library_checks():
    layer = _layer()
    x = torch.randn(2, 128)
    from hf_quant.runtime.dispatch import layer_id

    torch.library.opcheck(torch.ops.hf_quant.quant_linear.default,
                          (x, layer.qweight, layer.scales, layer.bias, layer_id(layer)),
                          test_utils=("test_schema", "test_faketensor"))


def test_hot_path_does_no_selection_after_the_first_call(monkeypatch):
    layer = _layer()
    x = torch.randn(1, 128)
    layer(x)
    calls = []
    monkeypatch.setattr(hf_quant.runtime.dispatch, "select_kernel", lambda *a: calls.append(a))
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert calls == []
