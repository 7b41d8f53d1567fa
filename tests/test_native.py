"""The native CPU helpers (runtime/kernels/native): built with the machine's compiler, exact against
`dequantize_weight`, the two kernels on top of them against the reference, and the fallback when
they cannot be built."""

import pytest
import torch

from hf_quant import kernels
from hf_quant.config import LayerSpec
from hf_quant.core import dequantize_weight
from hf_quant.core.devices import cpu_flags
from hf_quant.runtime.kernels import cpu_measure, native
from hf_quant.runtime.kernels.base import KERNELS
from hf_quant.runtime.kernels.cpu import NativeDequantMatmulKernel, NativeTilesKernel

from .test_kernels import make_layer, rel_err

CPU = torch.device("cpu")
NATIVE = ("native_tiles", "native_dequant_matmul")
needs_native = pytest.mark.skipif(native.library() is None, reason=f"native helpers: {native.unavailable_reason()}")


@pytest.fixture()
def rebuilt(monkeypatch, tmp_path):
    """A fresh load of the helpers into an empty cache (the process-wide one comes back afterwards)."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    native.reset()
    yield tmp_path / "cache"
    native.reset()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec,in_f", [
    (LayerSpec(4, 128, False), 384), (LayerSpec(4, 32, True), 96),  # the AVX-512 row path (gs/2 % 16 == 0)
    (LayerSpec(4, 16, False), 64), (LayerSpec(2, 16, True), 48),  # the scalar path (gs/2 == 8)
    (LayerSpec(3, 64, False, True), 192), (LayerSpec(4, -1, True), 96),
    (LayerSpec(8, -1, False), 64), (LayerSpec(8, 32, True), 96), (LayerSpec(6, 32, False), 64)])  # bytes
def test_kernel_tiles_equal_dequantize_weight_bit_for_bit(spec, in_f, dtype):
    """A dequantized tile is (code - zero) * scale rounded once: with scales stored in the activation dtype,
    exactly dequantize_weight's W (columns in group order for act-order layers)."""
    layer, _ = make_layer(37, in_f, spec, bias=False, dtype=dtype)
    kernel = KERNELS.get("native_tiles")
    nibbles, packed, scale, zero, perm = kernel.prepare(layer, CPU, dtype)
    assert nibbles == (spec.bits <= 4)
    out = torch.empty(37, in_f, dtype=dtype)
    native.dequantize_into(packed, scale, zero, out, nibbles)
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, in_f, dtype, layer.g_idx)
    if perm is not None:
        W = W[:, perm]
    assert torch.equal(out, W)


@needs_native
@pytest.mark.parametrize("spec,in_f", [(LayerSpec(4, 128, False), 256), (LayerSpec(3, 64, True, True), 192),
                                       (LayerSpec(2, 32, False), 64), (LayerSpec(8, -1, True), 96),
                                       (LayerSpec(8, 32, False), 64)])
@pytest.mark.parametrize("rows", [1, 5, 300])  # 300: the rows-major GEMM orientation of native_tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_kernels_match_the_reference_over_several_tiles(monkeypatch, spec, in_f, rows, dtype):
    monkeypatch.setattr(NativeTilesKernel, "TILE_N", 32)  # 80 rows: tiles of 32, 32 and 16
    monkeypatch.setattr(NativeDequantMatmulKernel, "CHUNK_BYTES", 1)  # chunks of MIN_CHUNK_ROWS = 32 rows
    monkeypatch.setattr(NativeDequantMatmulKernel, "MIN_CHUNK_ROWS", 32)
    layer, _ = make_layer(80, in_f, spec, bias=True, dtype=dtype, seed=rows)
    x = torch.randn(2, rows, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    found = {k.name for k in cpu_measure.candidates(layer, CPU, dtype)}
    assert set(NATIVE) <= found
    for name in NATIVE:
        kernel = KERNELS.get(name)
        out = kernel.forward(layer, x, kernel.prepare(layer, CPU, dtype))
        assert out.shape == ref.shape and out.dtype == dtype, name
        assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2), name


