"""Kernels of the `int8_token` scheme (LLM.int8(), dynamic W8A8): int8 activations per token x int8
weights per output row, int32 accumulation, the outlier columns computed apart in float.

All of them quantize the activations exactly as the oracle does (`runtime.activations`: per-row
absmax in fp32, codes round-half-even(x * (127 / absmax)), the outlier *elements* left out of the
absmax, the outlier columns' codes zero; `quantize_tokens` below is bit-identical to
`quantize_rows`), then y = absmax/127 * (codes_x . codes_w) * w_scale + x[:, cols] @ W_hat[:, cols].T
+ bias. The int8 product is exact in int32, so against `reference` (F.linear(fake_quantize(x), W_hat))
the only differences are float rounding: ~3e-7 relative in fp32, bf16/fp16 rounding of the
reference's own GEMM otherwise.

CPU, five exact int8 GEMMs behind one epilogue (`finish_tokens`). The fixed choice where the native helpers are
built with AVX-512 VNNI is hf_quant's own, `cpu_int8_native` (`native.int8_gemm`: 6 x 64 register tiles of
`vpdpbusd`, the weight packed once per layer, the whole epilogue, outlier columns included, fused into the
GEMM). On a 2-core Zen 4 its GEMM runs at 98% of the VNNI peak (one `vpdpbusd` per cycle per core: 64
products, twice a `vdpbf16ps`'s; mixing in `vpmaddwd` lowers the rate, measured), where oneDNN's reaches ~90%:
W8A8 2.0-2.05x bf16 `F.linear` at M = 512 (oneDNN's kernel 1.92-1.98x), 2.2-2.3x at M = 64, and at M = 1 it is as
fast as fbgemm's GEMV or faster (its first tile per weight panel prefetches 16 KiB ahead). On CPUs with AMX-INT8 the
same GEMM runs on the tiles above 8 rows (`cpu_int8_native_amx`: the same packed weight and epilogue bytes; 2-core
Emerald Rapids, W8A8 2.05-2.25x AMX bf16 `F.linear` at 64-512 rows, where oneDNN's tile GEMM ran 1.3-2.2x). The others
(`cpu_int8_intmm`, `torch._int_mm`, fastest at M >= 64 on a 16-core AMX Xeon, is only a measured candidate):
- `cpu_int8_onednn`: oneDNN's int8 GEMM `torch.ops.onednn.qlinear_pointwise`, weights prepacked
  once (`onednn.qlinear_prepack`), activations passed as uint8 codes + 128 with x_scale=1 and zero
  point 128 and the per-channel weight scales, fp32 out;
- `cpu_int8_fbgemm`: fbgemm's int8 GEMM through PyTorch's quantized linear with fp32 output
  (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`), the per-token codes passed as fp32
  integers with scale 1 and zero point 128 (its own quantization of them is exact), weights
  prepacked once per channel. Its GEMV is the fast one: on a 2-core AMD EPYC (Zen 4, AVX-512
  VNNI/bf16, no AMX), weights cold, it ran M=1 at 2.3-2.7x the best float path where oneDNN ran
  1.7-2.0x (benchmarks/bench_int8_cpu.py; warm caches flatter both, 3.5-5x vs 2.5-3.6x).
In both, the per-token scale, outlier product and bias are applied after, so they are exact per
token (no per-tensor activation scale anywhere). Without the native int8 GEMM the fixed dispatch takes fbgemm up to
FBGEMM_MAX_ROWS rows and oneDNN above (oneDNN's GEMM is 5-15% faster at M >= 64 on that CPU);
the measured dispatch (`cpu_measure.py`, mode "measure") times both per layer shape and row class.
Inputs of at most CHUNK_ELEMS elements are quantized by one fused set of passes
(`quantize_activations`): per-op overhead is what a decoding step pays.
Measured earlier (2 cores Xeon with AVX-512 VNNI/bf16 and AMX): oneDNN was the fastest path at every
M in {1, 8, 64, 512} (fbgemm not yet a candidate); the candidates it beat were `torch._int_mm` (its GEMM alone 1.4-2.1x the best float path vs 1.7-2.7x
for this whole kernel at M>=8; 1.2-7x slower than float with oneDNN capped at AVX2), the weight-only
`_weight_int8pack_mm` (bf16: similar at M=1, 4-15x slower at M>=8; fp32: far slower) and fbgemm's dynamic `quantized::linear_dynamic` (per-*tensor* activation scale: relative
deviation from the per-token oracle 1.2-1.5e-2 on random inputs; never used).
Both run only where the CPU has a non-saturating int8 dot product (AVX-512 VNNI, AVX-VNNI or
AMX, and oneDNN not capped below it by ONEDNN_MAX_CPU_ISA): without VNNI, oneDNN's u8 x s8 path
(vpmaddubsw, also fbgemm's AVX2 path) saturates int16 pair sums; measured with ONEDNN_MAX_CPU_ISA=AVX2 it deviates 5.6e-3
relative from the oracle (and s8 activations are 10x slower). There `cpu_int8_native` runs in its AVX2 form
(vpmaddubsw on |w| and sign(w) x c: pair sums <= 32512, exact; on a 2-core Zen 1 EPYC W8A8 2.9-3.5x the best float
path at M = 1, 1.1x at M = 512, where fbgemm's saturating 7-bit path is no faster). Without any native build
`cpu_int8_token_w8` runs instead:
the exact per-token fake-quantized activations through the weight-only int8 paths
(`_weight_int8pack_mm` up to `cpu.MAX_ROWS`, else dequantize + F.linear), exact and never slower
than the oracle, but with weight-only speed.

CUDA (`cuda_int8_token`): a Triton per-token quantization kernel, `torch._int_mm` (int8 x int8 ->
int32; rows padded to >= 32 and to multiples of 8, the weight's rows to a multiple of 8 at prepare),
and a Triton epilogue applying row scale x column scale, adding the outlier product and the bias,
writing the activation dtype (kernels in `triton/int8.py`; checked in Triton's interpreter on CPU).
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...core.devices import cpu_flags
from . import cpu, native
from .base import Kernel, register_kernel

CHUNK_ELEMS = 1 << 18  # rows of x are quantized in chunks of ~1 MiB of fp32 (stays in cache)
ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
FBGEMM_MAX_ROWS = 16  # fixed dispatch: fbgemm up to here (its GEMV wins at M <= 8), oneDNN above


def threshold_of(layer: Any) -> float:
    return _threshold(layer.scheme.activation)


@functools.lru_cache(maxsize=None)
def _threshold(activation: Any) -> float:  # ActivationSpec is frozen (hashable): looked up once per spec
    return float(activation.kwargs().get("threshold", 0.0))


def outlier_index(x2: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Indices of the input channels where any |x| >= threshold, or None (threshold 0 or none
    found): the columns of `activations.outlier_columns`."""
    if threshold <= 0:
        return None
    idx = (x2.abs().amax(dim=0) >= threshold).nonzero().flatten()  # faster than amax + amin over dim 0
    return idx if idx.numel() else None


