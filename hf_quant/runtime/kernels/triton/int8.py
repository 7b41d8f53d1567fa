"""CUDA kernel of the `int8_token` scheme (LLM.int8(), dynamic W8A8): Triton per-token quantization,
`torch._int_mm` (int8 x int8 -> int32 on cuBLASLt), and a Triton epilogue.

- `_quant_kernel`: one program per row: absmax over the row in fp32 with the outlier *elements*
  (|x| >= threshold) left out, then codes round-half-even(x * (127 / absmax)) (127 / absmax computed as torch does it,
  127 * correctly rounded 1 / absmax; rounding by libdevice's rint, or the
  1.5 * 2**23 trick in the interpreter), the outlier columns' codes zero:
  bit-identical to `activations.quantize_rows`.
- `torch._int_mm` needs more than 16 rows and multiples of 8: the codes are written into a
  zero-padded (>= 32, multiple of 8) row buffer, the padding rows zeroed by the same kernel (no memset); the weight's rows are padded to a multiple of 8
  once at prepare.
- `_colmask_kernel`: the outlier columns as an int8 mask over K (any |x| >= threshold in the column).
- `_epilogue_kernel`: y = acc * w_scale[n] * absmax[m] / 127 (+ the outlier product, + bias), written in
  the activation dtype. The outlier product x[:, cols] @ W_hat[:, cols].T is computed in the same
  program, over the outlier columns only: `_compact_kernel` (one program) lists the mask's columns in
  ascending order with their count, and the epilogue loops over that count (read on the GPU) in blocks
  of 32, gathering x's columns and W_hat's columns (int8 codes times row scales, rounded to the
  activation dtype as the reference rounds them), fp32 accumulation, the sum rounded to the
  activation dtype as the reference's product is. (A first version walked all of K, skipping blocks
  without an outlier: at M = 4096 that walk cost more than the int8 GEMM.)

Nothing waits on the GPU: bitsandbytes (and this kernel before) find the outlier columns with
`nonzero`, a host sync per call that made LLM.int8 10-25x slower than bf16 on an H200. On CPU tensors with
TRITON_INTERPRET=1 the same functions run in Triton's interpreter (`_int_mm` has a CPU version),
which is how tests/test_int8_kernels.py checks them against the reference; the kernel itself is
registered for CUDA only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..base import Kernel, register_kernel
from ..cpu import int8_rows
from ..int8 import fits, threshold_of
from .launch import Launcher

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to nearest even


@triton.jit
def _quant_kernel(x_ptr, cols_ptr, codes_ptr, absmax_ptr, M, K, stride_x, stride_c, threshold,
                  HAS_COLS: tl.constexpr, BLOCK_K: tl.constexpr, RINT: tl.constexpr):
    row = tl.program_id(0)  # rows >= M are the padding of the _int_mm operand: all loads masked, codes 0
    live = row < M
    k_live = K * live.to(tl.int32)  # K in a live row, 0 in a padding row
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_ptr + row * stride_x + k, mask=k < k_live, other=0.0).to(tl.float32)
        if HAS_COLS:
            v = tl.where(tl.abs(v) >= threshold, 0.0, v)
        amax = tl.maximum(amax, tl.abs(v))
    a = tl.max(amax, axis=0)
    if live:
        tl.store(absmax_ptr + row, a)
    # 127 * (1 / a), as torch's `127.0 / absmax` (Tensor.__rtruediv__: reciprocal, then multiply)
    inv = tl.where(a > 0, tl.math.div_rn(1.0, tl.where(a > 0, a, 1.0)) * 127.0, 0.0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_ptr + row * stride_x + k, mask=k < k_live, other=0.0).to(tl.float32)
        if HAS_COLS:
            v = tl.where(tl.abs(v) >= threshold, 0.0, v)
        q = v * inv
        if RINT:  # compiled: rint, so that no FMA contraction can round the product before the tie-break
            q = libdevice.rint(q)
        else:  # the interpreter (numpy, no contraction): round to nearest even by the magic number
            q = (q + ROUND_MAGIC) - ROUND_MAGIC
        if HAS_COLS:
            out = tl.load(cols_ptr + k, mask=k < K, other=0)
            q = tl.where(out != 0, 0.0, q)
        tl.store(codes_ptr + row * stride_c + k, q.to(tl.int8), mask=k < K)


@triton.jit
def _colmask_kernel(x_ptr, mask_ptr, M, K, stride_x, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    hit = tl.zeros([BLOCK_K], dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        v = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        hit = tl.maximum(hit, tl.max((tl.abs(v) >= threshold).to(tl.int32), axis=0))
    tl.store(mask_ptr + offs_k, hit.to(tl.int8), mask=offs_k < K)


@triton.jit
def _compact_kernel(mask_ptr, order_ptr, count_ptr, K, BLOCK: tl.constexpr):
    """One program: the indices of the mask's nonzero entries in ascending order (order[:count]), and count."""
    offs = tl.arange(0, BLOCK)
    base = tl.zeros([], dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        c = (tl.load(mask_ptr + k, mask=k < K, other=0) != 0).to(tl.int32)
        pos = base + tl.cumsum(c, axis=0) - 1
        tl.store(order_ptr + pos, k, mask=c != 0)
        base += tl.sum(c, axis=0)
    tl.store(count_ptr, base)


@triton.jit
def _epilogue_kernel(acc_ptr, absmax_ptr, ws_ptr, x_ptr, order_ptr, count_ptr, wq_ptr, b_ptr, y_ptr, M, N,
                     stride_acc, stride_x, stride_w, stride_y, HAS_OUTL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    ok = m_ok[:, None] & n_ok[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_acc + offs_n[None, :], mask=ok, other=0).to(tl.float32)
    ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    sx = tl.load(absmax_ptr + offs_m, mask=m_ok, other=0.0) / 127.0
    y = (acc * ws[None, :]) * sx[:, None]
    if HAS_OUTL:  # x[:, cols] @ W_hat[:, cols].T over the outlier columns only (their count read on the GPU)
        out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        n_cols = tl.load(count_ptr)
        for j0 in range(0, n_cols, BLOCK_K):
            valid = j0 + offs_k < n_cols
            k = tl.load(order_ptr + j0 + offs_k, mask=valid, other=0)
            xk = tl.load(x_ptr + offs_m[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & valid[None, :],
                         other=0.0)
            wk = tl.load(wq_ptr + offs_n[None, :] * stride_w + k[:, None], mask=n_ok[None, :] & valid[:, None],
                         other=0).to(tl.float32)
            # W_hat[n, k] rounded to the activation dtype, as the reference; then both in fp32: a 16-bit
            # value is exact in tf32, so the tensor-core product equals the 16-bit one (fp32: IEEE)
            wk = (wk * ws[None, :]).to(xk.dtype).to(tl.float32)
            xk = xk.to(tl.float32)
            if IEEE:
                out += tl.dot(xk, wk, input_precision="ieee")
            else:
                out += tl.dot(xk, wk)
        y += out.to(y_ptr.dtype.element_ty).to(tl.float32)  # the reference's product is in the activation dtype
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


_COLMASK, _COMPACT, _QUANT, _EPILOGUE = (Launcher(k) for k in (_colmask_kernel, _compact_kernel, _quant_kernel,
                                                               _epilogue_kernel))


def padded_rows(M: int) -> int:
    """Rows of the `_int_mm` operand: more than 16 and a multiple of 8."""
    return max(32, (M + 7) // 8 * 8)


def column_mask(x2: torch.Tensor, threshold: float, block_k: int = 128, block_m: int = 16) -> torch.Tensor:
    """int8 (K,): 1 where any |x2[:, k]| >= threshold (`activations.outlier_columns` as a mask), no host sync."""
    M, K = x2.shape
    mask = torch.zeros(K, dtype=torch.int8, device=x2.device)
    if M and K:
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        _COLMASK((triton.cdiv(K, block_k),), x2, mask, M, K, x2.stride(0), float(threshold), out=1,
                 BLOCK_M=block_m, BLOCK_K=block_k)
    return mask


def compact(mask: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 indices of the mask's nonzero entries, ascending, in the first `count` slots; int32 count (1,)),
    on the GPU: no host sync."""
    K = mask.shape[0]
    order = torch.empty(max(K, 1), dtype=torch.int32, device=mask.device)
    count = torch.empty(1, dtype=torch.int32, device=mask.device)
    _COMPACT((1,), mask, order, count, K, out=1, BLOCK=block)
    return order, count


def quantize(x2: torch.Tensor, threshold: float, mask: torch.Tensor | None, rows: int | None = None,
             block_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (rows or M, K), zero-padded below M; fp32 absmax (M,)) of x2 (M, K) per token; `mask`:
    the outlier columns (`column_mask`) or None (no decomposition)."""
    M, K = x2.shape
    x2 = x2.contiguous()
    rows = M if rows is None else rows
    codes = torch.empty(rows, K, dtype=torch.int8, device=x2.device)  # the kernel zeroes the padding rows
    absmax = torch.empty(M, dtype=torch.float32, device=x2.device)
    if rows and K:
        _QUANT((rows,), x2, codes if mask is None else mask, codes, absmax, M, K, x2.stride(0), codes.stride(0),
               float(threshold), out=2, HAS_COLS=mask is not None, BLOCK_K=min(block_k, triton.next_power_of_2(K)),
               RINT=not _INTERPRET)
    return codes, absmax


def epilogue(acc: torch.Tensor, absmax: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, M: int, N: int,
             dtype: torch.dtype, outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             block_m: int = 32, block_n: int = 128, block_k: int = 32) -> torch.Tensor:
    """y (M, N) in `dtype`; `outliers` = (x2 (M, K), column mask (K,), int8 weight codes (N, K)) adds the
    outlier columns' product."""
    y = torch.empty(M, N, dtype=dtype, device=acc.device)
    if outliers is not None:
        x2, mask, wq = outliers
        order, count = compact(mask)
    else:
        x2 = order = count = wq = ws  # unused pointers
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _EPILOGUE(grid, acc, absmax, ws, x2, order, count, wq, ws if bias is None else bias, y, M, N, acc.stride(0),
              x2.stride(0) if outliers is not None else 0, wq.stride(0) if outliers is not None else 0, y.stride(0),
              out=8, HAS_OUTL=outliers is not None, HAS_BIAS=bias is not None, IEEE=dtype == torch.float32,
              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def prepare_weight(layer: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes (Np, K) with rows padded to a multiple of 8, fp32 row scales (N,), int8 codes (N, K))."""
    wq, ws = (t.to(device) for t in int8_rows(layer))
    N = wq.shape[0]
    Np = (N + 7) // 8 * 8
    wp = torch.zeros(Np, wq.shape[1], dtype=torch.int8, device=device)
    wp[:N] = wq
    return wp, ws, wq


def int8_linear(layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
    """y = x @ W_hat.T + bias of an `int8_token` layer, per-token int8 activations (any device Triton runs on).
    Launches only: nothing here waits for the GPU."""
    wp, ws, wq = prepared
    t = threshold_of(layer)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], ws.shape[0]
    mask = column_mask(x2, t) if t > 0 and M else None
    codes, absmax = quantize(x2, t, mask, rows=padded_rows(M))
    acc = torch._int_mm(codes, wp.t())
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return epilogue(acc, absmax, ws, bias, M, N, x.dtype,
                    None if mask is None else (x2, mask, wq)).reshape(*x.shape[:-1], N)


class CudaInt8TokenKernel(Kernel):
    name = "cuda_int8_token"
    priority = 30
    activations = ("int8_token",)

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32) and fits(layer)
                and layer.in_features % 8 == 0)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return prepare_weight(layer, device)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        return int8_linear(layer, x, prepared)


CUDA_INT8 = register_kernel(CudaInt8TokenKernel())
