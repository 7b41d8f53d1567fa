"""Weight-only quantized matmuls in Triton on the block layout of `layout.py`: y = x @ W_hat.T + b.

Three kernels, one per row class (dispatch table in `table.py`):

- `triton_gemv` (decode, few rows): each program streams a BLOCK_N x BW tile of words per block over
  a short K range. Code j of the tile becomes an fp32 *denormal* q * 2**(pos - 149) with one AND
  (an immediate mask) and, only for the codes above bit 23, one constant shift; the activations are
  scaled by 2**(E - pos) so that all products share one scale. The products of the 4 words a thread
  loads at once are added by one FMA chain across the codes of a group, the group's scale is applied
  once, and the words reduced once at the end. Weights are loaded evict-first, the activations
  evict-last.
- `triton_splitk` (16-128 rows): the magic-number decode of `layout.py` feeds `tl.dot` on the tensor cores, code j of a
  tile being a BW-deep K slice; the K range is split over the grid so that it fills the SMs.
- `triton_dequant` (prefill): one kernel dequantizes the whole weight into a reused buffer, then
  cuBLAS (`F.linear`).

Split-K without a memset or a cast launch: every program of a split writes its fp32 partial tile to
a workspace and counts itself in on a per-tile counter; the program that arrives last adds the
partials, the bias, and writes y in the activation dtype, then sets the counter back to zero for
the next call.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..base import Kernel, register_kernel
from . import layout as L
from . import table
from .launch import Launcher


@triton.jit
def _code(words, J: tl.constexpr, BITS: tl.constexpr, P: tl.constexpr):
    """fp32 1 + q * 2**(P - 23) for code J of each word: q moved to mantissa bits [P, P + BITS)."""
    if BITS * J > P:
        t = words >> (BITS * J - P)
    elif BITS * J < P:
        t = words << (P - BITS * J)
    else:
        t = words
    return ((t & (((1 << BITS) - 1) << P)) | 0x3F800000).to(tl.float32, bitcast=True)


GEMV_E = 80  # the activations' exponent offset in the GEMV (see _gemv_kernel)


@triton.constexpr_function
def _denormal_position(J, BITS, P):
    """Where code J lies in `_denormal`: where the word has it, if below bit 23, else at P."""
    return BITS * J if BITS * J + BITS <= 23 else P


@triton.constexpr_function
def _x_scale(J, BITS, P):
    """2**(E - position of code J): the activations' factor that puts every code's products at one scale."""
    return float(2.0 ** (GEMV_E - _denormal_position(J, BITS, P)))


@triton.constexpr_function
def _acc_scale(P):
    """What turns SA * sum(q x 2**(E - 149)) into scale * sum(q x): 2**(149 - E) / 2**(23 - P)."""
    return float(2.0 ** (126 - GEMV_E + P))


@triton.jit
def _denormal(words, J: tl.constexpr, BITS: tl.constexpr, P: tl.constexpr):
    """fp32 q * 2**(pos - 149) for code J of each word (a denormal, exact): the code at bit
    pos = `_denormal_position`, every other bit cleared. Codes that already lie below bit 23 need
    no shift, and the AND takes one immediate."""
    POS: tl.constexpr = _denormal_position(J, BITS, P)
    if BITS * J > POS:
        t = words >> (BITS * J - POS)
    else:
        t = words
    return (t & (((1 << BITS) - 1) << POS)).to(tl.float32, bitcast=True)


@triton.jit
def _group_scales(sa_ptr, sb_ptr, g, Np, offs_n):
    """SA and SB of group `g` for the outputs `offs_n`, as (BLOCK_N, 1) columns."""
    return tl.load(sa_ptr + g * Np + offs_n)[:, None], tl.load(sb_ptr + g * Np + offs_n)[:, None]


@triton.jit
def _finish(out, offs_m, offs_n, M, N, Np, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, tile,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Write the fp32 tile `out` (BLOCK_M, BLOCK_N) to y, through the split-K workspace if SPLIT > 1."""
    m_ok = offs_m < M
    y_mask = m_ok[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        ws = ws_ptr + offs_m[:, None] * Np + offs_n[None, :]
        tl.store(ws + tl.program_id(1) * M * Np, out, mask=m_ok[:, None])
        tl.debug_barrier()  # every thread's partial is written before the program counts itself in
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last program of this tile: add up, write, reset the counter
            total = tl.zeros(out.shape, dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(ws + s * M * Np, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _quads(t):
    """(.., BW) -> four (.., BW // 4) tensors: each 4 adjacent elements (which lie inside one thread)
    apart, without moving data between threads."""
    t0, t1 = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 4, 2, 2)))
    t00, t01 = tl.split(t0)
    t10, t11 = tl.split(t1)
    return t00, t01, t10, t11


