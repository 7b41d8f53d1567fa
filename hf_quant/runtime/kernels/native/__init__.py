"""Native CPU helpers (dequant.c), built on first use with the machine's C compiler and called
through ctypes.

torch has no fused low-bit GEMM for x86 (its int4 op is GEMV-oriented), so at 64+ rows the fast way
is to dequantize a weight tile into the activation dtype and hand it to torch's own GEMM (oneDNN).
The dequantization is the part torch does in five passes (AND, shift, convert, subtract, multiply);
dequant.c does it in one, vectorized for the machine it is built on (-march=native) and spread over
torch's thread count with OpenMP. It is plain C with no torch headers: the build takes about a second
and is cached per source, compiler and CPU under `HF_QUANT_NATIVE_CACHE` (default
~/.cache/hf_quant/native). With no compiler, or `HF_QUANT_NATIVE=0`, `library()` is None and the
kernels that use it are not candidates (the reason: `unavailable_reason()`).

Also here: `sign_gemm` (1-bit sign codes x fp32 / bf16 / fp16 activations by masked fp32 adds, no multiplies
in the inner loop: AVX-512F or AVX2 builds, `has_sign()`) and `sign_dequantize_into` (the 1-bit weight as
+-scale/2), `codes_gemm` (codes of up to 8 bits x bf16 or fp32 activations fused, no dequantized weight:
AVX512-BF16 builds for bf16, `has_codes_bf16()`; AVX-512F or AVX2 + FMA builds for fp32, `has_codes_f32()`),
LLM.int8()'s per-token activation quantization (`quantize_tokens`, bit-identical to the torch path of
kernels/int8.py) and its epilogue (`finish_tokens`), and an exact int8 GEMM (`int8_pack` / `int8_gemm`: uint8
codes + 128 x int8 weights in int32 by AVX-512 VNNI or, without it, AVX2 (`int8_gemm_form`), the epilogue optionally fused; `has_int8_gemm()`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from ....core import LayerSpec, grid
from ....methods import gptq

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("dequant.c")
ENV_DISABLE, ENV_CACHE, ENV_CC = "HF_QUANT_NATIVE", "HF_QUANT_NATIVE_CACHE", "CC"
ENV_CFLAGS = "HF_QUANT_NATIVE_CFLAGS"  # extra compiler flags after FLAGS (e.g. -march=x86-64-v3: an AVX2-only build)
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_state: dict = {}
_lock = threading.Lock()


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (the library is built with -march=native for this CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get(ENV_CC, "cc")) or shutil.which("gcc") or shutil.which("clang")


def _flags() -> tuple[str, ...]:
    return (*FLAGS, *os.environ.get(ENV_CFLAGS, "").split())


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary file and move it into place (never a half-written library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = ""
        for openmp in (("-fopenmp",), ()):  # without OpenMP: one thread, still vectorized
            run = subprocess.run([cc, *_flags(), *openmp, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                 timeout=120)
            if run.returncode == 0:
                os.replace(tmp, target)
                return
            errors = run.stderr.strip()[-2000:]
        raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    if os.environ.get(ENV_DISABLE, "1") == "0":
        raise RuntimeError(f"disabled by {ENV_DISABLE}=0")
    if platform.system() == "Windows":
        raise RuntimeError("native helpers are built on Linux and macOS only")
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (set {ENV_CC} or install gcc/clang)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(_flags()), _cpu_fingerprint()])
                         .encode()).hexdigest()[:16]
    cache = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "hf_quant" / "native")
    target = cache / f"dequant-{key}.so"
    if not target.exists():
        logger.info("hf_quant: building the native CPU helpers (%s) into %s", cc, target)
        _build(cc, target)
    lib = ctypes.CDLL(str(target))
    args = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int]
    for fn in (lib.hfq_dequant_nibbles, lib.hfq_dequant_bytes):
        fn.argtypes, fn.restype = args, ctypes.c_int
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hfq_caps.argtypes, lib.hfq_caps.restype = [], INT
    for fn in (lib.hfq_codes_bf16_gemm, lib.hfq_codes_f32_gemm, lib.hfq_codes_amx_gemm, lib.hfq_codes_amx_f32_gemm):
        fn.argtypes, fn.restype = [P, I64, I64, P, P, P, P, P, I64, I64, I64, INT, INT, INT], INT
    lib.hfq_amx_enable.argtypes, lib.hfq_amx_enable.restype = [], INT
    lib.hfq_dequant_amx_gemm.argtypes = [P, I64, I64, I64, P, P, P, P, P, I64, I64, I64, INT, INT, INT]
    lib.hfq_dequant_amx_gemm.restype = INT
    lib.hfq_codes_i16_gemv.argtypes = [P, INT, I64, I64, INT, ctypes.c_float, P, P, P, P, P, INT, I64, I64, I64, INT,
                                       INT]
    lib.hfq_codes_i16_gemv.restype = INT
    lib.hfq_codes_f32_vector_width.argtypes, lib.hfq_codes_f32_vector_width.restype = [], INT
    lib.hfq_quant_tokens.argtypes = [P, I64, I64, I64, INT, ctypes.c_float, P, INT, P, P, P, INT]
    lib.hfq_quant_tokens.restype = I64
    lib.hfq_finish_tokens.argtypes = [P, I64, I64, P, P, P, I64, INT, P, I64, P, P, P, I64, P, INT, INT]
    lib.hfq_finish_tokens.restype = INT
    lib.hfq_sign_vector_width.argtypes, lib.hfq_sign_vector_width.restype = [], INT
    lib.hfq_sign_gemm.argtypes = [P, I64, I64, I64, INT, P, P, P, P, I64, I64, I64, INT, P, INT]
    lib.hfq_sign_gemm.restype = INT
    lib.hfq_sign_dequant.argtypes, lib.hfq_sign_dequant.restype = [P, P, P, I64, I64, I64, INT, INT], INT
    lib.hfq_int8_packed_bytes.argtypes, lib.hfq_int8_packed_bytes.restype = [I64, I64], I64
    lib.hfq_int8_pack.argtypes, lib.hfq_int8_pack.restype = [P, I64, I64, P, P, INT], INT
    for fn in (lib.hfq_int8_gemm, lib.hfq_int8_amx_gemm):
        fn.argtypes, fn.restype = [P, I64, I64, I64, P, I64, P, P, P, P, P, P, I64, P, I64, INT, INT], INT
    lib.hfq_int8_split_amx.argtypes = [P, I64, I64, I64, INT, INT, ctypes.c_float, P, I64, P, P, P, P, P, INT, INT]
    lib.hfq_int8_split_amx.restype = INT
    lib.hfq_codes_vnni.argtypes, lib.hfq_codes_vnni.restype = [P, I64, I64, INT, P, INT], INT
    lib.hfq_codes_split_amx.argtypes = [P, I64, I64, I64, INT, INT, ctypes.c_float, P, INT, P, P, P, P, I64, I64, INT,
                                        INT]
    lib.hfq_codes_split_amx.restype = INT
    lib.hfq_int8_packed_cols.argtypes, lib.hfq_int8_packed_cols.restype = [P, I64, I64, P, I64, P, INT, P], INT
    lib.hfq_int8_token_gemm.argtypes = [P, I64, I64, I64, INT, ctypes.c_float, P, P, P, P, P, I64, P, P, P, P, INT, P,
                                        I64, P, INT]
    lib.hfq_int8_token_gemm.restype = I64
    lib.hfq_mse_search.argtypes = [P, I64, I64, P, P, P, P, P, P, INT, ctypes.c_float, INT, I64, I64, ctypes.c_float, INT]
    lib.hfq_mse_search.restype = INT
    lib.hfq_gptq_columns.argtypes = [P, I64, I64, P, I64, I64, I64, P, P, I64, P, INT, P, I64, I64, P, INT]
    lib.hfq_gptq_columns.restype = INT
    return lib


def _threads() -> int:
    """The threads a native call may use: torch's intra-op count."""
    return max(1, torch.get_num_threads())


