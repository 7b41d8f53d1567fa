"""CPU fast paths on torch's built-in packed-int matmuls.

int4 (`_weight_int4pack_mm_for_cpu`, tinygemm's layout): w = (q - 8) * scale + zero per group of
32/64/128/256 input channels. Our codes of 2, 3 and 4 bits fit in it exactly, with
tinygemm_zero = (8 - z) * scale. Per-channel layers use the largest such group that divides
in_features, with the scale repeated.
Act-order layers (g_idx) are run with their input channels sorted by group: the codes once at
prepare time, the activations on every call.
int8 (`_weight_int8pack_mm`): per-output-channel symmetric int8; an asymmetric zero adds
(128 - z) * scale * sum(x) to each output.
`dequant_tiles` dequantizes a few hundred output rows at a time, each tile followed by its GEMM.
`<kernel>_bf16` runs fp32 activations through a kernel's bf16 path (cast in, cast back); `<kernel>_fp32` runs
bf16/fp16 activations through a prefill kernel's fp32 path (for CPUs without native bf16 GEMMs).
The last two are chosen only by the measured dispatch (`cpu_measure.py`), the `_bf16` ones only
when the user allows bf16 compute for fp32 models (mode "measure_bf16", or torch's fp32 matmul precision bf16).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from . import native
from ...core import codes_by_group, dequantize_weight, gguf, unpack_codes, zero_points
from .base import Kernel, register_kernel

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Above these many rows, dequantize + F.linear (kernel "dequant_matmul") is faster than the packed
# ops, which are GEMV-oriented and have no fast fp32 path (benchmarks/bench_cpu.py, 2 cores).
MAX_ROWS = {torch.float32: 4, torch.bfloat16: 384, torch.float16: 384}


_INT4_GROUPS = (256, 128, 64, 32)


class _CpuPacked(Kernel):
    priority = 10
    measured = True

    def max_rows(self, dtype: torch.dtype) -> int | None:
        return MAX_ROWS.get(dtype)

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _CPU_DTYPES and self.fits(layer)

    def fits(self, layer: Any) -> bool:
        raise NotImplementedError


def _int4_group_size(layer: Any) -> int | None:
    K = layer.in_features
    if layer.spec.group_size == -1:
        return next((g for g in _INT4_GROUPS if K % g == 0), None)
    return layer.spec.group_size if layer.spec.group_size in _INT4_GROUPS else None


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _finish(layer: Any, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


def _codes_scale_zero(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (N, K), scale, zero (N, n_groups) fp32, channel permutation or None) with
    w = (code - zero) * scale: GGUF layers from their blocks (zero fractional where the type stores a
    min), the others from their buffers (act-order channels sorted by group, as `codes_by_group`)."""
    spec, K = layer.spec, layer.in_features
    if spec.gguf is not None:
        codes, scale, zero = gguf.codes_and_grid(layer.qweight, gguf.block_type(spec.gguf), K)
        return codes, scale, zero, None
    codes, perm = codes_by_group(layer.qweight, spec, K, layer.g_idx)
    scale = layer.scales.float()
    return codes, scale, zero_points(layer.qzeros, spec, scale), perm


