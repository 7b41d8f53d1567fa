"""The int8_token (LLM.int8 / dynamic W8A8) kernels against the `reference` oracle: the CPU kernels
(oneDNN int8 GEMM, the weight-only fallback), the CUDA kernel's Triton quantization and epilogue
(in Triton's interpreter on CPU tensors), per-token codes bit for bit, CPU dispatch, autograd."""

from __future__ import annotations

import pytest
import torch

from hf_quant import kernels
from hf_quant.config import LayerSpec
from hf_quant.methods.llm_int8 import int8_rowwise
from hf_quant.runtime import ActivationSpec, QuantLinear
from hf_quant.runtime.activations import outlier_columns, quantize_rows
from hf_quant.runtime.kernels import int8 as I

from .conftest import TRITON_KERNELS_UNAVAILABLE, needs_triton_kernels
from .test_kernels import rel_err

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def int8_layer(out_f, in_f, threshold, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_quantized(int8_rowwise(W), LayerSpec(8, -1, True, False), b,
                                      activation=ActivationSpec("int8_token", (("threshold", threshold),)))


def inputs(m, in_f, dtype, outliers, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, in_f, generator=g)
    if outliers:
        x[:, torch.randperm(in_f, generator=g)[:3]] *= 20
    x[0, 5] = 0.0
    return x.to(dtype)


CASES = [(m, dtype, threshold, outliers, bias)
         for m in (1, 3, 17, 64) for dtype in (torch.float32, torch.bfloat16, torch.float16)
         for threshold in (0.0, 6.0) for outliers in (False, True) for bias in (False, True)
         if (m + int(bias) + int(outliers)) % 2 == 0 or dtype == torch.float32]


def _check(layer, x, out):
    with kernels.use_kernel("reference"):
        ref = layer(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_err(out, ref) < TOL[x.dtype]


@pytest.mark.parametrize("m,dtype,threshold,outliers,bias", CASES)
def test_per_token_codes_are_the_oracles_bit_for_bit(m, dtype, threshold, outliers, bias):
    x = inputs(m, 96, dtype, outliers)
    codes, absmax = quantize_rows(x, outlier_columns(x, threshold), threshold)
    cols = I.outlier_index(x, threshold)
    assert (cols is None) == (outlier_columns(x, threshold) is None)
    for offset in (0, 128):
        got, got_absmax = I.quantize_tokens(x, threshold, cols, offset)
        assert torch.equal(got.to(torch.int16) - offset, codes.to(torch.int16)) and torch.equal(got_absmax, absmax)
    for chunk in (I.CHUNK_ELEMS, 96 * 5):  # one fused pass set, and row chunks (the large-input path)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(I, "CHUNK_ELEMS", chunk)
            for offset, as_float in ((0, False), (128, False), (0, True)):
                got, got_absmax, got_cols = I.quantize_activations(x, threshold, offset, as_float)
                assert (got_cols is None) == (cols is None) and (cols is None or torch.equal(got_cols, cols))
                assert got.dtype == (torch.float32 if as_float else torch.uint8 if offset else torch.int8)
                assert torch.equal(got.to(torch.int16) - offset, codes.to(torch.int16)), (chunk, offset, as_float)
                assert torch.equal(got_absmax, absmax)


@pytest.mark.parametrize("name", ["cpu_int8_onednn", "cpu_int8_fbgemm", "cpu_int8_intmm", "cpu_int8_native",
                                  "cpu_int8_native_amx", "cpu_int8_token_w8"])
@pytest.mark.parametrize("m,dtype,threshold,outliers,bias", CASES)
def test_cpu_kernels_match_the_reference(name, m, dtype, threshold, outliers, bias):
    kernel = kernels.base.KERNELS.get(name)
    layer = int8_layer(40, 96, threshold, bias, seed=m)
    x = inputs(m, 96, dtype, outliers, seed=m + 1)
    if not kernel.supports(layer, x.device, dtype):
        pytest.skip(f"{name} does not run here (oneDNN int8 not available)")
    with kernels.use_kernel(name):
        out = layer(x)
    _check(layer, x, out)
    with kernels.use_kernel(name):  # leading dims flatten
        assert torch.allclose(layer(x.reshape(1, m, 96)).reshape(m, -1), out)


def test_cpu_dispatch_picks_an_int8_kernel_for_llm_int8():
    layer = int8_layer(32, 64, 6.0, True)
    for m in (1, 8, 100):
        x = torch.randn(m, 64, dtype=torch.bfloat16)
        name = kernels.select_kernel(layer, x).name
        torch_int8 = "cpu_int8_fbgemm" if m <= I.FBGEMM_MAX_ROWS else "cpu_int8_onednn"
        amx = I.NATIVE_AMX.supports(layer, x.device, x.dtype) and m > I.NATIVE_AMX.AMX_MAX_ROWS  # its tiles above 8
        native = I.NATIVE.supports(layer, x.device, x.dtype) and I.NATIVE.chosen(layer, m)  # AMX: oneDNN above 16
        want = ("cpu_int8_native_amx" if amx else "cpu_int8_native" if native else torch_int8 if I.exact_int8_dot()
                else "cpu_int8_token_w8")
        assert name == want, name
    assert kernels.select_kernel(layer, torch.randn(3, 64)).name != "reference"


def test_onednn_kernel_not_chosen_where_int8_dot_saturates(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    layer = int8_layer(32, 64, 0.0, False)
    assert I.onednn_isa_capped() and not I.exact_int8_dot()
    assert not I.ONEDNN.supports(layer, torch.device("cpu"), torch.float32)
    assert not I.FBGEMM.supports(layer, torch.device("cpu"), torch.float32)
    assert not I.onednn_isa_capped({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"})
    exact = "cpu_int8_native" if I.NATIVE.supports(layer, torch.device("cpu"), torch.float32) else "cpu_int8_token_w8"
    tiles = I.NATIVE_AMX.supports(layer, torch.device("cpu"), torch.float32)
    for m in (1, 8, 100):  # hf_quant's own GEMMs are exact in all their forms (VNNI, AVX2, AMX): unaffected by the cap
        want = "cpu_int8_native_amx" if tiles and m > I.NATIVE_AMX.AMX_MAX_ROWS else exact
        assert kernels.select_kernel(layer, torch.randn(m, 64)).name == want


def test_weight_only_layers_never_pick_int8_kernels():
    from .test_kernels import make_layer
    layer, _ = make_layer(32, 64, LayerSpec(8, -1, True, False), False, dtype=torch.float32)
    assert not kernels.select_kernel(layer, torch.randn(4, 64)).name.startswith(("cpu_int8_onednn", "cpu_int8_token"))


def test_gradient_flows_through_the_int8_kernels():
    layer = int8_layer(24, 64, 6.0, True)
    x = inputs(5, 64, torch.float32, True).requires_grad_(True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ layer.dequantize().float(), atol=1e-5)


@needs_triton_kernels
@pytest.mark.parametrize("m,dtype,threshold,outliers,bias",
                         [(m, d, t, o, b) for m in (1, 3, 17, 64) for d in (torch.float32, torch.bfloat16)
                          for t, o, b in ((0.0, True, False), (6.0, True, True), (6.0, False, False))])
def test_triton_int8_matches_the_reference(m, dtype, threshold, outliers, bias):
    from hf_quant.runtime.kernels.triton import int8 as T
    layer = int8_layer(40, 96, threshold, bias, seed=m)
    x = inputs(m, 96, dtype, outliers, seed=m + 2)
    if x.is_cuda or torch.cuda.is_available():
        pytest.skip("the GPU runs it through the dispatcher (benchmarks/gpu_session.py)")
    mask = T.column_mask(x, threshold) if threshold > 0 else None
    cols = outlier_columns(x, threshold)
    if mask is not None:  # the mask marks exactly the oracle's outlier columns
        assert torch.equal(mask.bool(), torch.zeros(96, dtype=torch.bool) if cols is None else cols)
    codes, absmax = T.quantize(x, threshold, mask, rows=T.padded_rows(m))
    ref_codes, ref_absmax = quantize_rows(x, cols, threshold)
    assert torch.equal(codes[:m], ref_codes) and torch.equal(absmax, ref_absmax) and not codes[m:].any()
    out = T.CUDA_INT8.forward(layer, x, T.CUDA_INT8.prepare(layer, x.device, dtype))
    _check(layer, x, out)
    assert not T.CUDA_INT8.supports(layer, x.device, dtype)  # never chosen on CPU


@needs_triton_kernels
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (40, torch.float16), (5, torch.float32)])
def test_triton_int8_outliers_in_some_k_blocks_only(m, dtype):
    """The CUDA epilogue walks K in blocks and skips the blocks without an outlier column: outlier
    columns in the first, a middle and the ragged last block of K = 200, a strided input, vs the reference."""
    from hf_quant.runtime.kernels.triton import int8 as T
    if torch.cuda.is_available():
        pytest.skip("the GPU runs it through the dispatcher (benchmarks/gpu_session.py)")
    layer = int8_layer(72, 200, 6.0, bias=True, seed=m)
    g = torch.Generator().manual_seed(m)
    big = torch.randn(m, 400, generator=g)
    for col in (3, 100, 101, 199):
        big[m // 2, 2 * col] = 30.0 if col != 100 else -7.0
    x = big[:, ::2].to(dtype)  # strided
    assert T.column_mask(x, 6.0).nonzero().flatten().tolist() == [3, 100, 101, 199]
    _check(layer, x, T.CUDA_INT8.forward(layer, x, T.CUDA_INT8.prepare(layer, x.device, dtype)))


@needs_triton_kernels
@pytest.mark.parametrize("K,cols", [(96, []), (96, [0, 95]), (2500, [3, 1023, 1024, 1025, 2047, 2499]),
                                    (1024, list(range(0, 1024, 3)))])
def test_triton_outlier_columns_are_listed_on_the_device(K, cols):
    """`compact`: the mask's columns in ascending order and their count, across blocks of 1024."""
    from hf_quant.runtime.kernels.triton import int8 as T
    if torch.cuda.is_available():
        pytest.skip("checked in Triton's interpreter")
    mask = torch.zeros(K, dtype=torch.int8)
    mask[cols] = 1
    order, count = T.compact(mask)
    assert count.tolist() == [len(cols)] and order[:len(cols)].tolist() == cols


def _split_inputs(m, in_f, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, in_f, generator=g)
    if kind == "outlier_cols":  # LLM.int8-style outlier features: a few hidden dims 40x larger
        x[:, torch.randperm(in_f, generator=g)[:3]] *= 40
    elif kind == "massive":  # a row dominated by one huge value ("massive activations")
        x[0, 1] = 3000.0
    if m > 1:
        x[-1] = 0.0  # an all-zero row
    return x.to(dtype)


def _errors_against_float64(layer, x, name):
    """(the kernel's output, the reference kernel's, and the relative error of each against the float64 product of
    the layer's dequantized weight); skips where the kernel does not run here."""
    if not kernels.base.KERNELS.get(name).supports(layer, x.device, x.dtype):
        pytest.skip("no exact int8 GEMM on this CPU (VNNI/AMX and fbgemm / torch._int_mm needed)")
    truth = x.double() @ layer.dequantize().double().t() + (0 if layer.bias is None else layer.bias.double())
    with kernels.use_kernel(name):
        out = layer(x)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    return out, ref, rel_err(out, truth), rel_err(ref, truth)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("kind", ["plain", "outlier_cols", "massive"])
@pytest.mark.parametrize("name", ["cpu_int8_split", "cpu_int8_split_intmm", "cpu_int8_split_native",
                                  "cpu_int8_split_native_amx"])
def test_split_int8_weight_only_kernel_is_as_close_as_float(m, dtype, sym, bias, kind, name):
    """cpu_int8_split (8-bit weight-only on the int8 GEMM, activations as 2-3 int8 terms; fbgemm's GEMM, or
    `torch._int_mm`'s): against the float64 product of the same weights, no worse than the reference kernel's
    own float arithmetic."""
    from .test_kernels import make_layer
    layer, _ = make_layer(48, 256, LayerSpec(8, -1, sym, False), bias, dtype=dtype, seed=m)
    x = _split_inputs(m, 256, dtype, kind, seed=m)
    out, ref, err, err_ref = _errors_against_float64(layer, x, name)
    assert out.shape == ref.shape and out.dtype == dtype
    assert err < 2 * err_ref + 1e-4, (err, err_ref)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("sym,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("kind", ["plain", "outlier_cols", "massive"])
@pytest.mark.parametrize("name", ["cpu_int8_split_f32", "cpu_int8_split_intmm_f32", "cpu_int8_split_native_f32",
                                  "cpu_int8_split_native_amx_f32"])
def test_exact_split_kernels_are_as_close_as_fp32(m, sym, bias, kind, name):
    """The `_f32` split kernels (fp32 activations as 3-4 int8 terms, exact int32 products): against the float64
    product of the same weights, no worse than the reference kernel's fp32 arithmetic, which is why they are
    candidates in the default mode (unlike the `_bf16` kernels)."""
    from .test_kernels import make_layer
    layer, _ = make_layer(48, 512, LayerSpec(8, -1, sym, False), bias, dtype=torch.float32, seed=m)
    x = _split_inputs(m, 512, torch.float32, kind, seed=m)
    out, _, err, err_ref = _errors_against_float64(layer, x, name)
    assert out.dtype == torch.float32
    # the floor is the fp32 output's own rounding (up to eps/2 per element): on one row of 48 outputs the reference's
    # error can sit far below it by luck (2.8e-8 against the split kernel's 7.5e-8 on an AVX-512 VNNI Xeon)
    assert err <= 1.5 * err_ref + torch.finfo(torch.float32).eps, (err, err_ref)


@pytest.mark.parametrize("kind", ["plain", "massive"])
def test_exact_split_combines_its_terms_on_every_cpu(kind):
    """The `_f32` wrapper's arithmetic (terms, extra rows, zero points, bias) with an exact stand-in for the int8 GEMM
    (float64 products of the same integer codes), so it is checked on CPUs without an exact int8 dot too."""
    from .test_kernels import make_layer

    class Exact(I.SplitInt8Kernel):
        def available(self):
            return True

        def pack(self, wq, ws):
            return wq, ws

        def gemm(self, codes, packed):
            wq, ws = packed
            return ((codes.double() @ wq.double().t()) * ws.double()).float()

    layer, _ = make_layer(40, 512, LayerSpec(8, -1, False, False), True, dtype=torch.float32, seed=3)
    x = _split_inputs(9, 512, torch.float32, kind, seed=4)
    kernel = I.ExactSplitKernel(Exact())
    out = kernel.forward(layer, x, kernel.prepare(layer, x.device, torch.float32))
    truth = x.double() @ layer.dequantize().double().t() + layer.bias.double()
    with kernels.use_kernel("reference"):
        ref = layer(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, truth) <= 1.5 * rel_err(ref, truth) + 1e-8


def test_exact_split_terms_reach_fp32_resolution():
    """Three terms leave at most ~absmax / 2**24 per element (about fp32's step at the row's absmax); a row far
    above its rms gets a fourth, ~250x less."""
    x = _split_inputs(8, 512, torch.float32, "massive", seed=1)
    codes, scales, rows = I.split_terms(x, I.ExactSplitKernel.FOURTH_TERM_RATIO, I.ExactSplitKernel.TERMS)
    M = x.shape[0]
    assert codes.shape[0] == 3 * M + (0 if rows is None else rows.numel()) and codes.abs().max() <= 127
    assert rows is not None and 0 in rows.tolist()
    three = sum(codes[t * M:(t + 1) * M].double() * scales[t * M:(t + 1) * M, None].double() for t in range(3))
    amax = x.abs().amax(dim=1).double()
    assert ((three - x.double()).abs().amax(dim=1) <= amax * 2.0 ** -23 + 1e-30).all()
    four = three.index_add(0, rows, codes[3 * M:].double() * scales[3 * M:, None].double())
    assert ((four - x.double()).abs().amax(dim=1)[rows] <= amax[rows] * 2.0 ** -30).all()


@pytest.mark.parametrize("t,k,n", [(1, 256, 48), (6, 4096, 80), (130, 512, 33)])
def test_split_gemms_agree(t, k, n):
    """The fbgemm, `torch._int_mm` and native GEMMs of the split kernels: the same exact int32 products times the
    row scales, so the same fp32 numbers up to the rounding of that one multiply (and, where int32 sums pass
    2**24, of their conversion to fp32)."""
    g = torch.Generator().manual_seed(t)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 1e-4
    codes = torch.randint(-127, 128, (t, k), generator=g).float()
    if not (I.exact_int8_dot() and I._fbgemm_available() and hasattr(torch, "_int_mm")):
        pytest.skip("no exact int8 GEMM on this CPU")
    exact = (codes.double() @ wq.double().t()) * ws.double()
    for kernel in (I.SPLIT, I.SPLIT_INTMM, I.SPLIT_NATIVE):  # (the AMX one fuses its GEMM: forward_terms)
        if not kernel.available():
            continue
        z = kernel.gemm(codes, kernel.pack(wq, ws))
        assert z.dtype == torch.float32 and z.shape == (t, n)
        assert float(((z.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max()) < 2e-7, kernel.name


def test_split_terms_bound_the_activation_error():
    """Two int8 terms leave at most absmax / (2 * 127 * 254) per element; rows far above their rms
    get a third term, and their error drops by another ~250x."""
    x = _split_inputs(8, 512, torch.float32, "massive", seed=0)
    x[1, 5] = 500.0  # absmax / rms ~ 22 (at most sqrt(K) for one large value)
    codes, scales, rows = I.split_terms(x, I.SplitInt8Kernel.THIRD_TERM_RATIO)
    M = x.shape[0]
    assert codes.abs().max() <= 127 and torch.equal(codes, codes.round())
    assert rows is not None and set(rows.tolist()) == {0, 1}
    two = codes[:M] * scales[:M, None] + codes[M:2 * M] * scales[M:2 * M, None]
    amax = x.abs().amax(dim=1)
    assert ((two - x).abs().amax(dim=1) <= amax / (2 * 127 * 254) * 1.01 + 1e-12).all()
    three = two.index_add(0, rows, codes[2 * M:] * scales[2 * M:, None])
    err3 = (three - x).abs().amax(dim=1)[rows]
    assert (err3 <= amax[rows] / (2 * 127 * 254 * 100)).all()


def test_split_kernel_is_only_a_measured_candidate():
    """Never the fixed choice; in mode "measure" a candidate for bf16 8-bit per-channel layers, and for fp32 ones
    as cpu_int8_split_f32 (fp32 precision; as cpu_int8_split_bf16 only in "measure_bf16")."""
    from hf_quant.runtime.kernels import cpu_measure

    from .test_kernels import make_layer
    layer, _ = make_layer(32, 128, LayerSpec(8, -1, True, False), False)
    for m in (1, 8, 100):
        assert not kernels.select_kernel(layer, torch.randn(m, 128, dtype=torch.bfloat16)).name.startswith(
            "cpu_int8_split")
    names = {k.name for k in cpu_measure.candidates(layer, torch.device("cpu"), torch.bfloat16, allow_bf16=False)}
    names32 = {k.name for k in cpu_measure.candidates(layer, torch.device("cpu"), torch.float32, allow_bf16=False)}
    names32_bf16 = {k.name for k in cpu_measure.candidates(layer, torch.device("cpu"), torch.float32, allow_bf16=True)}
    assert "cpu_int8_split" not in names32 and "cpu_int8_split_bf16" not in names32
    assert {n for n in names32 if n.startswith("cpu_int8_split")} <= {
        "cpu_int8_split_f32", "cpu_int8_split_intmm_f32", "cpu_int8_split_native_f32", "cpu_int8_split_native_amx_f32"}
    for kernel in (I.SPLIT, I.SPLIT_INTMM, I.SPLIT_NATIVE, I.SPLIT_NATIVE_AMX):
        assert (kernel.name in names) == (kernel.name + "_bf16" in names32_bf16) == (
            kernel.name + "_f32" in names32) == (kernel.name + "_f32" in names32_bf16) == kernel.supports(
            layer, torch.device("cpu"), torch.bfloat16)
        grouped, _ = make_layer(32, 128, LayerSpec(8, 64, True, False), False)
        assert not kernel.supports(grouped, torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("name", ["cpu_int8_fbgemm", "cpu_int8_onednn", "cpu_int8_intmm", "cpu_int8_native",
                                  "cpu_int8_native_amx", "cpu_int8_token_w8", "cpu_int8_split", "cpu_int8_split_intmm",
                                  "cpu_int8_split_native", "cpu_int8_split_native_amx"])
def test_cpu_int8_kernels_take_empty_inputs(name):
    """No rows (an empty batch): an empty output of the right shape, as the reference gives."""
    from .test_kernels import make_layer
    layer = int8_layer(32, 64, 6.0, True) if not name.startswith("cpu_int8_split") else \
        make_layer(32, 64, LayerSpec(8, -1, False, False), True)[0]
    x = torch.randn(2, 0, 64, dtype=torch.bfloat16)
    if not kernels.base.KERNELS.get(name).supports(layer, x.device, x.dtype):
        pytest.skip(f"{name} does not run on this CPU")
    with kernels.use_kernel(name):
        out = layer(x)
    assert out.shape == (2, 0, 32) and out.dtype == x.dtype


@pytest.mark.parametrize("name", ["cpu_int8_fbgemm", "cpu_int8_onednn", "cpu_int8_intmm", "cpu_int8_native",
                                  "cpu_int8_native_amx", "cpu_int8_token_w8", "cpu_int8_split", "cpu_int8_split_intmm",
                                  "cpu_int8_split_native", "cpu_int8_split_native_amx"])
@pytest.mark.parametrize("m", [5, 1200])  # one fused pass set, and row chunks
def test_cpu_int8_kernels_take_strided_inputs(name, m):
    """A transposed (non-contiguous) activation view gives the reference's result."""
    from .test_kernels import make_layer
    layer = int8_layer(32, 256, 6.0, True) if not name.startswith("cpu_int8_split") else \
        make_layer(32, 256, LayerSpec(8, -1, False, False), True)[0]
    x = (torch.randn(256, m, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16).t()
    x[:, 3] *= 10  # an outlier column
    if not kernels.base.KERNELS.get(name).supports(layer, x.device, x.dtype):
        pytest.skip(f"{name} does not run on this CPU")
    assert not x.is_contiguous()
    with kernels.use_kernel(name):
        out = layer(x)
    with kernels.use_kernel("reference"):
        ref = layer(x.contiguous())
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def bitnet_layer(out_f, in_f, bias, seed=0):
    from hf_quant.methods.bitnet import BITNET_SPEC, int8_activation, quantize_bitnet

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    spec = LayerSpec(**BITNET_SPEC)
    return QuantLinear.from_quantized(quantize_bitnet(W, spec, torch.bfloat16), spec,
                                      torch.randn(out_f, generator=g) if bias else None,
                                      activation=ActivationSpec.of(int8_activation()))


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitnet_ternary_layers_run_on_the_int8_kernels(m, dtype):
    """BitNet's 2-bit ternary codes widen to int8 -1, 0, 1: the same exact int8 kernels (CPU, and the CUDA one in
    Triton's interpreter) against the reference."""
    layer = bitnet_layer(40, 96, bias=m % 2 == 1, seed=m)
    wq, ws = kernels.cpu.int8_rows(layer)
    assert set(wq.unique().tolist()) <= {-1, 0, 1} and torch.equal(ws, layer.scales.float()[:, 0])
    x = inputs(m, 96, dtype, False, seed=m + 3)
    ran = []
    for name in ("cpu_int8_onednn", "cpu_int8_fbgemm", "cpu_int8_intmm", "cpu_int8_native", "cpu_int8_native_amx",
                 "cpu_int8_token_w8"):
        kernel = kernels.base.KERNELS.get(name)
        if kernel.supports(layer, x.device, dtype):
            with kernels.use_kernel(name):
                _check(layer, x, layer(x))
            ran.append(name)
    assert "cpu_int8_token_w8" in ran
    assert kernels.select_kernel(layer, x).name in ran
    if TRITON_KERNELS_UNAVAILABLE is None and not torch.cuda.is_available():
        from hf_quant.runtime.kernels.triton import int8 as T

        _check(layer, x, T.CUDA_INT8.forward(layer, x, T.CUDA_INT8.prepare(layer, x.device, dtype)))


def test_native_int8_kernel_keeps_one_int8_copy_of_the_weight():
    """cpu_int8_native's layout is the packed weight, the row scales, the bias and its outlier cache, which gathers
    from the packed weight: no transposed copy of the codes (the other int8 kernels keep one for the outliers)."""
    layer = int8_layer(80, 128, 6.0, True)
    if not I.NATIVE.supports(layer, torch.device("cpu"), torch.bfloat16):
        pytest.skip("no native int8 GEMM on this CPU")
    gemm, outliers = layer.prepared(I.NATIVE, torch.device("cpu"), torch.bfloat16)
    packed = gemm.w
    assert isinstance(outliers, I.PackedOutliers) and outliers.packed is packed
    held = [t for t in (*packed, *gemm._keep, *vars(outliers).values()) if isinstance(t, torch.Tensor)]
    assert sum(t.numel() for t in held if t.dtype == torch.int8) == packed.packed.numel() == 128 * 128
    x = inputs(5, 128, torch.bfloat16, True, seed=9)
    with kernels.use_kernel("cpu_int8_native"):
        out = layer(x)
    _check(layer, x, out)
    assert outliers.last is not None  # the outlier columns' rows were gathered (and are cached) ...
    with kernels.use_kernel("cpu_int8_native"):
        assert torch.equal(layer(x), out)  # ... and reused


@pytest.mark.parametrize("name", ["cpu_int8_fbgemm", "cpu_int8_onednn", "cpu_int8_intmm"])
def test_transposed_codes_are_made_only_at_the_first_outlier_column(name):
    """The torch int8 kernels gather the outlier columns' weights from transposed codes: made when a call first
    has outlier columns, never for inputs without them (plain W8A8 layers hold no second int8 copy)."""
    layer = int8_layer(40, 96, 6.0, True)
    kernel = kernels.base.KERNELS.get(name)
    if not kernel.supports(layer, torch.device("cpu"), torch.bfloat16):
        pytest.skip(f"{name} does not run on this CPU")
    outliers = layer.prepared(kernel, torch.device("cpu"), torch.bfloat16)[-2]
    with kernels.use_kernel(name):
        layer(inputs(4, 96, torch.bfloat16, False))
        assert callable(outliers._wq_t)  # not made yet
        x = inputs(4, 96, torch.bfloat16, True)
        out = layer(x)
    assert isinstance(outliers._wq_t, torch.Tensor) and outliers._wq_t.shape == (96, 40)
    _check(layer, x, out)


def test_fixed_order_takes_the_native_amx_gemm_above_16_rows():
    """`cpu_int8_native_amx` outranks the other int8 kernels and takes the rows above 8 (the VNNI GEMV at and below
    them): on an AMX-INT8 CPU the fixed choice of a W8A8 layer is the tile GEMM from 9 rows up."""
    kernel = kernels.base.KERNELS.get("cpu_int8_native_amx")
    assert kernel.priority > max(I.NATIVE.priority, I.ONEDNN.priority, I.FBGEMM.priority)
    assert not kernel.chosen(None, 8) and kernel.chosen(None, 9) and kernel.chosen(None, 4096)
    assert 8 in kernel.row_cuts(torch.bfloat16)
    layer = int8_layer(40, 128, 0.0, True)
    if not kernel.supports(layer, torch.device("cpu"), torch.bfloat16):
        pytest.skip("no AMX-INT8 tiles on this CPU")
    for m, want in ((1, "cpu_int8_native"), (8, "cpu_int8_native"), (9, "cpu_int8_native_amx"),
                    (300, "cpu_int8_native_amx")):
        x = inputs(m, 128, torch.bfloat16, False, seed=m)
        assert kernels.select_kernel(layer, x).name == want
        _check(layer, x, layer(x))


def test_fixed_order_prefers_onednn_above_16_rows_on_amx_int8(monkeypatch):
    """On CPUs with AMX-INT8 the fixed order leaves `cpu_int8_native` (VNNI) for a tile GEMM above 16 rows (its own,
    `cpu_int8_native_amx`, where Linux grants the tiles; else oneDNN's); elsewhere it keeps the native kernel at every
    row count."""
    from hf_quant.runtime.kernels import int8 as I8

    kernel = kernels.base.KERNELS.get("cpu_int8_native")
    monkeypatch.setattr(I8, "cpu_flags", lambda: frozenset({"avx512_vnni", "amx_int8"}))
    assert kernel.chosen(None, 16) and not kernel.chosen(None, 17) and not kernel.chosen(None, 512)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN not exact: the native kernel at every row count
    assert kernel.chosen(None, 512) == (not I8.exact_int8_dot())
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(I8, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    assert kernel.chosen(None, 17) and kernel.chosen(None, 512)
    assert 16 in kernel.row_cuts(torch.float32)