MAGIC = 12582912.0  # 1.5 * 2**23: fp32 v + MAGIC rounds v (|v| < 2**22) to nearest even, the integer in the low bits


def row_multiplier(absmax: torch.Tensor) -> torch.Tensor:
    """127 / absmax per row as a column (M, 1), as the oracle computes it; 0 for an all-zero row (codes 0)."""
    return torch.where(absmax > 0, 127.0 / absmax, torch.zeros((), dtype=absmax.dtype)).unsqueeze(1)


def quantize_tokens(x2: torch.Tensor, threshold: float, cols: torch.Tensor | None, offset: int = 0,
                    as_float: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (M, K): int8, or uint8 codes + `offset`, or (`as_float`) fp32 integer-valued codes;
    fp32 absmax per row (M,)), bit-identical to `activations.quantize_rows(x2, mask of cols,
    threshold)`, computed in row chunks that stay in cache. With an offset the rounding is
    v + (MAGIC + offset) in fp32 (round half to even, as torch.round) and the code is the low byte of
    that float's bits: no separate round and float-to-int pass."""
    M, K = x2.shape
    codes = torch.empty(M, K, dtype=torch.float32 if as_float else torch.uint8 if offset else torch.int8)
    absmax = torch.empty(M, dtype=torch.float32)
    step = max(1, CHUNK_ELEMS // max(K, 1))
    buf = None if as_float else torch.empty(min(step, M), K, dtype=torch.float32)
    for r0 in range(0, M, step):
        xc = x2[r0:r0 + step]
        b = codes[r0:r0 + step] if buf is None else buf[:xc.shape[0]]  # fp32 codes: scaled in place
        b.copy_(xc)
        if cols is None:
            a = torch.maximum(b.amax(dim=1), b.amin(dim=1).neg_())  # absmax without an |x| temporary
        else:
            xo = xc.index_select(1, cols).float()
            b.index_fill_(1, cols, 0.0)  # the outlier columns' codes are zero ...
            xo.masked_fill_(xo.abs() >= threshold, 0.0)  # ... but only outlier elements leave the absmax
            a = torch.maximum(torch.maximum(b.amax(dim=1), b.amin(dim=1).neg_()), xo.abs().amax(dim=1))
        absmax[r0:r0 + step] = a
        b.mul_(row_multiplier(a))
        if as_float:
            b.round_()
        elif offset:
            b.add_(MAGIC + offset)
            codes[r0:r0 + step].copy_(b.view(torch.int32))  # int32 -> uint8 keeps the low byte
        else:
            codes[r0:r0 + step].copy_(b.round_())
    return codes, absmax


def quantize_activations(x2: torch.Tensor, threshold: float, offset: int = 0, as_float: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, absmax, outlier columns or None) of x2 (M, K): `outlier_index` then `quantize_tokens`,
    bit-identical to them. An input of at most CHUNK_ELEMS elements (decoding, short prompts) takes
    one fused pass set instead, where per-op overhead is what costs: |x| is computed once and serves
    the outlier columns (any |x| >= threshold in the column) and the absmax (the max of |x| below the threshold, which is
    exactly the absmax without the outlier elements)."""
    M, K = x2.shape
    if native.library() is not None and (K <= 1 or x2.stride(1) == 1):  # one native pass pair, bit-identical
        return native.quantize_tokens(x2, threshold, torch.float32 if as_float else torch.uint8 if offset else torch.int8)
    if M * K > CHUNK_ELEMS:
        cols = outlier_index(x2, threshold)
        return (*quantize_tokens(x2, threshold, cols, offset, as_float), cols)
    b = torch.empty(M, K, dtype=torch.float32).copy_(x2)  # contiguous even for a strided x2
    ab = b.abs()
    cols = None
    if threshold > 0:
        outlier = ab >= threshold
        found = (outlier[0] if M == 1 else outlier.any(dim=0)).nonzero().flatten()
        if found.numel():
            cols = found
            ab.masked_fill_(outlier, 0.0)  # only outlier elements leave the absmax ...
            b.index_fill_(1, cols, 0.0)  # ... and the outlier columns' codes are zero
    a = ab.amax(dim=1)
    b.mul_(row_multiplier(a))
    if as_float:
        return b.round_(), a, cols
    if offset:
        return b.add_(MAGIC + offset).view(torch.int32).to(torch.uint8), a, cols  # int32 -> uint8 keeps the low byte
    return b.round_().to(torch.int8), a, cols


def fake_quantize_fast(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """`activations.fake_quantize_int8_token` of x2 (M, K), bit-identical: one native pass pair where the helpers
    are built (no intermediate codes), else through `quantize_activations`."""
    if native.library() is not None and (x2.shape[1] <= 1 or x2.stride(1) == 1):
        return native.fake_quantize_tokens(x2, threshold)
    codes, absmax, cols = quantize_activations(x2, threshold)
    xq = codes.float().mul_((absmax / 127.0).unsqueeze(1))
    if cols is not None:
        xq.index_copy_(1, cols, x2.index_select(1, cols).float())
    return xq.to(x2.dtype)


def outlier_weight_t(wq_t: torch.Tensor, wscale: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_hat[:, cols].T (n, N) in `dtype`, from the transposed int8 codes (K, N) (contiguous rows: the
    gather reads n * N bytes, not the whole weight) and the fp32 row scales (N,)."""
    return (wq_t.index_select(0, cols).float() * wscale).to(dtype)


def onednn_isa_capped(environ: Any = os.environ) -> bool:
    """Whether the user capped oneDNN below any VNNI ISA (ONEDNN_MAX_CPU_ISA=AVX2, AVX512_CORE, ...)."""
    for name in ONEDNN_ISA_ENV:
        isa = environ.get(name, "").upper()
        if isa and isa not in ("ALL", "DEFAULT") and not any(s in isa for s in ("VNNI", "AMX", "BF16", "AVX10")):
            return True
    return False


def exact_int8_dot() -> bool:
    """Whether oneDNN's int8 GEMM accumulates without int16 saturation on this CPU (VNNI or AMX)."""
    return bool(cpu_flags() & set(_VNNI_FLAGS)) and not onednn_isa_capped()


def _onednn_available() -> bool:
    return hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()


def fits(layer: Any) -> bool:
    """The layer has one symmetric scale per row, no act-order, and codes of 2 to 8 bits (int8 weights; BitNet's
    ternary 2-bit codes, which `cpu.int8_rows` widens to int8 -1, 0, 1): what the int8_token kernels run."""
    spec = layer.spec
    return (2 <= spec.bits <= 8 and spec.gguf is None and spec.group_size == -1 and spec.sym
            and layer.g_idx is None)


_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _ExactInt8Kernel(Kernel):
    """An int8_token kernel on a CPU int8 GEMM: runs only where the int8 dot product is exact."""

    activations = ("int8_token",)
    measured = True

    def available(self) -> bool:
        raise NotImplementedError

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return (device.type == "cpu" and dtype in _CPU_DTYPES and fits(layer) and self.exact()
                and self.available())

    def exact(self) -> bool:
        """Whether this kernel's int8 GEMM is exact on this CPU (torch's need a non-saturating int8 dot)."""
        return exact_int8_dot()

    @staticmethod
    def epilogue_parts(layer: Any) -> tuple[torch.Tensor, torch.Tensor, "OutlierWeights", torch.Tensor | None]:
        """(int8 codes (N, K), fp32 row scales, the outlier columns' weights over the transposed codes (their
        gather reads contiguous rows; made at the first call that has outlier columns, so plain W8A8 layers never
        hold that second int8 copy of the weight), fp32 bias or None): what every exact int8 GEMM's epilogue
        takes."""
        wq, ws = cpu.int8_rows(layer)
        ref = weakref.ref(layer)  # the transposed codes are made from the layer at the first outlier column
        outliers = OutlierWeights(lambda: cpu.int8_rows(ref())[0].t().contiguous(), ws)
        return wq, ws, outliers, None if layer.bias is None else layer.bias.float()


class OneDnnInt8Kernel(_ExactInt8Kernel):
    """CPU W8A8 with exact per-token activation scales on oneDNN's int8 GEMM (see the module docstring)."""

    name = "cpu_int8_onednn"
    priority = 30

    def available(self) -> bool:
        return _onednn_available()

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        wq, ws, outliers, bias = self.epilogue_parts(layer)
        packed = torch.ops.onednn.qlinear_prepack(wq, None)
        zp = torch.zeros(wq.shape[0], dtype=torch.int64)
        return packed, ws, zp, outliers, bias

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        packed, ws, zp, outliers, bias = prepared
        t = threshold_of(layer)
        x2 = x.reshape(-1, x.shape[-1])
        codes, absmax, cols = quantize_activations(x2, t, offset=128)
        y = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, packed, ws, zp, None, 1.0, 0, torch.float32,
                                               "none", [], "")
        return finish_tokens(y, absmax, bias, x, x2, cols, outliers)