def grouped_codes(layer: Any) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The codes per group for the dequantizing kernels: (nibbles, packed (N, G, gs/2 or gs) uint8, scale, zero
    (N, G) fp32, channel permutation or None). Codes of at most 4 bits in groups of even width are split
    nibbles (the low nibbles the first half of each group, the high nibbles the second: a tile unpacks
    into contiguous halves); wider codes (GGUF's 5-8-bit types) one byte each."""
    codes, scale, zero, perm = _codes_scale_zero(layer)  # GGUF: a (fractional) zero per sub-block
    gs = layer.in_features // scale.shape[1]
    q = codes.reshape(layer.out_features, -1, gs)
    nibbles = layer.spec.bits <= 4 and gs % 2 == 0
    packed = q[..., :gs // 2] | (q[..., gs // 2:] << 4) if nibbles else q
    return nibbles, packed.contiguous(), scale, zero, perm


class Int4CpuKernel(_CpuPacked):
    name = "cpu_int4"
    gguf = True  # Q4_0 / Q4_1 / Q4_K (32-wide sub-blocks): w = (q - 8) * scale + (8 - zero) * scale exactly

    def fits(self, layer: Any) -> bool:
        return (
            layer.spec.bits <= 4
            and layer.out_features % 16 == 0  # the op's packing works on tiles of 16 output channels
            and _int4_group_size(layer) is not None
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        K = layer.in_features
        gs = _int4_group_size(layer)
        codes, scale, z, perm = _codes_scale_zero(layer)
        codes = codes.to(torch.int32)
        # Codes of at most 3 bits around an integer zero (2-3-bit symmetric grids, GGUF's ternary TQ types): shifted
        # by 8 - z, so q' - 8 is the signed value itself and the op's zero term is 0. Otherwise (8 - z) * scale,
        # rounded to the activation dtype, would be added to every weight and cancel against (q - 8) * scale:
        # in bf16 an error of about 2^-9 * (8 - z) * scale on each weight, as large as 3% of a ternary product.
        # (Asymmetric 2-3-bit layers would gain too; left unchanged so that the golden checkpoints' bf16 logits,
        # tests/test_golden.py, stay bit-identical on the machine that wrote them.)
        if (layer.spec.bits <= 3 and (layer.spec.sym or layer.spec.gguf is not None) and torch.equal(z, z.round())
                and bool(((z >= 0) & (z <= 8)).all())):
            shift = (8 - z).to(torch.int32).repeat_interleave(K // z.shape[1], dim=1)
            if int((codes + shift).max()) <= 15:
                codes, z = codes + shift, torch.full_like(z, 8.0)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        zero = (8.0 - z) * scale
        repeat = K // gs // scale.shape[1]  # > 1 only for per-channel layers
        scale_zero = torch.stack([scale, zero], dim=-1).repeat_interleave(repeat, dim=1)  # (N, G, 2)
        return packed, gs, scale_zero.transpose(0, 1).contiguous().to(dtype), perm

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        packed, gs, scale_zero, perm = prepared
        x2 = _flatten(x) if perm is None else _flatten(x).index_select(-1, perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, gs, scale_zero)
        return _finish(layer, y, x)


_WIDE_GGUF = ("Q8_0", "Q5_0", "Q5_1", "Q5_K")  # 32-wide sub-blocks, codes of 5 or 8 bits


class Int4x2CpuKernel(_CpuPacked):
    """Codes of 5 to 8 bits as two int4 products: u = 16 h + l, and w = (u - z) s is
    (l - 8) s + zA  plus  (h' - 8) 16 s + zB,  h' = h + shift,  zA + zB = C = (8 + 16 (8 - shift) - z) s.
    The high codes are shifted to sit around the op's fixed offset 8 (5-bit codes: h in {0, 1} -> h' in
    {7, 8}), so every per-weight term stays as small as w itself (the op forms (q - 8) * scale + zero in
    the activation dtype: a term of 128 s would lose w's low bits in bf16). C is split as zB = C rounded
    to that dtype and zA = the remainder, exact to about 2^-18 relative even in bf16 (fractional zeros
    too). For 8-bit groups (32..256 wide) and the GGUF types Q8_0, Q5_0, Q5_1, Q5_K: two
    `_weight_int4pack_mm_for_cpu` calls, 1 byte per weight in all."""

    name = "cpu_int4x2"
    gguf = True

    def fits(self, layer: Any) -> bool:
        spec = layer.spec
        wide = spec.gguf in _WIDE_GGUF if spec.gguf is not None else spec.bits == 8 and spec.group_size != -1
        return (wide and layer.out_features % 16 == 0 and _int4_group_size(layer) is not None
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        gs = _int4_group_size(layer)
        codes, scale, z, perm = _codes_scale_zero(layer)
        shift = 8 - (1 << (layer.spec.bits - 4)) // 2  # 5 bits: 7, 8 bits: 0 (GGUF specs carry their type's bits)
        C = (8.0 + 16 * (8 - shift) - z) * scale
        zB = C.to(dtype).float()
        zA = C - zB
        codes = codes.to(torch.int32)
        layouts = []
        for part, s, zero in ((codes & 15, scale, zA), ((codes >> 4) + shift, 16 * scale, zB)):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(part.contiguous(), 1)
            scale_zero = torch.stack([s, zero], dim=-1)  # (N, G, 2)
            layouts.append((packed, scale_zero.transpose(0, 1).contiguous().to(dtype)))
        return layouts, gs, perm

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        (low, low_sz), (high, high_sz) = prepared[0]
        gs, perm = prepared[1], prepared[2]
        x2 = _flatten(x) if perm is None else _flatten(x).index_select(-1, perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, low, gs, low_sz)
        y += torch.ops.aten._weight_int4pack_mm_for_cpu(x2, high, gs, high_sz)
        return _finish(layer, y, x)


def int8_rows(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (N, K), fp32 row scales (N,)) of a per-row layer: qweight - 128 for 8 bits; for a narrower
    symmetric one the codes minus their zero (BitNet's ternary codes become -1, 0, 1)."""
    spec = layer.spec
    if spec.bits == 8:
        wq = (layer.qweight.to(torch.int16) - 128).to(torch.int8)
    else:
        wq = (unpack_codes(layer.qweight, spec.bits, layer.in_features).to(torch.int16) - int(spec.sym_zero)).to(torch.int8)
    return wq.contiguous(), layer.scales.float()[:, 0].contiguous()


def int8_zero_offset(layer: Any, scale: torch.Tensor) -> torch.Tensor | None:
    """(128 - zero) * scale per output row, fp32 (N,), or None for a symmetric layer: with the codes of
    `int8_rows`, an asymmetric layer's product is theirs plus this times sum(x) per row."""
    return None if layer.qzeros is None else (128.0 - layer.qzeros.float()[:, 0]) * scale


class Int8CpuKernel(_CpuPacked):
    name = "cpu_int8"

    def fits(self, layer: Any) -> bool:
        return (
            layer.spec.bits == 8
            and layer.spec.group_size == -1
            and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        )

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        w, scale = int8_rows(layer)
        return w, scale.to(dtype), int8_zero_offset(layer, scale)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        w, scale, offset = prepared
        x2 = _flatten(x)
        y = torch.ops.aten._weight_int8pack_mm(x2, w, scale)
        if offset is not None:
            y = (y.float() + x2.float().sum(-1, keepdim=True) * offset).to(x.dtype)
        return _finish(layer, y, x)


def tile_gemm(x2: torch.Tensor, N: int, rows_major_from: int) -> Any:
    """gemm(n, W_tile) computes output columns n.. from a tile; gemm(None, None) returns y (M, N)."""
    if x2.shape[0] >= rows_major_from:
        y = x2.new_empty(x2.shape[0], N)

        def rows_major(n, w):
            if w is None:
                return y
            y[:, n:n + w.shape[0]] = torch.nn.functional.linear(x2, w)

        return rows_major
    yt = x2.new_empty(N, x2.shape[0])  # y transposed: each tile's rows are contiguous

    def transposed(n, w):
        if w is None:
            return yt.t().contiguous()
        torch.mm(w, x2.t(), out=yt[n:n + w.shape[0]])

    return transposed


class DequantTilesKernel(Kernel):
    """Dequantize TILE_N output rows at a time into the activation dtype, each tile followed by its
    GEMM: the tile stays in cache, and no float copy of the whole weight is ever built.

    The weight is re-laid at prepare time so that a tile takes few passes over cached memory:
    - 8-bit per channel: int8 codes q - 128; a tile is only converted (exact: small integers), the row
      scales are applied to the output (y * s, plus (128 - z) * s * sum(x) when asymmetric); fp16
      tiles take the scales (an fp16 sum of x times raw codes could overflow);
    - 2-4 bits: one byte per two codes, the low nibbles the first half of each group and the high
      nibbles the second, so a tile unpacks with one AND and one shift into contiguous halves, then is
      converted and takes (q - z) * s per group (act-order layers with their channels sorted by group);
    - 8-bit groups: `dequantize_weight` per tile.
    """

    name = "dequant_tiles"
    measured = True
    gguf = True
    TILE_N = 512
    # From this many rows on, each tile's GEMM is F.linear into a column slice of y (faster for large
    # M); below, W_tile @ x.T into rows of y transposed (faster for small M). benchmarks/bench_cpu.py.
    ROWS_MAJOR_FROM = 256

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _CPU_DTYPES

    def chosen(self, layer: Any, rows: int) -> bool:
        return False  # only by measurement

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        spec, K = layer.spec, layer.in_features
        gs = spec.effective_group_size(K)
        if spec.gguf is None and spec.bits == 8 and spec.group_size == -1:
            w, scale = int8_rows(layer)
            return "rows8", w, scale, int8_zero_offset(layer, scale)
        if spec.gguf is None and not (spec.bits <= 4 and gs % 2 == 0):
            return ("generic",)
        nibbles, packed, scale, zero, perm = grouped_codes(layer)  # GGUF 5-8 bits: one byte per code
        as_col = [v.to(dtype).unsqueeze(-1).contiguous() for v in (scale, zero)]
        return "nibbles" if nibbles else "bytes", packed, *as_col, perm

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        kind = prepared[0]
        if kind == "generic":
            return self._generic(layer, x)
        x2 = _flatten(x)
        if kind in ("nibbles", "bytes") and prepared[-1] is not None:  # act-order: channels sorted by group
            x2 = x2.index_select(-1, prepared[-1])
        N, K, T = layer.out_features, layer.in_features, self.TILE_N
        tile = x2.new_empty(min(T, N), K)
        gemm = self._gemm(x2, N)
        if kind == "rows8":
            _, w, scale, offset = prepared
            if x.dtype == torch.float16:  # sum(x * code) may pass fp16's 65504: scale the tile instead
                rows_scale = scale.to(x.dtype).unsqueeze(-1)
                for n in range(0, N, T):
                    gemm(n, tile[:min(T, N - n)].copy_(w[n:n + T]).mul_(rows_scale[n:n + T]))
                scale = 1.0
            else:
                for n in range(0, N, T):
                    gemm(n, tile[:min(T, N - n)].copy_(w[n:n + T]))
            y = gemm(None, None).float() * scale
            if offset is not None:
                y += x2.float().sum(-1, keepdim=True) * offset
            return _finish(layer, y.to(x.dtype), x)
        _, packed, scale, zero, perm = prepared
        nibbles = kind == "nibbles"
        G, width = packed.shape[1], packed.shape[2] * (2 if nibbles else 1)
        half = width // 2
        codes = torch.empty(min(T, N), G, width, dtype=torch.uint8)
        tile3 = tile.view(-1, G, width)
        for n in range(0, N, T):
            rows = min(T, N - n)
            c, t, p = codes[:rows], tile3[:rows], packed[n:n + T]
            if nibbles:
                torch.bitwise_and(p, 15, out=c[..., :half])
                torch.bitwise_right_shift(p, 4, out=c[..., half:])
            else:
                c = p
            t.copy_(c).sub_(zero[n:n + T]).mul_(scale[n:n + T])
            gemm(n, tile[:rows])
        return _finish(layer, gemm(None, None), x)

    def _gemm(self, x2: torch.Tensor, N: int) -> Any:
        return tile_gemm(x2, N, self.ROWS_MAJOR_FROM)

    def _generic(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        x2 = _flatten(x)
        N, T = layer.out_features, self.TILE_N
        yt = x2.new_empty(N, x2.shape[0])
        for n in range(0, N, T):
            rows = [None if b is None else b[n:n + T] for b in (layer.qweight, layer.scales, layer.qzeros)]
            W = dequantize_weight(*rows, layer.spec, layer.in_features, x.dtype, layer.g_idx)
            torch.mm(W, x2.t(), out=yt[n:n + T])
        return _finish(layer, yt.t().contiguous(), x)


class WrappedKernel(Kernel):
    """`base` run on activations of another dtype (named `<base>_<suffix>`): a measured candidate only, never the
    fixed choice."""

    measured = True
    suffix = ""

    def __init__(self, base: Kernel) -> None:
        self.base, self.name, self.priority = base, f"{base.name}_{self.suffix}", base.priority
        self.activations, self.gguf = base.activations, base.gguf

    def chosen(self, layer: Any, rows: int) -> bool:
        return False


class Bf16ActivationsKernel(WrappedKernel):
    """fp32 activations through `base`'s bf16 path: x cast to bf16, the output cast back to fp32.
    This changes results by bf16 rounding (tests/test_cpu_dispatch.py measures it), so it is a
    candidate only in mode "measure_bf16" or where torch's fp32 matmul precision is bf16
    (`cpu_measure.torch_allows_bf16`), and never chosen otherwise."""

    casts_to_bf16 = True
    suffix = "bf16"

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype == torch.float32 and self.base.accepts(layer, device, torch.bfloat16)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return self.base.prepare(layer, device, torch.bfloat16)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        return self.base.forward(layer, x.to(torch.bfloat16), prepared).to(x.dtype)


class Fp32ActivationsKernel(WrappedKernel):
    """bf16/fp16 activations through `base`'s fp32 path: x widened to fp32 (exact), the fp32 result rounded once to
    the activation dtype. For CPUs without native bf16/fp16 GEMMs (AVX2-only, or oneDNN capped below AVX512-BF16),
    where torch's fp32 GEMM is several times faster than its bf16 one: a bf16 model's prefill then runs at fp32
    speed. The result is closer to the exact product than the reference's bf16 arithmetic (one rounding instead of
    a bf16 weight and bf16 output), so it is a candidate in every measured mode; where bf16 GEMMs are native it
    loses the measurement (its fp32 GEMM does half the work per instruction) and is dropped by the probes."""

    suffix = "fp32"

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype in (torch.bfloat16, torch.float16) and self.base.accepts(layer, device, torch.float32)

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return self.base.prepare(layer, device, torch.float32)

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        return self.base.forward(layer, x.float(), prepared).to(x.dtype)


class _NativeDequant(Kernel):
    """Dequantization in one native pass (kernels/native: (code - zero) * scale in fp32, rounded once,
    so the tile equals `dequantize_weight`'s), then torch's GEMM. Candidates of the measured dispatch
    only, and only where the native helpers could be built."""

    layout = "native_dequant"
    measured = True
    gguf = True

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in _CPU_DTYPES and native.library() is not None

    def chosen(self, layer: Any, rows: int) -> bool:
        return False  # only by measurement

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        nibbles, packed, scale, zero, perm = grouped_codes(layer)
        return nibbles, packed, scale.float().contiguous(), zero.float().contiguous(), perm

    def _tiles(self, layer: Any, x: torch.Tensor, prepared: Any, rows: int):
        """x flattened (act-order channels sorted), and each (n, dequantized rows n..n+rows) tile."""
        nibbles, packed, scale, zero, perm = prepared
        x2 = _flatten(x)
        if perm is not None:
            x2 = x2.index_select(-1, perm)
        N, K = layer.out_features, layer.in_features
        buf = _scratch(min(rows, N) * K, x.dtype).view(min(rows, N), K)

        def tiles():
            for n in range(0, N, rows):
                tile = buf[:min(rows, N - n)]
                yield n, native.dequantize_into(packed[n:n + rows], scale[n:n + rows], zero[n:n + rows], tile, nibbles)

        return x2, tiles()


class NativeTilesKernel(_NativeDequant):
    """TILE_N output rows at a time, each tile's GEMM right after its dequantization (in cache)."""

    name = "native_tiles"
    TILE_N = DequantTilesKernel.TILE_N

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        x2, tiles = self._tiles(layer, x, prepared, self.TILE_N)
        gemm = tile_gemm(x2, layer.out_features, DequantTilesKernel.ROWS_MAJOR_FROM)
        for n, tile in tiles:
            gemm(n, tile)
        return _finish(layer, gemm(None, None), x)


class NativeDequantMatmulKernel(_NativeDequant):
    """The whole weight (or chunks of at most CHUNK_BYTES) dequantized into a reused scratch buffer,
    then one `F.linear` per chunk: for many rows (prefill), where oneDNN wants the big GEMM."""

    name = "native_dequant_matmul"
    CHUNK_BYTES, MIN_CHUNK_ROWS = 64 << 20, 512

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        N, K = layer.out_features, layer.in_features
        rows = max(self.MIN_CHUNK_ROWS, self.CHUNK_BYTES // (K * x.element_size()))
        x2, tiles = self._tiles(layer, x, prepared, rows)
        if rows >= N:  # one chunk: F.linear's output is y itself
            (_, W), = tiles
            return _finish(layer, torch.nn.functional.linear(x2, W), x)
        gemm = tile_gemm(x2, N, rows_major_from=0)  # one F.linear per chunk into y's columns
        for n, tile in tiles:
            gemm(n, tile)
        return _finish(layer, gemm(None, None), x)


class NativeDequantAmxKernel(_NativeDequant):
    """The prefill GEMM of bf16 activations on AMX tiles with the weight dequantized into L2 (`native.dequant_amx_gemm`):
    each thread dequantizes its blocks of 64 output rows, a chunk of K at a time, into panels in AMX's pair layout
    (the same bf16 weight as `native_dequant_matmul`'s, hence the reference's), which every 32 activation rows then
    read as B tiles: exact products, fp32 sums, rounded once to the output dtype. Where `native_dequant_matmul`
    writes the whole dequantized weight to memory and oneDNN reads it back, this one reads only the codes (a quarter
    of the bytes at 4 bits) and dequantizes each once per 512 rows. CPUs with AMX-BF16 where Linux grants the
    tiles; K and the group size multiples of 32 (GGUF sub-blocks of 32 included); act-order layers by the sorted
    channels. A candidate of the measured dispatch only."""

    name = "native_dequant_amx"

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        K = layer.in_features
        gs = layer.spec.effective_group_size(K)
        return (device.type == "cpu" and dtype == torch.bfloat16 and K % 32 == 0 and gs % 32 == 0
                and native.has_codes_amx())

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        nibbles, packed, scale, zero, perm = prepared
        x2 = x.reshape(-1, x.shape[-1])
        if perm is not None:
            x2 = x2.index_select(-1, perm)
        if x2.shape[0] > 1 and (x2.stride(1) != 1 or x2.stride(0) < x2.shape[1]):
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], layer.out_features, dtype=x.dtype)
        native.dequant_amx_gemm(x2, packed, scale, zero, out, nibbles)
        return _finish(layer, out, x)


def zero_point_corr(x2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The native codes kernels' corr (M, N) fp32: the fp32 sums of x2 (M, K) over each group, times offset (G, N)."""
    return torch.mm(x2.float().reshape(x2.shape[0], offset.shape[0], -1).sum(dim=2), offset)


class NativeCodesKernel(Kernel):
    """Codes x activations in one fused native pass (`native.codes_gemm`), for decoding and small batches: no
    dequantized weight is written anywhere. The products of x with the codes times the group's scale are summed
    in fp32, and the correction sum_g scale * (zero + offset) * sum(x over the group) is subtracted. So the weight
    is used unrounded ((q - zero) * scale exactly), where the reference rounds it to the activation dtype first:
    the two differ by that rounding.
    - bf16 compute ("native_int4", "native_int8"; bf16 activations, CPUs with AVX512-BF16): each code q of at
      most 4 bits becomes the bf16 number 128 + q by one OR; a code of 5-8 bits u = 16 h + l becomes two, 128 + h
      and 128 + l, read once and met by the same x (16 (128 + h) + (128 + l) = u + 2176); `vdpbf16ps` dot
      products (exact products, fp32 sums) per group, the scale applied to each group's sum.
    - fp32 compute ("native_int4_f32", "native_int8_f32"; fp32, bf16 or fp16 activations widened to fp32, CPUs
      with AVX-512F or AVX2 + FMA): codes widened to int32, converted and multiplied by the scale, fp32 FMAs. The
      decode path of fp32 models, and of bf16 models on CPUs without native bf16.
    int4: at most 4 bits in groups of 32 or a multiple of 64 channels (fp32: a multiple of 2 vector widths);
    int8: 5-8 bits in groups (or rows) of a multiple of 32 (fp32 with AVX2: 16). GGUF types with such sub-blocks
    (Q4_0 / Q4_1 / Q4_K, Q8_0 / Q5_0 / Q5_1 / Q5_K) included; act-order layers by the sorted-channel trick.
    Candidates of the measured dispatch only, up to MAX_ROWS rows, where the native helpers are built."""

    measured = True
    gguf = True
    MAX_ROWS = 64
    OFFSETS = native.CODES_OFFSET  # the code offset `corr` subtracts, by (compute dtype, nibbles)

    def __init__(self, name: str, nibbles: bool, compute: torch.dtype) -> None:
        self.name, self.nibbles, self.compute = name, nibbles, compute

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        bits = layer.spec.bits
        dtypes = (torch.bfloat16,) if self.compute == torch.bfloat16 else _CPU_DTYPES
        return (device.type == "cpu" and dtype in dtypes and (bits <= 4) == self.nibbles and bits <= 8
                and self.group_size_ok(layer.spec.effective_group_size(layer.in_features))  # GGUF: sub-block
                and self.built())

    def group_size_ok(self, gs: int) -> bool:
        return native.codes_group_size_ok(gs, self.nibbles, self.compute)

    def built(self) -> bool:
        """The native kernel is compiled for this CPU."""
        return native.has_codes_bf16() if self.compute == torch.bfloat16 else native.has_codes_f32()

    def max_rows(self, dtype: torch.dtype) -> int | None:
        return self.MAX_ROWS

    def chosen(self, layer: Any, rows: int) -> bool:
        return False  # only by measurement

    def operands(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
        """(packed codes, fp32 scale (N, G), offset (G, N) = scale * (zero + the compute's code offset), fp32 bias or
        None, the act-order permutation or None): the operands of both native GEMV forms."""
        nibbles, packed, scale, zero, perm = grouped_codes(layer)
        scale = scale.float().contiguous()
        shift = self.OFFSETS[(self.compute, nibbles)]
        offset = (scale * (zero.float() + shift)).t().contiguous()  # (G, N): corr = xsum @ offset
        bias = None if layer.bias is None else layer.bias.float().contiguous()
        return packed, scale, offset, bias, perm

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        packed, scale, offset, bias, perm = self.operands(layer)
        return native.CodesGemm(packed, scale, bias, self.compute), offset, perm

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        # Decoding calls this once per layer and token: the fewest torch ops (a 2-d contiguous x goes as it is).
        gemm, offset, perm = prepared
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if perm is not None:
            x2 = x2.index_select(-1, perm)
        xc = x2.to(self.compute)
        if not xc.is_contiguous():
            xc = xc.contiguous()
        M, N = xc.shape[0], layer.out_features
        corr = zero_point_corr(xc, offset)
        out = torch.empty(M, N, dtype=x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32)
        gemm(xc, corr, out)
        out = out if out.dtype == x.dtype else out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], N)


class NativeAmxKernel(NativeCodesKernel):
    """The fused codes x bf16 GEMM on AMX tiles ("native_int4_amx", "native_int8_amx"; bf16 activations, CPUs with
    AMX-BF16 where Linux grants the tile state: Sapphire Rapids and later). The weight's 16 x 32 tiles are made in L1
    from the codes (nibbles by the same OR trick as "native_int4", 128 + q; bytes as u itself, exact in bf16) and meet x,
    transposed into AMX's pair layout once per call, in `tdpbf16ps`: exact products, fp32 sums, the scale applied to
    each group's tile. No dequantized weight is written to memory, at any row count: on AMX CPUs bf16 `F.linear`
    runs on the tiles from 8 rows up, where the AVX-512 kernels fall behind it. Group sizes: multiples of 32 (GGUF
    sub-blocks of 32 included); act-order layers by the sorted-channel trick. A candidate of the measured dispatch
    only, at every row count.

    With fp32 compute ("native_int4_amx_f32", "native_int8_amx_f32"; any activation dtype, widened to fp32): x is
    split into three bf16 terms, x = t0 + t1 + t2 up to fp32's own rounding, each met by the same weight tile (three
    `tdpbf16ps`, the tile made once), and the tile holds the codes themselves (a nibble's bf16 q by a table lookup),
    with no offset whose large sums would cancel: exact products and fp32 sums, the accuracy of `native_int4_f32`, so
    a candidate in the default mode."""

    MAX_ROWS = None
    OFFSETS = native.AMX_CODES_OFFSET  # the tiles' codes: bytes exact, fp32 x against q itself

    def group_size_ok(self, gs: int) -> bool:
        return native.codes_group_size_ok(gs, self.nibbles, self.compute, amx=True)

    def built(self) -> bool:
        return native.has_codes_amx()

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        packed, scale, offset, bias, perm = self.operands(layer)
        return native.CodesGemm(packed, scale, bias, self.compute, amx=True), offset, perm


class NativeSplitAmxKernel(NativeCodesKernel):
    """Codes times float activations written as int8 terms, on AMX-INT8 tiles (`native.CodesSplitAmx`): the split
    kernels' terms (`int8.SplitInt8Kernel`: x ~ s1 q1 + s2 q2 (+ s3 q3), each term from the residual of the ones
    before, one more for rows far above their rms) for layers with a scale per group (or per row). Each group's
    products with the codes sum exactly in int32 on the tiles (`tdpbsud`, 16384 products per instruction, twice
    `tdpbf16ps`'s), are scaled per output row in fp32 and summed over the groups; the zero points come off through the
    fp32 group sums of x, as in `NativeCodesKernel`. int4: codes of at most 4 bits, two per byte, made into tiles in
    L1; int8: 5-8-bit codes, the weight stored as the B tiles themselves. Group sizes: multiples of 64; act-order
    layers by the sorted-channel trick. Measured candidates only, at every row count:
    - "native_int{4,8}_split_amx": bf16 / fp16 activations, two terms (a third above 16 x rms): as close to the
      float product as the 16-bit arithmetic of the reference, like `cpu_int8_split`;
    - "native_int{4,8}_split_amx_f32": fp32 activations at fp32 precision, three terms (a fourth above 8 x rms), like
      `cpu_int8_split_*_f32`: where `native_int4_amx_f32` needs three bf16 terms on the tiles, these cost half the
      tile work per term; a candidate in every mode;
    - "native_int{4,8}_split_amx_bf16": fp32 activations with the two-term rule of 16-bit ones, only where bf16
      compute is allowed for fp32 models (mode "measure_bf16")."""

    MAX_ROWS = None

    def __init__(self, name: str, nibbles: bool, dtypes: tuple[torch.dtype, ...], terms: int, extra_ratio: float,
                 casts_to_bf16: bool = False) -> None:
        super().__init__(name, nibbles, torch.float32)  # `operands`: the codes themselves (offset 0)
        self.dtypes, self.terms, self.extra_ratio, self.casts_to_bf16 = dtypes, terms, extra_ratio, casts_to_bf16

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        bits = layer.spec.bits
        return (device.type == "cpu" and dtype in self.dtypes and (bits <= 4) == self.nibbles and bits <= 8
                and layer.in_features <= native.CODES_SPLIT_MAX_K[self.nibbles]
                and self.group_size_ok(layer.spec.effective_group_size(layer.in_features)) and self.built())

    def group_size_ok(self, gs: int) -> bool:
        return native.codes_split_group_size_ok(gs)

    def built(self) -> bool:
        return native.has_int8_amx()

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        codes, scale, zero, perm = _codes_scale_zero(layer)
        scale = scale.float()
        offset = (scale * zero.float()).t().contiguous()  # (G, N): corr = xsum @ offset
        bias = None if layer.bias is None else layer.bias.float().contiguous()
        gemm = native.CodesSplitAmx(codes.reshape(layer.out_features, layer.in_features), scale.contiguous(), bias,
                                    self.nibbles)
        return gemm, offset, perm

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        gemm, offset, perm = prepared
        K, N = layer.in_features, layer.out_features
        x2 = x.reshape(-1, K)
        if perm is not None:
            x2 = x2.index_select(-1, perm)
        if K > 1 and x2.stride(1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        corr = zero_point_corr(x2, offset)
        out = gemm(x2, corr, torch.empty(M, N, dtype=x.dtype), self.terms, self.extra_ratio)
        return out.view(*x.shape[:-1], N)


class NativeI16Kernel(NativeCodesKernel):
    """Decoding on CPUs without AVX512-BF16 ("native_int4_i16", "native_int8_i16"; AVX2), in one native call
    (`native.codes_i16_gemv`): each activation row written as int16 codes, x ~ s1 c1 (+ s2 c2), their products with
    the weight codes exact in int32 (`vpmaddwd`), scaled once per group; the zero points through the fp32 group
    sums of x, as `NativeCodesKernel` does. Converting every code to fp32 (`native_int4_f32`) leaves the AVX2 GEMV
    compute-bound at about half the memory bandwidth; this does about half the vector work per weight.
    Accuracy: one term leaves at most absmax / 65534 per element. fp32 activations always get the second term (the
    residual's codes: ~absmax / 4.3e9, the fp32 kernels' level); 16-bit ones when a row's absmax is over
    SECOND_TERM_RATIO x its rms (outlier features), so that no element's error passes ~5e-4 of its row's rms, below
    the bf16 rounding of the reference's own weights (2^-9 relative). A measured candidate only, up to MAX_ROWS."""

    MAX_ROWS = native.I16_MAX_ROWS
    SECOND_TERM_RATIO = 32.0

    def __init__(self, name: str, nibbles: bool) -> None:
        super().__init__(name, nibbles, torch.float32)  # `prepare`: the fp32 kernels' layout (offset = scale * zero)

    def group_size_ok(self, gs: int) -> bool:
        return native.codes_i16_group_size_ok(gs, self.nibbles)

    def built(self) -> bool:
        return native.has_codes_i16()

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        packed, scale, offset, bias, perm = self.operands(layer)
        return native.I16Gemv(packed, scale, offset, bias), perm

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        # Decoding calls this once per layer and token, and in a small model its torch ops cost more than the GEMV:
        # a contiguous x of at most MAX_ROWS rows goes as it is, into an output made in its final shape.
        gemv, perm = prepared
        out = torch.empty((*x.shape[:-1], layer.out_features), dtype=x.dtype)
        if perm is None and x.numel() <= self.MAX_ROWS * layer.in_features and x.is_contiguous():
            return gemv(x, out, self.terms(x.dtype), self.SECOND_TERM_RATIO)
        x2 = x.reshape(-1, x.shape[-1])
        if perm is not None:
            x2 = x2.index_select(-1, perm)
        x2, out2 = x2.contiguous(), out.view(-1, layer.out_features)
        for r0 in range(0, x2.shape[0], self.MAX_ROWS):  # more rows (a forced kernel): blocks of MAX_ROWS
            gemv(x2[r0:r0 + self.MAX_ROWS], out2[r0:r0 + self.MAX_ROWS], self.terms(x.dtype), self.SECOND_TERM_RATIO)
        return out

    def terms(self, dtype: torch.dtype) -> int:
        """`codes_i16_gemv`'s two_terms: 2 (always) for fp32 activations, 1 (outlier rows only) for 16-bit ones."""
        return 2 if dtype == torch.float32 else 1


class NativeI16Bf16Kernel(NativeI16Kernel):
    """fp32 activations through the int16 GEMV at 16-bit precision ("native_int4_i16_bf16", "native_int8_i16_bf16"):
    the rule of bf16 activations (one int16 term, the residual's only for outlier rows), half the integer work of
    the exact two-term product. Each element's error is at most ~5e-4 of its row's rms (casting to bf16 moves an
    element of rms size by up to 2e-3 of it, though small elements less), and the output is not rounded to bf16;
    but it is not the fp32 product: like the `_bf16` kernels a candidate only where bf16 compute is allowed for fp32
    models (mode "measure_bf16", or torch's fp32 matmul precision bf16)."""

    casts_to_bf16 = True

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype == torch.float32 and super().supports(layer, device, dtype)

    def terms(self, dtype: torch.dtype) -> int:
        return 1


_SCRATCH = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of at least `numel` elements of `dtype`, reused across calls and layers (a
    fresh allocation of tens of MB per call costs its page faults every time)."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


for _kernel in (Int4CpuKernel(), Int4x2CpuKernel(), Int8CpuKernel(), DequantTilesKernel(), NativeTilesKernel(),
                NativeDequantMatmulKernel(), NativeDequantAmxKernel(),
                NativeCodesKernel("native_int4", True, torch.bfloat16),
                NativeCodesKernel("native_int8", False, torch.bfloat16), NativeAmxKernel("native_int4_amx", True,
                                                                                         torch.bfloat16),
                NativeAmxKernel("native_int8_amx", False, torch.bfloat16)):
    register_kernel(_kernel)
    register_kernel(Bf16ActivationsKernel(_kernel))
    if isinstance(_kernel, (DequantTilesKernel, _NativeDequant)) and not isinstance(_kernel, NativeDequantAmxKernel):
        # the prefill paths: fp32 GEMMs for bf16 models (the AMX one has no fp32 path)
        register_kernel(Fp32ActivationsKernel(_kernel))
for _kernel in (NativeCodesKernel("native_int4_f32", True, torch.float32),
                NativeCodesKernel("native_int8_f32", False, torch.float32),
                NativeAmxKernel("native_int4_amx_f32", True, torch.float32),
                NativeAmxKernel("native_int8_amx_f32", False, torch.float32),
                NativeI16Kernel("native_int4_i16", True), NativeI16Kernel("native_int8_i16", False)):
    register_kernel(_kernel)  # exact in fp32 for every activation dtype: no bf16-cast variant
for _kernel in (NativeI16Bf16Kernel("native_int4_i16_bf16", True), NativeI16Bf16Kernel("native_int8_i16_bf16", False)):
    register_kernel(_kernel)  # the int16 GEMV's own 16-bit rule for fp32 activations (no cast)
SPLIT_THIRD_TERM_RATIO, SPLIT_FOURTH_TERM_RATIO = 16.0, 8.0  # `int8.SplitInt8Kernel`'s and `int8.ExactSplitKernel`'s
for _bits, _nibbles in (("int4", True), ("int8", False)):
    for _kernel in (
            NativeSplitAmxKernel(f"native_{_bits}_split_amx", _nibbles, (torch.bfloat16, torch.float16), 2,
                                 SPLIT_THIRD_TERM_RATIO),
            NativeSplitAmxKernel(f"native_{_bits}_split_amx_f32", _nibbles, (torch.float32,), 3, SPLIT_FOURTH_TERM_RATIO),
            NativeSplitAmxKernel(f"native_{_bits}_split_amx_bf16", _nibbles, (torch.float32,), 2, SPLIT_THIRD_TERM_RATIO,
                                 True)):
        register_kernel(_kernel)

from . import cpu_measure  # noqa: E402,F401  (the measured dispatch: installs itself in kernels.base)
