"""GPU kernels in Triton (DESIGN.md step 7). Registered only when Triton imports.

On a machine without CUDA, `TRITON_INTERPRET=1` runs the same kernels on CPU tensors (slowly), which
is how the test suite checks them against the reference there.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - Triton is optional
    AVAILABLE = False
else:
    AVAILABLE = True
    from . import qgemm  # noqa: F401  (registers "triton_gemv", "triton_splitk", "triton_dequant")
    from . import int8  # noqa: F401  (registers "cuda_int8_token")
