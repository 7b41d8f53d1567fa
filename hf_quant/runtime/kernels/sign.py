"""CPU kernels for 1-bit (sign) layers: W_hat = (q - 1/2) * scale, one bit per weight (OneBit, 1-bit RTN).

- `native_sign` (decoding and small batches): y = sum_g scale * (P_g - S_g / 2), P_g the sum of the group's
  activations whose bit is set, S_g the sum of all: masked fp32 adds whose mask is the packed bits themselves
  (AVX-512) or a lane mask looked up per byte (AVX2), no multiply in the inner loop and no dequantized weight
  (`native.sign_gemm`). All sums in fp32 for fp32, bf16 and fp16 activations (widened once per call); the
  weight is used exactly (+-scale/2 in fp32), where the reference rounds it to the activation dtype first
  (exact for scales stored in that dtype, as a model's are). Groups of a multiple of the vector width.
- `native_sign_dequant` (many rows, prefill): the weight expanded to +-scale/2 in the activation dtype in one
  native pass, a cache-sized tile at a time, each tile followed by its GEMM (torch's).
Both are candidates of the measured CPU dispatch (and `native_sign_dequant_bf16`, fp32 activations through the bf16
GEMM, in mode "measure_bf16"); in the fixed order `native_sign` takes up to MAX_ROWS rows and `native_sign_dequant`
the rest (`dequant_matmul`, dequantization in torch, remains the fallback where the native
helpers cannot be built). A kernel computes x @ W_hat.T + `kernel_bias` only: `dispatch.linear` has already
multiplied x by `in_scales`, and OneBit's output LayerNorm and bias come after (`QuantLinear.forward`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

from . import native
from .base import KERNELS, Kernel, register_kernel
from .cpu import Bf16ActivationsKernel, DequantTilesKernel, _scratch

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WORK = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least `numel` elements, reused across calls and layers (a fresh one of a
    few MB per call would pay its page faults every time)."""
    buf = getattr(_WORK, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _WORK.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def _is_sign_layer(layer: Any) -> bool:
    spec = layer.spec
    return spec.bits == 1 and spec.gguf is None and layer.qzeros is None and layer.g_idx is None


def _prepare(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed bits (N, K/8) uint8, scales (N, G) fp32, kernel bias (N,) fp32 or None)."""
    bias = layer.kernel_bias
    return (layer.qweight.contiguous(), layer.scales.float().contiguous(),
            None if bias is None else bias.detach().float().contiguous())


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


class NativeSignKernel(Kernel):
    """1-bit layers by masked fp32 adds (`native.sign_gemm`): the decode path of OneBit / 1-bit models."""

    name = "native_sign"
    priority = 10
    measured = True
    one_bit = True
    # The fixed order's limits (mode "fixed"; the measured dispatch times it at every row class), from 2 Zen 4
    # cores (AVX-512 BF16, no AMX), 4096x11008, weights cold: bf16 activations, native_sign_dequant's bf16 GEMM
    # wins from about 16 rows (M=8: 4.0 ms vs 6.5 ms; M=16: 7.8 vs 6.7); fp32 and fp16 ones, whose GEMMs run at
    # most at the fp32 rate, never did (M=64 fp32: 33 vs 47 ms; M=512: 280 vs 344 ms), so no limit.
    MAX_ROWS = {torch.bfloat16: 12}

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return (device.type == "cpu" and dtype in _CPU_DTYPES and _is_sign_layer(layer)
                and native.sign_group_size_ok(layer.spec.effective_group_size(layer.in_features)))

    def max_rows(self, dtype: torch.dtype) -> int | None:
        return self.MAX_ROWS.get(dtype)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return native.SignGemm(*_prepare(layer))

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        # a decode step calls this once per layer: a contiguous x goes as it is, into an output in its final shape
        gemm = prepared
        if not x.is_contiguous() and (x.dim() != 2 or x.stride(-1) != 1):
            x = x.contiguous()
        out = torch.empty((*x.shape[:-1], layer.out_features), dtype=x.dtype)
        work = _workspace(native.sign_workspace_floats(x.numel() // max(gemm.k, 1), gemm.k, gemm.g))
        return gemm(x, out, work)


class NativeSignDequantKernel(Kernel):
    """1-bit layers for many rows: +-scale/2 expanded natively into the activation dtype (exactly the
    reference's weight when the scales are stored in that dtype), a tile of about TILE_BYTES at a time into a
    reused buffer, each tile's GEMM right after its expansion (the tile is still in the cache): no float copy
    of the whole weight is ever written to memory."""

    name = "native_sign_dequant"
    priority = 5
    measured = True
    one_bit = True
    TILE_BYTES, MIN_TILE_ROWS = 8 << 20, 64

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _CPU_DTYPES and _is_sign_layer(layer) and native.library() is not None

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return _prepare(layer)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        bits, scale, bias = prepared
        x2 = _flatten(x)
        N, K = layer.out_features, layer.in_features
        rows = min(N, max(self.MIN_TILE_ROWS, self.TILE_BYTES // (K * x.element_size()) // 16 * 16))
        buf = _scratch(rows * K, x.dtype).view(rows, K)  # shared with the other dequantizing CPU kernels
        b = None if bias is None else bias.to(x.dtype)
        M = x2.shape[0]
        rows_major = M >= DequantTilesKernel.ROWS_MAJOR_FROM  # else W_tile @ x.T into rows of y transposed
        y = x2.new_empty(M, N) if rows_major else x2.new_empty(N, M)
        for n in range(0, N, rows):
            r = min(rows, N - n)
            w = native.sign_dequantize_into(bits[n:n + r], scale[n:n + r], buf[:r])
            bn = None if b is None else b[n:n + r]
            if rows_major:
                y[:, n:n + r] = F.linear(x2, w, bn)
            elif bn is None:
                torch.mm(w, x2.t(), out=y[n:n + r])
            else:  # the bias inside the GEMM: one rounding of the output
                torch.addmm(bn.unsqueeze(1), w, x2.t(), out=y[n:n + r])
        if not rows_major:
            y = y.t().contiguous()
        return y.reshape(*x.shape[:-1], N)


register_kernel(NativeSignKernel())
register_kernel(NativeSignDequantKernel())
# fp32 activations through the bf16 GEMM (mode "measure_bf16" only: results move by bf16 rounding); native_sign
# sums in fp32 for every dtype and has no such variant
_bf16 = Bf16ActivationsKernel(KERNELS.get("native_sign_dequant"))
_bf16.one_bit = True
register_kernel(_bf16)