@triton.jit
def _fma4(part, v, x, FIRST: tl.constexpr):
    """part (.., BW // 4) + v * x (.., BW) summed over each 4 adjacent words, which lie inside one
    thread: one FMA chain."""
    v00, v01, v10, v11 = _quads(v)
    x00, x01, x10, x11 = _quads(x)
    if FIRST:
        part = v00 * x00
    else:
        part += v00 * x00
    part += v01 * x01
    part += v10 * x10
    part += v11 * x11
    return part


@triton.jit
def _gemv_block(acc, b, w_ptrs, x_ptrs, sa_ptrs, Np, m_ok, k_left, offs_w, BITS: tl.constexpr, PER: tl.constexpr,
                BW: tl.constexpr, GS: tl.constexpr, P: tl.constexpr, MASK_K: tl.constexpr):
    """acc + SA * sum(q x 2**(E - 149)) over block b; MASK_K: the block runs past K
    (k_left = K - b * KB). The products of the 4 adjacent words that one thread loads at once are
    added by one FMA chain, across the codes of a group, before the group's scale is applied."""
    KB: tl.constexpr = PER * BW
    words = tl.load(w_ptrs + b * BW, eviction_policy="evict_first")
    # a block lies in one group or holds whole groups: the first group's scales, then constant steps
    sa_block = sa_ptrs + (b * KB // GS) * Np
    part = tl.zeros(acc.shape, dtype=tl.float32)
    for j in tl.static_range(PER):
        k0 = b * KB + j * BW
        mask = m_ok
        if MASK_K:
            mask = mask & (j * BW + offs_w < k_left)
        xj = tl.load(x_ptrs + k0, mask=mask, other=0.0, eviction_policy="evict_last")
        # x * 2**(E - pos): every product q * x * 2**(E - 149), whatever the code's position
        xs = xj.to(tl.float32) * _x_scale(j, BITS, P)
        part = _fma4(part, _denormal(words, j, BITS, P), xs, j == 0 or (j * BW) % GS == 0)
        if ((j + 1) * BW) % GS == 0 or j == PER - 1:  # the last slice of a group in this block
            acc += part * tl.load(sa_block + (j * BW // GS) * Np)
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, sa_ptr, sb_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                 M, N, K, Np, KW, n_blocks, blocks_per_split, stride_xm, stride_ym,
                 BITS: tl.constexpr, PER: tl.constexpr, BW: tl.constexpr, GS: tl.constexpr, P: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    """y = sum over groups of scale * sum(q x) - scale * zero * sum(x).

    The main loop computes the first term. Code q of a word becomes the fp32 denormal
    q * 2**(pos - 149), exact, with one AND and, for codes above bit 23, one shift (`_denormal`); the
    activations, multiplied by 2**(E - pos), put every product at q * x * 2**(E - 149). FFMA takes
    denormal operands at full rate and no flush-to-zero is used. Products below fp32's normal range
    (|x| < 2**(23 - E)) lose precision and |x| >= 2**(127 - E) overflows: E = 80 keeps both far from
    activations' values. Per group and thread one FMA chain adds the products of its 4 adjacent words
    over the group's codes; SA (= scale * 2**(23 - P)) is applied once, and 2**(126 - E + P) once
    at the end. Every tensor in the loop is 3D (rows, outputs, words) from its load on, split into
    the 4 words of a thread in registers (`_quads`), so that no layout conversion is needed. The
    main loop runs the blocks that lie inside K without masks; a block that runs past K (only the
    last) follows with them. A second, short loop over the groups subtracts scale * zero * sum(x),
    scale * zero being SB - SA."""
    KB: tl.constexpr = PER * BW
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # the words' offsets, written so that the compiler sees runs of only 4 contiguous elements: the
    # fp16 activations are then loaded 4 to a thread like the int32 words, in the same layout
    w = tl.arange(0, BW)
    offs_w = (w // 4 * 4 + w % 4)[None, None, :]
    offs_m = tl.arange(0, BLOCK_M)[:, None, None]
    m_ok = offs_m < M
    n3 = offs_n[None, :, None]
    w_ptrs = w_ptr + n3 * KW + offs_w  # (1, BLOCK_N, BW)
    # x as a full (BLOCK_M, BLOCK_N, BW) tile whose rows repeat: its layout is the words', so each
    # thread loads (from L1) just the activations of its own words
    x_ptrs = x_ptr + offs_m * stride_xm + offs_w + n3 * 0
    # SA pointers in the layout of the partial sums, (1, BLOCK_N, BW // 4): no scale goes through a
    # layout conversion
    sa_ptrs = _quads(sa_ptr + n3 + offs_w * 0)[0]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BW // 4), dtype=tl.float32)
    b0 = tl.program_id(1) * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, n_blocks)
    b_full = b1 if EVEN_K else tl.minimum(b1, K // KB)  # blocks wholly inside K
    for b in range(b0, b_full):
        acc = _gemv_block(acc, b, w_ptrs, x_ptrs, sa_ptrs, Np, m_ok, K, offs_w, BITS, PER, BW, GS, P, False)
    if not EVEN_K:
        if b_full < b1:
            acc = _gemv_block(acc, b_full, w_ptrs, x_ptrs, sa_ptrs, Np, m_ok, K - b_full * KB, offs_w, BITS, PER,
                              BW, GS, P, True)
    out = tl.sum(acc, axis=2) * _acc_scale(P)  # (BLOCK_M, BLOCK_N)
    # - scale * zero * sum(x) per group: x read once more per block (from L2), a few instructions per
    # group; scale * zero = SB - SA
    rows = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BW)
    for b in range(b0, b1):
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j in tl.static_range(PER):
            k = b * KB + j * BW + offs_k
            xsum += tl.sum(tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                                   mask=(rows < M)[:, None] & (k < K)[None, :], other=0.0).to(tl.float32), axis=1)
            if ((j + 1) * BW) % GS == 0 or j == PER - 1:
                g = ((b * KB + j * BW) // GS) * Np + offs_n
                out -= xsum[:, None] * (tl.load(sb_ptr + g) - tl.load(sa_ptr + g))[None, :]
                xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    _finish(out, rows, offs_n, M, N, Np, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, pid_n, HAS_BIAS, SPLIT)


@triton.jit
def _splitk_block(acc, b, w_ptrs, x_ptrs, sa_ptr, sb_ptr, offs_n, Np, m_ok, k_left, BITS: tl.constexpr,
                  PER: tl.constexpr, BW: tl.constexpr, GS: tl.constexpr, P: tl.constexpr, MASK_K: tl.constexpr,
                  DOT_FP32: tl.constexpr):
    """acc + x @ W_hat.T over block b; MASK_K: the block runs past K (k_left = K - b * KB)."""
    KB: tl.constexpr = PER * BW
    words = tl.load(w_ptrs + b * BW, eviction_policy="evict_first")  # (BLOCK_N, BW)
    sa, sb = _group_scales(sa_ptr, sb_ptr, b * KB // GS, Np, offs_n)  # the scales, once per group
    for j in tl.static_range(PER):
        k0 = b * KB + j * BW
        if j > 0 and (j * BW) % GS == 0:  # a block of several groups: the next group starts
            sa, sb = _group_scales(sa_ptr, sb_ptr, k0 // GS, Np, offs_n)
        mask = m_ok[:, None]
        if MASK_K:
            mask = mask & (j * BW + tl.arange(0, BW) < k_left)[None, :]
        xj = tl.load(x_ptrs + k0, mask=mask, other=0.0, eviction_policy="evict_last")
        w = (_code(words, j, BITS, P) * sa - sb).to(xj.dtype)  # W_hat slice (BLOCK_N, BW), rounded as the reference
        if DOT_FP32:  # Triton's interpreter gets bf16 tl.dot wrong: the same products, exact in fp32
            acc = tl.dot(xj.to(tl.float32), tl.trans(w).to(tl.float32), acc)
        else:
            acc = tl.dot(xj, tl.trans(w), acc)
    return acc


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, sa_ptr, sb_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, Np, KW, n_blocks, blocks_per_split, stride_xm, stride_ym,
                   BITS: tl.constexpr, PER: tl.constexpr, BW: tl.constexpr, GS: tl.constexpr, P: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr = False):
    """Blocks wholly inside K without masks, then the one that runs past K (if any) with them."""
    KB: tl.constexpr = PER * BW
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BW)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None] * KW + offs_w[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_w[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b0 = tl.program_id(1) * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, n_blocks)
    b_full = b1 if EVEN_K else tl.minimum(b1, K // KB)
    for b in range(b0, b_full):
        acc = _splitk_block(acc, b, w_ptrs, x_ptrs, sa_ptr, sb_ptr, offs_n, Np, m_ok, K, BITS, PER, BW, GS, P, False,
                            DOT_FP32)
    if not EVEN_K:
        if b_full < b1:
            acc = _splitk_block(acc, b_full, w_ptrs, x_ptrs, sa_ptr, sb_ptr, offs_n, Np, m_ok, K - b_full * KB, BITS,
                                PER, BW, GS, P, True, DOT_FP32)
    _finish(acc, offs_m, offs_n, M, N, Np, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, pid_n, HAS_BIAS, SPLIT)


@triton.jit
def _dequant_kernel(w_ptr, sa_ptr, sb_ptr, out_ptr, N, K, Np, KW,
                    BITS: tl.constexpr, PER: tl.constexpr, BW: tl.constexpr, GS: tl.constexpr, P: tl.constexpr,
                    BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    """W_hat (N, K), K in the layer's (group-sorted) channel order, into `out_ptr` (row stride K)."""
    KB: tl.constexpr = PER * BW
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BW)
    b = tl.program_id(1)
    n_ok = (offs_n < N)[:, None]
    words = tl.load(w_ptr + offs_n[:, None] * KW + b * BW + offs_w[None, :], eviction_policy="evict_first")
    sa, sb = _group_scales(sa_ptr, sb_ptr, b * KB // GS, Np, offs_n)
    for j in tl.static_range(PER):
        k0 = b * KB + j * BW
        if j > 0 and (j * BW) % GS == 0:
            sa, sb = _group_scales(sa_ptr, sb_ptr, k0 // GS, Np, offs_n)
        w = (_code(words, j, BITS, P) * sa - sb).to(out_ptr.dtype.element_ty)
        ptrs = out_ptr + offs_n[:, None] * K + k0 + offs_w[None, :]
        if EVEN_K:
            tl.store(ptrs, w, mask=n_ok)
        else:
            tl.store(ptrs, w, mask=n_ok & (k0 + offs_w < K)[None, :])


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GEMV, _SPLITK, _DEQUANT = Launcher(_gemv_kernel), Launcher(_splitk_kernel), Launcher(_dequant_kernel)


def _rows(blocks: L.Blocks, x: torch.Tensor) -> torch.Tensor:
    """x as contiguous rows (M, K) in the layout's channel order."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2.index_select(-1, blocks.perm) if blocks.perm is not None else x2.contiguous()


@lru_cache(maxsize=None)
def _layout_args(geo: L.Geometry) -> dict:
    """The constexprs every kernel takes from the layout."""
    return dict(BITS=geo.bits, PER=geo.per, BW=geo.bw, GS=geo.gs, P=L.magic_position(geo.bits),
                EVEN_K=geo.K % geo.kb == 0)


@lru_cache(maxsize=None)
def launch_options(cfg: table.Launch) -> dict:
    """Compiler options of a launch beyond warps and stages (none in the interpreter)."""
    return {} if cfg.maxnreg is None or _INTERPRET else {"maxnreg": cfg.maxnreg}


def launch_matmul(which: str, blocks: L.Blocks, x2: torch.Tensor, bias: torch.Tensor | None,
                  cfg: table.Launch) -> torch.Tensor:
    """y (M, N) = x2 @ W_hat.T + bias with kernel `which` ("gemv" or "splitk") and launch config `cfg`."""
    geo = blocks.geo
    M, N, Np = x2.shape[0], geo.N, blocks.padded_rows
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    n_tiles = triton.cdiv(N, cfg.block_n)
    per_split, split = table.split_blocks(geo.n_blocks, cfg.split)
    ws = torch.empty(split, M, Np, dtype=torch.float32, device=x2.device) if split > 1 else y
    extra = {}
    if which == "splitk" and x2.dtype == torch.bfloat16 and _INTERPRET:
        extra["DOT_FP32"] = True
    launcher = _GEMV if which == "gemv" else _SPLITK
    launcher(
        (n_tiles, split), x2, blocks.words, blocks.sa, blocks.sb, y if bias is None else bias, y, ws, blocks.counters,
        M, N, geo.K, Np, blocks.words.shape[1], geo.n_blocks, per_split, x2.stride(0), y.stride(0), out=5,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(cfg), **_layout_args(geo), **extra)
    return y


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of `numel` elements reused by every layer on (device, dtype): one dequantized weight
    at a time (the calls on one stream are ordered). Grows to the largest layer, never shrinks."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def dequantize_blocks(blocks: L.Blocks, dtype: torch.dtype, out: torch.Tensor | None = None,
                      block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """W_hat (N, K) in the layout's channel order, written into `out` (or a new tensor)."""
    N, K = blocks.geo.N, blocks.geo.K
    out = torch.empty(N * K, dtype=dtype, device=blocks.words.device) if out is None else out
    grid = (triton.cdiv(N, block_n), blocks.geo.n_blocks)
    _DEQUANT(grid, blocks.words, blocks.sa, blocks.sb, out, N, K, blocks.padded_rows, blocks.words.shape[1], out=3,
             BLOCK_N=block_n, num_warps=num_warps, **_layout_args(blocks.geo))
    return out.view(N, K)


class _TritonBlocks(Kernel):
    """Shared by the three kernels: CUDA, fp16/bf16, the block layout (built once, shared)."""

    layout = "triton_blocks"
    priority = 20  # above dequant_matmul on CUDA; which of the three runs is the table's choice
    one_bit = True  # 1-bit codes are one more width of the layout (zero 1/2 goes into SB like any zero)

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and L.fits(layer)

    def row_cuts(self, dtype: torch.dtype) -> tuple[int, ...]:
        return table.ROW_CUTS

    def chosen(self, layer: Any, rows: int) -> bool:
        return table.kernel_for(rows, layer.spec.bits) == self.name

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return L.build(layer, device)

    def bias(self, layer: Any, dtype: torch.dtype) -> torch.Tensor | None:
        bias = layer.kernel_bias  # none for a layer that normalises its product first (OneBit)
        return None if bias is None else bias.to(dtype)


class _TritonMatmul(_TritonBlocks):
    """A matmul kernel on the layout: `launch_matmul(which, ...)` with the table's launch for the rows."""

    which = ""
    limit = 0

    def __init__(self) -> None:
        self._launches: dict[tuple, table.Launch] = {}

    def max_rows(self, dtype: torch.dtype) -> int | None:
        return self.limit

    def launch(self, M: int, geo: L.Geometry, sms: int) -> table.Launch:
        raise NotImplementedError

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        x2 = _rows(prepared, x)
        key = (x2.shape[0], prepared.geo, table.sm_count(x.device))
        cfg = self._launches.get(key)
        if cfg is None:  # a pure function of the key: computed once (host time is what decoding pays)
            cfg = self._launches[key] = self.launch(*key)
        return launch_matmul(self.which, prepared, x2, self.bias(layer, x.dtype), cfg).reshape(*x.shape[:-1], layer.out_features)


class TritonGemv(_TritonMatmul):
    name, which, limit = "triton_gemv", "gemv", table.GEMV_MAX_ROWS
    launch = staticmethod(table.gemv_launch)


class TritonSplitK(_TritonMatmul):
    name, which, limit = "triton_splitk", "splitk", table.SPLITK_MAX_ROWS
    launch = staticmethod(table.splitk_launch)


class TritonDequant(_TritonBlocks):
    """Any number of rows: dequantize into the shared scratch buffer, then cuBLAS."""

    name = "triton_dequant"

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        x2 = _rows(prepared, x)
        W = dequantize_blocks(prepared, x.dtype, scratch(prepared.geo.N * prepared.geo.K, x.device, x.dtype))
        return F.linear(x2, W, self.bias(layer, x.dtype)).reshape(*x.shape[:-1], layer.out_features)


GEMV, SPLITK, DEQUANT = TritonGemv(), TritonSplitK(), TritonDequant()
for _kernel in (GEMV, SPLITK, DEQUANT):
    register_kernel(_kernel)
