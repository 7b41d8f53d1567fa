"""Kernels computing `x @ W_hat.T + b` for a `QuantLinear`, and the dispatcher choosing among them.

`reference` (dequantize + `F.linear`) is the oracle every other kernel is tested against.
"""

from . import cpu, reference, triton  # noqa: F401  (register the built-in kernels; Triton's if it imports)
from .dispatch import Kernel, available_kernels, linear, prefer_kernel, register_kernel, select_kernel, use_kernel

__all__ = ["Kernel", "available_kernels", "linear", "prefer_kernel", "register_kernel", "select_kernel", "use_kernel"]
