"""Weight-only quantized GEMM in Triton: y = x @ W_hat.T + b, dequantizing W tile by tile.

Load-time layout (built by `prepare`, never saved): the codes of each output channel are repacked
along K into int32 words of PER = 32 // bits codes, transposed to (ceil(K / PER), N) so that a
(BLOCK_K, BLOCK_N) tile of codes comes from BLOCK_K / PER rows of words; scales and zero points are
transposed to (n_groups, N). Act-order layers (g_idx) have their channels sorted by group once, and
the activations gathered the same way on each call, so groups are contiguous inside the kernel.

Two kernels share that layout: `triton_qgemm`, a tensor-core path (`tl.dot` on dequantized tiles),
and `triton_gemv`, a split-K decode path for a few rows. Both are correctness-first; tuning and
dispatch by M come with the GPU benchmarks of issue 4.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ....core import codes_by_group, zero_points
from ..base import Kernel, register_kernel


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k_ok, n_ok, N, BITS: tl.constexpr, PER: tl.constexpr,
                  GS: tl.constexpr):
    """fp32 W_hat^T tile (len(offs_k), len(offs_n)) from the repacked words, scales and zeros."""
    kn_ok = k_ok[:, None] & n_ok[None, :]
    words = tl.load(w_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=kn_ok, other=0)
    q = (words >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
    g = offs_k // GS
    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=kn_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=kn_ok, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_ym, K: tl.constexpr,
                  BITS: tl.constexpr, PER: tl.constexpr, GS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        # W_hat^T tile (BLOCK_K, BLOCK_N), rounded to the activation dtype as the reference rounds it
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k_ok, n_ok, N, BITS, PER, GS).to(x.dtype)
        acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, stride_xm, K: tl.constexpr,
                  BITS: tl.constexpr, PER: tl.constexpr, GS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode path (few rows): each program dequantizes a (BLOCK_K, BLOCK_N) weight tile once and
    multiplies every row with it on CUDA cores; K is split over the grid's second axis and the
    partial sums are added atomically into the fp32 output `y_ptr` (M, N)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = pid_k * K_PER_SPLIT + kk + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k_ok, n_ok, N, BITS, PER, GS)
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as the reference rounds it
        for m in tl.static_range(BLOCK_M):
            row_ok = (offs_k * 0 + m) < M  # as a tensor: some Triton interpreters refuse scalar masks
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_ok & row_ok, other=0.0).to(tl.float32)
            part = tl.sum(x[:, None] * w, axis=0)
            acc += tl.where(rows[:, None] == m, part[None, :], 0.0)
    tl.atomic_add(y_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=(rows[:, None] < M) & n_ok[None, :])


def repack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) -> int32 words (ceil(K / PER), N), PER = 32 // bits codes per word, low bits first."""
    per = 32 // bits
    N, K = codes.shape
    Kp = -(-K // per) * per
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, Kp - K)).reshape(N, Kp // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous()


def _operands(prepared: Any, x: torch.Tensor) -> tuple:
    """(words, scales, zeros, x as contiguous rows in the kernel's channel order)."""
    words, scales, zeros, perm = prepared
    x2 = x.reshape(-1, x.shape[-1])
    return words, scales, zeros, x2.index_select(-1, perm) if perm is not None else x2.contiguous()


def _block_m(M: int) -> int:
    return 16 if M <= 16 else 32 if M <= 32 else 64


class TritonQGemm(Kernel):
    name = "triton_qgemm"
    # Not chosen automatically until it has been compiled and measured on a GPU (issue 4); force it
    # with `kernels.use_kernel("triton_qgemm")`. Checked against the reference in Triton's interpreter.
    priority = -1

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        spec = layer.spec
        codes, perm = codes_by_group(layer.qweight, spec, layer.in_features, layer.g_idx)
        words = repack(codes, spec.bits)
        scales = layer.scales.t().contiguous().to(dtype)
        zeros = zero_points(layer.qzeros, spec, layer.scales).t().contiguous().to(dtype)  # small ints: exact
        return words, scales, zeros, perm

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        words, scales, zeros, x2 = _operands(prepared, x)
        M, K = x2.shape
        N = layer.out_features
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else y  # any pointer when HAS_BIAS is False
        bm, bn, bk = _block_m(M), 64, 64
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _qgemm_kernel[grid](x2, words, scales, zeros, bias, y, M, N, x2.stride(0), y.stride(0), K=K,
                            BITS=layer.spec.bits, PER=32 // layer.spec.bits,
                            GS=layer.spec.effective_group_size(K), HAS_BIAS=layer.bias is not None,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return y.reshape(*x.shape[:-1], N)


class TritonQGemv(TritonQGemm):
    """Few rows (decode): `_qgemv_kernel`, split-K with fp32 atomics. Same load-time layout."""

    name = "triton_gemv"
    priority = -1  # as triton_qgemm: forced only, until measured on a GPU
    MAX_ROWS = 8

    def max_rows(self, dtype: torch.dtype) -> int | None:
        return self.MAX_ROWS

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        words, scales, zeros, x2 = _operands(prepared, x)
        M, K = x2.shape
        N = layer.out_features
        block_n, block_k = 64, 64
        split = max(1, min(K // (4 * block_k), 8))  # more programs for small N, a few K chunks each
        k_per_split = -(-K // (split * block_k)) * block_k
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(N, block_n), triton.cdiv(K, k_per_split))
        _qgemv_kernel[grid](x2, words, scales, zeros, y, M, N, x2.stride(0), K=K, BITS=layer.spec.bits,
                            PER=32 // layer.spec.bits, GS=layer.spec.effective_group_size(K),
                            K_PER_SPLIT=k_per_split, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n,
                            BLOCK_K=block_k)
        if layer.bias is not None:
            y += layer.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], N)


register_kernel(TritonQGemm())
register_kernel(TritonQGemv())