def library() -> ctypes.CDLL | None:
    """The loaded helpers, built on first call; None (once, logged) if they cannot be built."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"], _state["reason"] = _load(), None
                except Exception as e:  # no compiler, a failed build, an unloadable file: torch paths remain
                    _state["lib"], _state["reason"] = None, str(e)
                    logger.info("hf_quant: native CPU helpers unavailable (%s); using torch-only CPU paths", e)
    return _state["lib"]


def unavailable_reason() -> str | None:
    library()
    return _state["reason"]


def reset() -> None:
    """Forget the loaded library (tests; a changed environment)."""
    with _lock:
        _state.clear()


def _check(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor, nibbles: bool) -> None:
    ok = (packed.dtype == torch.uint8 and scale.dtype == zero.dtype == torch.float32 and out.dtype in _KIND
          and all(t.is_contiguous() and t.device.type == "cpu" for t in (packed, scale, zero, out))
          and packed.dim() == 3 and scale.dim() == 2 and zero.shape == scale.shape
          and tuple(packed.shape[:2]) == tuple(scale.shape) and out.dim() == 2 and out.shape[0] == scale.shape[0]
          and out.shape[1] == packed.shape[1] * packed.shape[2] * (2 if nibbles else 1))
    if not ok:
        raise ValueError(f"native dequantize: bad operands packed {tuple(packed.shape)} {packed.dtype}, scale "
                         f"{tuple(scale.shape)} {scale.dtype}, zero {tuple(zero.shape)} {zero.dtype}, out "
                         f"{tuple(out.shape)} {out.dtype}: expected contiguous CPU tensors, packed uint8 (rows, "
                         "groups, bytes per group), scale and zero fp32 (rows, groups), out (rows, groups * codes "
                         "per group) in fp32, bf16 or fp16")


def dequantize_into(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor,
                    nibbles: bool) -> torch.Tensor:
    """out[r, g*gs + j] = (code - zero[r, g]) * scale[r, g], rounded once to out's dtype.

    nibbles: packed (rows, G, gs/2) uint8, low nibbles channels 0..gs/2-1 of each group, high nibbles
    the rest; else packed (rows, G, gs), one code per byte. scale, zero: fp32 (rows, G)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native CPU helpers unavailable: {unavailable_reason()}")
    _check(packed, scale, zero, out, nibbles)
    rows, G = scale.shape
    gs = packed.shape[2] * (2 if nibbles else 1)
    fn = lib.hfq_dequant_nibbles if nibbles else lib.hfq_dequant_bytes
    if fn(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), rows, G, gs, _KIND[out.dtype],
          _threads()):
        raise MemoryError("native dequantize: out of memory for a row buffer")
    return out


