"""Every fast kernel against the reference (the oracle), on random shapes, bits, groups and dtypes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_quant import kernels
from hf_quant.core import grid
from hf_quant.methods import get_method
from hf_quant.config import LayerSpec
from hf_quant.core import dequantize_weight
from hf_quant.runtime import QuantLinear


def make_layer(out_f, in_f, spec, bias, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    if spec.g_idx:  # act-order: GPTQ with a Hessian whose diagonal shuffles the channel order
        H = torch.diag(torch.rand(in_f, generator=g) + 0.5)
        qw = get_method("gptq").quantize(W, spec, dtype, H=H, desc_act=True)
        assert not torch.equal(qw.g_idx, torch.arange(in_f) // spec.group_size)
    else:
        qw = get_method("rtn").quantize(W, spec, dtype)
    return QuantLinear.from_quantized(qw, spec, b), qw


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 16, 32, 64, 128, 256]),
    sym=st.booleans(),
    act_order=st.booleans(),
    bias=st.booleans(),
    k_mult=st.integers(1, 6),
    out_f=st.integers(1, 96),
    m=st.sampled_from([1, 2, 5, 17, 64]),
    seed=st.integers(0, 1000),
)
def test_fast_path_matches_reference_fp32(bits, group_size, sym, act_order, bias, k_mult, out_f, m, seed):
    in_f = k_mult * (256 if group_size == -1 else group_size)
    act_order = act_order and in_f > group_size > 0
    layer, _ = make_layer(out_f, in_f, LayerSpec(bits, group_size, sym, act_order), bias, seed=seed)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(seed + 1))
    with kernels.use_kernel("reference"):
        ref = layer(x)
    out = layer(x)
    assert out.shape == ref.shape == (m, out_f) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-3, kernels.select_kernel(layer, x).name


_HALF_CASES = [(4, 128, "cpu_int4"), (3, 64, "cpu_int4"), (2, 32, "cpu_int4"), (4, -1, "cpu_int4"), (8, -1, "cpu_int8")]


# act-order only where there are several groups (a per-channel layer stores no g_idx)
@pytest.mark.parametrize("bits, group_size, kernel, act_order",
                         [c + (False,) for c in _HALF_CASES] + [c + (True,) for c in _HALF_CASES if c[1] != -1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym", [True, False])
def test_fast_path_half_precision_and_3d_inputs(bits, group_size, kernel, act_order, dtype, sym):
    spec = LayerSpec(bits, group_size, sym, act_order)
    layer, _ = make_layer(80, 512, spec, bias=True, dtype=dtype, seed=bits)
    x = torch.randn(3, 7, 512, dtype=dtype)
    assert kernels.select_kernel(layer, x).name == kernel
    with kernels.use_kernel("reference"):
        ref = layer(x)
    out = layer(x)
    assert out.shape == (3, 7, 80) and out.dtype == dtype
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("bits, group_size, expected", [
    (4, 128, "cpu_int4"), (4, -1, "cpu_int4"), (3, 256, "cpu_int4"), (2, 64, "cpu_int4"),
    (4, 16, "dequant_matmul"),  # tinygemm needs groups of 32..256
    (8, -1, "cpu_int8"), (8, 128, "cpu_int4x2"),  # int8pack is per-channel only; groups: two int4 products
])
def test_dispatch_choice(bits, group_size, expected):
    layer, _ = make_layer(32, 512, LayerSpec(bits, group_size, False), bias=False)
    assert kernels.select_kernel(layer, torch.randn(1, 512, dtype=torch.bfloat16)).name == expected
    with kernels.use_kernel("reference"):
        assert kernels.select_kernel(layer, torch.randn(1, 512)).name == "reference"


@pytest.mark.parametrize("dtype, rows, expected", [
    (torch.bfloat16, 1, "cpu_int4"), (torch.bfloat16, 384, "cpu_int4"), (torch.bfloat16, 385, "dequant_matmul"),
    (torch.float32, 4, "cpu_int4"), (torch.float32, 5, "dequant_matmul"),  # torch's packed ops have no fast fp32 path
])
def test_dispatch_by_batch_rows(dtype, rows, expected):
    layer, _ = make_layer(32, 256, LayerSpec(4, 128, False), bias=True)
    x = torch.randn(rows, 256, dtype=dtype)
    assert kernels.select_kernel(layer, x).name == expected
    assert kernels.select_kernel(layer, x.reshape(1, rows, 256)).name == expected  # rows = all leading dims
    with kernels.use_kernel("reference"):
        ref = layer(x)
    assert rel_err(layer(x), ref) < (1e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_matmul_matches_reference(bits, dtype):
    """Dequantizing in the activation dtype equals the fp32 oracle cast to that dtype."""
    layer, _ = make_layer(48, 256, LayerSpec(bits, 64, bits % 2 == 0), bias=True, dtype=torch.bfloat16, seed=bits)
    W_ref = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, 256)
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, 256, dtype)
    assert W.dtype == dtype and torch.equal(W, W_ref.to(dtype))
    x = torch.randn(7, 256, dtype=dtype)
    with kernels.use_kernel("dequant_matmul"):
        out = layer(x)
    with kernels.use_kernel("reference"):
        assert torch.equal(out, layer(x))


def test_prefer_kernel_applies_where_supported_only():
    layer, _ = make_layer(32, 512, LayerSpec(4, 128, False), bias=False)
    small, large = torch.randn(1, 512, dtype=torch.bfloat16), torch.randn(500, 512, dtype=torch.bfloat16)
    with kernels.prefer_kernel("reference"):
        assert kernels.select_kernel(layer, small).name == "reference"
    with kernels.prefer_kernel("cpu_int4"):
        assert kernels.select_kernel(layer, large).name == "dequant_matmul"  # too many rows for cpu_int4
        with kernels.use_kernel("reference"):  # forcing wins over preferring
            assert kernels.select_kernel(layer, small).name == "reference"
    assert kernels.select_kernel(layer, small).name == "cpu_int4"
    with pytest.raises(ValueError, match="unknown kernel"):
        with kernels.prefer_kernel("nope"):
            pass


def test_forcing_an_unsupported_kernel_errors():
    layer, _ = make_layer(32, 512, LayerSpec(8, 128, False), bias=False)
    with kernels.use_kernel("cpu_int4"), pytest.raises(ValueError, match="cannot run"):
        layer(torch.randn(1, 512))
    with pytest.raises(ValueError, match="unknown kernel"):
        with kernels.use_kernel("nope"):
            pass


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_reference_equals_independent_dequantization(bits, sym):
    spec = LayerSpec(bits, 64, sym)
    layer, qw = make_layer(40, 256, spec, bias=False, dtype=torch.float32)
    zero = qw.zero.float() if qw.zero is not None else torch.full(qw.scale.shape, 2.0 ** (bits - 1))
    W_hat = grid.dequantize(qw.codes.float().reshape(40, 4, 64), qw.scale.float(), zero).reshape(40, 256)
    assert torch.equal(dequantize_weight(layer.qweight, layer.scales, layer.qzeros, spec, 256), W_hat)
    x = torch.randn(5, 256)
    with kernels.use_kernel("reference"):
        assert torch.allclose(layer(x), x @ W_hat.t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_act_order_reference_equals_per_channel_lookup(bits, sym):
    """With g_idx, input channel i is dequantized on the grid of group g_idx[i]."""
    spec = LayerSpec(bits, 32, sym, g_idx=True)
    layer, qw = make_layer(24, 128, spec, bias=False, dtype=torch.float32, seed=bits)
    zero = qw.zero.float() if qw.zero is not None else torch.full(qw.scale.shape, 2.0 ** (bits - 1))
    W_hat = torch.empty(24, 128)
    for i in range(128):
        g = int(qw.g_idx[i])
        W_hat[:, i] = (qw.codes[:, i].float() - zero[:, g]) * qw.scale[:, g]
    assert torch.equal(layer.dequantize(), W_hat)
    assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((4,), 32))
    x = torch.randn(3, 128)
    with kernels.use_kernel("reference"):
        assert torch.allclose(layer(x), x @ W_hat.t(), rtol=1e-5, atol=1e-6)
    with kernels.use_kernel("dequant_matmul"):
        assert torch.allclose(layer(x), x @ W_hat.t(), rtol=1e-5, atol=1e-6)


def test_invalid_g_idx_is_refused():
    spec = LayerSpec(4, 32, False, g_idx=True)
    layer, qw = make_layer(16, 128, spec, bias=False)
    qw.g_idx = torch.zeros(128, dtype=torch.int32)  # every channel in group 0
    with pytest.raises(ValueError, match="g_idx.*group_size=32"):
        QuantLinear.from_quantized(qw, spec, None)


def _assert_follows(layer, x, before):
    after = layer(x)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    assert not torch.allclose(before, after)
    assert rel_err(after, ref) < 2e-2


def _random_codes(layer):
    return torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(9))


def test_kernel_cache_is_dropped_where_buffers_change():
    """Choices and layouts are cached per (device, dtype, row class) and dropped by load_state_dict,
    buffer assignment, `.to()`, in-place edits and `invalidate_kernels()`."""
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    x = torch.randn(3, 256)
    before = layer(x)
    assert len(layer._kernel_cache) == 1 and len(layer._prepared) == 1
    layer(torch.randn(4, 256))  # same row class: no new entry
    assert len(layer._kernel_cache) == 1
    layer.qweight.copy_(_random_codes(layer))  # in-place edit: seen through the buffers' version counters
    _assert_follows(layer, x, before)

    before = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["qweight"] = torch.flip(state["qweight"], dims=[1])
    layer.load_state_dict(state)
    assert layer._kernel_cache == {} and layer._prepared == {}
    _assert_follows(layer, x, before)

    before = layer(x)
    layer.qweight = _random_codes(layer).flip(0)
    assert layer._kernel_cache == {}
    _assert_follows(layer, x, before)

    layer(x)
    layer.to("cpu")
    assert layer._kernel_cache == {} and layer._prepared == {}


@pytest.mark.parametrize("built_in_inference_mode", [False, True])
def test_in_place_edits_under_inference_mode_are_never_served_stale(built_in_inference_mode):
    """`scales.mul_(2)` inside torch.inference_mode: the cached cpu_int4 layout must not be reused."""
    ctx = torch.inference_mode if built_in_inference_mode else torch.no_grad
    with ctx():
        layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    assert not any(t.is_inference() for t in layer.tracked_buffers())
    x = torch.randn(1, 256)
    with torch.inference_mode():
        before = layer(x)
        assert kernels.select_kernel(layer, x).name == "cpu_int4"
        layer.scales.mul_(2)
        after = layer(x)
        with kernels.use_kernel("reference"):
            ref = layer(x)
    torch.testing.assert_close(after, ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(after, 2 * before, rtol=2e-2, atol=1e-3)
    with torch.inference_mode():
        layer.qzeros = torch.zeros_like(layer.qzeros)  # an inference tensor assigned: kept as a normal one
    assert not layer.qzeros.is_inference()


def test_row_classes_follow_kernel_limits():
    """Inputs whose row counts lie on either side of a kernel's max_rows get separate cache entries."""
    from hf_quant.runtime.kernels.cpu import MAX_ROWS

    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    limit = MAX_ROWS[torch.bfloat16]
    small, large = torch.randn(limit, 256, dtype=torch.bfloat16), torch.randn(limit + 1, 256, dtype=torch.bfloat16)
    assert kernels.row_class(torch.bfloat16, limit) != kernels.row_class(torch.bfloat16, limit + 1)
    layer(small), layer(large)
    chosen = {key[2]: entry[0].__self__.name for key, entry in layer._kernel_cache.items()}
    assert sorted(chosen.values()) == ["cpu_int4", "dequant_matmul"]


def test_layers_built_under_inference_mode():
    with torch.inference_mode():
        layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=True)
        x = torch.randn(3, 256)
        out = layer(x)
        with kernels.use_kernel("reference"):
            ref = layer(x)
    assert rel_err(out, ref) < 1e-3
