"""Kernels computing `x @ W_hat.T + b` for a `QuantLinear`, registered per scheme, and their selection.

`reference` (dequantize + `F.linear`) is the oracle every other kernel is tested against.
Importing this package registers the built-in kernels (Triton's where Triton imports).
"""

from .base import (Kernel, available_kernels, prefer_kernel, register_kernel, row_class, rows_of, select_kernel,
                   use_kernel)
from . import cpu, reference, triton  # noqa: E402,F401  (register the built-in kernels)
from . import int8  # noqa: E402,F401  (the int8_token (LLM.int8 / W8A8) kernels)
from . import sign  # noqa: E402,F401  (1-bit layers on the CPU)
from .cpu_measure import cpu_dispatch, get_cpu_dispatch  # noqa: E402

__all__ = ["Kernel", "available_kernels", "cpu_dispatch", "get_cpu_dispatch", "prefer_kernel", "register_kernel",
           "row_class", "rows_of", "select_kernel", "use_kernel"]
