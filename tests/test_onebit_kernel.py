"""The CPU kernels of 1-bit (sign) layers (runtime/kernels/sign.py): `native_sign` (masked fp32 adds, no
dequantized weight) and `native_sign_dequant` (+-scale/2 expanded natively, then torch's GEMM), against the
reference kernel and the exact product, in the AVX-512 and AVX2 builds; their place in the dispatch."""

import platform

import pytest
import torch

from hf_quant import kernels
from hf_quant.config import LayerSpec
from hf_quant.core import dequantize_weight
from hf_quant.methods.onebit import quantize_onebit
from hf_quant.methods.rtn import quantize_rtn
from hf_quant.runtime import QuantLinear
from hf_quant.runtime.kernels import cpu_measure, native
from hf_quant.runtime.kernels.base import KERNELS, choose_fixed
from hf_quant.runtime.kernels.sign import NativeSignDequantKernel, NativeSignKernel

from .test_kernels import rel_err

CPU = torch.device("cpu")
ONEBIT = LayerSpec(1, -1, True, in_scale=True)
needs_sign = pytest.mark.skipif(not native.has_sign(), reason=f"native sign kernel: {native.unavailable_reason() or 'no AVX2'}")
needs_native = pytest.mark.skipif(native.library() is None, reason=f"native helpers: {native.unavailable_reason()}")
x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")


@pytest.fixture()
def rebuilt(monkeypatch, tmp_path):
    """A fresh load of the helpers into an empty cache (the process-wide one comes back afterwards)."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    native.reset()
    yield
    native.reset()


def sign_layer(out_f, in_f, group_size, dtype, bias, seed=0, onebit=None):
    """A 1-bit layer: OneBit's (SVID value vectors, in_scales, the output LayerNorm; bf16 scales) for group_size
    -1 unless onebit=False, else plain 1-bit RTN with scales in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    if onebit if onebit is not None else group_size == -1:
        return QuantLinear.from_quantized(quantize_onebit(W, ONEBIT, torch.bfloat16), ONEBIT, b, output_norm=True)
    spec = LayerSpec(1, group_size, True)
    return QuantLinear.from_quantized(quantize_rtn(W, spec, dtype), spec, b)


def exact_product(layer, x):
    """x @ W_hat.T + kernel bias in fp64, W_hat = +-scale/2 (x as the kernel sees it: after in_scales), and the
    size of its terms (|x| @ |W_hat|.T + |bias|) for an fp32 summation bound."""
    W = dequantize_weight(layer.qweight, layer.scales, None, layer.spec, layer.in_features).double()
    x2 = x.reshape(-1, layer.in_features).double()
    b = layer.kernel_bias
    y, size = x2 @ W.t(), x2.abs() @ W.abs().t()
    if b is not None:
        y, size = y + b.double(), size + b.double().abs()
    return y, size