def dequant_amx_gemm(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     out: torch.Tensor, nibbles: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = x2 (M, K) bf16 @ W^T (+ bias), W the codes dequantized as `dequantize_into` makes them in bf16,
    on AMX tiles (`hfq_dequant_amx_gemm`: the weight dequantized per thread into L2-sized panels, exact products,
    fp32 sums, rounded once to out's dtype). packed, scale, zero as for `dequantize_into`; x2 unit column stride;
    K and the group size multiples of 32; bias fp32 (N,) or None. Needs `has_codes_amx()`."""
    N, G = scale.shape if scale.dim() == 2 else (-1, -1)
    M, K = x2.shape if x2.dim() == 2 else (-1, -1)
    gs = K // G if G > 0 else 0
    if not (packed.dtype == torch.uint8 and scale.dtype == zero.dtype == torch.float32 and zero.shape == scale.shape
            and all(t.is_contiguous() and t.is_cpu for t in (packed, scale, zero)) and packed.dim() == 3
            and tuple(packed.shape) == (N, G, gs // 2 if nibbles else gs)
            and x2.dtype == torch.bfloat16 and x2.is_cpu and (K <= 1 or x2.stride(1) == 1) and K > 0 and K % 32 == 0
            and (M <= 1 or x2.stride(0) >= K)
            and G * gs == K and gs % 32 == 0 and out.shape == (M, N) and out.is_contiguous() and out.dtype in _KIND
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == (N,) and bias.is_contiguous()))):
        raise ValueError(f"native dequant_amx_gemm: bad operands x {tuple(x2.shape)} {x2.dtype}, out "
                         f"{tuple(out.shape)} {out.dtype}, weight ({N}, {K}) in {G} groups: expected bf16 x (M, K) "
                         "with unit column stride (rows not overlapping), K and the group size multiples of 32, a "
                         "contiguous out (M, N) in fp32 / bf16 / fp16, bias fp32 (N,) or None")
    if not has_codes_amx():
        raise RuntimeError("native dequant_amx_gemm unavailable: "
                           + (f"native CPU helpers unavailable: {unavailable_reason()}" if library() is None
                              else "not built (a CPU with AMX-BF16 is needed), or Linux refused the AMX tile state"))
    if M == 0:
        return out
    rc = library().hfq_dequant_amx_gemm(x2.data_ptr(), M, K, x2.stride(0) if M > 1 else K, packed.data_ptr(),
                                        scale.data_ptr(), zero.data_ptr(), None if bias is None else bias.data_ptr(),
                                        out.data_ptr(), N, G, gs, int(nibbles), _KIND[out.dtype], _threads())
    if rc == 3:
        raise RuntimeError("native dequant_amx_gemm: Linux refused this process the AMX tile state")
    if rc:
        raise (MemoryError if rc == 4 else RuntimeError)(f"native dequant_amx_gemm failed ({rc})")
    return out


CAP_CODES_BF16 = 1  # hfq_codes_bf16_gemm compiled (AVX-512 BW + BF16)
CAP_CODES_F32 = 2  # hfq_codes_f32_gemm vectorized (AVX-512F, or AVX2 + FMA)
CAP_SIGN = 4  # hfq_sign_gemm vectorized (AVX-512F, or AVX2)
CAP_CODES_I16 = 8  # hfq_codes_i16_gemv compiled (AVX2)
CAP_INT8 = 16  # hfq_int8_gemm compiled (AVX-512 VNNI, or AVX2: CAP_INT8_AVX2 too)
CAP_INT8_AVX2 = 32  # hfq_int8_gemm in its AVX2 form (vpmaddubsw on |w| and sign(w) * c)
CAP_MSE = 64  # hfq_mse_search compiled (AVX2 + FMA)
CAP_CODES_AMX = 128  # hfq_codes_amx_gemm compiled (AMX-TILE + AMX-BF16 + AVX512-BF16)
CAP_INT8_AMX = 256  # hfq_int8_amx_gemm compiled (AMX-TILE + AMX-INT8 and the VNNI int8 GEMM's epilogue)
# corr's offset per layout: bf16, nibbles 128 + q, bytes 16 (128 + high) + (128 + low) = u + 2176; fp32: q itself
CODES_OFFSET = {(torch.bfloat16, True): 128.0, (torch.bfloat16, False): 2176.0,
                (torch.float32, True): 0.0, (torch.float32, False): 0.0}
# the AMX kernel's tiles: bf16 x meets nibbles as 128 + q (one OR), fp32 x the codes themselves; bytes are exact
AMX_CODES_OFFSET = {(torch.bfloat16, True): 128.0, (torch.bfloat16, False): 0.0,
                    (torch.float32, True): 0.0, (torch.float32, False): 0.0}


def _caps() -> int:
    """The built library's capability bits, read once per load (`reset` forgets them with the library)."""
    caps = _state.get("caps")
    if caps is None:
        lib = library()
        caps = _state["caps"] = 0 if lib is None else lib.hfq_caps()
    return caps


def has_codes_bf16() -> bool:
    """Whether the fused codes x bf16 kernel (`codes_gemm` with bf16 x) is built for this CPU."""
    return bool(_caps() & CAP_CODES_BF16)


def has_codes_amx() -> bool:
    """Whether the fused codes x bf16 kernel on AMX tiles (`codes_gemm` with amx=True) is built for this CPU and
    Linux lets this process use the tiles (asked once per process)."""
    return bool(_caps() & CAP_CODES_AMX) and _amx_granted()


def _amx_granted() -> bool:
    """Whether Linux lets this process use the AMX tiles (asked once per process)."""
    granted = _state.get("amx")
    if granted is None:
        granted = _state["amx"] = library().hfq_amx_enable() == 0
    return granted


def has_int8_amx() -> bool:
    """Whether the exact int8 GEMM on AMX-INT8 tiles (`Int8Gemm(..., amx=True)`) is built for this CPU and Linux
    lets this process use the tiles."""
    return bool(_caps() & CAP_INT8_AMX) and _amx_granted()


def has_codes_f32() -> bool:
    """Whether the fused codes x fp32 kernel (`codes_gemm` with fp32 x) is built (vectorized) for this CPU."""
    return bool(_caps() & CAP_CODES_F32)


def has_codes_i16() -> bool:
    """Whether the fused codes x int16 GEMV (`codes_i16_gemv`, AVX2 integer products) is built for this CPU."""
    return bool(_caps() & CAP_CODES_I16)


def has_mse_search() -> bool:
    """Whether the grid's clipping search (`mse_search`, AVX2 + FMA) is built for this CPU."""
    return bool(_caps() & CAP_MSE)


MSE_MAX_FACTORS = 1024  # HFQ_MSE_MAX_FACTORS


def mse_search(W: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               maxq: int, sym_zero: float | None, scale_dtype: torch.dtype, n: int, grid: int, norm: float,
               chosen: bool = False) -> tuple[torch.Tensor, ...]:
    """The clipping search of `hf_quant.core.grid` (`_mse_search`, GPTQ's quantizer with mse=True) for the rows of
    W (rows, gs) fp32, in one native call over all rows: for each row, the shrink factors 1 - i / grid (i < n) of
    its range [lo, hi] (fp32 (rows,)), each one's grid exactly as `grid._grid` makes it (sym_zero: the fixed zero
    of a symmetric grid, else None), and its error sum |w_hat - w|^norm; the first least error wins. Returns new
    (scale, zero) fp32 (rows,), starting from `scale` / `zero` (kept by a row whose errors are all NaN), and with
    `chosen` the factor index per row (int32, -1: none) and its error (fp32, inf: none). The errors agree with
    the oracle's to ~1e-6 (its power is torch's powf, this one fp32 polynomials), so where two factors' errors are
    that close the choice may differ; the codes each grid gives are the oracle's exactly."""
    lib = library()
    if lib is None or not has_mse_search():
        raise RuntimeError(f"native mse_search unavailable: {unavailable_reason() or 'not built (AVX2 + FMA needed)'}")
    rows = W.shape[0] if W.dim() == 2 else -1
    if not (rows >= 0 and W.dtype == torch.float32 and scale_dtype in _KIND and 1 <= maxq < 2**16
            and 0 <= n <= MSE_MAX_FACTORS and grid > 0
            and all(t.dtype == torch.float32 and t.shape == (rows,) for t in (lo, hi, scale, zero))
            and all(t.device.type == "cpu" for t in (W, lo, hi, scale, zero))):
        raise ValueError(f"native mse_search: bad operands W {tuple(W.shape)} {W.dtype}, scale dtype {scale_dtype}, "
                         f"maxq {maxq}, n {n}, grid {grid}: expected CPU fp32 rows (rows, gs), fp32 (rows,) ranges, "
                         f"scales and zeros, scales stored in fp32/bf16/fp16, at most {MSE_MAX_FACTORS} factors")
    W, lo, hi = W.contiguous(), lo.contiguous(), hi.contiguous()
    scale, zero = scale.clone(memory_format=torch.contiguous_format), zero.clone(memory_format=torch.contiguous_format)
    at, err = (torch.empty(rows, dtype=torch.int32), torch.empty(rows)) if chosen else (None, None)
    rc = lib.hfq_mse_search(W.data_ptr(), rows, W.shape[1], lo.data_ptr(), hi.data_ptr(), scale.data_ptr(),
                            zero.data_ptr(), None if at is None else at.data_ptr(),
                            None if err is None else err.data_ptr(), maxq,
                            -1.0 if sym_zero is None else sym_zero, _KIND[scale_dtype], n, grid, norm, _threads())
    if rc:
        raise RuntimeError(f"native mse_search failed (code {rc})")
    return (scale, zero, at, err) if chosen else (scale, zero)


def _grid_mse_search(W: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     spec: LayerSpec, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`hf_quant.core.grid`'s clipping search on CPU fp32 rows, native (None elsewhere: the torch search runs)."""
    if (W.device.type != "cpu" or W.dtype != torch.float32 or W.dim() != 2 or scale_dtype not in _KIND
            or spec.bits < 2 or not has_mse_search()):
        return None
    return mse_search(W, lo, hi, scale, zero, spec.maxq, spec.sym_zero if spec.sym else None, scale_dtype,
                      int(grid.MSE_MAX_SHRINK * grid.MSE_GRID), grid.MSE_GRID, grid.MSE_NORM)


grid.register_mse_search(_grid_mse_search)


def gptq_columns(W1: torch.Tensor, Hinv1: torch.Tensor, c0: int, c1: int, scale: torch.Tensor, zero: torch.Tensor,
                 group: torch.Tensor, maxq: int, codes: torch.Tensor, col0: int, Err1: torch.Tensor) -> bool:
    """GPTQ's column steps c0 .. c1 of one lazy-update block in one native call (`methods.gptq` `_COLUMN_STEPS`),
    bit for bit the torch steps: W1 (rows, B) and Err1 fp32 contiguous, updated in place; Hinv1 (B, B) fp32 with
    unit column stride (a block of the factor); scale / zero fp32 (rows, G); group int32 (B,); codes uint8 (rows,
    in) written at columns col0 + c0 .. col0 + c1. False (nothing done) where these do not fit or the helpers are
    not built: the torch steps then run."""
    lib = library()
    if lib is None:
        return False
    rows, B = W1.shape if W1.dim() == 2 else (-1, -1)
    G = scale.shape[1] if scale.dim() == 2 else -1
    ok = (W1.dtype == Err1.dtype == Hinv1.dtype == scale.dtype == zero.dtype == torch.float32
          and codes.dtype == torch.uint8 and group.dtype == torch.int32 and 1 <= maxq <= 255
          and Err1.shape == W1.shape and Hinv1.shape == (B, B) and Hinv1.stride(1) == 1
          and scale.shape == zero.shape == (rows, G) and group.shape == (B,) and codes.dim() == 2
          and codes.shape[0] == rows and 0 <= c0 <= c1 <= B and 0 <= col0 and col0 + c1 <= codes.shape[1]
          and all(t.is_contiguous() for t in (W1, Err1, scale, zero, group, codes))
          and all(t.device.type == "cpu" for t in (W1, Hinv1, scale, zero, group, codes, Err1)))
    if not ok:
        return False
    return lib.hfq_gptq_columns(W1.data_ptr(), rows, B, Hinv1.data_ptr(), Hinv1.stride(0), c0, c1, scale.data_ptr(),
                                zero.data_ptr(), G, group.data_ptr(), maxq, codes.data_ptr(), codes.shape[1], col0,
                                Err1.data_ptr(), _threads()) == 0


gptq.register_column_steps(gptq_columns)


def codes_i16_group_size_ok(gs: int, nibbles: bool) -> bool:
    return gs > 0 and gs % (32 if nibbles else 16) == 0


I16_MAX_ROWS = 8  # HFQ_I16_MAX_ROWS


def _group_layout(G: int, width: int, K: int) -> tuple[bool, int]:
    """(nibbles, group size) of packed codes (N, G, width) met by K input channels: nibbles when K = 2 G width
    (two codes per byte), bytes otherwise (K = G width, checked by the caller)."""
    nibbles = G * width * 2 == K
    return nibbles, 2 * width if nibbles else width


def codes_i16_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                   bias: torch.Tensor | None, out: torch.Tensor, two_terms: int, ratio: float) -> torch.Tensor:
    """out (M, N) fp32/bf16/fp16 = x (M, K) @ W.T + bias for M <= I16_MAX_ROWS, W[n, k] = (q - zero) * scale of
    `packed` (the `codes_gemm` layouts), all in one native call: each row of x (fp32/bf16/fp16, contiguous) written
    as int16 codes c1 = round(x * 32767 / absmax) and (two_terms 2: always; 1: when a row's absmax is over `ratio` x
    its rms) the codes of the residual, their products with the codes exact in int32 (`vpmaddwd`), scaled per
    group, minus the zero points' term xsum (M, G) @ offset (offset (G, N) = scale * zero, fp32, or None).
    A kernel calling it per token binds the weight's operands once instead (`I16Gemv`)."""
    return I16Gemv(packed, scale, offset, bias)(x, out, two_terms, ratio)


class I16Gemv:
    """`codes_i16_gemv` with the weight's operands (packed, scale, offset, bias) checked and bound once, for a layer's
    prepared layout: a call checks only x and out. A decode step calls it once per layer, and on a slow core the
    per-call Python work (operand checks, pointers, argument conversion) had cost more than a small layer's GEMV.
    Holds references to the bound tensors (their pointers are passed on every call)."""

    __slots__ = ("_fn", "_static", "_tail", "_keep")

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        lib = library()
        if lib is None or not has_codes_i16():
            raise RuntimeError("native codes x int16 kernel unavailable: "
                               f"{unavailable_reason() or 'not built (AVX2 needed)'}")
        N, G, width = packed.shape if packed.dim() == 3 else (0, 0, 0)
        ok = (packed.dim() == 3 and packed.dtype == torch.uint8 and scale.dtype == torch.float32
              and tuple(scale.shape) == (N, G) and N > 0 and G > 0
              and (offset is None or (offset.dtype == torch.float32 and tuple(offset.shape) == (G, N)))
              and (bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (N,)))
              and all(t.is_contiguous() and t.device.type == "cpu" for t in (packed, scale, offset, bias)
                      if t is not None))
        if not ok:
            raise ValueError(f"native codes_i16_gemv: bad operands packed {tuple(packed.shape)} {packed.dtype}, scale "
                             f"{tuple(scale.shape)} {scale.dtype}: expected contiguous CPU tensors, packed uint8 "
                             "(N, G, gs/2) nibbles (gs a multiple of 32) or (N, G, gs) bytes (gs a multiple of 16), "
                             "scale fp32 (N, G), offset fp32 (G, N), bias fp32 (N,)")
        self._fn, self._keep = lib.hfq_codes_i16_gemv, (packed, scale, offset, bias)
        self._static = (packed.data_ptr(), scale.data_ptr(), None if offset is None else offset.data_ptr(),
                        None if bias is None else bias.data_ptr())
        self._tail = (N, G, width)  # nibbles or bytes: told by K at call time (K = 2 G width or G width)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, two_terms: int, ratio: float) -> torch.Tensor:
        """out = x @ W.T + bias (see `codes_i16_gemv`); x (..., K) and out (..., N) contiguous CPU tensors with the
        same leading dimensions (at most I16_MAX_ROWS rows in all)."""
        N, G, width = self._tail
        kx, ko = _KIND.get(x.dtype), _KIND.get(out.dtype)
        K = x.shape[-1] if x.dim() else -1
        M = x.numel() // K if K > 0 else -1
        nibbles, gs = _group_layout(G, width, K)
        if (kx is None or ko is None or not 0 <= M <= I16_MAX_ROWS or G * gs != K
                or not codes_i16_group_size_ok(gs, nibbles) or out.shape[:-1] != x.shape[:-1] or out.shape[-1] != N
                or not x.is_contiguous() or not out.is_contiguous() or not x.is_cpu or not out.is_cpu):
            raise ValueError(f"native codes_i16_gemv: bad operands x {tuple(x.shape)} {x.dtype}, packed "
                             f"{(N, G, width)}, out {tuple(out.shape)} {out.dtype}: expected contiguous CPU tensors, "
                             f"at most {I16_MAX_ROWS} rows of fp32/bf16/fp16 x, packed uint8 (N, G, gs/2) nibbles "
                             "(gs a multiple of 32) or (N, G, gs) bytes (gs a multiple of 16)")
        p, s, o, b = self._static
        rc = self._fn(x.data_ptr(), kx, M, K, two_terms, ratio, p, s, o, b, out.data_ptr(), ko, N, G, gs,
                      0 if nibbles else 1, _threads())
        if rc < 0:
            raise MemoryError("native codes_i16_gemv: out of memory for its buffers")
        if rc:
            raise RuntimeError(f"native codes_i16_gemv failed (code {rc})")
        return out


def has_int8_gemm() -> bool:
    """Whether the exact int8 GEMM (`int8_gemm`: AVX-512 VNNI, or AVX2) is built for this CPU."""
    return bool(_caps() & CAP_INT8)


def int8_gemm_form() -> str | None:
    """"vnni", "avx2" (`vpmaddubsw` on |w| x sign(w) c; activation codes + 128 of at least 1) or None: which exact int8 GEMM this build has."""
    return None if not has_int8_gemm() else "avx2" if _caps() & CAP_INT8_AVX2 else "vnni"


class Int8Packed(NamedTuple):
    """An int8 weight (N, K) in `int8_gemm`'s layout: `packed` (blocks of 64 rows, each (K/4, 64, 4) bytes),
    `comp` int32 = 128 * the row sums of the codes (the term of the activations' +128 offset)."""
    packed: torch.Tensor
    comp: torch.Tensor
    n: int
    k: int


def _int8_library() -> ctypes.CDLL:
    lib = library()
    if lib is None or not has_int8_gemm():
        raise RuntimeError(f"native int8 GEMM unavailable: {unavailable_reason() or 'not built (AVX-512 VNNI or AVX2 needed)'}")
    return lib


def int8_pack(wq: torch.Tensor) -> Int8Packed:
    """wq (N, K) int8 codes, K a multiple of 4, in `int8_gemm`'s layout (built once per layer at prepare)."""
    lib = _int8_library()
    if not (wq.dtype == torch.int8 and wq.dim() == 2 and wq.shape[1] % 4 == 0 and wq.numel() > 0
            and wq.device.type == "cpu"):
        raise ValueError(f"native int8_pack: weight {tuple(wq.shape)} {wq.dtype}: expected CPU int8 (N, K) with K a "
                         "positive multiple of 4")
    wq = wq.contiguous()
    N, K = wq.shape
    packed = torch.empty(lib.hfq_int8_packed_bytes(N, K), dtype=torch.int8)
    comp = torch.empty(packed.numel() // K, dtype=torch.int32)
    if lib.hfq_int8_pack(wq.data_ptr(), N, K, packed.data_ptr(), comp.data_ptr(), _threads()):
        raise RuntimeError("native int8_pack failed")
    return Int8Packed(packed, comp, N, K)


def int8_gemm(codes: torch.Tensor, w: Int8Packed, ws: torch.Tensor, absmax: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
              outliers: tuple[torch.Tensor, torch.Tensor] | None = None, shape: tuple[int, ...] | None = None,
              amx: bool = False) -> torch.Tensor:
    """codes (M, K) uint8 (the per-token codes + 128, unit column stride) times the packed int8 weight, exact in
    int32, times the row scales ws (N,) fp32: fp32 (M, N) (`fbgemm_int8_mm`'s contract). With `absmax` (M,) fp32
    the epilogue of `finish_tokens` follows in the same pass (* absmax / 127 per row, + bias, + with `outliers` =
    (xo (M, n) fp32: the activations of the outlier columns, w_blocks (ceil(N/16), n, 16) fp32: W_hat's rows of
    them in blocks of 16 columns, zero-padded, `int8_packed_cols`) their product), in `dtype`: the same bytes
    as `finish_tokens` of the fp32 result. `shape`: the output's leading dimensions (M elements in all; default
    (M,)), so that a caller's (..., N) result needs no reshape. A kernel calling it per token binds the weight's
    operands once instead (`Int8Gemm`). `amx`: the same product on AMX-INT8 tiles (`has_int8_amx`), the same bytes."""
    return Int8Gemm(w, ws, bias, amx)(codes, absmax, dtype, outliers, shape)


class Int8Gemm:
    """`int8_gemm` with the weight's operands (the packed weight, row scales ws, bias) checked and bound once, for a
    layer's prepared layout: a call checks only the activations' operands (see `I16Gemv`). With `amx` its product
    runs on AMX-INT8 tiles (`hfq_int8_amx_gemm`: the same operands and bytes; `tokens` stays on the VNNI GEMM)."""

    __slots__ = ("w", "_fn", "_tokens", "_static", "_bias", "_keep", "amx")
    TOKEN_ROWS = 64  # `tokens` takes at most this many rows (decoding, short prompts; its buffers are reused per thread)

    def __init__(self, w: Int8Packed, ws: torch.Tensor, bias: torch.Tensor | None = None, amx: bool = False) -> None:
        lib = _int8_library()
        if amx and not has_int8_amx():
            raise RuntimeError("native int8 GEMM on AMX tiles unavailable: "
                               + ("Linux refused this process the AMX tile state" if _caps() & CAP_INT8_AMX
                                  else "not built (a CPU with AMX-INT8 and AVX-512 VNNI is needed)"))
        N = w.n
        if not (ws.dtype == torch.float32 and ws.shape == (N,) and ws.is_contiguous() and ws.is_cpu
                and (bias is None or (bias.dtype == torch.float32 and bias.shape == (N,) and bias.is_contiguous()
                                      and bias.is_cpu))):
            raise ValueError(f"native int8_gemm: bad operands ws {tuple(ws.shape)} {ws.dtype}"
                             + ("" if bias is None else f", bias {tuple(bias.shape)} {bias.dtype}")
                             + f": expected contiguous fp32 ({N},) CPU tensors")
        self.w, self._keep, self._bias, self.amx = w, (ws, bias), bias is not None, amx
        self._fn = lib.hfq_int8_amx_gemm if amx else lib.hfq_int8_gemm
        self._tokens = lib.hfq_int8_token_gemm
        self._static = (w.packed.data_ptr(), N, w.comp.data_ptr(), ws.data_ptr(),
                        None if bias is None else bias.data_ptr())

    def __call__(self, codes: torch.Tensor, absmax: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 outliers: tuple[torch.Tensor, torch.Tensor] | None = None, shape: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
        """The product and epilogue of `int8_gemm` for these codes (M, K)."""
        w = self.w
        N = w.n
        M, K = codes.shape if codes.dim() == 2 else (-1, -1)
        xo, wc = outliers if outliers is not None else (None, None)
        n_out = 0 if xo is None else xo.shape[1]
        ok = (codes.dtype == torch.uint8 and K == w.k and (K <= 1 or codes.stride(1) == 1) and codes.is_cpu
              and dtype in _KIND
              and (absmax is None or (absmax.dtype == torch.float32 and absmax.shape == (M,) and absmax.is_contiguous()))
              and (absmax is not None or (dtype == torch.float32 and outliers is None and not self._bias))
              and (outliers is None or (xo.dtype == wc.dtype == torch.float32 and xo.dim() == 2 and xo.shape[0] == M
                                        and tuple(wc.shape) == (-(-N // 16), n_out, 16)
                                        and xo.is_contiguous() and wc.is_contiguous())))
        if not ok:
            raise ValueError(f"native int8_gemm: bad operands codes {tuple(codes.shape)} {codes.dtype}, dtype {dtype}: "
                             f"expected uint8 codes (M, {w.k}) with unit column stride, absmax fp32 (M,) (needed for "
                             f"bias, outliers or a dtype other than fp32), outliers (fp32 (M, n), fp32 "
                             f"({-(-N // 16)}, n, 16)) contiguous")
        out = self._output(M, shape, dtype)
        if M == 0:
            return out
        packed, _, comp, ws, bias = self._static
        rc = self._fn(codes.data_ptr(), M, K, codes.stride(0) if M > 1 else K, packed, N, comp, ws,
                      None if absmax is None else absmax.data_ptr(), bias, None if xo is None else xo.data_ptr(),
                      None if wc is None else wc.data_ptr(), n_out, out.data_ptr(), N, _KIND[dtype], _threads())
        if rc == 3 and not self.amx:
            raise ValueError("native int8_gemm: an activation code of -128 (a uint8 0): the AVX2 int8 GEMM takes "
                             "per-token codes in [-127, 127] (codes + 128 in [1, 255]), as quantize_tokens writes them")
        if rc:
            raise RuntimeError("native int8_gemm failed")
        return out

    def _output(self, M: int, shape: tuple[int, ...] | None, dtype: torch.dtype) -> torch.Tensor:
        """The output for M rows: (M, N), or (*shape, N) where shape holds M elements in all."""
        N = self.w.n
        out = torch.empty((M, N) if shape is None else (*shape, N), dtype=dtype)
        if out.numel() != M * N:
            raise ValueError(f"native int8_gemm: output leading dimensions {tuple(shape)} for {M} rows of codes")
        return out

    def tokens(self, x2: torch.Tensor, threshold: float, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
               known: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """`quantize_tokens` of x2 (M <= TOKEN_ROWS rows of K, fp32/bf16/fp16, unit column stride) with `threshold`
        and, when no column has an outlier, the product with its fused epilogue in `dtype`, in one native call:
        (out (*shape, N), None). The same when the outlier columns are exactly `known` = (cols int64, ascending;
        their W_hat rows in the outlier layout of `int8_packed_cols` for `dtype`): the call gathers their
        activations and adds their product. Other outlier columns: (None, (codes + 128, absmax, cols)) for the
        caller's GEMM with the outlier columns' product; codes and absmax are this thread's reused buffers, valid
        until its next call of `tokens`."""
        w = self.w
        M, K = x2.shape if x2.dim() == 2 else (-1, -1)
        kx, ko = _KIND.get(x2.dtype), _KIND.get(dtype)
        if (kx is None or ko is None or K != w.k or not 0 <= M <= self.TOKEN_ROWS or (K > 1 and x2.stride(1) != 1)
                or not x2.is_cpu):
            raise ValueError(f"native int8_gemm.tokens: x {tuple(x2.shape)} {x2.dtype} stride {x2.stride()}, dtype "
                             f"{dtype}: expected a CPU fp32/bf16/fp16 matrix of at most {self.TOKEN_ROWS} rows of "
                             f"{w.k} with unit column stride, and an fp32/bf16/fp16 output")
        out = self._output(M, shape, dtype)
        if M == 0:
            return out, None
        codes, absmax, flags, cols = _token_buffers(M * K, M, K)
        packed, N, comp, ws, bias = self._static
        kc, kw = known if known is not None else (None, None)
        if known is not None and not (kc.dtype == torch.int64 and kc.dim() == 1 and kc.is_contiguous()
                                      and kw.dtype == torch.float32 and tuple(kw.shape) == (-(-N // 16), kc.numel(), 16)
                                      and kw.is_contiguous()):
            raise ValueError(f"native int8_gemm.tokens: known columns {tuple(kc.shape)} {kc.dtype}, rows "
                             f"{tuple(kw.shape)} {kw.dtype}: expected int64 (n,) and fp32 ({-(-N // 16)}, n, 16), "
                             "contiguous")
        n = self._tokens(x2.data_ptr(), M, K, x2.stride(0) if M > 1 else K, kx, threshold, codes.data_ptr(),
                         absmax.data_ptr(), flags.data_ptr(), cols.data_ptr(), packed, N, comp, ws, bias,
                         out.data_ptr(), ko, None if kc is None else kc.data_ptr(), 0 if kc is None else kc.numel(),
                         None if kw is None else kw.data_ptr(), _threads())
        if n == 0:
            return out, None
        if n > 0:
            return None, (codes[:M * K].view(M, K), absmax[:M], cols[:n].clone())
        if n == -1:
            raise MemoryError("native int8_gemm.tokens: out of memory for a row buffer")
        raise RuntimeError(f"native int8_gemm.tokens failed (code {n})")


SPLIT_MAX_TERMS = 3  # `int8_split_amx`: terms per row at most (one more for a row far above its rms)


def int8_split_amx(x: torch.Tensor, w: Int8Packed, ws: torch.Tensor, offset: torch.Tensor | None,
                   bias: torch.Tensor | None, terms: int, extra_ratio: float) -> torch.Tensor:
    """Weight-only int8 rows times float activations on AMX-INT8 tiles (`cpu_int8_split` fused): each row of x (M, K)
    fp32/bf16/fp16 with unit column stride written as `terms` int8 terms (x ~ sum_t s_t q_t, each from the residual of
    the ones before; one more term where a row's absmax passes extra_ratio x its rms), their exact int32 products
    with the packed weight combined in fp32: y = sum_t s_t (q_t . w^T) ws (+ sum(x) * offset) (+ bias), (M, N) in
    x's dtype. ws, offset, bias: fp32 (N,) (offset: an asymmetric layer's (128 - zero) * scale)."""
    if not has_int8_amx():
        raise RuntimeError("native int8_split_amx unavailable: the int8 GEMM on AMX tiles is not built or not granted")
    lib = library()
    N = w.n
    M, K = x.shape if x.dim() == 2 else (-1, -1)
    vecs = [v for v in (ws, offset, bias) if v is not None]
    if not (x.dtype in _KIND and K == w.k and (K <= 1 or x.stride(1) == 1) and x.is_cpu
            and 1 <= terms <= SPLIT_MAX_TERMS
            and all(v.dtype == torch.float32 and v.shape == (N,) and v.is_contiguous() for v in vecs)):
        raise ValueError(f"native int8_split_amx: bad operands x {tuple(x.shape)} {x.dtype}, {terms} terms: expected a "
                         f"CPU fp32/bf16/fp16 (M, {w.k}) matrix with unit column stride, 1-{SPLIT_MAX_TERMS} terms, "
                         f"ws / offset / bias contiguous fp32 ({N},)")
    out = torch.empty(M, N, dtype=x.dtype)
    if M == 0:
        return out
    rc = lib.hfq_int8_split_amx(x.data_ptr(), M, K, x.stride(0) if M > 1 else K, _KIND[x.dtype], terms, extra_ratio,
                                w.packed.data_ptr(), N, w.comp.data_ptr(), ws.data_ptr(),
                                None if offset is None else offset.data_ptr(), None if bias is None else bias.data_ptr(),
                                out.data_ptr(), _KIND[x.dtype], _threads())
    if rc == 4:
        raise MemoryError("native int8_split_amx: out of memory for the activation tiles")
    if rc:
        raise RuntimeError(f"native int8_split_amx failed (code {rc})")
    return out


def codes_split_group_size_ok(gs: int) -> bool:
    """Group sizes `CodesSplitAmx` takes: multiples of 64 (a tile of K lies in one group)."""
    return gs > 0 and gs % 64 == 0


CODES_SPLIT_MAX_K = {True: 1 << 20, False: 1 << 16}  # by nibbles: a group's int32 sums stay exact below it


class CodesSplitAmx:
    """Group-quantized codes times float activations written as int8 terms, on AMX-INT8 tiles (`hfq_codes_split_amx`):
    the weight W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g] (g = k // gs) is bound once from its codes q (N, K)
    uint8 (nibbles: at most 15, two per byte in the tiles' layout; else bytes, the B tiles themselves:
    `hfq_codes_vnni`) and scale (N, G) fp32; the zero points are the caller's: corr (M, N) fp32 = sum over g of
    (sum of x over group g) * scale * zero. A call writes each row of x (M, K) fp32/bf16/fp16 as `terms` int8 terms
    (x ~ sum_t s_t q_t, each from the residual of the ones before; one more for a row whose absmax passes
    extra_ratio x its rms), sums each group's products exactly in int32, scales them in fp32 and combines the terms:
    out = sum_t s_t sum_g scale_g (q_t . q_w over g) - corr + bias, in out's dtype."""

    __slots__ = ("n", "k", "gs", "nibbles", "_wv", "_scale_t", "_bias")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 nibbles: bool = True) -> None:
        if not has_int8_amx():
            raise RuntimeError("native codes_split_amx unavailable: the int8 GEMM on AMX tiles is not built or not "
                               "granted (it needs AMX-INT8, AVX-512 VNNI and the tile state from Linux)")
        N, K = codes.shape if codes.dim() == 2 else (0, 0)
        G = scale.shape[1] if scale.dim() == 2 else 0
        gs = K // G if G else 0
        ok = (codes.dtype == torch.uint8 and scale.dtype == torch.float32 and N > 0 and G > 0 and G * gs == K
              and tuple(scale.shape) == (N, G) and codes_split_group_size_ok(gs) and K <= CODES_SPLIT_MAX_K[nibbles]
              and (bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (N,)))
              and all(t.device.type == "cpu" for t in (codes, scale, bias) if t is not None)
              and not (nibbles and int(codes.max()) > 15))
        if not ok:
            raise ValueError(f"native codes_split_amx: bad operands codes {tuple(codes.shape)} {codes.dtype}, scale "
                             f"{tuple(scale.shape)} {scale.dtype}, nibbles={nibbles}: expected CPU tensors, codes uint8 "
                             f"(N, K) (at most 15 as nibbles) with K <= {CODES_SPLIT_MAX_K[nibbles]}, scale fp32 (N, G) "
                             "with K / G a multiple of 64, bias fp32 (N,)")
        NB = 2 * ((N + 31) // 32)  # blocks of 16 output rows, in pairs
        self.n, self.k, self.gs, self.nibbles = N, K, gs, nibbles
        self._wv = torch.empty(NB * (K // 64) * (512 if nibbles else 1024), dtype=torch.uint8)
        if library().hfq_codes_vnni(codes.contiguous().data_ptr(), N, K, 0 if nibbles else 1, self._wv.data_ptr(),
                                    _threads()):
            raise RuntimeError("native codes_split_amx: the weight's tile layout failed")
        self._scale_t = torch.zeros(G, NB * 16, dtype=torch.float32)  # (G, N padded to 32): a group's 32 at once
        self._scale_t[:, :N] = scale.t()
        self._bias = None if bias is None else bias.contiguous()

    def __call__(self, x: torch.Tensor, corr: torch.Tensor | None, out: torch.Tensor, terms: int,
                 extra_ratio: float) -> torch.Tensor:
        """out (M, N) fp32/bf16/fp16 = x @ W.T - corr + bias, x (M, K) fp32/bf16/fp16 with unit column stride, corr
        fp32 (M, N) contiguous or None, 1-SPLIT_MAX_TERMS terms."""
        N, K = self.n, self.k
        M = x.shape[0] if x.dim() == 2 else -1
        if not (x.dim() == 2 and x.shape[1] == K and x.dtype in _KIND and (K <= 1 or x.stride(1) == 1) and x.is_cpu
                and out.dtype in _KIND and tuple(out.shape) == (M, N) and out.is_contiguous() and out.is_cpu
                and (corr is None or (corr.dtype == torch.float32 and tuple(corr.shape) == (M, N)
                                      and corr.is_contiguous() and corr.is_cpu))
                and 1 <= terms <= SPLIT_MAX_TERMS):
            raise ValueError(f"native codes_split_amx: bad operands x {tuple(x.shape)} {x.dtype}, corr "
                             f"{None if corr is None else tuple(corr.shape)}, out {tuple(out.shape)} {out.dtype}, "
                             f"{terms} terms: expected CPU tensors, x fp32/bf16/fp16 (M, {K}) with unit column stride, "
                             f"corr fp32 (M, {N}) contiguous or None, out fp32/bf16/fp16 (M, {N}) contiguous, "
                             f"1-{SPLIT_MAX_TERMS} terms")
        if M == 0:
            return out
        rc = library().hfq_codes_split_amx(
            x.data_ptr(), M, K, x.stride(0) if M > 1 else K, _KIND[x.dtype], terms, extra_ratio, self._wv.data_ptr(),
            0 if self.nibbles else 1, self._scale_t.data_ptr(), None if corr is None else corr.data_ptr(),
            None if self._bias is None else self._bias.data_ptr(), out.data_ptr(), N, self.gs, _KIND[out.dtype],
            _threads())
        if rc == 4:
            raise MemoryError("native codes_split_amx: out of memory for the activation tiles")
        if rc:
            raise RuntimeError(f"native codes_split_amx failed (code {rc})")
        return out


def int8_packed_cols(w: Int8Packed, cols: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_hat's rows of the columns `cols` (int64) in `int8_gemm`'s outlier layout (ceil(N/16), n, 16) fp32, read from
    the packed weight: codes * ws rounded to `dtype` (the activation type) and back to fp32, as
    `kernels.int8.outlier_weight_t` builds them."""
    lib = _int8_library()
    cols = cols.to(torch.int64).contiguous()
    if not (ws.dtype == torch.float32 and ws.shape == (w.n,) and ws.is_contiguous() and cols.dim() == 1
            and dtype in _KIND):
        raise ValueError(f"native int8_packed_cols: expected cols int64 (n,), ws fp32 ({w.n},), dtype fp32/bf16/fp16; "
                         f"got ws {tuple(ws.shape)} {ws.dtype}")
    out = torch.empty(-(-w.n // 16), cols.numel(), 16, dtype=torch.float32)
    if lib.hfq_int8_packed_cols(w.packed.data_ptr(), w.n, w.k, cols.data_ptr(), cols.numel(), ws.data_ptr(),
                                _KIND[dtype], out.data_ptr()):
        raise ValueError(f"native int8_packed_cols: a column index is outside [0, {w.k})")
    return out


def has_sign() -> bool:
    """Whether the 1-bit sign kernel (`sign_gemm`) is built (vectorized) for this CPU."""
    return bool(_caps() & CAP_SIGN)


def sign_group_size_ok(gs: int) -> bool:
    """Group sizes `sign_gemm` takes: multiples of its vector width (16 with AVX-512, 8 with AVX2)."""
    return has_sign() and gs > 0 and gs % library().hfq_sign_vector_width() == 0


def sign_workspace_floats(M: int, K: int, G: int) -> int:
    """fp32 elements of the `work` buffer `sign_gemm` needs for M rows of K channels in G groups."""
    return M * K + M * G


def sign_gemm(x: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """out (M, N) = x (M, K) @ W.T + bias for a 1-bit layer, W[n, k] = (bit k of row n - 1/2) * scale[n, g(k)]:
    per group the sum P of the activations whose bit is set and the sum S of all, y = sum_g scale (P - S / 2),
    all in fp32 (x widened once per call), the output rounded once. bits: the packed codes (N, K / 8) uint8
    (core/packing.py: code k in bit k % 8 of byte k // 8); scale (N, G) fp32 with K / G a multiple of the vector
    width (`sign_group_size_ok`); bias (N,) fp32 or None; x fp32 / bf16 / fp16 with unit column stride; out
    fp32 / bf16 / fp16 (N contiguous); work fp32, at least `sign_workspace_floats` elements. A kernel calling it
    per token binds the weight's operands once instead (`SignGemm`)."""
    return SignGemm(bits, scale, bias)(x, out, work)


class SignGemm:
    """`sign_gemm` with the weight's operands (bits, scale, bias) checked and bound once, for a layer's prepared
    layout: a call checks only x, out and the workspace (see `I16Gemv`)."""

    __slots__ = ("n", "k", "g", "_fn", "_static", "_keep")

    def __init__(self, bits: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        lib = library()
        if lib is None or not has_sign():
            raise RuntimeError("native sign kernel unavailable: "
                               f"{unavailable_reason() or 'not built for this CPU (AVX2 or AVX-512F)'}")
        N, G = scale.shape if scale.dim() == 2 else (-1, 0)
        K = bits.shape[1] * 8 if bits.dim() == 2 else -1
        gs = K // G if G > 0 else 0
        ok = (bits.dtype == torch.uint8 and scale.dtype == torch.float32 and bits.dim() == 2
              and bits.shape[0] == N and G * gs == K and sign_group_size_ok(gs)
              and (bias is None or (bias.dtype == torch.float32 and bias.shape == (N,) and bias.is_contiguous()
                                    and bias.is_cpu))
              and bits.is_contiguous() and scale.is_contiguous() and bits.is_cpu and scale.is_cpu)
        if not ok:
            raise ValueError(f"native sign_gemm: bad operands bits {tuple(bits.shape)} {bits.dtype}, scale "
                             f"{tuple(scale.shape)} {scale.dtype}: expected contiguous CPU tensors, bits uint8 (N, K/8), "
                             "scale fp32 (N, G) with groups of a multiple of the vector width, bias fp32 (N,) or None")
        self.n, self.k, self.g, self._fn, self._keep = N, K, G, lib.hfq_sign_gemm, (bits, scale, bias)
        self._static = (bits.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr())

    def __call__(self, x: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """out = x @ W.T + bias: x (M, K) with unit column stride, or (..., K) contiguous; out (..., N) contiguous
        with x's leading dimensions; work fp32 of at least `sign_workspace_floats(M, K, G)` elements."""
        N, K, G = self.n, self.k, self.g
        two_d = x.dim() == 2
        M = x.numel() // K if K > 0 else 0
        ok = (x.dtype in _KIND and out.dtype in _KIND and work.dtype == torch.float32 and x.dim() >= 1
              and x.shape[-1] == K and out.shape[:-1] == x.shape[:-1] and out.shape[-1] == N
              and (x.is_contiguous() or (two_d and (K <= 1 or M == 0 or x.stride(1) == 1)))
              and work.numel() >= sign_workspace_floats(M, K, G) and out.is_contiguous() and work.is_contiguous()
              and x.is_cpu and out.is_cpu and work.is_cpu)
        if not ok:
            raise ValueError(f"native sign_gemm: bad operands x {tuple(x.shape)} {x.dtype}, out {tuple(out.shape)} "
                             f"{out.dtype}, work {work.numel()} {work.dtype}, weight ({N}, {K}): expected CPU tensors, "
                             "x fp32/bf16/fp16 (M, K) with unit column stride, out fp32/bf16/fp16 (M, N), work fp32 of "
                             "sign_workspace_floats(M, K, G), contiguous")
        if M == 0 or N == 0:
            return out
        bits, scale, bias = self._static
        rc = self._fn(x.data_ptr(), M, K, x.stride(0) if two_d and M > 1 else K, _KIND[x.dtype], bits, scale, bias,
                      out.data_ptr(), N, G, K // G, _KIND[out.dtype], work.data_ptr(), _threads())
        if rc:
            raise RuntimeError(f"native sign_gemm failed (code {rc})")
        return out


def sign_dequantize_into(bits: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, K) = the 1-bit weight +-scale / 2 (+ where the bit is set) in out's dtype (fp32 / bf16 / fp16),
    rounded once from fp32: bits (N, K / 8) uint8, scale (N, G) fp32, K / G a multiple of 8."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native CPU helpers unavailable: {unavailable_reason()}")
    N, K = out.shape
    G = scale.shape[1] if scale.dim() == 2 else 0
    ok = (bits.dtype == torch.uint8 and scale.dtype == torch.float32 and out.dtype in _KIND and G > 0
          and K % (8 * G) == 0 and tuple(bits.shape) == (N, K // 8) and tuple(scale.shape) == (N, G)
          and all(t.is_contiguous() and t.device.type == "cpu" for t in (bits, scale, out)))
    if not ok:
        raise ValueError(f"native sign_dequantize_into: bad operands bits {tuple(bits.shape)} {bits.dtype}, scale "
                         f"{tuple(scale.shape)} {scale.dtype}, out {tuple(out.shape)} {out.dtype}: expected contiguous "
                         "CPU tensors, bits uint8 (N, K/8), scale fp32 (N, G) with K/G a multiple of 8, out fp32/bf16/"
                         "fp16 (N, K)")
    if N and lib.hfq_sign_dequant(bits.data_ptr(), scale.data_ptr(), out.data_ptr(), N, K, K // G, _KIND[out.dtype],
                                  _threads()):
        raise MemoryError("native sign_dequantize_into: out of memory for a row buffer")
    return out


def codes_group_size_ok(gs: int, nibbles: bool, compute: torch.dtype, amx: bool = False) -> bool:
    """Group sizes `codes_gemm` takes: bf16 nibbles 32 or multiples of 64, bf16 bytes multiples of 32; fp32
    multiples of twice the vector width (32 with AVX-512, 16 with AVX2); on AMX tiles, multiples of 32."""
    if gs <= 0:
        return False
    if amx:
        return gs % 32 == 0
    if compute == torch.float32:
        width = library().hfq_codes_f32_vector_width() if has_codes_f32() else 0
        return width > 0 and gs % (2 * width) == 0
    return gs == 32 or gs % 64 == 0 if nibbles else gs % 32 == 0


def codes_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, corr: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor, amx: bool = False) -> torch.Tensor:
    """out (M, N) fp32 or bf16 = x (M, K) @ W.T + bias with W[n, g*gs + j] = (q - zero[n, g]) * scale[n, g]
    computed without W: packed (N, G, gs/2) nibbles or (N, G, gs) bytes (the `dequantize_into` layouts, told
    apart by K), scale (N, G) fp32 and corr (M, N) fp32 = xsum (M, G) @ (scale * (zero + offset)).T, xsum the
    per-group sums of x in fp32 and offset CODES_OFFSET[(x.dtype, nibbles)]. x bf16: AVX512-BF16 dot products
    (`has_codes_bf16`); x fp32: fp32 FMAs (`has_codes_f32`). With amx=True, AMX tiles (`has_codes_amx`; group sizes
    multiples of 32; fp32 x as three bf16 terms; the offset AMX_CODES_OFFSET[(x.dtype, nibbles)]). A kernel calling
    it per token binds the weight's operands once instead (`CodesGemm`)."""
    return CodesGemm(packed, scale, bias, x.dtype, amx)(x, corr, out)


def _codes_library(compute: torch.dtype, amx: bool = False) -> ctypes.CDLL:
    lib = library()
    if (lib is None or compute not in (torch.bfloat16, torch.float32)
            or not (has_codes_amx() if amx else has_codes_bf16() if compute == torch.bfloat16 else has_codes_f32())):
        needs = ("AMX-BF16, and the tile state granted by Linux" if amx
                 else "AVX512-BF16" if compute == torch.bfloat16 else "AVX2 + FMA")
        raise RuntimeError(f"native codes x {compute}{' (AMX)' if amx else ''} kernel unavailable: "
                           f"{unavailable_reason() or f'not built for this CPU (it needs {needs})'}")
    return lib


class CodesGemm:
    """`codes_gemm` for activations of dtype `compute` (bf16 or fp32) with the weight's operands (packed, scale, bias)
    checked and bound once, for a layer's prepared layout: a call checks only x, corr and out (see `I16Gemv`)."""

    __slots__ = ("compute", "amx", "_fn", "_static", "_tail", "_keep")

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute: torch.dtype, amx: bool = False) -> None:
        lib = _codes_library(compute, amx)
        N, G, width = packed.shape if packed.dim() == 3 else (0, 0, 0)
        ok = (packed.dim() == 3 and packed.dtype == torch.uint8 and scale.dtype == torch.float32
              and tuple(scale.shape) == (N, G) and N > 0 and G > 0
              and (bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (N,)))
              and all(t.is_contiguous() and t.device.type == "cpu" for t in (packed, scale, bias) if t is not None))
        if not ok:
            raise ValueError(f"native codes_gemm: bad operands packed {tuple(packed.shape)} {packed.dtype}, scale "
                             f"{tuple(scale.shape)} {scale.dtype}: expected contiguous CPU tensors, packed uint8 "
                             "(N, G, gs/2) nibbles or (N, G, gs) bytes, scale fp32 (N, G), bias fp32 (N,)")
        self.compute, self.amx, self._keep = compute, amx, (packed, scale, bias)
        if amx:  # fp32 x: three bf16 terms on the tiles
            self._fn = lib.hfq_codes_amx_gemm if compute == torch.bfloat16 else lib.hfq_codes_amx_f32_gemm
        else:
            self._fn = lib.hfq_codes_bf16_gemm if compute == torch.bfloat16 else lib.hfq_codes_f32_gemm
        self._static = (packed.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr())
        self._tail = (N, G, width)  # nibbles or bytes: told by K at call time (K = 2 G width or G width)

    def __call__(self, x: torch.Tensor, corr: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = x @ W.T + bias (see `codes_gemm`); x (M, K) of `compute`, corr fp32 and out fp32/bf16 (M, N),
        contiguous CPU tensors."""
        N, G, width = self._tail
        M, K = x.shape if x.dim() == 2 else (-1, -1)
        nibbles, gs = _group_layout(G, width, K)
        if (x.dtype != self.compute or corr.dtype != torch.float32 or out.dtype not in (torch.float32, torch.bfloat16)
                or G * gs != K or not codes_group_size_ok(gs, nibbles, self.compute, self.amx) or corr.shape != (M, N)
                or out.shape != (M, N) or not (x.is_contiguous() and corr.is_contiguous() and out.is_contiguous())
                or not (x.is_cpu and corr.is_cpu and out.is_cpu)):
            raise ValueError(f"native codes_gemm: bad operands x {tuple(x.shape)} {x.dtype}, packed {(N, G, width)}, "
                             f"corr {tuple(corr.shape)} {corr.dtype}, out {tuple(out.shape)} {out.dtype}: expected "
                             f"contiguous CPU tensors, x {self.compute} (M, K), packed uint8 (N, G, gs/2) nibbles or "
                             "(N, G, gs) bytes with a group size `codes_group_size_ok` accepts, corr fp32 (M, N), out "
                             "fp32/bf16 (M, N)")
        p, s, b = self._static
        rc = self._fn(x.data_ptr(), M, K, p, s, corr.data_ptr(), b, out.data_ptr(), N, G, gs, _KIND[out.dtype],
                      0 if nibbles else 1, _threads())
        if rc:
            raise RuntimeError(f"native codes_gemm failed (code {rc})")
        return out


_CODE_KINDS = {torch.int8: 0, torch.uint8: 1, torch.float32: 2}
_FAKE_QUANT = 3  # hfq_quant_tokens' code_kind for the fake-quantized activations in x's own type


def _quant_tokens(x2: torch.Tensor, threshold: float, codes: torch.Tensor, code_kind: int, who: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`hfq_quant_tokens` of x2 into `codes` (code_kind: `_CODE_KINDS` or `_FAKE_QUANT`): (fp32 absmax (M,),
    outlier columns or None). x2 checked here: fp32/bf16/fp16 on the CPU, unit column stride."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native CPU helpers unavailable: {unavailable_reason()}")
    M, K = x2.shape
    if x2.dtype not in _KIND or x2.device.type != "cpu" or (K > 1 and x2.stride(1) != 1):
        raise ValueError(f"native {who}: x {tuple(x2.shape)} {x2.dtype} stride {x2.stride()}: expected a CPU "
                         "fp32/bf16/fp16 matrix with unit column stride")
    absmax = torch.empty(M, dtype=torch.float32)
    flags, cols = _token_scratch(K)
    n = lib.hfq_quant_tokens(x2.data_ptr(), M, K, x2.stride(0) if M > 1 else K, _KIND[x2.dtype], float(threshold),
                             codes.data_ptr(), code_kind, absmax.data_ptr(), flags.data_ptr(), cols.data_ptr(),
                             _threads())
    if n < 0:
        raise MemoryError(f"native {who}: out of memory for a row buffer")
    return absmax, (cols[:n].clone() if n else None)


_TOKEN_SCRATCH = threading.local()


def _token_scratch(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`hfq_quant_tokens`' work buffers for K columns (flags uint8, cols int64), per thread and reused: two fewer
    allocations in every decode step's int8 layers (the columns found are copied out)."""
    return _token_buffers(0, 0, K)[2:]


def _token_buffers(n_codes: int, M: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This thread's reused buffers (codes uint8, absmax fp32, flags uint8, cols int64) of at least n_codes, M, K, K
    elements, grown as needed."""
    bufs = getattr(_TOKEN_SCRATCH, "bufs", None)
    if bufs is None or bufs[0].numel() < n_codes or bufs[1].numel() < M or bufs[2].numel() < K:
        old = bufs or (torch.empty(0, dtype=torch.uint8), torch.empty(0), torch.empty(0, dtype=torch.uint8))
        bufs = _TOKEN_SCRATCH.bufs = (torch.empty(max(n_codes, old[0].numel()), dtype=torch.uint8),
                                      torch.empty(max(M, old[1].numel()), dtype=torch.float32),
                                      torch.empty(max(K, old[2].numel()), dtype=torch.uint8),
                                      torch.empty(max(K, old[2].numel()), dtype=torch.int64))
    return bufs


def quantize_tokens(x2: torch.Tensor, threshold: float, code_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (M, K) int8 / uint8 (+128) / fp32 integers, fp32 absmax (M,), outlier columns or None) of
    x2 (M, K) fp32/bf16/fp16 with unit stride along K: LLM.int8()'s per-token quantization in one native
    pass pair, bit-identical to `kernels.int8.quantize_activations`."""
    if code_dtype not in _CODE_KINDS:
        raise ValueError(f"native quantize_tokens: codes {code_dtype}: expected int8, uint8 or fp32")
    codes = torch.empty(*x2.shape, dtype=code_dtype)
    absmax, cols = _quant_tokens(x2, threshold, codes, _CODE_KINDS[code_dtype], "quantize_tokens")
    return codes, absmax, cols


def fake_quantize_tokens(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8()'s per-token fake quantization of x2 (M, K) fp32/bf16/fp16 with unit column stride, in x2's dtype:
    codes * (absmax / 127) per row, the outlier columns (any |x| >= threshold) left as x, in one native pass pair,
    bit-identical to `runtime.activations.fake_quantize_int8_token`."""
    out = torch.empty(*x2.shape, dtype=x2.dtype)
    _quant_tokens(x2, threshold, out, _FAKE_QUANT, "fake_quantize_tokens")
    return out


def finish_tokens(y: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  w_cols: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 GEMMs' epilogue in one pass, in `dtype`: y (M, N) fp32 * (absmax / 127) per row + bias, plus, with
    `outliers` = (x2 (M, K) fp32/bf16/fp16 with unit column stride: the activations, wq_t (K, N) int8: the
    weight's codes transposed, cols (n,) int64: the outlier columns, ws (N,) fp32 row scales),
    x2[:, cols] @ W_hat[:, cols].T with W_hat = codes * ws rounded to `dtype`. `w_cols` (n, N) fp32, contiguous:
    those W_hat rows already built (`kernels.int8.OutlierWeights` caches them while the columns repeat, as
    they do from token to token): then only the products are computed."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native CPU helpers unavailable: {unavailable_reason()}")
    M, N = y.shape
    ok = (y.dtype == absmax.dtype == torch.float32 and y.is_contiguous() and absmax.shape == (M,) and dtype in _KIND
          and (bias is None or (bias.dtype == torch.float32 and bias.shape == (N,) and bias.is_contiguous())))
    args: tuple = (None, 0, 0, None, 0, None, None, None, 0)
    if outliers is not None:
        x2, wq_t, cols, ws = outliers
        ok = ok and (x2.dtype in _KIND and x2.dim() == 2 and x2.shape[0] == M and (x2.shape[1] <= 1 or x2.stride(1) == 1)
                     and wq_t.dtype == torch.int8 and wq_t.dim() == 2 and tuple(wq_t.shape) == (x2.shape[1], N)
                     and cols.dtype == torch.int64 and cols.dim() == 1 and ws.dtype == torch.float32
                     and ws.shape == (N,) and all(t.is_contiguous() for t in (wq_t, cols, ws))
                     and (w_cols is None or (w_cols.dtype == torch.float32 and tuple(w_cols.shape) == (cols.numel(), N)
                                             and w_cols.is_contiguous())))
        if ok:
            args = (x2.data_ptr(), x2.stride(0) if M > 1 else x2.shape[1], _KIND[x2.dtype], wq_t.data_ptr(),
                    wq_t.shape[0], cols.data_ptr(), ws.data_ptr(), None if w_cols is None else w_cols.data_ptr(),
                    cols.numel())
    if not ok:
        raise ValueError("native finish_tokens: expected y fp32 (M, N) contiguous, absmax fp32 (M,), bias fp32 (N,) or "
                         "None, dtype fp32/bf16/fp16, outliers None or (x2 (M, K) fp32/bf16/fp16, wq_t int8 (K, N), cols "
                         f"int64 (n,), ws fp32 (N,)), w_cols None or fp32 (n, N); got y {tuple(y.shape)} {y.dtype}")
    out = torch.empty(M, N, dtype=dtype)
    if lib.hfq_finish_tokens(y.data_ptr(), M, N, absmax.data_ptr(), None if bias is None else bias.data_ptr(), *args,
                             out.data_ptr(), _KIND[dtype], _threads()):
        raise ValueError(f"native finish_tokens: an outlier column index is outside [0, {args[4]})")
    return out