class OutlierWeights:
    """W_hat[:, cols].T in fp32 (rounded through the activation dtype) for the outlier columns of the
    last call, rebuilt only when the set changes: LLM.int8's outliers sit in a few hidden dimensions
    that repeat from token to token, so the gather is usually skipped."""

    def __init__(self, wq_t: torch.Tensor | Callable[[], torch.Tensor], wscale: torch.Tensor) -> None:
        """wq_t: the transposed int8 codes (K, N), or a function that makes them (called once, when first needed)."""
        self._wq_t, self.wscale, self.last = wq_t, wscale, None

    @property
    def wq_t(self) -> torch.Tensor:
        if callable(self._wq_t):
            self._wq_t = self._wq_t()
        return self._wq_t

    def get(self, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        last = self.last
        if last is not None and last[1] == dtype and last[0].shape == cols.shape and torch.equal(last[0], cols):
            return last[2]
        w = self.build(cols, dtype)
        self.last = (cols, dtype, w)  # one tuple: a concurrent call sees the old or the new entry
        return w

    def build(self, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return outlier_weight_t(self.wq_t, self.wscale, cols, dtype).float()


class PackedOutliers(OutlierWeights):
    """`OutlierWeights` for `cpu_int8_native`: the rows gathered from the packed weight itself
    (`native.int8_packed_cols`, in the GEMM's epilogue layout), so the layer never holds a transposed copy of
    its codes (the other int8 kernels make one, a second int8 copy of the weight, at their first outlier column)."""

    def __init__(self, packed: Any, wscale: torch.Tensor) -> None:
        self.packed, self.wscale, self.last, self._wq_t = packed, wscale, None, None

    def build(self, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return native.int8_packed_cols(self.packed, cols, self.wscale, dtype)


def finish_tokens(y: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                  x2: torch.Tensor, cols: torch.Tensor | None, outliers: OutlierWeights) -> torch.Tensor:
    """The epilogue of the CPU int8 GEMMs: y (M, N) fp32 = codes_x . codes_w * w_scale, times the row
    scales absmax/127, plus the bias and the outlier columns' product; in x's dtype and leading dims."""
    if native.library() is not None:  # one pass: row scale, bias, outlier product, the cast
        y = native.finish_tokens(y.contiguous(), absmax, bias, x.dtype,
                                 None if cols is None else (x2 if x2.stride(1) == 1 else x2.contiguous(), outliers.wq_t,
                                                            cols, outliers.wscale),
                                 None if cols is None else outliers.get(cols, x.dtype))
        return y.reshape(*x.shape[:-1], y.shape[-1])
    sx = (absmax / 127.0).unsqueeze(1)
    y = y.mul_(sx) if bias is None else torch.addcmul(bias, y, sx)
    if cols is not None:  # the outlier columns: their products in the activation dtype, accumulated in fp32
        y.addmm_(x2.index_select(1, cols).float(), outliers.get(cols, x.dtype))
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


_FBGEMM_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"


def _fbgemm_available() -> bool:
    return (hasattr(torch.ops.quantized, _FBGEMM_OP)
            and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")))


def fbgemm_prepack(wq: torch.Tensor, ws: torch.Tensor) -> Any:
    """fbgemm's packed int8 weight (N, K) with per-row scales `ws` (fp32), for `fbgemm_int8_mm`."""
    engine = torch.backends.quantized.engine
    try:
        with warnings.catch_warnings():  # quantized tensor creation is deprecated in torch >= 2.10 (still the op's input)
            warnings.simplefilter("ignore")
            torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
            qw = torch._make_per_channel_quantized_tensor(wq, ws.double(), torch.zeros(wq.shape[0], dtype=torch.int64), 0)
            return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = engine


def fbgemm_int8_mm(codes: torch.Tensor, packed: Any) -> torch.Tensor:
    """(codes . codes_w^T) * w_scale in fp32, exact in int32: `codes` (M, K) fp32 integers in [-127, 127]."""
    return getattr(torch.ops.quantized, _FBGEMM_OP)(codes, 1.0, 128, packed)


class FbgemmInt8Kernel(_ExactInt8Kernel):
    """CPU W8A8 with exact per-token activation scales on fbgemm's int8 GEMM (PyTorch's quantized
    linear with fp32 output): the per-token codes go in as fp32 integers with scale 1 and zero point
    128 (the op's own quantization of them is exact: uint8 codes + 128), weights prepacked once with
    their per-channel scales; the row scales, outlier product and bias come after (`finish_tokens`).
    fbgemm's int8 GEMV is the faster one at M <= 8 (Zen 4, cold weights: 2.3-3.5x the best float path,
    oneDNN 1.7-2.6x)."""

    name = "cpu_int8_fbgemm"
    priority = 31

    def available(self) -> bool:
        return _fbgemm_available()

    def row_cuts(self, dtype: torch.dtype) -> tuple[int, ...]:
        return (FBGEMM_MAX_ROWS,)

    def chosen(self, layer: Any, rows: int) -> bool:
        return rows <= FBGEMM_MAX_ROWS  # the fixed order; the measured dispatch times it at every row count

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        wq, ws, outliers, bias = self.epilogue_parts(layer)
        return fbgemm_prepack(wq, ws), outliers, bias

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        packed, outliers, bias = prepared
        t = threshold_of(layer)
        x2 = x.reshape(-1, x.shape[-1])
        codes, absmax, cols = quantize_activations(x2, t, as_float=True)
        return finish_tokens(fbgemm_int8_mm(codes, packed), absmax, bias, x, x2, cols, outliers)


class IntMmInt8Kernel(_ExactInt8Kernel):
    """CPU W8A8 on `torch._int_mm` (int8 x int8 -> int32, oneDNN's GEMM with AMX where the CPU has it), the
    exact per-token codes, then the column scales and `finish_tokens`. Only a measured candidate (never the
    fixed choice): on a 16-core Xeon with AMX its GEMM alone ran 1.84-2.15x the best float path at M >= 64
    where the prepacked oneDNN kernel ran 1.36-1.68x; on a 2-core Zen 4 (VNNI, no AMX) it was slower than
    both others at every M."""

    name = "cpu_int8_intmm"
    priority = 6

    def available(self) -> bool:
        return hasattr(torch, "_int_mm")

    def chosen(self, layer: Any, rows: int) -> bool:
        return False

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        wq, ws, outliers, bias = self.epilogue_parts(layer)
        return wq.contiguous(), ws, outliers, bias

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        wq, ws, outliers, bias = prepared
        t = threshold_of(layer)
        x2 = x.reshape(-1, x.shape[-1])
        codes, absmax, cols = quantize_activations(x2, t)
        y = torch.mul(torch._int_mm(codes, wq.t()), ws)  # int32 * fp32 column scales -> fp32, one pass
        return finish_tokens(y, absmax, bias, x, x2, cols, outliers)


def _native_int8_available() -> bool:
    return native.library() is not None and native.has_int8_gemm()


def _native_int8_fits(layer: Any) -> bool:
    """`native.int8_gemm` reads the activations four codes at a time: K a multiple of 4."""
    return layer.in_features % 4 == 0


class NativeInt8Kernel(_ExactInt8Kernel):
    """CPU W8A8 on hf_quant's own exact int8 GEMM (`native.int8_gemm`, AVX-512 VNNI: 6 x 64 tiles in registers, or
    its AVX2 form without VNNI; the weight packed once per layer): the per-token codes + 128 as uint8, the offset's term subtracted in int32,
    and the whole epilogue (column scale, row scale, bias, the outlier columns' product from W_hat rows gathered
    from the packed weight and cached while the columns repeat, the cast) in the GEMM's own pass, the same bytes
    as `finish_tokens`. The layer keeps one int8 copy of its weight (the packed one) beside its buffers. On a
    2-core Zen 4 its GEMM alone runs at 98% of the VNNI peak (917 GOP/s at M = 512), 1.08x oneDNN's and 1.16x
    `torch._int_mm` there."""

    name = "cpu_int8_native"
    priority = 32
    # the fixed order on CPUs with AMX-INT8: oneDNN's tile GEMM above this many rows (2-core Emerald Rapids, cold
    # weights: 1.80-2.17x bf16 F.linear at 64 rows and 1.28-1.58x at 512, where this VNNI GEMM ran 1.14-1.30x and
    # 0.62-0.68x); the measured dispatch times both at every row count
    AMX_MAX_ROWS = 16
    AMX = False  # the GEMM on AMX-INT8 tiles (NativeAmxInt8Kernel; its `tokens` call would run the VNNI GEMM)

    def available(self) -> bool:
        return _native_int8_available()

    def row_cuts(self, dtype: torch.dtype) -> tuple[int, ...]:
        return (self.AMX_MAX_ROWS,)

    def chosen(self, layer: Any, rows: int) -> bool:
        return (rows <= self.AMX_MAX_ROWS or "amx_int8" not in cpu_flags()
                or not (exact_int8_dot() and _onednn_available()))  # oneDNN capped or absent: this one

    def exact(self) -> bool:
        return True  # both forms (VNNI, and AVX2's |w| x sign(w) c) are exact by construction

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return super().supports(layer, device, dtype) and _native_int8_fits(layer)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        wq, ws = cpu.int8_rows(layer)
        packed = native.int8_pack(wq)
        bias = None if layer.bias is None else layer.bias.float().contiguous()
        return native.Int8Gemm(packed, ws.contiguous(), bias, amx=self.AMX), PackedOutliers(packed, ws)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        gemm, outliers = prepared
        t = threshold_of(layer)
        x2 = x.reshape(-1, x.shape[-1])
        unit = x2.shape[1] <= 1 or x2.stride(1) == 1
        if unit and not self.AMX and x2.shape[0] <= gemm.TOKEN_ROWS:  # decoding: quantization and product in one call ...
            last = outliers.last  # (cols, dtype, their W_hat rows): the outlier columns usually repeat
            known = (last[0], last[2]) if last is not None and last[1] == x.dtype else None
            out, parts = gemm.tokens(x2, t, x.dtype, x.shape[:-1], known)
            if out is not None:
                return out
            codes, absmax, cols = parts  # ... unless a column has an outlier the last call did not have
        elif unit:  # the native quantization (built: this kernel needs the helpers)
            codes, absmax, cols = native.quantize_tokens(x2, t, torch.uint8)
        else:
            codes, absmax, cols = quantize_activations(x2, t, offset=128)
        extra = None if cols is None else (x2.index_select(1, cols).float(), outliers.get(cols, x.dtype))
        # the fused epilogue, outlier columns included: the same bytes as finish_tokens of the fp32 product
        return gemm(codes, absmax, x.dtype, extra, x.shape[:-1])


def _native_int8_amx_available() -> bool:
    return _native_int8_available() and native.has_int8_amx()


class NativeAmxInt8Kernel(NativeInt8Kernel):
    """`cpu_int8_native` with its GEMM on AMX-INT8 tiles (`native.Int8Gemm(..., amx=True)`, CPUs with AMX-INT8 where
    Linux grants the tile state: Sapphire Rapids and later): the same codes, packed weight and fused epilogue, the
    same bytes. `tdpbusd` takes 16 x 64 codes of 16 tokens against 64 x 16 weight codes per instruction (16384
    products, 16 times a `vpdpbusd`), so above AMX_MAX_ROWS rows it is the fixed choice on such CPUs (where oneDNN's
    tile GEMM was before: this one runs the quantization and the epilogue in its own passes, oneDNN's needed
    separate torch passes for both); at and below them the VNNI GEMV, which streams the weight once per token
    block, is (2-core Emerald Rapids, cold weights, 4096 x 4096 and 4096 x 11008: at 8 rows the VNNI kernel ran
    1.84-1.95x bf16 `F.linear` and this one 1.72-1.81x, at 16 rows 1.62-1.67x and 1.84-1.87x). A measured candidate
    at every row count."""

    name = "cpu_int8_native_amx"
    priority = 33
    AMX = True
    AMX_MAX_ROWS = 8

    def available(self) -> bool:
        return _native_int8_amx_available()

    def chosen(self, layer: Any, rows: int) -> bool:
        return rows > self.AMX_MAX_ROWS


class TokenW8Kernel(Kernel):
    """The exact per-token fake-quantized activations (one native pass pair, `native.fake_quantize_tokens`) through
    the weight-only int8 paths (packed `_weight_int8pack_mm` up to `cpu.MAX_ROWS`, else dequantize + F.linear): the
    reference's own computation. The fixed choice on CPUs without VNNI; a measured candidate everywhere (on a
    16-core AMX Xeon `_weight_int8pack_mm` with bf16 activations ran M = 1 at 2.7-2.8x the best float path, the
    int8 GEMMs' kernels at 1.8-2.2x)."""

    name = "cpu_int8_token_w8"
    priority = 25
    activations = ("int8_token",)
    measured = True

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _CPU_DTYPES and fits(layer)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        wq, ws = cpu.int8_rows(layer)
        return wq, ws.to(dtype), ws

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        wq, ws_dtype, ws = prepared
        x2 = x.reshape(-1, x.shape[-1])
        xq = fake_quantize_fast(x2, threshold_of(layer))
        limit = cpu.MAX_ROWS.get(x.dtype, 0)
        if x2.shape[0] <= limit and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            y = torch.ops.aten._weight_int8pack_mm(xq, wq, ws_dtype)
            if layer.bias is not None:
                y = y + layer.bias.to(y.dtype)
        else:
            W = (wq.float() * ws.unsqueeze(1)).to(x.dtype)
            y = F.linear(xq, W, None if layer.bias is None else layer.bias.to(x.dtype))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SplitInt8Kernel(Kernel):
    """Weight-only 8-bit per-channel layers on the int8 GEMM: float activations written as a sum of
    int8 terms per row, x = s1 q1 + s2 q2 (+ s3 q3), each term quantized from the previous residual
    (q1 from x by its row absmax, q2 from x - s1 q1, whose absmax is at most s1 / 2, ...), all terms
    stacked as rows of one fbgemm int8 GEMM (the weight is read once), y = sum_t s_t (q_t . W_q^T) w_s.
    Not bit-exact, but as close to the float product as bf16/fp16 arithmetic: two terms leave at most
    absmax / 64516 per element, about absmax / (111000 rms) of the output relative to its size; rows
    whose absmax is more than THIRD_TERM_RATIO x their rms (outlier features, "massive
    activations") get a third term (~250x less), so no row passes ~1.4e-4, below fp16's rounding of
    the output (4.9e-4). Asymmetric zero points add a rank-1 correction.
    bf16/fp16 activations only; fp32 ones through `cpu_int8_split_bf16` in mode "measure_bf16"."""

    name = "cpu_int8_split"
    priority = 5  # never the fixed choice (`chosen`): the measured dispatch decides
    measured = True
    THIRD_TERM_RATIO = cpu.SPLIT_THIRD_TERM_RATIO  # rows with absmax > this x rms get a third term (their 2-term
    # error would pass ~1.4e-4)

    def available(self) -> bool:
        """The int8 GEMM of `gemm` exists in this torch."""
        return _fbgemm_available()

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        spec = layer.spec
        return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and spec.bits == 8
                and spec.group_size == -1 and layer.g_idx is None and self.exact() and self.available())

    def exact(self) -> bool:
        """Whether `gemm` is exact on this CPU (fbgemm's and oneDNN's need a non-saturating int8 dot)."""
        return exact_int8_dot()

    def chosen(self, layer: Any, rows: int) -> bool:
        return False

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        wq, ws = cpu.int8_rows(layer)
        bias = None if layer.bias is None else layer.bias.float()
        return self.pack(wq, ws), cpu.int8_zero_offset(layer, ws), bias

    def pack(self, wq: torch.Tensor, ws: torch.Tensor) -> Any:
        return fbgemm_prepack(wq, ws)

    def gemm(self, codes: torch.Tensor, packed: Any) -> torch.Tensor:
        """(codes . codes_w^T) * w_scale, fp32 (T, N), exact in int32: codes (T, K) fp32 integers in [-127, 127]."""
        return fbgemm_int8_mm(codes, packed)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        return self.forward_terms(x, prepared, 2, self.THIRD_TERM_RATIO)

    def forward_terms(self, x: torch.Tensor, prepared: Any, terms: int, extra_ratio: float) -> torch.Tensor:
        """The layer's output with x written as `terms` int8 terms per row (one more for rows whose absmax passes
        extra_ratio x their rms), in x's dtype."""
        packed, offset, bias = prepared
        xf = x.reshape(-1, x.shape[-1]).float()
        codes, scales, rows = split_terms(xf, extra_ratio, terms)
        z = self.gemm(codes, packed)  # (terms * M (+ extra rows), N)
        M = xf.shape[0]
        y = z[:M].mul_(scales[:M].unsqueeze(1))
        for t in range(1, terms):
            y.addcmul_(z[t * M:(t + 1) * M], scales[t * M:(t + 1) * M].unsqueeze(1))
        if rows is not None:
            y.index_add_(0, rows, z[terms * M:] * scales[terms * M:].unsqueeze(1))
        if offset is not None:
            y.addr_(xf.sum(dim=1), offset)
        if bias is not None:
            y.add_(bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


class SplitIntMmKernel(SplitInt8Kernel):
    """`cpu_int8_split` with its int8 GEMM on `torch._int_mm` (oneDNN: AMX-INT8 where the CPU has it, where
    fbgemm runs AVX-512 VNNI) instead of fbgemm. The same terms, the same exact int32 products, the same
    result to fp32 rounding. A measured candidate only: on a 2-core Zen 4, `_int_mm` between 2 and ~64 rows is
    slower than fbgemm and than bf16 `F.linear`; on a 16-core AMX Xeon `_int_mm` ran 1.65-2.15x the best float
    path at 8-512 rows, where the fbgemm-based kernels that weight-only 8-bit layers had ran 0.59-1.33x."""

    name = "cpu_int8_split_intmm"

    def available(self) -> bool:
        return hasattr(torch, "_int_mm")

    def pack(self, wq: torch.Tensor, ws: torch.Tensor) -> Any:
        return wq.contiguous(), ws

    def gemm(self, codes: torch.Tensor, packed: Any) -> torch.Tensor:
        wq, ws = packed
        return torch.mul(torch._int_mm(codes.to(torch.int8), wq.t()), ws)  # int32 * fp32 column scales, one pass


class SplitNativeKernel(SplitInt8Kernel):
    """`cpu_int8_split` with its int8 GEMM on `native.int8_gemm` (AVX-512 VNNI or AVX2 builds): the same terms as uint8
    codes + 128, the same exact int32 products. A measured candidate only."""

    name = "cpu_int8_split_native"

    def available(self) -> bool:
        return _native_int8_available()

    def exact(self) -> bool:
        return True

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return super().supports(layer, device, dtype) and _native_int8_fits(layer)

    def pack(self, wq: torch.Tensor, ws: torch.Tensor) -> Any:
        return native.int8_pack(wq), ws

    def gemm(self, codes: torch.Tensor, packed: Any) -> torch.Tensor:
        w, ws = packed
        return native.int8_gemm(codes.add(128.0).to(torch.uint8), w, ws)


class SplitNativeAmxKernel(SplitNativeKernel):
    """`cpu_int8_split` fused on AMX-INT8 tiles (`native.int8_split_amx`): the terms of each row written natively
    into tiles of codes + 128 (one tile row per term for every 16 rows), met by the same B tiles of the packed weight
    (`int8_pack`), and the exact int32 products combined per row in the GEMM's epilogue (term scales, the asymmetric
    layer's zero-point term, bias, the cast), where the torch form makes a (terms x M, N) fp32 product and combines it
    in separate passes. The same terms and extra-term rule, so the same accuracy to fp32 rounding. A measured
    candidate only; with 2 terms it runs twice W8A8's tile work, which on AMX CPUs is about bf16 `F.linear`'s."""

    name = "cpu_int8_split_native_amx"

    def available(self) -> bool:
        return _native_int8_amx_available()

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        wq, ws = cpu.int8_rows(layer)
        offset = cpu.int8_zero_offset(layer, ws)
        bias = None if layer.bias is None else layer.bias.float().contiguous()
        return native.int8_pack(wq), ws.contiguous(), None if offset is None else offset.contiguous(), bias

    def forward_terms(self, x: torch.Tensor, prepared: Any, terms: int, extra_ratio: float) -> torch.Tensor:
        w, ws, offset, bias = prepared
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[1] > 1 and x2.stride(1) != 1:
            x2 = x2.contiguous()
        y = native.int8_split_amx(x2, w, ws, offset, bias, terms, extra_ratio)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _int8_term(r: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """One term of `split_terms`: r's per-row int8 codes (as fp32) into `codes`, absmax / 127 into `scales`."""
    a = r.abs().amax(dim=1)
    torch.mul(r, row_multiplier(a), out=codes).round_()
    torch.div(a, 127.0, out=scales)


def split_terms(xf: torch.Tensor, extra_ratio: float, terms: int = 2
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (T, K) fp32 integers in [-127, 127], scales (T,), rows of xf given an extra term or None)
    of fp32 activations xf (M, K): rows [t M, (t + 1) M) are term t + 1 of every row (t < terms), the rest
    one more term of the rows listed (those whose absmax passes extra_ratio x their rms), with
    xf ~ sum of s_t * q_t, each term quantized from the residual of the ones before."""
    M, K = xf.shape
    big = None
    if M:
        rms = xf.pow(2).mean(dim=1).sqrt_()
        found = (xf.abs().amax(dim=1) > extra_ratio * rms).nonzero().flatten()
        big = found if found.numel() else None
    n_extra = 0 if big is None else big.numel()
    codes = torch.empty(terms * M + n_extra, K, dtype=torch.float32)
    scales = torch.empty(terms * M + n_extra, dtype=torch.float32)
    residual = xf
    for t in range(terms):
        q, s = codes[t * M:(t + 1) * M], scales[t * M:(t + 1) * M]
        _int8_term(residual, q, s)
        if t + 1 < terms:
            residual = torch.addcmul(residual, q, s.unsqueeze(1), value=-1.0)
    if big is not None:  # the last residual, only of the rows that take an extra term
        q, s = q.index_select(0, big), s.index_select(0, big)
        _int8_term(torch.addcmul(residual.index_select(0, big), q, s.unsqueeze(1), value=-1.0),
                   codes[terms * M:], scales[terms * M:])
    return codes, scales, big


class ExactSplitKernel(cpu.WrappedKernel):
    """fp32 activations through a split kernel's int8 GEMM at fp32 precision: three int8 terms per row (x to
    within absmax / 2**24 per element), a fourth for rows whose absmax passes FOURTH_TERM_RATIO x their rms
    (within absmax / 2**32), the exact int32 products combined in fp32. Measured against the float64 product
    (tests/test_int8_kernels.py) its error is at most that of the fp32 reference kernel, so unlike the `_bf16`
    kernels it is a candidate in every measured mode. On CPUs with native bf16 its int8 GEMM does 4 products per
    byte lane where fp32 FMAs do 1 per float lane: 3-4 terms cost less than fp32 arithmetic."""

    suffix = "f32"
    TERMS = 3
    FOURTH_TERM_RATIO = cpu.SPLIT_FOURTH_TERM_RATIO  # above it a row's 3-term error could pass the fp32 GEMM's own

    def available(self) -> bool:
        return self.base.available()

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype == torch.float32 and self.base.accepts(layer, device, torch.bfloat16)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return self.base.prepare(layer, device, torch.bfloat16)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        return self.base.forward_terms(x, prepared, self.TERMS, self.FOURTH_TERM_RATIO)


ONEDNN, FBGEMM, TOKEN_W8, SPLIT = OneDnnInt8Kernel(), FbgemmInt8Kernel(), TokenW8Kernel(), SplitInt8Kernel()
INTMM, SPLIT_INTMM = IntMmInt8Kernel(), SplitIntMmKernel()
NATIVE, SPLIT_NATIVE = NativeInt8Kernel(), SplitNativeKernel()
NATIVE_AMX, SPLIT_NATIVE_AMX = NativeAmxInt8Kernel(), SplitNativeAmxKernel()
for _kernel in (ONEDNN, FBGEMM, INTMM, NATIVE, NATIVE_AMX, TOKEN_W8, SPLIT, SPLIT_INTMM, SPLIT_NATIVE, SPLIT_NATIVE_AMX):
    register_kernel(_kernel)
for _kernel in (SPLIT, SPLIT_INTMM, SPLIT_NATIVE, SPLIT_NATIVE_AMX):
    register_kernel(cpu.Bf16ActivationsKernel(_kernel))
    register_kernel(ExactSplitKernel(_kernel))
