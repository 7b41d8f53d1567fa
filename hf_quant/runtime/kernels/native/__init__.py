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

import torch

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
    return lib


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
          max(1, torch.get_num_threads())):
        raise MemoryError("native dequantize: out of memory for a row buffer")
    return out