def check_sign(layer, x, dtype, name="native_sign"):
    """Kernel `name` against the reference kernel (within the output dtype's rounding) and against the exact
    product (fp32 sums of K terms, then one rounding to the output dtype), called as `dispatch.linear` calls it
    (x times in_scales first; any row count, as the measured dispatch does); through the layer too where the
    kernel's `max_rows` lets it be forced."""
    kernel = KERNELS.get(name)
    xs = x if layer.in_scales is None else x * layer.in_scales.to(x.dtype)  # what dispatch.linear hands a kernel
    raw = kernel.forward(layer, xs, layer.prepared(kernel, CPU, dtype))
    ref = KERNELS.get("reference").forward(layer, xs, None)
    assert raw.dtype == dtype and raw.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(raw, ref) < tol, (name, rel_err(raw, ref))
    exact, size = exact_product(layer, xs)
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    terms = layer.in_features / 8 + layer.scales.shape[1] + 8  # the longest chain of fp32 additions, at most
    err = (raw.reshape(-1, layer.out_features).double() - exact).abs()
    assert (err <= 2.4e-7 * terms * size + eps * exact.abs() + 1e-7).all(), name
    if kernel.runs(layer, CPU, dtype, xs.numel() // layer.in_features):
        with kernels.use_kernel("reference"):
            want = layer(x)
        with kernels.use_kernel(name):
            got = layer(x)
        assert got.dtype == dtype and rel_err(got, want) < tol


SHAPES = [  # (in, out, group size, rows): per-row and grouped, odd weight-row counts, rows of every block remainder;
    (64, 8, -1, 1), (4096, 1024, -1, 1), (1024, 37, -1, 7), (256, 13, -1, 33), (4096, 64, -1, 5),
    (512, 1024, 128, 1), (384, 19, 128, 2), (4096, 40, 128, 13), (2048, 8, 64, 3), (192, 101, 64, 33),
    (64, 9, 64, 4), (1152, 256, 128, 6),
    (1040, 24, -1, 1), (480, 10, 48, 2), (256, 12, 16, 1)]  # a last single vector of 16 per row / group


@needs_sign
@pytest.mark.parametrize("in_f,out_f,group_size,rows", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_sign_matches_the_reference(in_f, out_f, group_size, rows, dtype):
    bias = (in_f + rows) % 2 == 0
    layer = sign_layer(out_f, in_f, group_size, dtype, bias, seed=rows)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(in_f)).to(dtype)
    check_sign(layer, x, dtype)


@needs_sign
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("onebit", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_native_sign_with_and_without_bias(dtype, onebit, bias):
    """OneBit's layer (in_scales before the kernel, LayerNorm and bias after it) and a plain 1-bit layer whose
    bias the kernel adds; a 3-d input of 2 x 3 rows."""
    layer = sign_layer(96, 512, -1 if onebit else 128, dtype, bias, seed=3, onebit=onebit)
    assert (layer.kernel_bias is None) == (onebit or not bias)
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_sign(layer, x, dtype)
    check_sign(layer, x, dtype, "native_sign_dequant")


@needs_sign
def test_strided_activations_and_no_rows():
    layer = sign_layer(24, 256, 128, torch.bfloat16, True, onebit=False)
    x = torch.randn(256, 6, dtype=torch.bfloat16).t()  # columns of unit stride 6 apart: copied to rows
    check_sign(layer, x, torch.bfloat16)
    with kernels.use_kernel("native_sign"):
        assert layer(torch.empty(0, 256, dtype=torch.bfloat16)).shape == (0, 24)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [-1, 8, 64, 128])  # 8: the row-buffer path of the AVX-512 build
def test_sign_dequantize_is_the_reference_weight_bit_for_bit(dtype, group_size):
    layer = sign_layer(33, 256, group_size, dtype, False, onebit=False)
    _, scale, _ = KERNELS.get("native_sign_dequant").prepare(layer, CPU, dtype)
    out = native.sign_dequantize_into(layer.qweight, scale, torch.empty(33, 256, dtype=dtype))
    assert torch.equal(out, dequantize_weight(layer.qweight, layer.scales, None, layer.spec, 256, dtype))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 300])  # 300: the rows-major GEMM orientation
def test_native_sign_dequant_over_several_tiles(monkeypatch, dtype, rows):
    monkeypatch.setattr(NativeSignDequantKernel, "TILE_BYTES", 1)  # tiles of MIN_TILE_ROWS = 32 rows
    monkeypatch.setattr(NativeSignDequantKernel, "MIN_TILE_ROWS", 32)
    layer = sign_layer(80, 256, 64, dtype, True, onebit=False)
    check_sign(layer, torch.randn(rows, 256).to(dtype), dtype, "native_sign_dequant")


@needs_sign
def test_chosen_for_one_bit_layers_only():
    layer = sign_layer(64, 256, -1, torch.bfloat16, False)
    assert KERNELS.get("native_sign").one_bit and KERNELS.get("native_sign_dequant").one_bit
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        found = [k.name for k in cpu_measure.candidates(layer, CPU, dtype)]
        assert {"native_sign", "native_sign_dequant", "dequant_matmul"} <= set(found)
        assert choose_fixed(layer, CPU, dtype, 1).name == "native_sign"
        limit = NativeSignKernel.MAX_ROWS.get(dtype)
        if limit is None:  # fp32 / fp16: the sums beat a GEMM at fp32 speed at any row count
            assert choose_fixed(layer, CPU, dtype, 4096).name == "native_sign"
        else:
            assert choose_fixed(layer, CPU, dtype, limit).name == "native_sign"
            assert choose_fixed(layer, CPU, dtype, limit + 1).name == "native_sign_dequant"
    assert "native_sign_dequant_bf16" in {k.name for k in cpu_measure.candidates(layer, CPU, torch.float32, True)}
    assert "native_sign_dequant_bf16" not in {k.name for k in cpu_measure.candidates(layer, CPU, torch.float32, False)}
    kernel, x = KERNELS.get("native_sign_dequant_bf16"), torch.randn(3, 256) * layer.in_scales.float()
    out = kernel.forward(layer, x, layer.prepared(kernel, CPU, torch.float32))  # x rounded to bf16: only near
    assert out.dtype == torch.float32 and rel_err(out, KERNELS.get("reference").forward(layer, x, None)) < 1e-2
    four = QuantLinear.from_quantized(quantize_rtn(torch.randn(16, 256), LayerSpec(4, 128, True), torch.bfloat16),
                                      LayerSpec(4, 128, True), None)
    for name in ("native_sign", "native_sign_dequant"):
        assert not KERNELS.get(name).accepts(four, CPU, torch.bfloat16)
    with kernels.cpu_dispatch("measure"):  # the measured dispatch picks one of the three, and it is right
        x = torch.randn(1, 256, dtype=torch.bfloat16)
        with kernels.use_kernel("reference"):
            ref = layer(x)
        assert kernels.select_kernel(layer, x).name in ("native_sign", "native_sign_dequant", "dequant_matmul")
        assert rel_err(layer(x), ref) < 1e-2


