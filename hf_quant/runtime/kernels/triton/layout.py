"""The load-time weight layout that the Triton kernels share ("blocks"), built once per layer.

K is cut into blocks of KB = PER * BW input channels, PER = 32 // bits codes per int32 word and BW
words per row. Word w of block b in row n holds, at bits [bits * j, bits * (j + 1)), the code of
input channel b * KB + j * BW + w. Code j of every word of a block is then the contiguous K slice
[b * KB + j * BW, b * KB + (j + 1) * BW): a kernel extracts it from all words with one constant shift
and mask, and multiplies it with a contiguous slice of x. BW is chosen so that every slice lies in
one quantization group, and a block either lies in one group or holds whole groups.

Codes become floats with a magic number: with the code q placed at mantissa bits [P, P + bits) and
the exponent of 1.0, the word's bits read as the fp32 value v = 1 + q * 2**(P - 23) exactly. With
SA = scale * 2**(23 - P) and SB = scale * (2**(23 - P) + zero),

    (q - zero) * scale = v * SA - SB      and      sum_k (q_k - z) s x_k = SA * sum_k v_k x_k - SB * sum_k x_k,

so the split-K and dequantize kernels need one shift (none for one code of each word), one AND-OR
and one FMA per weight, and the scales once per group. The GEMV reads the same words as fp32
denormals instead (see `qgemm._gemv_kernel`): SA and SB - SA = scale * zero serve it unchanged. Rows are padded to a multiple of 128 and K to a multiple of KB (zero
codes, zero scales), so that weight loads need no masks; K and N stay runtime arguments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ....core import codes_by_group, zero_points

N_PAD = 128  # rows padded to a multiple of the largest BLOCK_N
_BLOCK_WORDS = (16, 32, 64, 128)  # 16: the smallest K of a tensor-core dot


def per_word(bits: int) -> int:
    return 32 // bits


def magic_position(bits: int) -> int:
    """Mantissa bit P where codes are placed: the largest multiple of `bits` with P + bits <= 23, so
    that the code already at P in each word needs no shift."""
    return (23 - bits) // bits * bits


def block_words(bits: int, group: int | None) -> int | None:
    """Words per row in a block for groups of `group` input channels (None: one group per row), or
    None when no block width lines up with the groups."""
    per = per_word(bits)
    for bw in _BLOCK_WORDS:
        kb = per * bw
        if group is None or group % kb == 0 or (kb % group == 0 and group % bw == 0):
            return bw
    return None


class Geometry(NamedTuple):
    """Where a (N, K) weight's codes go in the block layout: what launch configurations and the
    offline budget need, without the tensors."""

    bits: int
    bw: int
    gs: int  # input channels per group in the kernel (Kp for one group per row)
    K: int
    N: int
    Kp: int  # K padded to whole blocks

    @property
    def per(self) -> int:
        return per_word(self.bits)

    @property
    def kb(self) -> int:
        return self.per * self.bw

    @property
    def n_blocks(self) -> int:
        return self.Kp // self.kb


def geometry(bits: int, group: int | None, K: int, N: int) -> Geometry | None:
    """The layout of a (N, K) weight in groups of `group` (None: one per row); None if none fits."""
    bw = block_words(bits, group) if 1 <= bits <= 8 else None
    if bw is None:
        return None
    kb = per_word(bits) * bw
    Kp = -(-K // kb) * kb
    return Geometry(bits, bw, Kp if group is None else group, K, N, Kp)


def layer_geometry(layer: Any) -> Geometry | None:
    spec = layer.spec
    group = None if spec.group_size == -1 else spec.effective_group_size(layer.in_features)
    return geometry(spec.bits, group, layer.in_features, layer.out_features)


class Blocks(NamedTuple):
    """A layer's weights in the block layout, on one device (see the module docstring)."""

    words: torch.Tensor  # int32 (Np, Kp // PER)
    sa: torch.Tensor  # fp32 (Kp // GS, Np): scale * 2**(23 - P); zero for padding
    sb: torch.Tensor  # fp32 (Kp // GS, Np): scale * (2**(23 - P) + zero)
    perm: torch.Tensor | None  # act-order: input channels sorted by group (gather x with it)
    geo: Geometry
    counters: torch.Tensor  # int32 split-K arrival counters, one per output tile; zero between calls

    @property
    def padded_rows(self) -> int:
        return self.words.shape[0]


def fits(layer: Any) -> bool:
    return layer_geometry(layer) is not None


def interleave(codes: torch.Tensor, bits: int, bw: int) -> torch.Tensor:
    """uint8 codes (N, Kp), Kp a multiple of KB -> int32 words (N, Kp // PER) of the block layout."""
    per = per_word(bits)
    N, Kp = codes.shape
    c = codes.to(torch.int64).reshape(N, Kp // (per * bw), per, bw)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int64) * bits).view(1, 1, per, 1)
    words = (c << shifts).sum(2)  # (N, blocks, BW) < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(N, -1)


def build(layer: Any, device: torch.device) -> Blocks:
    spec, K, N = layer.spec, layer.in_features, layer.out_features
    bits = spec.bits
    geo = layer_geometry(layer)
    if geo is None:
        raise ValueError(f"group size {spec.group_size} of {layer.extra_repr()} does not fit the Triton block layout")
    bw, gs, Kp = geo.bw, geo.gs, geo.Kp
    Np = -(-N // N_PAD) * N_PAD
    codes, perm = codes_by_group(layer.qweight.to(device), spec, K, None if layer.g_idx is None else layer.g_idx.to(device))
    codes = torch.nn.functional.pad(codes, (0, Kp - K, 0, Np - N))
    scales = layer.scales.to(device, torch.float32)  # (N, groups)
    zeros = zero_points(None if layer.qzeros is None else layer.qzeros.to(device), spec, scales)
    mult = float(2 ** (23 - magic_position(bits)))
    n_groups = Kp // gs

    def by_group(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n_groups, Np, dtype=torch.float32, device=device)
        out[: t.shape[1], :N] = t.t()
        return out.contiguous()

    return Blocks(words=interleave(codes, bits, bw), sa=by_group(scales * mult), sb=by_group(scales * (mult + zeros)),
                  perm=perm, geo=geo, counters=torch.zeros(Np, dtype=torch.int32, device=device))
