"""GPU kernels in Triton (DESIGN.md step 7). Registered only where Triton 3.5 or later imports (`UNAVAILABLE_REASON`
says why not).

On a machine without CUDA, `TRITON_INTERPRET=1` runs the same kernels on CPU tensors (slowly), which
is how the test suite checks them against the reference there.
"""

from __future__ import annotations

MIN_VERSION = "3.5"  # `triton.constexpr_function` (the GEMV's compile-time scales); torch 2.9's Triton

try:
    import triton
except ImportError:  # pragma: no cover - Triton is optional
    triton = None

if triton is None:
    UNAVAILABLE_REASON: str | None = "Triton is not installed"
elif not hasattr(triton, "constexpr_function"):  # Triton 3.2-3.4 (torch 2.6-2.8 ship them)
    UNAVAILABLE_REASON = (f"Triton {triton.__version__} is older than {MIN_VERSION} (the kernels use "
                          f"triton.constexpr_function): pip install -U 'triton>={MIN_VERSION}'")
else:
    UNAVAILABLE_REASON = None
AVAILABLE = UNAVAILABLE_REASON is None  # why not: UNAVAILABLE_REASON
if AVAILABLE:
    from . import qgemm  # noqa: F401  (registers "triton_gemv", "triton_splitk", "triton_dequant")
    from . import int8  # noqa: F401  (registers "cuda_int8_token")
elif triton is not None:  # too old: importing hf_quant still works; CUDA layers use the torch paths
    import logging

    import torch

    logging.getLogger(__name__).log(logging.WARNING if torch.cuda.is_available() else logging.DEBUG,
                                    "hf_quant: Triton kernels off (%s); CUDA layers run the torch paths "
                                    "(dequantize + matmul)", UNAVAILABLE_REASON)