@needs_sign
def test_bad_operands_are_refused():
    x, bits, scale = torch.zeros(2, 64), torch.zeros(8, 8, dtype=torch.uint8), torch.ones(8, 1)
    work = torch.empty(native.sign_workspace_floats(2, 64, 1))
    native.sign_gemm(x, bits, scale, None, torch.empty(2, 8), work)
    for bad in (dict(bits=torch.zeros(8, 4, dtype=torch.uint8)), dict(scale=torch.ones(8, 1, dtype=torch.bfloat16)),
                dict(out=torch.empty(2, 8, dtype=torch.float64)), dict(work=torch.empty(10)),
                dict(scale=torch.ones(8, 8)),  # groups of 8: narrower than any vector width here but AVX2's
                dict(x=torch.zeros(64, 2).t())):  # no unit column stride
        args = dict(x=x, bits=bits, scale=scale, bias=None, out=torch.empty(2, 8), work=work) | bad
        if "scale" in bad and bad["scale"].shape == (8, 8) and native.library().hfq_sign_vector_width() == 8:
            continue
        with pytest.raises(ValueError, match="native sign_gemm: bad operands"):
            native.sign_gemm(**args)
    with pytest.raises(ValueError, match="native sign_dequantize_into: bad operands"):
        native.sign_dequantize_into(bits, torch.ones(8, 3), torch.empty(8, 64))


@needs_native
@x86
def test_the_avx2_build(monkeypatch, rebuilt):
    """-march=x86-64-v3 (AVX2, FMA, F16C; no AVX-512): vectors of 8 lanes from a table of byte masks, groups of 8
    taken; the same results against the reference and the exact product."""
    monkeypatch.setenv(native.ENV_CFLAGS, "-march=x86-64-v3")
    assert native.has_sign() and native.library().hfq_sign_vector_width() == 8
    assert native.sign_group_size_ok(8) and native.sign_group_size_ok(24) and not native.sign_group_size_ok(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for in_f, out_f, gs, rows in ((1024, 37, -1, 7), (4096, 16, -1, 1), (384, 19, 128, 2), (192, 33, 64, 5),
                                      (64, 9, 8, 3)):
            layer = sign_layer(out_f, in_f, gs, dtype, rows % 2 == 1, seed=rows)
            check_sign(layer, torch.randn(rows, in_f).to(dtype), dtype)
        layer = sign_layer(21, 256, 8, dtype, False, onebit=False)
        _, scale, _ = KERNELS.get("native_sign_dequant").prepare(layer, CPU, dtype)
        out = native.sign_dequantize_into(layer.qweight, scale, torch.empty(21, 256, dtype=dtype))
        assert torch.equal(out, dequantize_weight(layer.qweight, layer.scales, None, layer.spec, 256, dtype))


@needs_native
@x86
def test_a_build_without_avx2_keeps_the_dequantizing_kernel(monkeypatch, rebuilt):
    monkeypatch.setenv(native.ENV_CFLAGS, "-march=x86-64")  # SSE2 only
    assert native.library() is not None and not native.has_sign()
    layer = sign_layer(24, 256, 128, torch.bfloat16, True, onebit=False)
    found = {k.name for k in cpu_measure.candidates(layer, CPU, torch.bfloat16)}
    assert "native_sign" not in found and "native_sign_dequant" in found
    assert choose_fixed(layer, CPU, torch.bfloat16, 1).name == "native_sign_dequant"
    check_sign(layer, torch.randn(3, 256, dtype=torch.bfloat16), torch.bfloat16, "native_sign_dequant")
    with pytest.raises(RuntimeError, match="native sign kernel unavailable"):
        native.sign_gemm(torch.zeros(1, 64), torch.zeros(8, 8, dtype=torch.uint8), torch.ones(8, 1), None,
                         torch.empty(1, 8), torch.empty(128))
