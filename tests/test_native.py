"""The native CPU helpers (runtime/kernels/native): built with the machine's compiler, exact against
`dequantize_weight`, the two kernels on top of them against the reference, and the fallback when
they cannot be built."""

import pytest
import torch

from hf_quant import kernels
from hf_quant.config import LayerSpec
from hf_quant.core import dequantize_weight
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


@needs_native
@pytest.mark.parametrize("cflags", ["-march=x86-64-v3", "-march=x86-64-v4 -mno-avx512bf16"])
def test_builds_without_avx512_or_native_bf16_are_exact_too(monkeypatch, rebuilt, cflags):
    """The AVX2 build (staging buffer, F16C) and the AVX-512 build without native bf16 conversion (rounding on the
    bit pattern) give the same tiles as dequantize_weight."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    monkeypatch.setenv(native.ENV_CFLAGS, cflags)
    assert native.library() is not None, native.unavailable_reason()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for spec, in_f in ((LayerSpec(4, 128, False), 256), (LayerSpec(8, -1, True), 64)):
            layer, _ = make_layer(19, in_f, spec, bias=False, dtype=dtype)
            nibbles, packed, scale, zero, _ = KERNELS.get("native_tiles").prepare(layer, CPU, dtype)
            out = native.dequantize_into(packed, scale, zero, torch.empty(19, in_f, dtype=dtype), nibbles)
            W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, in_f, dtype)
            assert torch.equal(out, W), (cflags, dtype, spec)