@needs_native
def test_whole_weight_in_one_chunk_and_the_scratch_is_reused():
    from hf_quant.runtime.kernels import cpu

    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    kernel = KERNELS.get("native_dequant_matmul")
    prepared = kernel.prepare(layer, CPU, torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    first = kernel.forward(layer, x, prepared)
    buf = cpu._scratch(1, torch.bfloat16)
    second = kernel.forward(layer, x, prepared)
    assert torch.equal(first, second) and cpu._scratch(1, torch.bfloat16).data_ptr() == buf.data_ptr()


def test_disabled_by_environment_leaves_the_torch_paths(monkeypatch, rebuilt):
    monkeypatch.setenv(native.ENV_DISABLE, "0")
    assert native.library() is None and "HF_QUANT_NATIVE=0" in native.unavailable_reason()
    layer, _ = make_layer(16, 128, LayerSpec(4, 128, False), bias=False)
    found = {k.name for k in cpu_measure.candidates(layer, CPU, torch.bfloat16)}
    assert not found & set(NATIVE) and {"dequant_tiles", "dequant_matmul"} <= found
    with pytest.raises(RuntimeError, match="native CPU helpers unavailable: disabled"):
        native.dequantize_into(torch.zeros(1, 1, 1, dtype=torch.uint8), torch.ones(1, 1), torch.ones(1, 1),
                               torch.empty(1, 2), True)


def test_a_failing_compiler_is_reported_and_nothing_is_left_behind(monkeypatch, rebuilt, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'fatal: no such target' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(native.ENV_CC, str(fake))
    assert native.library() is None
    assert "could not build dequant.c: fatal: no such target" in native.unavailable_reason()
    assert not any(rebuilt.glob("*.so"))  # no half-written library in the cache


@needs_native
def test_built_into_the_cache_once(rebuilt):
    assert native.library() is not None
    built = list(rebuilt.glob("dequant-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_native
def test_bad_operands_are_refused():
    scale = torch.ones(2, 1)
    with pytest.raises(ValueError, match="native dequantize: bad operands"):
        native.dequantize_into(torch.zeros(2, 1, 4, dtype=torch.uint8), scale, scale, torch.empty(2, 9), True)
    with pytest.raises(ValueError, match="native dequantize: bad operands"):  # not contiguous
        native.dequantize_into(torch.zeros(2, 1, 4, dtype=torch.uint8), scale, scale, torch.empty(8, 2).t(), True)
    with pytest.raises(ValueError, match="native dequantize: bad operands"):  # int64 codes
        native.dequantize_into(torch.zeros(2, 1, 8), scale, scale, torch.empty(2, 8), False)


X86_64_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}  # what an x86-64-v4 build may use


@needs_native
@pytest.mark.parametrize("cflags", ["-march=x86-64-v3", "-march=x86-64-v4 -mno-avx512bf16"])
def test_builds_without_avx512_or_native_bf16_are_exact_too(monkeypatch, rebuilt, cflags):
    """The AVX2 build (staging buffer, F16C) and the AVX-512 build without native bf16 conversion (rounding on the
    bit pattern) give the same tiles as dequantize_weight."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    if "x86-64-v4" in cflags and not X86_64_V4 <= cpu_flags():
        pytest.skip("this CPU cannot run an x86-64-v4 (AVX-512) build")
    monkeypatch.setenv(native.ENV_CFLAGS, cflags)
    assert native.library() is not None, native.unavailable_reason()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for spec, in_f in ((LayerSpec(4, 128, False), 256), (LayerSpec(8, -1, True), 64)):
            layer, _ = make_layer(19, in_f, spec, bias=False, dtype=dtype)
            nibbles, packed, scale, zero, _ = KERNELS.get("native_tiles").prepare(layer, CPU, dtype)
            out = native.dequantize_into(packed, scale, zero, torch.empty(19, in_f, dtype=dtype), nibbles)
            W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, in_f, dtype)
            assert torch.equal(out, W), (cflags, dtype, spec)


needs_codes_bf16 = pytest.mark.skipif(not native.has_codes_bf16(), reason="native codes x bf16 kernel needs AVX512-BF16")


def _bf16_codes_case(int4: str, int8: str, spec: LayerSpec, in_f: int, rows: int, out_f: int):
    """(layer, kernel, x, its output, the fp32 product with the unrounded weight) of a fused bf16 codes kernel (the
    `int4` one for at most 4 bits, else `int8`), a candidate of the layer; the output checked within bf16 rounding."""
    layer, _ = make_layer(out_f, in_f, spec, bias=True, dtype=torch.bfloat16, seed=rows + out_f)
    kernel = KERNELS.get(int4 if spec.bits <= 4 else int8)
    assert kernel in cpu_measure.candidates(layer, CPU, torch.bfloat16)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    out = kernel.forward(layer, x, kernel.prepare(layer, CPU, torch.bfloat16))
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, in_f, torch.float32, layer.g_idx)
    exact = x.float() @ W.t() + layer.bias.float()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_f)
    assert rel_err(out, exact) < 4e-3  # the output's own bf16 rounding
    return layer, kernel, x, out, exact


@needs_codes_bf16
@pytest.mark.parametrize("spec,in_f", [
    (LayerSpec(4, 128, False), 384), (LayerSpec(4, 128, True, True), 512), (LayerSpec(4, 32, False), 96),
    (LayerSpec(4, 64, True), 192), (LayerSpec(3, 256, False), 512), (LayerSpec(2, 32, True), 64),
    (LayerSpec(4, -1, False), 128), (LayerSpec(8, -1, False), 320), (LayerSpec(8, 32, True), 96),
    (LayerSpec(8, 128, False, True), 384), (LayerSpec(6, 64, False), 192)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13])  # row blocks of 4 and every remainder
@pytest.mark.parametrize("out_f", [1, 37])  # an odd last weight row
def test_native_codes_match_the_unrounded_weight(spec, in_f, rows, out_f):
    """native_int4 / native_int8 use the weight (code - zero) * scale unrounded: against x @ W.T in fp32 they are
    exact to fp32 accumulation error; against the bf16 reference (whose W is rounded to bf16) within bf16 rounding."""
    layer, kernel, x, out, exact = _bf16_codes_case("native_int4", "native_int8", spec, in_f, rows, out_f)
    assert KERNELS.get("native_int8" if spec.bits <= 4 else "native_int4") not in cpu_measure.candidates(
        layer, CPU, torch.bfloat16)
    if out_f > 1:  # a lone output can be a cancellation, where the reference's bf16 weight rounding shows
        with kernels.use_kernel("reference"):
            assert rel_err(out, layer(x)) < 1e-2
    y = torch.empty(rows, out_f)  # fp32 output: no output rounding left
    packed, scale, offset, bias, perm = kernel.operands(layer)
    xs = x if perm is None else x.index_select(1, perm)
    corr = xs.float().view(rows, offset.shape[0], -1).sum(dim=2) @ offset
    native.codes_gemm(xs.contiguous(), packed, scale, corr, bias, y)
    # fp32 sums of x * (offset + q) * scale, then the correction: errors against the size of those products
    S = scale.repeat_interleave(in_f // scale.shape[1], dim=1)
    size = 144 if spec.bits <= 4 else 16 * 144 + 144
    assert ((y - exact).abs() <= 1e-6 * size * (xs.float().abs() @ S.t()) + 1e-6 * layer.bias.float().abs()).all()


needs_codes_amx = pytest.mark.skipif(not native.has_codes_amx(), reason="the AMX codes kernel needs AMX-BF16 (and "
                                     "Linux granting the tile state)")


@needs_codes_amx
@pytest.mark.parametrize("spec,in_f", [
    (LayerSpec(4, 128, False), 384), (LayerSpec(4, 128, True, True), 512), (LayerSpec(4, 32, False), 96),
    (LayerSpec(3, 256, False), 512), (LayerSpec(2, 32, True), 64), (LayerSpec(4, -1, False), 128),
    (LayerSpec(8, -1, False), 320), (LayerSpec(8, 32, True), 96), (LayerSpec(8, 128, False, True), 384),
    (LayerSpec(6, 64, False), 192)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64, 70, 133])  # blocks of 16 rows, groups of 4 blocks, remainders
@pytest.mark.parametrize("out_f", [1, 37])  # a partial block of 16 weight rows
def test_native_amx_codes_match_the_unrounded_weight(spec, in_f, rows, out_f):
    """native_int4_amx / native_int8_amx: the AVX-512 kernels' products and sums on AMX tiles, every row count."""
    layer, kernel, x, out, exact = _bf16_codes_case("native_int4_amx", "native_int8_amx", spec, in_f, rows, out_f)
    y, y512 = torch.empty(rows, out_f), torch.empty(rows, out_f)
    gemm, offset, perm = kernel.prepare(layer, CPU, torch.bfloat16)
    packed, scale, _, bias, _ = kernel.operands(layer)
    xs = (x if perm is None else x.index_select(1, perm)).contiguous()
    corr = xs.float().view(rows, offset.shape[0], -1).sum(dim=2) @ offset
    native.codes_gemm(xs, packed, scale, corr, bias, y, amx=True)
    S = scale.repeat_interleave(in_f // scale.shape[1], dim=1)
    size = 144 if spec.bits <= 4 else 16 * 144 + 144
    assert ((y - exact).abs() <= 1e-6 * size * (xs.float().abs() @ S.t()) + 1e-6 * layer.bias.float().abs()).all()
    if native.codes_group_size_ok(in_f // scale.shape[1], spec.bits <= 4, torch.bfloat16):  # the AVX-512 kernel too
        _, _, offset512, _, _ = KERNELS.get("native_int4" if spec.bits <= 4 else "native_int8").operands(layer)
        corr512 = xs.float().view(rows, offset512.shape[0], -1).sum(dim=2) @ offset512  # its own code offset
        native.codes_gemm(xs, packed, scale, corr512, bias, y512)
        assert ((y - y512).abs() <= 2e-6 * size * (xs.float().abs() @ S.t()) + 1e-6).all()


@needs_codes_amx
@pytest.mark.parametrize("spec,in_f", [
    (LayerSpec(4, 128, False), 384), (LayerSpec(4, 128, True, True), 512), (LayerSpec(3, 256, False), 512),
    (LayerSpec(4, 32, True), 96), (LayerSpec(8, -1, False), 320), (LayerSpec(8, 64, True), 192)])
@pytest.mark.parametrize("rows", [1, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_native_amx_f32_is_as_exact_as_the_fp32_kernels(spec, in_f, rows, dtype, split):
    """native_int4_amx_f32 / native_int8_amx_f32: x as three bf16 terms against tiles of the codes themselves;
    native_int{4,8}_split_amx_f32 (split): x as three int8 terms on the AMX-INT8 tiles: against the float64 product,
    within a small factor of the reference's own fp32 error, like native_int4_f32 (candidates of the default mode
    for fp32 activations)."""
    layer, _ = make_layer(37, in_f, spec, bias=True, dtype=dtype, seed=rows)
    name = f"native_int{4 if spec.bits <= 4 else 8}_{'split_amx' if split else 'amx'}_f32"
    if split and not (native.codes_split_group_size_ok(spec.effective_group_size(in_f)) and native.has_int8_amx()):
        pytest.skip("the split AMX kernels take groups of a multiple of 64 on AMX-INT8 CPUs")
    kernel = KERNELS.get(name)
    assert kernel in cpu_measure.candidates(layer, CPU, torch.float32 if split else dtype)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
    out = kernel.forward(layer, x, kernel.prepare(layer, CPU, torch.float32))
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, in_f, torch.float64, layer.g_idx)
    exact = x.double() @ W.t() + layer.bias.double()
    with kernels.use_kernel("reference"):
        ref = layer(x.to(dtype)) if dtype == torch.float32 else None
    fp32_err = rel_err(ref, exact) if ref is not None else 2e-7
    assert out.dtype == torch.float32 and rel_err(out, exact) < 5 * fp32_err + 2e-7, (rel_err(out, exact), fp32_err)


_DEQUANT_AMX_CASES = [(*case, rows) for case in [
    (LayerSpec(4, 128, False), 384, 37), (LayerSpec(4, 32, True), 96, 130),  # groups of 32: both halves in a tile
    (LayerSpec(4, 128, True, True), 512, 64), (LayerSpec(3, 256, False), 512, 70), (LayerSpec(2, 32, False), 64, 16),
    (LayerSpec(4, -1, False), 128, 37), (LayerSpec(8, -1, False), 320, 130), (LayerSpec(8, 32, True), 96, 37),
    (LayerSpec(6, 64, False), 192, 65)]
    for rows in (1, 17, 33, 70, 600)]  # units of 32 rows, their remainders, two passes of 512
_DEQUANT_AMX_CASES += [(*case, rows) for case in [(LayerSpec(4, 128, False), 4224, 130), (LayerSpec(8, -1, True), 4224, 37)]
                       for rows in (17, 600)]  # K in two chunks of panels


@needs_codes_amx
@pytest.mark.parametrize("spec,in_f,out_f,rows", _DEQUANT_AMX_CASES)
def test_native_dequant_amx_is_the_bf16_weights_product(spec, in_f, out_f, rows):
    """native_dequant_amx: the bf16 weight that `dequantize_into` makes (the reference's), met by x on AMX tiles with
    exact products and fp32 sums: within fp32 summation error of the float64 product of the same bf16 operands, with
    the output in fp32 and rounded once to bf16 through the kernel."""
    layer, _ = make_layer(out_f, in_f, spec, bias=True, dtype=torch.bfloat16, seed=rows + in_f)
    kernel = KERNELS.get("native_dequant_amx")
    assert kernel in cpu_measure.candidates(layer, CPU, torch.bfloat16)
    nibbles, packed, scale, zero, perm = prepared = kernel.prepare(layer, CPU, torch.bfloat16)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    xs = x if perm is None else x.index_select(1, perm)
    W = torch.empty(out_f, in_f, dtype=torch.bfloat16)
    native.dequantize_into(packed, scale, zero, W, nibbles)
    exact = xs.double() @ W.double().t()
    bound = 1e-6 * (xs.double().abs() @ W.double().abs().t()) * (1 + in_f / 4096)
    y = torch.empty(rows, out_f)
    native.dequant_amx_gemm(xs.contiguous(), packed, scale, zero, y, nibbles)
    assert ((y.double() - exact).abs() <= bound).all()
    bias = layer.bias.float()
    native.dequant_amx_gemm(xs.contiguous(), packed, scale, zero, y, nibbles, bias)
    assert ((y.double() - exact - bias.double()).abs() <= bound + 1e-6 * bias.double().abs()).all()
    out = kernel.forward(layer, x.view(1, rows, in_f), prepared)  # bf16 out: the fp32 sums rounded once, + bias
    assert out.shape == (1, rows, out_f) and out.dtype == torch.bfloat16
    with kernels.use_kernel("reference"):
        ref = layer(x)
    assert rel_err(out[0], ref) < 1e-2


@needs_codes_amx
def test_native_dequant_amx_refusals():
    kernel = KERNELS.get("native_dequant_amx")
    layer, _ = make_layer(8, 64, LayerSpec(4, 16, False), bias=False)  # groups of 16
    assert not kernel.supports(layer, CPU, torch.bfloat16)
    layer, _ = make_layer(8, 48, LayerSpec(8, -1, False), bias=False)  # K = 48: not a multiple of 32
    assert not kernel.supports(layer, CPU, torch.bfloat16)
    layer, _ = make_layer(8, 256, LayerSpec(4, 128, False), bias=False)
    assert kernel.supports(layer, CPU, torch.bfloat16) and not kernel.supports(layer, CPU, torch.float16)
    assert kernel not in cpu_measure.candidates(layer, CPU, torch.float32)  # fp32: its _bf16 form, when allowed
    assert KERNELS.get("native_dequant_amx_bf16") in cpu_measure.candidates(layer, CPU, torch.float32, allow_bf16=True)
    assert KERNELS.get("native_dequant_amx_bf16") not in cpu_measure.candidates(layer, CPU, torch.float32)
    assert "native_dequant_amx_fp32" not in KERNELS.names()
    nibbles, packed, scale, zero, _ = kernel.prepare(layer, CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="native dequant_amx_gemm: bad operands"):  # fp32 x
        native.dequant_amx_gemm(torch.zeros(2, 256), packed, scale, zero, torch.empty(2, 8), nibbles)
    x = torch.zeros(1, 256, dtype=torch.bfloat16).expand(2, 256)  # rows overlapping (stride 0)
    with pytest.raises(ValueError, match="native dequant_amx_gemm: bad operands"):
        native.dequant_amx_gemm(x, packed, scale, zero, torch.empty(2, 8, dtype=torch.bfloat16), nibbles)
    assert torch.equal(kernel.forward(layer, x, (nibbles, packed, scale, zero, None)),
                       kernel.forward(layer, x.contiguous(), (nibbles, packed, scale, zero, None)))
    with pytest.raises(ValueError, match="native dequant_amx_gemm: bad operands"):  # out of the wrong shape
        native.dequant_amx_gemm(torch.zeros(2, 256, dtype=torch.bfloat16), packed, scale, zero, torch.empty(2, 9),
                                nibbles)


@needs_codes_amx
def test_native_amx_refusals():
    layer, _ = make_layer(8, 64, LayerSpec(4, 16, False), bias=False)  # groups of 16
    assert not KERNELS.get("native_int4_amx").supports(layer, CPU, torch.bfloat16)
    layer, _ = make_layer(8, 256, LayerSpec(4, 128, False), bias=False)
    assert not KERNELS.get("native_int4_amx").supports(layer, CPU, torch.float32)  # fp32: native_int4_amx_f32
    assert KERNELS.get("native_int4_amx_bf16") in cpu_measure.candidates(layer, CPU, torch.float32, allow_bf16=True)
    assert KERNELS.get("native_int4_amx_bf16") not in cpu_measure.candidates(layer, CPU, torch.float32)
    x, packed = torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(8, 16, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="native codes_gemm: bad operands"):  # groups of 16
        native.codes_gemm(x, packed, torch.ones(8, 16), torch.zeros(2, 8), None, torch.empty(2, 8), amx=True)


@needs_codes_bf16
def test_native_codes_candidates_and_refusals():
    for spec, in_f in ((LayerSpec(4, 16, False), 64), (LayerSpec(8, 128, False), 256)):  # groups of 16; 8 bits
        layer, _ = make_layer(8, in_f, spec, bias=False)
        assert not KERNELS.get("native_int4").supports(layer, CPU, torch.bfloat16)
    for spec, in_f in ((LayerSpec(8, 16, False), 64), (LayerSpec(8, -1, False), 80), (LayerSpec(4, 128, False), 256)):
        layer, _ = make_layer(8, in_f, spec, bias=False)  # groups of 16; rows of 80; 4 bits
        assert not KERNELS.get("native_int8").supports(layer, CPU, torch.bfloat16)
    layer, _ = make_layer(8, 256, LayerSpec(4, 128, False), bias=False)
    assert not KERNELS.get("native_int4").supports(layer, CPU, torch.float16)  # bf16 dot products only
    assert KERNELS.get("native_int4_bf16") in cpu_measure.candidates(layer, CPU, torch.float32, allow_bf16=True)
    x, packed = torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(8, 2, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="native codes_gemm: bad operands"):  # fp16 out
        native.codes_gemm(x, packed, torch.ones(8, 2), torch.zeros(2, 8), None, torch.empty(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="native codes_gemm: bad operands"):  # groups of 16
        native.codes_gemm(x, torch.zeros(8, 16, 8, dtype=torch.uint8), torch.ones(8, 16), torch.zeros(2, 8),
                               None, torch.empty(2, 8))
    with pytest.raises(ValueError, match="native codes_gemm: bad operands"):  # byte groups of 16
        native.codes_gemm(x, torch.zeros(8, 16, 16, dtype=torch.uint8), torch.ones(8, 16), torch.zeros(2, 8),
                               None, torch.empty(2, 8))


needs_codes_f32 = pytest.mark.skipif(not native.has_codes_f32(), reason="native codes x fp32 kernel needs AVX2 + FMA")
F32_SPECS = [(LayerSpec(4, 128, False), 384), (LayerSpec(4, 32, True, True), 96), (LayerSpec(3, 64, False), 192),
             (LayerSpec(2, -1, True), 128), (LayerSpec(8, -1, False), 320), (LayerSpec(8, 32, True), 96),
             (LayerSpec(8, 128, False, True), 256), (LayerSpec(5, 64, False), 128)]


def check_codes_f32(spec, in_f, rows, out_f, dtype):
    """native_int{4,8}_f32 against x @ W.T with W unrounded, all in fp32: exact to fp32 accumulation error; the
    output rounded once to the activation dtype."""
    layer, _ = make_layer(out_f, in_f, spec, bias=True, dtype=dtype, seed=rows + out_f)
    kernel = KERNELS.get("native_int4_f32" if spec.bits <= 4 else "native_int8_f32")
    assert kernel in cpu_measure.candidates(layer, CPU, dtype)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = kernel.forward(layer, x, kernel.prepare(layer, CPU, dtype))
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, in_f, torch.float32, layer.g_idx)
    exact = x.float() @ W.t() + layer.bias.float()
    assert out.dtype == dtype and out.shape == (rows, out_f)
    bound = 1e-5 * (x.float().abs() @ W.abs().t() + layer.bias.float().abs())  # fp32 sums of K products
    if dtype == torch.float32:
        assert ((out - exact).abs() <= bound).all()
        with kernels.use_kernel("reference"):  # the reference's fp32 weight is W itself
            assert ((out - layer(x)).abs() <= 2 * bound).all()
    else:  # one rounding of the exact value to the output dtype
        eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        assert ((out.float() - exact).abs() <= bound + eps * exact.abs()).all()


@needs_codes_f32
@pytest.mark.parametrize("spec,in_f", F32_SPECS)
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 13])  # row blocks of 4 (AVX-512) / 2 (AVX2) and every remainder
@pytest.mark.parametrize("out_f", [1, 37])  # an odd last weight row
def test_native_codes_f32_are_exact_in_fp32(spec, in_f, rows, out_f):
    check_codes_f32(spec, in_f, rows, out_f, torch.float32)


@needs_codes_f32
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec,in_f", [F32_SPECS[0], F32_SPECS[4], F32_SPECS[6]])
def test_native_codes_f32_take_16_bit_activations(spec, in_f, dtype):
    check_codes_f32(spec, in_f, 5, 37, dtype)


@needs_native
def test_native_codes_f32_in_an_avx2_build(monkeypatch, rebuilt):
    """An AVX2-only build (vectors of 8): groups of 16 are taken, and the results are as exact."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    monkeypatch.setenv(native.ENV_CFLAGS, "-march=x86-64-v3")
    assert native.has_codes_f32() and native.library().hfq_codes_f32_vector_width() == 8
    assert native.codes_group_size_ok(16, True, torch.float32) and not native.codes_group_size_ok(8, True, torch.float32)
    for spec, in_f in [*F32_SPECS[:2], F32_SPECS[5], (LayerSpec(4, 16, False), 64), (LayerSpec(8, 16, True), 48)]:
        for rows in (1, 3):
            check_codes_f32(spec, in_f, rows, 37, torch.float32)
    check_codes_f32(LayerSpec(4, 16, False), 64, 3, 37, torch.bfloat16)


needs_codes_i16 = pytest.mark.skipif(not native.has_codes_i16(), reason="no AVX2 native build")
I16_SPECS = [(LayerSpec(4, 128, False), 384), (LayerSpec(4, 32, True, True), 96), (LayerSpec(3, 64, False), 192),
             (LayerSpec(2, -1, True), 128), (LayerSpec(8, -1, False), 320), (LayerSpec(8, 16, True), 96),
             (LayerSpec(8, 128, False, True), 256), (LayerSpec(5, 64, False), 128)]


def check_codes_i16(spec, in_f, rows, out_f, dtype, x=None, sixteen_bit=False):
    """native_int{4,8}_i16 against x @ W.T with W unrounded in fp64: fp32 activations (two int16 terms) within the
    fp32 kernels' bound; 16-bit ones within one int16 step of each row's absmax per element (plus one rounding of
    the output), or two steps where a row's absmax passes SECOND_TERM_RATIO x its rms. sixteen_bit: fp32 activations
    through native_int{4,8}_i16_bf16 (the 16-bit rule, an fp32 output), a candidate only where bf16 is allowed."""
    layer, _ = make_layer(out_f, in_f, spec, bias=True, dtype=dtype, seed=rows + out_f)
    name = "native_int4_i16" if spec.bits <= 4 else "native_int8_i16"
    if sixteen_bit:
        assert dtype == torch.float32
        kernel = KERNELS.get(name + "_bf16")
        assert kernel in cpu_measure.candidates(layer, CPU, dtype, allow_bf16=True)
        assert kernel not in cpu_measure.candidates(layer, CPU, dtype, allow_bf16=False)
        assert not kernel.supports(layer, CPU, torch.bfloat16)
    else:
        kernel = KERNELS.get(name)
        assert kernel in cpu_measure.candidates(layer, CPU, dtype)
    if x is None:
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = kernel.forward(layer, x, kernel.prepare(layer, CPU, dtype))
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, in_f, torch.float32, layer.g_idx)
    exact = x.double() @ W.double().t() + layer.bias.double()
    assert out.dtype == dtype and out.shape == (rows, out_f)
    absw = W.double().abs().t()
    if dtype == torch.float32 and not sixteen_bit:
        bound = 1e-5 * (x.double().abs() @ absw + layer.bias.double().abs())
        assert ((out.double() - exact).abs() <= bound).all()
    else:
        eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -23}[dtype]
        step = x.double().abs().amax(dim=1, keepdim=True) / 65534  # half an int16 step of the row's absmax
        bound = step @ absw.sum(dim=0, keepdim=True) + 1e-5 * (x.double().abs() @ absw) + eps * exact.abs()
        assert ((out.double() - exact).abs() <= bound).all()
    return out, exact, absw


@needs_codes_i16
@pytest.mark.parametrize("spec,in_f", I16_SPECS)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 13])  # blocks of 2 rows, every remainder; 13: two native calls
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_codes_i16_against_the_exact_product(spec, in_f, rows, dtype):
    check_codes_i16(spec, in_f, rows, 37, dtype)


@needs_codes_i16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_codes_i16_outlier_rows_zero_rows_and_extremes(dtype):
    """A row with a massive activation (absmax far above its rms: the second term), an all-zero row, and the
    largest sums the int32 lanes meet between flushes (8-bit codes 255 against codes 32767 over 4096 channels)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2048, generator=g)
    x[1, 17] = 500.0  # absmax / rms ~ 45 (it is at most sqrt(K): 2048 channels, so that it can pass 32)
    x[2] = 0.0
    check_codes_i16(LayerSpec(4, 128, False), 2048, 4, 40, dtype, x.to(dtype))
    layer, _ = make_layer(16, 4096, LayerSpec(8, -1, False), bias=False, seed=1)
    layer.qweight.fill_(255)  # every code 255: the int32 lanes at their largest
    layer.invalidate_kernels()
    kernel = KERNELS.get("native_int8_i16")
    x = torch.ones(1, 4096, dtype=dtype)
    out = kernel.forward(layer, x, kernel.prepare(layer, CPU, dtype))
    W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, 4096, torch.float32, None)
    exact = x.double() @ W.double().t()
    assert float(((out.double() - exact).abs() / exact.abs()).max()) < (1e-5 if dtype == torch.float32 else 8e-3)


@needs_codes_i16
@pytest.mark.parametrize("spec,in_f", I16_SPECS)
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_native_codes_i16_bf16_rule_for_fp32_activations(spec, in_f, rows):
    out = check_codes_i16(spec, in_f, rows, 37, torch.float32, sixteen_bit=True)[0]
    two_terms = check_codes_i16(spec, in_f, rows, 37, torch.float32)[0]
    assert not torch.equal(out, two_terms)  # one term, not the exact two-term product


@needs_codes_i16
def test_native_codes_i16_bf16_rule_takes_the_second_term_for_outlier_rows():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2048, generator=g)
    x[1, 17] = 500.0  # absmax ~ 45 x the rms (over SECOND_TERM_RATIO): this row's residual term too
    out, exact, absw = check_codes_i16(LayerSpec(4, 128, False), 2048, 3, 40, torch.float32, x, sixteen_bit=True)
    bound = 1e-5 * (x.double().abs() @ absw)  # the fp32 kernels' bound (without the bias)
    assert ((out - exact).abs() <= bound).all()  # the outlier row makes every row take the second term
    args = (LayerSpec(4, 128, False), 2048, 3, 40, torch.float32, x[[0, 2, 0]])
    out, exact, _ = check_codes_i16(*args, sixteen_bit=True)  # without the outlier row: one term
    two_terms = check_codes_i16(*args)[0]
    assert (out - exact).abs().max() > 10 * (two_terms - exact).abs().max()


@needs_codes_i16
def test_native_codes_i16_refusals():
    with pytest.raises(ValueError, match="native codes_i16_gemv: bad operands"):  # nibbles in groups of 16
        native.codes_i16_gemv(torch.zeros(2, 64), torch.zeros(8, 4, 8, dtype=torch.uint8), torch.ones(8, 4), None,
                              None, torch.empty(2, 8), 1, 32.0)
    with pytest.raises(ValueError, match="at most 8 rows"):
        native.codes_i16_gemv(torch.zeros(9, 64), torch.zeros(8, 2, 16, dtype=torch.uint8), torch.ones(8, 2), None,
                              None, torch.empty(9, 8), 1, 32.0)
    layer, _ = make_layer(8, 64, LayerSpec(4, 16, False), bias=False)
    assert not KERNELS.get("native_int4_i16").supports(layer, CPU, torch.bfloat16)  # groups of 16 nibbles
    packed, scale = torch.zeros(8, 2, 16, dtype=torch.uint8), torch.ones(8, 2)
    with pytest.raises(ValueError, match="bad operands packed"):  # the weight's operands: checked when bound
        native.I16Gemv(packed, scale.half(), None, None)
    with pytest.raises(ValueError, match="bad operands packed"):
        native.I16Gemv(packed, scale, torch.zeros(8, 2), None)  # offset (N, G), not (G, N)
    gemv = native.I16Gemv(packed, scale, None, None)
    for x, out in ((torch.zeros(64, 2).t(), torch.empty(2, 8)),  # x not contiguous
                   (torch.zeros(2, 48), torch.empty(2, 8)),  # K of neither layout (64: nibbles, 32: bytes)
                   (torch.zeros(2, 64), torch.empty(2, 9)),  # out's shape
                   (torch.zeros(2, 64, dtype=torch.float64), torch.empty(2, 8))):
        with pytest.raises(ValueError, match="native codes_i16_gemv: bad operands x"):
            gemv(x, out, 1, 32.0)
    assert torch.equal(gemv(torch.ones(2, 64), torch.empty(2, 8), 2, 32.0), torch.zeros(2, 8))  # codes 0, no zero


@needs_codes_i16
@pytest.mark.parametrize("name,spec", [("native_int4_i16", LayerSpec(4, 64, False, True)),
                                       ("native_int8_i16", LayerSpec(8, -1, True))])
def test_native_codes_i16_kernel_takes_any_input_layout(name, spec):
    """3-d inputs, non-contiguous ones and act-order layers (channels permuted) give the 2-d contiguous result."""
    layer, _ = make_layer(24, 256, spec, bias=True, seed=3)
    kernel = KERNELS.get(name)
    prepared = kernel.prepare(layer, CPU, torch.float32)
    x = torch.randn(3, 2, 256, generator=torch.Generator().manual_seed(2))
    flat = kernel.forward(layer, x.reshape(6, 256), prepared)
    assert torch.equal(kernel.forward(layer, x, prepared), flat.view(3, 2, 24))
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
    assert not strided.is_contiguous()
    assert torch.equal(kernel.forward(layer, strided, prepared), flat.view(3, 2, 24))


def test_native_codes_i16_in_an_avx2_build(monkeypatch, rebuilt):
    """The int16 kernel is AVX2 code: the AVX2-only build has it, with the same results."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    monkeypatch.setenv(native.ENV_CFLAGS, "-march=x86-64-v3")
    assert native.has_codes_i16() and not native.has_codes_bf16()
    for spec, in_f in (I16_SPECS[0], I16_SPECS[4], I16_SPECS[5]):
        for dtype in (torch.float32, torch.bfloat16):
            check_codes_i16(spec, in_f, 3, 37, dtype)


@needs_native
def test_native_codes_f32_refusals():
    layer, _ = make_layer(8, 64, LayerSpec(4, 16, False), bias=False)  # AVX-512: groups of 16 are too narrow
    width = native.library().hfq_codes_f32_vector_width()
    assert KERNELS.get("native_int4_f32").supports(layer, CPU, torch.float32) == (width == 8)
    layer, _ = make_layer(8, 256, LayerSpec(4, 128, False), bias=False)
    assert not KERNELS.get("native_int8_f32").supports(layer, CPU, torch.float32)  # 4 bits
    assert "native_int4_f32_bf16" not in KERNELS.names()  # exact for every dtype: no bf16-cast variant
    if native.has_codes_f32():
        with pytest.raises(ValueError, match="native codes_gemm: bad operands"):  # groups of 8
            native.codes_gemm(torch.zeros(2, 64), torch.zeros(8, 8, 4, dtype=torch.uint8), torch.ones(8, 8),
                              torch.zeros(2, 8), None, torch.empty(2, 8))
    with pytest.raises(RuntimeError, match="native codes x torch.float16 kernel unavailable"):
        native.codes_gemm(torch.zeros(2, 64, dtype=torch.float16), torch.zeros(8, 2, 16, dtype=torch.uint8),
                          torch.ones(8, 2), torch.zeros(2, 8), None, torch.empty(2, 8))


@needs_native
def test_a_build_without_avx512_bf16_has_no_codes_kernel(monkeypatch, rebuilt):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    monkeypatch.setenv(native.ENV_CFLAGS, "-march=x86-64-v3")
    assert native.library() is not None and not native.has_codes_bf16()
    for bits, name in ((4, "native_int4"), (8, "native_int8")):
        layer, _ = make_layer(8, 256, LayerSpec(bits, 128, False), bias=False)
        assert KERNELS.get(name) not in cpu_measure.candidates(layer, CPU, torch.bfloat16)


def _token_quantization_matches_torch(monkeypatch, dtype, rows, threshold):
    from hf_quant.runtime.kernels import int8

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3 * 96, generator=g)
    x[:, 5] *= 4  # outlier columns, with elements below the threshold in them too
    x[rows // 2, 77] = -9.0
    x[0, 100:110] = torch.tensor([254.0, 1, 3, 5, -1, -3, -5, 7, 9, -11])  # products k + 0.5: ties to even
    if rows > 1:
        x[-1] = 0.0  # an all-zero row: codes 0
    x = x.to(dtype)[:, :200]  # strided rows
    for code_dtype, kw in ((torch.int8, {}), (torch.uint8, {"offset": 128}), (torch.float32, {"as_float": True})):
        codes, absmax, cols = native.quantize_tokens(x, threshold, code_dtype)
        with monkeypatch.context() as mp:
            mp.setattr(native, "library", lambda: None)
            ref = int8.quantize_activations(x, threshold, **kw)
            ref_chunked = int8.quantize_tokens(x, threshold, int8.outlier_index(x, threshold), **kw)
        assert codes.dtype == code_dtype and torch.equal(codes, ref[0]) and torch.equal(codes, ref_chunked[0])
        assert torch.equal(absmax, ref[1])
        assert (cols is None) == (ref[2] is None) == (threshold == 0) and (cols is None or torch.equal(cols, ref[2]))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 130])  # 130: more than one thread
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_native_token_quantization_is_bit_identical_to_torch(monkeypatch, dtype, rows, threshold):
    _token_quantization_matches_torch(monkeypatch, dtype, rows, threshold)


@needs_native
def test_native_token_quantization_other_builds(monkeypatch, rebuilt):
    """The same bytes from the AVX2 build (8 lanes) and from a build without vectors (the two-pass scalar form)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    for cflags in ("-march=x86-64-v3", "-march=x86-64"):
        monkeypatch.setenv(native.ENV_CFLAGS, cflags)
        native.reset()
        assert native.library() is not None
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rows, threshold in ((7, 0.0), (130, 2.5), (1, 2.5)):
                _token_quantization_matches_torch(monkeypatch, dtype, rows, threshold)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 130])  # 130: more than one thread
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_native_fake_quantization_is_bit_identical_to_the_oracle(monkeypatch, dtype, rows, threshold):
    """`native.fake_quantize_tokens` (the fake-quantized activations of `cpu_int8_token_w8` in one pass pair)
    against `activations.fake_quantize_int8_token` and the torch path of `int8.fake_quantize_fast`, compared as
    bits (a -0.0 where the oracle has +0.0 would be a different bf16 number)."""
    from hf_quant.runtime import activations
    from hf_quant.runtime.kernels import int8

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3 * 96, generator=g)
    x[:, 5] *= 4  # outlier columns, with elements below the threshold in them too
    x[rows // 2, 77] = -9.0
    x[0, :40] = -1e-6  # tiny negatives: codes round to -0.0 before the integer cast
    if rows > 1:
        x[-1] = 0.0  # an all-zero row
    x = x.to(dtype)[:, :200]  # strided rows
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    got = native.fake_quantize_tokens(x, threshold)
    oracle = activations.fake_quantize_int8_token(x, threshold)
    monkeypatch.setattr(native, "library", lambda: None)
    torch_path = int8.fake_quantize_fast(x, threshold)
    monkeypatch.undo()
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.view(bits), oracle.view(bits)) and torch.equal(got.view(bits), torch_path.view(bits))
    assert torch.equal(int8.fake_quantize_fast(x, threshold).view(bits), got.view(bits))  # the native route
    with pytest.raises(ValueError, match="unit column stride"):
        native.fake_quantize_tokens(torch.randn(6, 4, dtype=dtype).t(), threshold)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_finish_tokens(dtype):
    """Row scales, bias and the outlier columns' product (W_hat rounded to the activation dtype, as the
    reference holds it) in one pass, against the torch epilogue."""
    from hf_quant.runtime.kernels import int8

    g = torch.Generator().manual_seed(0)
    M, K, N = 21, 40, 300  # 21 rows: a block of 16 and a remainder; 300 columns: a chunk of 256 and a remainder
    y, absmax = torch.randn(M, N, generator=g), torch.rand(M, generator=g) * 3
    bias, x = torch.randn(N, generator=g), (torch.randn(M, K, generator=g) * 4).to(dtype)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    ws = torch.rand(N, generator=g) * 0.01
    cols = torch.tensor([3, 17, 39])
    weights = int8.OutlierWeights(wq.t().contiguous(), ws)
    for b, c in ((None, None), (bias, None), (bias, cols), (None, cols)):
        monkey = native.library
        try:
            native.library = lambda: None  # the torch epilogue
            want = int8.finish_tokens(y.clone(), absmax, b, x, x, c, weights)
        finally:
            native.library = monkey
        extra = None if c is None else (x, weights.wq_t, c, ws)
        got = native.finish_tokens(y, absmax, b, dtype, extra)
        assert got.dtype == dtype and got.shape == (M, N)
        assert torch.allclose(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
        if c is not None:  # the cached W_hat rows give the same bytes as building them from the codes
            assert torch.equal(native.finish_tokens(y, absmax, b, dtype, extra, weights.get(c, dtype)), got)
    with pytest.raises(ValueError, match="outside"):
        native.finish_tokens(y, absmax, None, dtype, (x, weights.wq_t, torch.tensor([0, 1, 99]), ws))
    with pytest.raises(ValueError, match="native finish_tokens: expected"):
        native.finish_tokens(y, absmax, None, dtype, (x[:, :3], weights.wq_t, cols, ws))
    with pytest.raises(ValueError, match="native finish_tokens: expected"):  # cached rows of the wrong columns
        native.finish_tokens(y, absmax, None, dtype, (x, weights.wq_t, cols, ws), weights.get(cols[:2], dtype))


needs_int8_gemm = pytest.mark.skipif(not native.has_int8_gemm(), reason="native int8 GEMM needs AVX-512 VNNI or AVX2")


def _int8_operands(M, K, N, seed=0, full_range=False):
    g = torch.Generator().manual_seed(seed)
    lo = -128 if full_range else -127
    wq = torch.randint(lo, 128, (N, K), dtype=torch.int8, generator=g)
    codes = torch.randint(1, 256, (M, K), dtype=torch.uint8, generator=g)  # per-token codes + 128: c in [-127, 127]
    ws = torch.rand(N, generator=g) * 0.01 + 1e-4
    return wq, codes, ws


@needs_int8_gemm
@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 64])  # tiles of 6 rows and every remainder
@pytest.mark.parametrize("K,N", [(4, 1), (96, 40), (100, 130), (1024, 64), (256, 1000)])  # blocks of 64 and tails
def test_native_int8_gemm_is_exact_in_int32(M, K, N):
    """acc - 128 * rowsum(w) equals the int64 product of the signed codes exactly (checked where it fits fp32's
    24-bit mantissa: the product times ws is then one fp32 rounding), for every tile remainder and column tail."""
    wq, codes, ws = _int8_operands(M, K, N, seed=M * 7 + N, full_range=True)
    if M == 64:  # the largest pair sums: every code at an end of its range
        codes[:2], wq[:2] = 1, -128  # |w| 128 meets c = -127 twice in a pair (32512 <= 32767)
        codes[2:4], wq[2:4] = 255, 127
    p = native.int8_pack(wq)
    assert p.packed.numel() == -(-N // 64) * 64 * K and p.comp.numel() == -(-N // 64) * 64
    assert torch.equal(p.comp[:N], 128 * wq.long().sum(1).int()) and not p.comp[N:].any()
    exact = (codes.long() - 128) @ wq.long().t()
    ones = torch.ones(N)
    y = native.int8_gemm(codes, p, ones)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert torch.equal(y.double(), exact.double().float().double())  # the exact int32 sum, rounded once to fp32
    y = native.int8_gemm(codes, p, ws)
    assert torch.equal(y, exact.float() * ws)


@needs_int8_gemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_int8_gemm_fused_epilogue_is_finish_tokens_bit_for_bit(dtype):
    """With absmax the GEMM applies finish_tokens' row scale, bias and cast in its own pass: the same bytes as
    finish_tokens of its fp32 output, with and without bias and outlier columns, a strided activation view
    included."""
    from hf_quant.runtime.kernels import int8

    M, K, N = 20, 128, 200
    wq, codes, ws = _int8_operands(M, K, N, seed=3)
    g = torch.Generator().manual_seed(4)
    absmax, bias = torch.rand(M, generator=g) * 5, torch.randn(N, generator=g)
    absmax[2] = 0.0  # an all-zero row
    p = native.int8_pack(wq)
    y = native.int8_gemm(codes, p, ws)
    x = (torch.randn(M, K, generator=g) * 4).to(dtype)
    cols = torch.tensor([3, 17, 99])
    w_cols = int8.OutlierWeights(wq.t().contiguous(), ws).get(cols, dtype)
    for b in (None, bias):
        fused = native.int8_gemm(codes, p, ws, absmax, b, dtype)
        assert fused.dtype == dtype and torch.equal(fused, native.finish_tokens(y, absmax, b, dtype))
        blocks = native.int8_packed_cols(p, cols, ws, dtype)  # gathered from the packed weight
        assert blocks.shape == (13, 3, 16) and not blocks.transpose(0, 1).reshape(3, -1)[:, N:].any()
        assert torch.equal(blocks.transpose(0, 1).reshape(3, -1)[:, :N], w_cols)
        fused = native.int8_gemm(codes, p, ws, absmax, b, dtype, (x.index_select(1, cols).float(), blocks))
        want = native.finish_tokens(y, absmax, b, dtype, (x, wq.t().contiguous(), cols, ws), w_cols)
        assert torch.equal(fused, want)
        assert not torch.equal(fused, native.int8_gemm(codes, p, ws, absmax, b, dtype))  # the outliers count
    wide = torch.zeros(M, K + 12, dtype=torch.uint8)
    wide[:, :K] = codes
    assert torch.equal(native.int8_gemm(wide[:, :K], p, ws), y)  # a row stride other than K


@needs_int8_gemm
def test_native_int8_gemm_many_rows_and_threads(monkeypatch):
    """More rows than one tile pass and the threads splitting the column blocks give the exact product."""
    M, K, N = 300, 2048, 200
    wq, codes, ws = _int8_operands(M, K, N, seed=5)
    exact = ((codes.long() - 128) @ wq.long().t()).double()
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        y = native.int8_gemm(codes, native.int8_pack(wq), torch.ones(N))
        assert torch.equal(y.double(), exact.float().double())


@needs_int8_gemm
@pytest.mark.parametrize("M", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_native_int8_tokens_is_quantize_then_gemm(M, dtype, threshold):
    """Int8Gemm.tokens (decoding's one native call): without outlier columns, or with the known ones (their rows
    given), the bytes of quantize_tokens then int8_gemm with the fused epilogue; with other outlier columns nothing
    written but that quantization (codes, absmax, columns)."""
    wq, _, ws = _int8_operands(M, 96, 40, seed=M)
    p, bias = native.int8_pack(wq), torch.randn(40)
    x = (torch.rand(M, 96, generator=torch.Generator().manual_seed(M)) * 8 - 4).to(dtype)  # |x| < 4
    x[:, 7] = 9.0  # an outlier column at threshold 6
    codes, absmax, cols = native.quantize_tokens(x, threshold, torch.uint8)
    gemm = native.Int8Gemm(p, ws, bias)
    out, parts = gemm.tokens(x, threshold, dtype, (1, M))
    if threshold == 0.0:
        assert parts is None and out.shape == (1, M, 40) and out.dtype == dtype
        assert torch.equal(out[0], native.int8_gemm(codes, p, ws, absmax, bias, dtype))
    else:
        got_codes, got_absmax, got_cols = parts
        assert out is None and torch.equal(got_cols, cols) and got_cols.tolist() == [7]
        assert torch.equal(got_codes, codes) and torch.equal(got_absmax, absmax)
        wc = native.int8_packed_cols(p, cols, ws, dtype)  # the columns' rows, as the kernel caches them
        want = native.int8_gemm(codes, p, ws, absmax, bias, dtype, (x.index_select(1, cols).float(), wc))
        out, parts = gemm.tokens(x, threshold, dtype, None, (cols, wc))  # the known columns: one call
        assert parts is None and torch.equal(out, want)
        other = torch.tensor([8])
        out, parts = gemm.tokens(x, threshold, dtype, None, (other, native.int8_packed_cols(p, other, ws, dtype)))
        assert out is None and parts[2].tolist() == [7]  # other columns: left to the caller
        with pytest.raises(ValueError, match="known columns"):
            gemm.tokens(x, threshold, dtype, None, (cols.int(), wc))
    with pytest.raises(ValueError, match="at most 64 rows"):
        gemm.tokens(torch.zeros(65, 96), threshold, dtype)
    with pytest.raises(ValueError, match="unit column stride"):
        gemm.tokens(torch.zeros(96, 2).t(), threshold, dtype)


needs_int8_amx = pytest.mark.skipif(not native.has_int8_amx(), reason="the int8 GEMM on tiles needs AMX-INT8 (and Linux "
                                    "granting the tile state)")


@needs_int8_amx
@pytest.mark.parametrize("M", [1, 15, 16, 17, 33, 64, 100])  # one or two m-tiles per pass, and every remainder
@pytest.mark.parametrize("K,N", [(4, 1), (68, 40), (100, 130), (256, 64), (1024, 200)])  # K tails, column tails
def test_native_int8_amx_gemm_is_the_vnni_gemm_bit_for_bit(M, K, N):
    """The GEMM on AMX-INT8 tiles (the same packed weight, the same epilogue): exact in int32, and the same bytes as the
    VNNI GEMM in every form: fp32 out, the fused epilogue with bias, outlier columns and a 16-bit cast, a row stride
    other than K, one thread and two."""
    wq, codes, ws = _int8_operands(M, K, N, seed=M * 5 + K, full_range=True)
    p = native.int8_pack(wq)
    exact = (codes.long() - 128) @ wq.long().t()
    y = native.int8_gemm(codes, p, torch.ones(N), amx=True)
    assert torch.equal(y.double(), exact.double().float().double())
    g = torch.Generator().manual_seed(M)
    absmax, bias = torch.rand(M, generator=g) * 5, torch.randn(N, generator=g)
    x = torch.randn(M, K, generator=g) * 4
    cols = torch.tensor(sorted({0, K // 3, K - 1}))
    for dtype in (torch.float32, torch.bfloat16):
        blocks = native.int8_packed_cols(p, cols, ws, dtype)
        for args in ((None, None, torch.float32, None), (absmax, bias, dtype, None),
                     (absmax, None, dtype, (x.index_select(1, cols), blocks))):
            want = native.int8_gemm(codes, p, ws, *args)
            assert torch.equal(native.int8_gemm(codes, p, ws, *args, amx=True), want)
    wide = torch.zeros(M, K + 12, dtype=torch.uint8)
    wide[:, :K] = codes
    assert torch.equal(native.int8_gemm(wide[:, :K], p, ws, amx=True), native.int8_gemm(codes, p, ws))


@needs_int8_amx
def test_native_int8_amx_gemm_many_rows_and_threads(monkeypatch):
    """Many 64-row passes, the column blocks grouped over one thread or split over two: the exact product."""
    M, K, N = 300, 2048, 520
    wq, codes, ws = _int8_operands(M, K, N, seed=6)
    exact = ((codes.long() - 128) @ wq.long().t()).double()
    p = native.int8_pack(wq)
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert torch.equal(native.int8_gemm(codes, p, torch.ones(N), amx=True).double(), exact.float().double())


@needs_int8_amx
def test_native_int8_amx_gemm_in_chunks_of_k(monkeypatch, rebuilt):
    """A build whose groups keep 16 KiB of weight per chunk of K and pass 64 rows at a time (the large-K path: the
    partial sums wait in a buffer between the chunks), against the exact product and the VNNI GEMM's epilogue bytes:
    K tails inside a chunk and at the end, rows over several passes, outlier columns."""
    monkeypatch.setenv(native.ENV_CFLAGS, "-DHFQ_AI8_PANEL=16384 -DHFQ_AI8_MC=64")
    for M, K, N in ((150, 1000, 200), (17, 4100, 64)):
        wq, codes, ws = _int8_operands(M, K, N, seed=K)
        p = native.int8_pack(wq)
        exact = ((codes.long() - 128) @ wq.long().t()).double()
        for threads in (1, 2):
            monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
            assert torch.equal(native.int8_gemm(codes, p, torch.ones(N), amx=True).double(), exact.float().double())
        absmax = torch.rand(M, generator=torch.Generator().manual_seed(1)) * 3
        cols = torch.tensor([1, K // 2])
        outliers = (torch.randn(M, 2), native.int8_packed_cols(p, cols, ws, torch.bfloat16))
        assert torch.equal(native.int8_gemm(codes, p, ws, absmax, None, torch.bfloat16, outliers, amx=True),
                           native.int8_gemm(codes, p, ws, absmax, None, torch.bfloat16, outliers))


def _split_truth(x, wq, ws, offset, bias):
    W = wq.double() * ws.double()[:, None]
    y = x.double() @ W.t()
    if offset is not None:
        y += x.double().sum(1, keepdim=True) * offset.double()
    return y if bias is None else y + bias.double()


@needs_int8_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", [(1, 64, 16), (37, 200, 70), (64, 1024, 130)])  # K and N tails, 16-row groups
def test_native_int8_split_amx_terms(dtype, M, K, N):
    """The fused split kernel: 1-3 terms per row against the float64 product of the same weight (each term cuts the
    error ~254x, down to fp32's own rounding), the zero-point and bias terms, a row far above its rms taking one
    more term, a strided x; and a row's result does not depend on the rows beside it (a group's rows that need fewer
    terms meet the extra tile with code 0 and scale 0), so each row alone gives the same bytes."""
    g = torch.Generator().manual_seed(M + K)
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    ws, offset, bias = torch.rand(N, generator=g) * 0.01 + 1e-4, torch.randn(N, generator=g) * 0.1, torch.randn(N, generator=g)
    wide = torch.randn(M, K + 8, generator=g)
    wide[0, 3] = 500.0  # a "massive" row: absmax / rms ~ 250 / sqrt(K)... enough for the extra term at ratio 8
    x = wide[:, :K].to(dtype)  # row stride K + 8
    p = native.int8_pack(wq)
    truth = _split_truth(x, wq, ws, offset, bias)
    scale = truth.abs().max()
    errs = []
    for terms in (1, 2, 3):
        y = native.int8_split_amx(x, p, ws, offset, bias, terms, 8.0)
        assert y.dtype == dtype and y.shape == (M, N)
        errs.append(float((y.double() - truth).abs().max() / scale))
    out_eps = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    assert errs[0] < 2e-2 and errs[1] < max(errs[0] / 30, 2 * out_eps) and errs[2] < max(errs[1] / 30, 2 * out_eps), errs
    y = native.int8_split_amx(x, p, ws, None, None, 2, 8.0)
    for m in {0, M // 2, M - 1}:  # alone: the same bytes
        assert torch.equal(native.int8_split_amx(x[m:m + 1], p, ws, None, None, 2, 8.0)[0], y[m])


@needs_int8_amx
def test_native_int8_split_amx_in_chunks_of_k_and_threads(monkeypatch, rebuilt):
    """The large-K path (chunks of K, partial sums between them, passes of rows) and one or two threads give the bytes
    of the default build's single pass."""
    M, K, N = 70, 1000, 200
    g = torch.Generator().manual_seed(3)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    ws, x = torch.rand(N, generator=g) * 0.01, torch.randn(M, K, generator=g).bfloat16()
    want = native.int8_split_amx(x, native.int8_pack(wq), ws, None, None, 2, 16.0)
    monkeypatch.setenv(native.ENV_CFLAGS, "-DHFQ_AI8_PANEL=16384 -DHFQ_AI8_MC=32")
    native.reset()
    p = native.int8_pack(wq)
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert torch.equal(native.int8_split_amx(x, p, ws, None, None, 2, 16.0), want)


def _codes_split_case(M, K, N, gs, seed, dtype=torch.float32, stride_pad=0, levels=16):
    g = torch.Generator().manual_seed(seed)
    G = K // gs
    q = torch.randint(0, levels, (N, K), dtype=torch.uint8, generator=g)
    scale = torch.rand(N, G, generator=g) * 0.01 + 1e-4
    zero = torch.randint(0, levels, (N, G), generator=g).float()
    bias = torch.randn(N, generator=g)
    wide = torch.randn(M, K + stride_pad, generator=g)
    x = wide[:, :K].to(dtype)
    W = (q.double().view(N, G, gs) - zero.double()[..., None]) * scale.double()[..., None]
    truth = x.double() @ W.view(N, K).t() + bias.double()
    corr = (x.float().reshape(M, G, gs).sum(2) @ (scale * zero).t()).contiguous()
    return q, scale, zero, bias, x, corr, truth, W.view(N, K)


@needs_int8_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,gs", [(1, 64, 16, 64), (37, 256, 70, 128), (70, 512, 33, 512), (22, 384, 16, 192)])
@pytest.mark.parametrize("nibbles", [True, False])
def test_native_codes_split_amx_terms(dtype, M, K, N, gs, nibbles):
    """Codes (nibbles, or bytes) x int8 terms on AMX-INT8 tiles: 1-3 terms per row against the float64 product (each
    term cuts the error ~254x, down to the output's own rounding), zero points (corr) and bias, a strided x, a row far
    above its rms taking one more term, tokens packed across the 16-row tiles; a row's result does not depend on the
    rows beside it (each row alone gives the same bytes)."""
    q, scale, zero, bias, x, corr, truth, W = _codes_split_case(M, K, N, gs, M + K, dtype, stride_pad=8,
                                                                levels=16 if nibbles else 256)
    gemm = native.CodesSplitAmx(q, scale, bias, nibbles)
    size = truth.abs().max()
    errs = []
    for terms in (1, 2, 3):
        y = gemm(x, corr, torch.empty(M, N, dtype=dtype), terms, 8.0)
        errs.append(float((y.double() - truth).abs().max() / size))
    out_eps = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    assert errs[0] < 2e-2 and errs[1] < max(errs[0] / 30, 2 * out_eps) and errs[2] < max(errs[1] / 30, 4 * out_eps), errs
    massive = x.clone()
    massive[0, 3] = 500.0  # absmax far above 8 x rms: a fourth term at 3
    tm = massive.double() @ W.t() + bias.double()
    cm = (massive.float().reshape(M, -1, gs).sum(2) @ (scale * zero).t()).contiguous()
    ym = gemm(massive, cm, torch.empty(M, N, dtype=dtype), 3, 8.0)
    assert float((ym.double() - tm).abs().max() / tm.abs().max()) < max(4 * out_eps, 1e-6)
    y = gemm(x, corr, torch.empty(M, N, dtype=dtype), 3, 8.0)
    for m in {0, M // 2, M - 1}:  # alone: the same bytes
        assert torch.equal(gemm(x[m:m + 1], corr[m:m + 1], torch.empty(1, N, dtype=dtype), 3, 8.0)[0], y[m])


@needs_int8_amx
def test_native_codes_split_amx_chunks_and_threads(monkeypatch, rebuilt):
    """Many rows of terms in chunks of work groups (one work group per chunk in a test build) and one or two threads
    give the bytes of the default build."""
    M, K, N, gs = 90, 512, 50, 128
    q, scale, zero, bias, x, corr, _, _ = _codes_split_case(M, K, N, gs, 5)
    want = [native.CodesSplitAmx(q, scale, bias, nibbles)(x, corr, torch.empty(M, N), 3, 8.0) for nibbles in (1, 0)]
    monkeypatch.setenv(native.ENV_CFLAGS, "-DHFQ_CS_CHUNK=1 -DHFQ_CS_ONE=0")
    native.reset()
    for nibbles in (True, False):
        gemm = native.CodesSplitAmx(q, scale, bias, nibbles)
        for threads in (1, 2):
            monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
            assert torch.equal(gemm(x, corr, torch.empty(M, N), 3, 8.0), want[0])


@needs_int8_amx
def test_native_codes_split_amx_refusals():
    q, scale = torch.zeros(16, 128, dtype=torch.uint8), torch.ones(16, 2)
    with pytest.raises(ValueError, match="native codes_split_amx: bad operands"):  # groups of 32
        native.CodesSplitAmx(torch.zeros(16, 128, dtype=torch.uint8), torch.ones(16, 4), None)
    with pytest.raises(ValueError, match="at most 15 as nibbles"):
        native.CodesSplitAmx(torch.full((16, 128), 16, dtype=torch.uint8), scale, None)
    gemm = native.CodesSplitAmx(q, scale, None)
    for bad in (dict(terms=0), dict(terms=4), dict(x=torch.zeros(2, 64)), dict(x=torch.zeros(2, 128, dtype=torch.int8)),
                dict(corr=torch.zeros(2, 15)), dict(out=torch.empty(2, 15)), dict(x=torch.zeros(128, 2).t())):
        args = dict(x=torch.zeros(2, 128), corr=torch.zeros(2, 16), out=torch.empty(2, 16), terms=2,
                    extra_ratio=16.0) | bad
        with pytest.raises(ValueError, match="native codes_split_amx: bad operands"):
            gemm(**args)
    layer, _ = make_layer(8, 128, LayerSpec(4, 32, False), bias=False)  # groups of 32: not a candidate
    assert not KERNELS.get("native_int4_split_amx_f32").supports(layer, CPU, torch.float32)
    layer, _ = make_layer(8, 256, LayerSpec(4, 128, False), bias=False)
    found = {k.name for k in cpu_measure.candidates(layer, CPU, torch.float32)}
    assert "native_int4_split_amx_f32" in found and "native_int4_split_amx_bf16" not in found
    assert "native_int4_split_amx_bf16" in {k.name for k in cpu_measure.candidates(layer, CPU, torch.float32,
                                                                                 allow_bf16=True)}
    assert "native_int4_split_amx" in {k.name for k in cpu_measure.candidates(layer, CPU, torch.bfloat16)}
    layer, _ = make_layer(8, 256, LayerSpec(8, 128, False), bias=False)  # 8 bits: bytes
    assert not KERNELS.get("native_int4_split_amx_f32").supports(layer, CPU, torch.float32)
    assert KERNELS.get("native_int8_split_amx_f32").supports(layer, CPU, torch.float32)


@needs_int8_amx
def test_native_int8_split_amx_refusals():
    wq = torch.zeros(16, 64, dtype=torch.int8)
    p, ws = native.int8_pack(wq), torch.ones(16)
    for bad in (dict(terms=0), dict(terms=4), dict(x=torch.zeros(2, 32)), dict(x=torch.zeros(2, 64, dtype=torch.int8)),
                dict(ws=torch.ones(15)), dict(x=torch.zeros(64, 2).t())):
        args = dict(x=torch.zeros(2, 64), w=p, ws=ws, offset=None, bias=None, terms=2, extra_ratio=16.0) | bad
        with pytest.raises(ValueError, match="native int8_split_amx: bad operands"):
            native.int8_split_amx(**args)
    assert native.int8_split_amx(torch.zeros(0, 64), p, ws, None, None, 2, 16.0).shape == (0, 16)


def test_native_int8_amx_refused_where_unavailable(monkeypatch):
    """Without AMX-INT8 in the build (or the tile state from Linux) asking for the tile GEMM is a clear error."""
    if not native.has_int8_gemm():
        pytest.skip("no native int8 GEMM")
    wq, codes, ws = _int8_operands(3, 64, 16)
    monkeypatch.setitem(native._state, "caps", native._caps() & ~native.CAP_INT8_AMX)
    assert not native.has_int8_amx()
    with pytest.raises(RuntimeError, match="AMX-INT8"):
        native.Int8Gemm(native.int8_pack(wq), ws, amx=True)


@needs_int8_gemm
def test_native_int8_gemm_refusals():
    wq, codes, ws = _int8_operands(3, 96, 40)
    p = native.int8_pack(wq)
    with pytest.raises(ValueError, match="K a positive multiple of 4"):
        native.int8_pack(torch.zeros(8, 6, dtype=torch.int8))
    with pytest.raises(ValueError, match="K a positive multiple of 4"):
        native.int8_pack(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="native int8_gemm: bad operands"):
        native.int8_gemm(codes.to(torch.int8), p, ws)  # signed codes: the GEMM takes codes + 128
    with pytest.raises(ValueError, match="native int8_gemm: bad operands"):
        native.int8_gemm(codes[:, :64], p, ws)  # K of another weight
    with pytest.raises(ValueError, match="native int8_gemm: bad operands"):
        native.int8_gemm(codes, p, ws, dtype=torch.bfloat16)  # a 16-bit output needs the fused epilogue
    with pytest.raises(ValueError, match="native int8_gemm: bad operands"):
        native.int8_gemm(codes, p, ws, torch.ones(3), None, torch.float32, (torch.ones(3, 2), torch.ones(2, 40)))
    assert native.int8_gemm(codes[:0], p, ws).shape == (0, 40)
    with pytest.raises(ValueError, match="native int8_gemm: bad operands ws"):  # the weight's operands: when bound
        native.Int8Gemm(p, ws.half())
    with pytest.raises(ValueError, match="native int8_gemm: bad operands ws"):
        native.Int8Gemm(p, ws, torch.zeros(41))  # a bias of another width
    gemm = native.Int8Gemm(p, ws, torch.zeros(40))
    with pytest.raises(ValueError, match="native int8_gemm: bad operands codes"):
        gemm(codes)  # a bias needs the fused epilogue (absmax)
    with pytest.raises(ValueError, match="output leading dimensions"):
        gemm(codes, torch.ones(3), shape=(2, 2))
    absmax = torch.full((3,), 127.0)
    assert torch.equal(gemm(codes, absmax, shape=(3, 1)), native.int8_gemm(codes, p, ws, absmax).view(3, 1, 40))
    with pytest.raises(ValueError, match="outside"):
        native.int8_packed_cols(p, torch.tensor([0, 96]), ws, torch.float32)


@needs_native
def test_an_avx2_build_has_the_avx2_int8_gemm_and_an_sse2_build_none(monkeypatch, rebuilt):
    """Without VNNI the int8 GEMM is built in its AVX2 form (|w| x sign(w) c on vpmaddubsw, exact); it refuses
    activation codes of -128. A build below AVX2 has none, and the kernels on it say so."""
    import platform

    from hf_quant.runtime.kernels import int8

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    monkeypatch.setenv(native.ENV_CFLAGS, "-march=x86-64-v3")
    assert native.library() is not None and native.int8_gemm_form() == "avx2"
    assert int8.NATIVE.available() and int8.SPLIT_NATIVE.available()
    assert not native.has_int8_amx() and not int8.NATIVE_AMX.available()  # the tile GEMM shares the VNNI epilogue
    wq, codes, ws = _int8_operands(9, 4096, 70, seed=11, full_range=True)
    exact = ((codes.long() - 128) @ wq.long().t()).double()
    assert torch.equal(native.int8_gemm(codes, native.int8_pack(wq), torch.ones(70)).double(), exact.float().double())
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        native.int8_gemm(torch.zeros(2, 8, dtype=torch.uint8), native.int8_pack(torch.ones(3, 8, dtype=torch.int8)),
                         torch.ones(3))
    monkeypatch.setenv(native.ENV_CFLAGS, "-march=x86-64")
    native.reset()
    assert native.library() is not None and not native.has_int8_gemm() and native.int8_gemm_form() is None
    assert not int8.NATIVE.available() and not int8.SPLIT_NATIVE.available()
    with pytest.raises(RuntimeError, match="AVX-512 VNNI or AVX2 needed"):
        native.int8_pack(torch.zeros(8, 8, dtype=torch.int8))


needs_mse = pytest.mark.skipif(not native.has_mse_search(), reason="native clipping search needs AVX2 + FMA")


def _mse_rows(gs, seed):
    """Rows of the kinds a clipping search meets: Gaussian weights, some with an outlier, a uniform row, rows far
    below fp16's smallest scale (every factor's grid the same: a tie the first factor wins), rows near fp16's
    largest value (`_fit_range` lowers the scale), a constant row and a row with a NaN."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(61, gs, generator=g) * 0.02
    W[::5, 1] *= 12
    W[3] = torch.rand(gs, generator=g) - 0.5
    W[4] *= 1e-4
    W[5] = torch.randn(gs, generator=g) * 3e4
    W[6] = 0.25
    W[7, -1] = float("nan")
    return W


def _oracle_errors(W, spec, scale_dtype, lo, hi):
    """Every shrink factor's grid and its error |w_hat - w|^2.4 summed, as core.grid computes them: (P, rows)."""
    from hf_quant.core import grid

    p = 1 - torch.arange(int(grid.MSE_MAX_SHRINK * grid.MSE_GRID), dtype=torch.float32) / grid.MSE_GRID
    s, z = grid._grid(p[:, None] * lo, p[:, None] * hi, spec, scale_dtype)
    err = (grid.dequantize(grid.quantize(W, s, z, spec.maxq), s, z) - W).abs().pow(grid.MSE_NORM).sum(-1)
    return s, z, err


@needs_mse
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,sym,gs", [(4, False, 128), (3, True, 128), (2, False, 64), (8, True, 32),
                                         (4, True, 24), (3, False, 200)])
def test_native_mse_search_is_the_oracles_search(scale_dtype, bits, sym, gs):
    """The native clipping search picks, per row, one of the oracle's own candidate grids bit for bit (same scale
    rounding, fp16 range fitting, zero point), the one of least oracle error up to its power's ~1e-6 (exact ties:
    the first factor), and reports that error within 2e-6 of the oracle's; the oracle's `_mse_search` agrees on
    (almost) every row; a NaN row keeps its grid."""
    from hf_quant.core import grid

    spec = LayerSpec(bits, gs, sym)
    W = _mse_rows(gs, seed=bits * 1000 + gs)
    lo, hi = W.nan_to_num().amin(-1).clamp(max=0), W.nan_to_num().amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    s0, z0 = grid._grid(lo, hi, spec, scale_dtype)
    s, z, at, found = native.mse_search(W, lo, hi, s0, z0, spec.maxq, spec.sym_zero if sym else None, scale_dtype,
                                        80, 100, 2.4, chosen=True)
    cs, cz, err = _oracle_errors(W, spec, scale_dtype, lo, hi)
    assert at[7] == -1 and s[7] == s0[7] and z[7] == z0[7] and found[7] == float("inf")  # the NaN row
    ok = torch.arange(len(W)) != 7
    idx = at.long()[ok]
    assert (idx >= 0).all()
    assert torch.equal(cs[:, ok].gather(0, idx[None])[0], s[ok]) and torch.equal(cz[:, ok].gather(0, idx[None])[0], z[ok])
    least, first = err[:, ok].min(0)
    mine = err[:, ok].gather(0, idx[None])[0]
    assert (mine <= least * (1 + 1e-5)).all(), (mine / least - 1).max()
    # the power's error; a zero difference counts 2^-120 (row 6, an exact grid: ~1e-34 where the oracle has 0)
    assert torch.allclose(found[ok], mine, rtol=2e-6, atol=1e-30), (found[ok] / mine - 1).abs().max()
    if scale_dtype == torch.float16:  # row 4: every factor's scale is fp16's smallest, the same grid: the first wins
        assert idx[4] == 0 and (cs[:, 4] == cs[0, 4]).all()
    rs, rz = grid._mse_search(W[ok], lo[ok], hi[ok], s0[ok].clone(), z0[ok].clone(), spec, scale_dtype)
    assert ((rs == s[ok]) & (rz == z[ok])).float().mean() >= 0.95


@needs_mse
def test_find_params_takes_the_native_search_on_cpu(monkeypatch):
    """`find_params(mse=True)` on CPU fp32 weights goes to the registered native search (one call for all rows),
    with the grids the torch search finds; on other inputs (a 1-bit grid is refused before) the torch search."""
    from hf_quant.core import grid

    calls = []
    native_search = grid._MSE_SEARCHES[0]

    def spy(*args):
        calls.append(args[0].shape)
        return native_search(*args)

    monkeypatch.setattr(grid, "_MSE_SEARCHES", [spy])
    spec = LayerSpec(4, 64, False)
    Wg = grid.group(torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 0.02, spec)
    scale, zero = grid.find_params(Wg, spec, torch.float16, mse=True)
    assert calls == [(96 * 4, 64)] and scale.shape == zero.shape == (96, 4)
    monkeypatch.setattr(grid, "_MSE_SEARCHES", [])
    ref_scale, ref_zero = grid.find_params(Wg, spec, torch.float16, mse=True)
    assert ((scale == ref_scale) & (zero == ref_zero)).float().mean() >= 0.99
    assert grid.find_params(Wg, spec, torch.float16, mse=False)[0].shape == (96, 4)
    assert calls == [(96 * 4, 64)]  # mse off: no search


@needs_mse
def test_native_mse_search_refusals():
    W, r = torch.zeros(3, 8), torch.ones(3)
    with pytest.raises(ValueError, match="native mse_search: bad operands"):
        native.mse_search(W.double(), -r, r, r, r, 15, None, torch.float16, 80, 100, 2.4)
    with pytest.raises(ValueError, match="at most 1024 factors"):
        native.mse_search(W, -r, r, r, r, 15, None, torch.float16, 2000, 100, 2.4)
    with pytest.raises(ValueError, match="native mse_search: bad operands"):
        native.mse_search(W, -r, r, r[:2], r, 15, None, torch.float16, 80, 100, 2.4)


@needs_native
@pytest.mark.parametrize("maxq,B,c0,c1", [(15, 128, 0, 128), (7, 96, 32, 64), (255, 64, 5, 64), (1, 48, 0, 48)])
def test_native_gptq_columns_are_the_torch_steps_bit_for_bit(maxq, B, c0, c1):
    """`gptq_columns` (GPTQ's fused column steps): W1 and Err1 after columns c0 .. c1, and the codes, equal the
    torch steps of `methods.gptq.column_loop` bit for bit (IEEE division, round half even, the product and the
    update rounded apart: an FMA would differ in last bits)."""
    g = torch.Generator().manual_seed(maxq + B)
    rows, in_f, col0, G = 37, 256, 64, 3
    W1 = torch.randn(rows, B, generator=g)
    X = torch.randn(B, 4 * B, generator=g)
    U = torch.linalg.cholesky(torch.linalg.inv(X @ X.t() / (4 * B) + 0.01 * torch.eye(B)), upper=True)
    Hinv = torch.zeros(B, B + 5)
    Hinv[:, :B] = U  # a block of a wider factor: row stride B + 5
    Hinv1 = Hinv[:, :B]
    scale = torch.rand(rows, G, generator=g) * 0.3 + 0.05
    zero = torch.randint(0, maxq + 1, (rows, G), generator=g).float() if maxq > 1 else torch.full((rows, G), 0.5)
    group = (torch.arange(B) * G // B).to(torch.int32)
    codes = torch.zeros(rows, in_f, dtype=torch.uint8)
    Err1 = torch.zeros_like(W1)
    want_W1, want_Err1, want_codes = W1.clone(), Err1.clone(), codes.clone()
    assert native.gptq_columns(W1, Hinv1, c0, c1, scale, zero, group, maxq, codes, col0, Err1)
    for i in range(c0, c1):  # the torch steps (grid.quantize, then column_loop's update)
        s, z = scale[:, group[i]], zero[:, group[i]]
        w = want_W1[:, i]
        q = (w >= 0).float() if maxq == 1 else torch.clamp(torch.round(w / s) + z, 0, maxq)
        err = (w - (q - z) * s) / Hinv1[i, i]
        want_W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        want_Err1[:, i] = err
        want_codes[:, col0 + i] = q.to(torch.uint8)
    assert torch.equal(W1, want_W1) and torch.equal(Err1, want_Err1) and torch.equal(codes, want_codes)
    assert not native.gptq_columns(W1, Hinv1, 0, B + 1, scale, zero, group, maxq, codes, col0, Err1)  # past B
    assert not native.gptq_columns(W1.double(), Hinv1, c0, c1, scale, zero, group, maxq, codes, col0, Err1)
