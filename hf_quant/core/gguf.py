"""GGUF (llama.cpp) block types as quantization grids, in torch: bytes <-> fields <-> weights.

Every type quantizes each row of a weight in blocks along the input dimension. A block's fields:
- `codes`: unsigned integers in [0, 2**bits), one per weight;
- `d` (fp16, one per block) and, for types with a stored minimum, `dmin` (fp16 per block);
- K-quants (256-wide super-blocks): integer sub-block scales `sc` and mins `mn`, one per 16 or 32
  weights, themselves quantized against d and dmin.

Weights, in llama.cpp's own order of fp32 operations (gguf-py's numpy `dequantize` is the oracle;
tests/test_gguf.py compares on random bytes, bit for bit):
    Q8_0: d*(u-128) (u = int8 + 128)   Q4_0: d*(u-8)   Q5_0: d*(u-16)   Q4_1 / Q5_1: d*u + m
    Q2_K, Q4_K, Q5_K: (d*sc)*u - dmin*mn      Q3_K: (d*sc)*(u-4)      Q6_K: (d*sc)*(u-32)
    TQ1_0, TQ2_0 (ternary, 256-wide blocks, one d each): d*(u-1), u in {0, 1, 2} (TQ2_0's 2-bit field can
    also hold 3, read as 2*d like llama.cpp does; TQ1_0 packs five base-3 digits per byte)
A grid is then per sub-block `scale` and `offset` with w = scale*u + offset (fp32), which is what
calibration methods quantize against (`find_grid`, `quantize_codes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .grid import clamp_ste
from .spec import QuantizedWeight

QK_K = 256


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int  # weights per (super-)block
    nbytes: int  # bytes per block
    bits: int  # bits per code
    sub: int  # weights per sub-block scale (== block for the legacy types)
    zero: int | None  # implicit code offset (symmetric types), None when a min is stored
    scale_max: int = 0  # K-quants: the sub-scale range, [0, scale_max] or [-scale_max-1, scale_max] if signed
    signed_scales: bool = False
    ternary: bool = False  # TQ1_0 / TQ2_0: codes {0, 1, 2} (d*(u-1)), d = the block's absmax when rounding

    @property
    def maxq(self) -> int:
        return 2 if self.ternary else (1 << self.bits) - 1

    @property
    def is_k(self) -> bool:  # 256-wide super-blocks with integer sub-block scales (not the ternary types)
        return self.block == QK_K and not self.ternary


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", 32, 34, 8, 32, 128),
    BlockType("Q4_0", 32, 18, 4, 32, 8),
    BlockType("Q4_1", 32, 20, 4, 32, None),
    BlockType("Q5_0", 32, 22, 5, 32, 16),
    BlockType("Q5_1", 32, 24, 5, 32, None),
    BlockType("Q2_K", QK_K, 84, 2, 16, None, 15),
    BlockType("Q3_K", QK_K, 110, 3, 16, 4, 31, True),
    BlockType("Q4_K", QK_K, 144, 4, 32, None, 63),
    BlockType("Q5_K", QK_K, 176, 5, 32, None, 63),
    BlockType("Q6_K", QK_K, 210, 6, 16, 32, 127, True),
    # ternary (BitNet b1.58): one fp16 d per 256 weights; bits: the width hf_quant's kernels hold a code in
    BlockType("TQ1_0", QK_K, 54, 2, QK_K, 1, ternary=True),
    BlockType("TQ2_0", QK_K, 66, 2, QK_K, 1, ternary=True),
)}


def block_type(name: str) -> BlockType:
    if name not in TYPES:
        raise ValueError(f"GGUF type {name!r} is not supported; use one of {sorted(TYPES)}.")
    return TYPES[name]


@dataclass
class Blocks:
    """The fields of a tensor's blocks, rows kept: codes (N, K) uint8; d, dmin (N, K/block) fp16 (dmin:
    Q4_1/Q5_1's m, the K-quants' dmin, else None); sc, mn (N, K/sub) int16 (K-quants; mn None
    without mins)."""

    codes: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None


def row_bytes(t: BlockType, in_features: int) -> int:
    return in_features // t.block * t.nbytes


def check_shape(t: BlockType, in_features: int, name: str) -> None:
    if in_features % t.block:
        raise ValueError(f"{name}: in_features={in_features} is not a multiple of {t.name}'s block width {t.block}; "
                         f"GGUF cannot store it as {t.name}. Keep the layer in float (modules_to_not_convert) or "
                         f"use a type with {'32' if t.block == QK_K else 'a smaller'}-wide blocks (e.g. Q8_0, Q4_0).")


# --- bytes <-> fields ---------------------------------------------------------------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def _bits(x: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """(..., n) bytes -> (..., len(shifts), n) fields (x >> shift) & mask."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def _join(fields: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """Inverse of `_bits`: (..., len(shifts), n) fields -> (..., n) bytes."""
    out = torch.zeros(fields.shape[:-2] + fields.shape[-1:], dtype=torch.uint8, device=fields.device)
    for i, s in enumerate(shifts):
        out |= fields[..., i, :].to(torch.uint8) << s
    return out


def _split(raw: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(raw, sizes, dim=-1))


def _k_scales_unpack(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    return sc, mn


def _k_scales_pack(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    d = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    m = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    md = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return torch.cat([d, m, md], -1)


# TQ1_0's base-3 bytes: digits q_j in {0, 1, 2} (j = 0 first) with s = sum_j q_j 3^(4-j) are stored as
# ceil(s * 256 / 243) (a fixed-point fraction of 3^5), and digit j is read back as ((byte * 3^j mod 256) * 3) >> 8.
_POW3 = (1, 3, 9, 27, 81)


def _trits(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., w) bytes -> (..., n, w) base-3 digits (the first n of each byte)."""
    m = torch.tensor(_POW3[:n], dtype=torch.uint8, device=x.device).view(-1, 1)
    return (((x.unsqueeze(-2) * m).to(torch.int16) * 3) >> 8).to(torch.uint8)  # uint8 products wrap: mod 256


def _untrits(q: torch.Tensor) -> torch.Tensor:
    """Inverse of `_trits`: (..., n, w) digits -> (..., w) bytes (the 4-digit bytes with a last digit 0)."""
    m = torch.tensor(_POW3[::-1][:q.shape[-2]], dtype=torch.int16, device=q.device).view(-1, 1)
    s = (q.to(torch.int16) * m).sum(-2, dtype=torch.int32)
    return ((s * 256 + 242) // 243).to(torch.uint8)


def unpack(raw: torch.Tensor, t: BlockType, in_features: int) -> Blocks:
    """Block bytes (N, row_bytes) uint8 -> fields."""
    N, nb = raw.shape[0], in_features // t.block
    b = raw.reshape(N, nb, t.nbytes)
    u8 = torch.uint8

    def codes(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(N, in_features)

    def sub(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(N, -1).to(torch.int16)

    if t.name == "Q8_0":
        d, q = _split(b, [2, 32])
        return Blocks(codes((q.view(torch.int8).to(torch.int16) + 128).to(u8)), _f16(d))
    if t.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        has_m, five = t.name.endswith("_1"), t.name.startswith("Q5")
        parts = _split(b, [2] + ([2] if has_m else []) + ([4] if five else []) + [16])
        d, qs = parts[0], parts[-1]
        u = _bits(qs, [0, 4], 15).reshape(N, nb, 32)
        if five:
            qh = _bits(parts[-2], list(range(8)), 1).transpose(-1, -2).reshape(N, nb, 32)  # bit j of byte k: element 8k+j
            u = u | (qh << 4)
        return Blocks(codes(u), _f16(d), _f16(parts[1]) if has_m else None)
    if t.name == "Q2_K":
        scales, qs, d, dmin = _split(b, [16, 64, 2, 2])
        u = _bits(qs.reshape(N, nb, 2, 32), [0, 2, 4, 6], 3)  # (N, nb, 2, 4, 32): element h*128 + s*32 + l
        return Blocks(codes(u), _f16(d), _f16(dmin), sub(scales & 15), sub(scales >> 4))
    if t.name == "Q3_K":
        hmask, qs, scales, d = _split(b, [32, 64, 12, 2])
        ql = _bits(qs.reshape(N, nb, 2, 32), [0, 2, 4, 6], 3)
        qh = _bits(hmask, list(range(8)), 1)  # (N, nb, 8, 32): element i*32 + l
        u = ql.reshape(N, nb, QK_K) | (qh.reshape(N, nb, QK_K) << 2)
        low = _bits(scales[..., :8], [0, 4], 15).reshape(N, nb, 16)
        high = _bits(scales[..., 8:], [0, 2, 4, 6], 3).reshape(N, nb, 16)
        return Blocks(codes(u), _f16(d), sc=sub(low | (high << 4)) - 32)
    if t.name in ("Q4_K", "Q5_K"):
        parts = _split(b, [2, 2, 12] + ([32] if t.name == "Q5_K" else []) + [128])
        sc, mn = _k_scales_unpack(parts[2])
        u = _bits(parts[-1].reshape(N, nb, 4, 32), [0, 4], 15)  # (N, nb, 4, 2, 32): element c*64 + h*32 + l
        u = u.reshape(N, nb, QK_K)
        if t.name == "Q5_K":
            u = u | (_bits(parts[3], list(range(8)), 1).reshape(N, nb, QK_K) << 4)
        return Blocks(codes(u), _f16(parts[0]), _f16(parts[1]), sub(sc), sub(mn))
    if t.name == "Q6_K":
        ql, qh, scales, d = _split(b, [128, 64, 16, 2])
        low = _bits(ql.reshape(N, nb, 2, 64), [0, 4], 15).reshape(N, nb, QK_K)  # element h*128 + k*64 + l
        high = _bits(qh.reshape(N, nb, 2, 32), [0, 2, 4, 6], 3).reshape(N, nb, QK_K)
        return Blocks(codes(low | (high << 4)), _f16(d), sc=sub(scales.contiguous().view(torch.int8)))
    if t.name == "TQ2_0":
        qs, d = _split(b, [64, 2])
        return Blocks(codes(_bits(qs.reshape(N, nb, 2, 32), [0, 2, 4, 6], 3)), _f16(d))  # element h*128 + s*32 + l
    if t.name == "TQ1_0":
        qs, qh, d = _split(b, [48, 4, 2])
        u = [_trits(qs[..., :32], 5), _trits(qs[..., 32:], 5), _trits(qh, 4)]  # elements j*w + l per part
        return Blocks(codes(torch.cat([x.reshape(N, nb, -1) for x in u], -1)), _f16(d))
    raise ValueError(f"GGUF type {t.name}: no codec")


def pack(f: Blocks, t: BlockType) -> torch.Tensor:
    """Fields -> block bytes (N, row_bytes) uint8 (the inverse of `unpack`)."""
    N, K = f.codes.shape
    nb = K // t.block
    u = f.codes.reshape(N, nb, t.block).to(torch.uint8)
    d = _f16_bytes(f.d.reshape(N, nb))

    def subs(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(N, nb, -1)

    if t.name == "Q8_0":
        parts = [d, (u.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)]
    elif t.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        parts = [d] + ([_f16_bytes(f.dmin.reshape(N, nb))] if t.name.endswith("_1") else [])
        if t.name.startswith("Q5"):
            parts.append(_join((u >> 4).reshape(N, nb, 4, 8).transpose(-1, -2), list(range(8))))
        parts.append(_join((u & 15).reshape(N, nb, 2, 16), [0, 4]))
    elif t.name == "Q2_K":
        scales = subs(f.sc).to(torch.uint8) | (subs(f.mn).to(torch.uint8) << 4)
        qs = _join(u.reshape(N, nb, 2, 4, 32), [0, 2, 4, 6]).reshape(N, nb, 64)
        parts = [scales, qs, d, _f16_bytes(f.dmin.reshape(N, nb))]
    elif t.name == "Q3_K":
        hmask = _join((u >> 2).reshape(N, nb, 8, 32), list(range(8)))
        qs = _join((u & 3).reshape(N, nb, 2, 4, 32), [0, 2, 4, 6]).reshape(N, nb, 64)
        s = (subs(f.sc) + 32).to(torch.uint8)
        low = _join((s & 15).reshape(N, nb, 2, 8), [0, 4])
        high = _join((s >> 4).reshape(N, nb, 4, 4), [0, 2, 4, 6])
        parts = [hmask, qs, low, high, d]
    elif t.name in ("Q4_K", "Q5_K"):
        parts = [d, _f16_bytes(f.dmin.reshape(N, nb)), _k_scales_pack(subs(f.sc), subs(f.mn))]
        if t.name == "Q5_K":
            parts.append(_join((u >> 4).reshape(N, nb, 8, 32), list(range(8))))
        parts.append(_join((u & 15).reshape(N, nb, 4, 2, 32), [0, 4]).reshape(N, nb, 128))
    elif t.name == "Q6_K":
        ql = _join((u & 15).reshape(N, nb, 2, 2, 64), [0, 4]).reshape(N, nb, 128)
        qh = _join((u >> 4).reshape(N, nb, 2, 4, 32), [0, 2, 4, 6]).reshape(N, nb, 64)
        parts = [ql, qh, subs(f.sc).to(torch.int8).view(torch.uint8), d]
    elif t.name == "TQ2_0":
        parts = [_join(u.reshape(N, nb, 2, 4, 32), [0, 2, 4, 6]).reshape(N, nb, 64), d]
    elif t.name == "TQ1_0":
        if u.numel() and int(u.max()) > 2:
            raise ValueError("TQ1_0 holds ternary codes 0, 1, 2 only; got a code of 3.")
        parts = [_untrits(u[..., :160].reshape(N, nb, 5, 32)), _untrits(u[..., 160:240].reshape(N, nb, 5, 16)),
                 _untrits(u[..., 240:].reshape(N, nb, 4, 4)), d]
    else:
        raise ValueError(f"GGUF type {t.name}: no codec")
    return torch.cat(parts, -1).reshape(N, nb * t.nbytes)


# --- fields <-> weights ---------------------------------------------------------------------------

def grid_of(f: Blocks, t: BlockType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per sub-block (scale, offset) (N, K/sub) fp32 with w = scale * (u - zero) (symmetric types,
    offset None) or w = scale * u - offset (stored mins), each product in llama.cpp's order."""
    d = f.d.float()
    if not t.is_k:
        return d, (None if f.dmin is None else -f.dmin.float())
    per = t.block // t.sub
    scale = d.repeat_interleave(per, -1) * f.sc.float()
    if f.mn is None:
        return scale, None
    return scale, f.dmin.float().repeat_interleave(per, -1) * f.mn.float()


def dequantize_fields(f: Blocks, t: BlockType) -> torch.Tensor:
    """fp32 weights (N, K), bit-equal to gguf-py's `dequantize` (and so to transformers' GGUF loader)."""
    N, K = f.codes.shape
    scale, offset = grid_of(f, t)
    u = f.codes.reshape(N, -1, t.sub).float()
    if offset is None:
        return (scale.unsqueeze(-1) * (u - t.zero)).reshape(N, K)
    return (scale.unsqueeze(-1) * u - offset.unsqueeze(-1)).reshape(N, K)  # Q4_1/Q5_1: d*u - (-m), exactly d*u + m


def dequantize(raw: torch.Tensor, t: BlockType, in_features: int) -> torch.Tensor:
    return dequantize_fields(unpack(raw, t, in_features), t)


# --- weights -> fields (round to nearest on the type's grid; the GPTQ column step uses the same) ----

def _round(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (C's roundf / llama.cpp's nearest_int), not torch's half-to-even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, with its sign."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _safe_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.zeros_like(x), x / torch.where(s == 0, torch.ones_like(s), s))


# The clipping search of `mse=True` (as GPTQ's reference quantizer does for its grid): shrink factors
# 1, 0.98, ..., 0.62 of each sub-block's range, error sum |w - w_hat|^2.4 against the stored grid.
MSE_SHRINKS = tuple(1 - 0.02 * i for i in range(20))
MSE_NORM = 2.4


def mse_clip(Wb: torch.Tensor, t: BlockType) -> torch.Tensor:
    """Per sub-block shrink factor (N, K/sub) of the range that minimises the sub-block's |w - w_hat|^2.4 on
    the grid as stored (sub-scales rounded against the super-scales each factor gives)."""
    N, K = Wb.shape
    n_sub = K // t.sub

    def error(Wr: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:  # per sub-block of the rows of Wr
        scale, zero = column_grid(find_grid(Wr, t, clip), t)
        W = Wr.float().reshape(Wr.shape[0], -1, t.sub)
        q = quantize_codes(W, scale.unsqueeze(-1), zero.unsqueeze(-1), t.maxq)
        return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - W).abs_().pow_(MSE_NORM).sum(-1)

    # every factor at once: the rows repeated once per factor (rows are independent blocks of the format)
    shrinks = torch.tensor(MSE_SHRINKS, device=Wb.device)
    per_factor = max(1, (1 << 22) // max(Wb.numel(), 1))
    errs = []
    for chunk in shrinks.split(per_factor):
        P = chunk.numel()
        clip = chunk.repeat_interleave(N).unsqueeze(-1).expand(P * N, n_sub)
        errs.append(error(Wb.float().repeat(P, 1), clip).reshape(P, N, n_sub))
    err = torch.cat(errs)
    best = shrinks[err.argmin(0)]  # the first (largest) factor among equals
    if t.is_k:  # the chosen factors change the super-scales they were measured under: keep a super-block's
        per = t.block // t.sub  # choice only where it beats the unclipped grid there
        chosen, plain = (error(Wb, c).reshape(N, -1, per).sum(-1) for c in (best, torch.ones_like(best)))
        best = torch.where((chosen > plain).repeat_interleave(per, -1), torch.ones_like(best), best)
    return best


Clip = "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None"


def _ends(clip: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Any, Any]:
    """(low, high) shrink factors of a clip given as one tensor for both ends, a pair, or None."""
    if clip is None:
        return 1.0, 1.0
    if isinstance(clip, tuple):
        return clip[0].float(), clip[1].float()
    return clip.float(), clip.float()


def _sym_scale(W: torch.Tensor, t: BlockType) -> torch.Tensor:
    """Per sub-block scale of a symmetric type from W (..., n_sub, sub), as llama.cpp's reference quantizers set
    it: the largest-magnitude weight on the extreme code (Q8_0: absmax / 127; TQ1_0 / TQ2_0: d = absmax)."""
    if t.name == "Q8_0":
        return W.abs().amax(-1) / 127
    if t.ternary:
        return W.abs().amax(-1)
    return _signed_absmax(W) / -float(1 << (t.bits - 1))


def find_grid(Wb: torch.Tensor, t: BlockType, clip: Clip = None, mse: bool = False) -> Blocks:
    """The block fields (codes left empty) of weights Wb (N, n*block) fp32: scales from each sub-block's
    range, as llama.cpp's reference quantizers set them (signed scales where the format has a fixed
    zero, so the largest-magnitude weight lands on the extreme code), the K-quants' sub-scales and mins
    rounded against their fp16 super-scales exactly as stored. `clip` (N, K/sub) factors in (0, 1] shrink
    each sub-block's range first (AWQ's clipping search); `mse` searches them (`mse_clip`) when none is given."""
    if mse and clip is None:
        clip = mse_clip(Wb, t)
    N, K = Wb.shape
    W = Wb.float().reshape(N, -1, t.sub)
    c_lo, c_hi = _ends(clip)
    if t.zero is not None:  # symmetric: scale = signed absmax / -2**(bits-1) (Q8_0: absmax / 127, TQ: absmax)
        scale = _sym_scale(W, t) * c_hi
        mn = None
    else:
        lo = (W.amin(-1).clamp(max=0) if t.is_k else W.amin(-1)) * c_lo
        scale = (W.amax(-1) * c_hi - lo) / t.maxq
        mn = -lo
    if not t.is_k:
        d = scale.to(torch.float16)
        return Blocks(torch.empty(0), d, None if mn is None else (-mn).to(torch.float16))
    nb, per = K // t.block, t.block // t.sub

    def superscale(v: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        v = v.reshape(N, nb, per)
        top = _signed_absmax(v) / -(t.scale_max + 1) if signed else v.amax(-1) / t.scale_max
        d = top.to(torch.float16)
        lo, hi = (-(t.scale_max + 1), t.scale_max) if signed else (0, t.scale_max)
        q = _round(_safe_div(v, d.float().unsqueeze(-1))).clamp(lo, hi)
        return d, q.reshape(N, -1).to(torch.int16)

    d, sc = superscale(scale, t.signed_scales)
    if mn is None:
        return Blocks(torch.empty(0), d, sc=sc)
    dmin, m = superscale(mn, False)
    return Blocks(torch.empty(0), d, dmin, sc, m)


def column_grid(f: Blocks, t: BlockType) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per sub-block (N, K/sub) fp32 such that u = round(w / scale + zero) picks the code
    and w_hat = scale * (u - zero): the fixed zero, or offset / scale for stored mins."""
    scale, offset = grid_of(f, t)
    if offset is None:
        return scale, torch.full_like(scale, float(t.zero))
    return scale, _safe_div(offset, scale)


def quantize_codes(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (..., n) fp32 of W (..., n) against per-element-broadcast scale and zero (...,) or (..., n)."""
    return _round(_safe_div(W, scale) + zero).clamp(0, maxq)


def quantize_rtn(W: torch.Tensor, t: BlockType, clip: Clip = None, mse: bool = False) -> Blocks:
    """Round-to-nearest of W (N, K) onto type t (each sub-block's range shrunk by `clip`, or by the `mse`
    search): the fields, codes filled."""
    N, K = W.shape
    f = find_grid(W, t, clip, mse)
    scale, zero = column_grid(f, t)
    Wg = W.float().reshape(N, -1, t.sub)
    f.codes = quantize_codes(Wg, scale.unsqueeze(-1), zero.unsqueeze(-1), t.maxq).reshape(N, K).to(torch.uint8)
    return f


def join_blocks(parts: list[Blocks], codes: torch.Tensor) -> Blocks:
    """One tensor's fields from its blocks' fields (in column order), with all codes (N, K)."""
    def cat(name: str) -> torch.Tensor | None:
        got = [getattr(p, name) for p in parts]
        return None if got[0] is None else torch.cat(got, -1)

    return Blocks(codes, cat("d"), cat("dmin"), cat("sc"), cat("mn"))


def quantized_weight(f: Blocks, t: BlockType) -> QuantizedWeight:
    """The `QuantizedWeight` of a GGUF layer: its block bytes, and the effective sub-block scales."""
    scale, _ = grid_of(f, t)
    return QuantizedWeight(codes=f.codes, scale=scale, zero=None, raw=pack(f, t))


def check_blocks(raw: torch.Tensor, t: BlockType, in_features: int, name: str) -> None:
    """Refuse blocks whose fp16 scales (or mins) are NaN or inf: a corrupt tensor."""
    f = unpack(raw, t, in_features)
    for field, v in (("d", f.d), ("dmin" if t.is_k else "m", f.dmin)):
        if v is not None and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{name}.qweight: {bad} {t.name} block(s) have a NaN/inf fp16 {field}; the tensor is "
                             "corrupt. Re-quantize the model or re-download the checkpoint.")


# --- llama.cpp's file-type mixes (llama-quant.cpp, llama_tensor_get_type) ---------------------------
# name -> base block type. "Q2_K_M" is llama.cpp's `Q2_K` file type (a mix, unlike the Q2_K block type).
MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q3_K_M": "Q3_K", "Q2_K_M": "Q2_K"}
# Where a row is not a multiple of 256, llama.cpp falls back to a 32-wide type (Q2_K/Q3_K: IQ4_NL, which
# hf_quant does not hold: Q4_0, the same size).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# HF module name endings -> llama.cpp tensor roles
_ROLES = (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
          ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
          ("mlp.down_proj", "ffn_down"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
          ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down"), ("lm_head", "output"), ("embed_tokens", "token_embd"),
          ("wte", "token_embd"))


def role_of(module_name: str) -> tuple[str | None, int | None]:
    """(llama.cpp tensor role, block index) of an HF module name, e.g. ("attn_v", 3)."""
    import re

    role = next((r for suffix, r in _ROLES if module_name == suffix or module_name.endswith("." + suffix)), None)
    found = re.search(r"\.(\d+)\.", module_name)
    return role, None if found is None else int(found.group(1))


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, module_name: str, n_layers: int, n_gqa: int = 1, in_features: int | None = None) -> str:
    """The block type llama.cpp's file type `mix` gives the tensor of `module_name` (same rules for the
    roles Llama / Qwen2 / Mistral / GPT-2 have; its 70B and MoE special cases are not reproduced)."""
    base = MIXES[mix]
    role, i = role_of(module_name)
    t = base
    if role in ("output", "token_embd"):
        t = "Q6_K" if role == "output" else base
    elif role == "attn_v" and i is not None:
        if mix == "Q2_K_M":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif _use_more_bits(i, n_layers):
            t = "Q6_K"
    elif role == "ffn_down" and i is not None:
        if mix == "Q2_K_M":
            t = "Q3_K"
        elif mix == "Q3_K_M":
            t = "Q5_K" if i < n_layers // 16 else "Q4_K"
        elif _use_more_bits(i, n_layers):
            t = "Q6_K"
    elif role == "attn_output":
        t = {"Q2_K_M": "Q3_K", "Q3_K_M": "Q4_K"}.get(mix, base)
    elif role == "attn_qkv":
        t = {"Q3_K_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(mix, base)
    if in_features is not None and in_features % TYPES[t].block:
        t = _FALLBACK.get(t, t)
    return t


def codes_and_grid(raw: torch.Tensor, t: BlockType, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (N, K) uint8, scale, zero (N, K/sub) fp32) with w = (code - zero) * scale: a GGUF tensor in the
    codes-and-grid form the packed kernels take (zero is fractional for types that store a min)."""
    f = unpack(raw, t, in_features)
    scale, zero = column_grid(f, t)
    return f.codes, scale, zero


def fake_quantize(W: torch.Tensor, t: BlockType, clip: Clip = None) -> torch.Tensor:
    """W_hat (N, K) fp32 of round-to-nearest onto type t."""
    return dequantize_fields(quantize_rtn(W, t, clip), t)


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` forward, identity gradient to `x` backward."""
    return x + (rounded - x).detach()


def fake_quantize_ste(W: torch.Tensor, t: BlockType, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """W_hat (N, K) on type t's grid with each sub-block's range shrunk by `low`, `high` (N, K/sub), as
    `find_grid` builds it (fp16 super-scales, integer sub-scales), differentiable in `low` and `high`:
    every rounding passes the gradient straight through (OmniQuant's learnable clipping on GGUF grids)."""
    N, K = W.shape
    Wg = W.detach().float().reshape(N, -1, t.sub)
    if t.zero is not None:
        scale = _sym_scale(Wg, t) * high
        offset = None
    else:
        lo = (Wg.amin(-1).clamp(max=0) if t.is_k else Wg.amin(-1)) * low
        scale, offset = (Wg.amax(-1) * high - lo) / t.maxq, -lo  # w = scale * u - offset

    def stored(v: torch.Tensor, signed: bool) -> torch.Tensor:
        if not t.is_k:
            return _ste(v, v.to(torch.float16).float())
        per = t.block // t.sub
        v3 = v.reshape(N, -1, per)
        top = _signed_absmax(v3) / -(t.scale_max + 1) if signed else v3.amax(-1) / t.scale_max
        d = _ste(top, top.to(torch.float16).float()).unsqueeze(-1)
        d = torch.where(d.detach() == 0, torch.ones_like(d), d)
        bounds = (-(t.scale_max + 1), t.scale_max) if signed else (0, t.scale_max)
        q = clamp_ste(_ste(v3 / d, _round(v3 / d)), *bounds)
        return (d * q).reshape(N, -1)

    scale = stored(scale, t.signed_scales)
    scale = torch.where(scale.detach().abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
    zero = torch.full_like(scale, float(t.zero)) if offset is None else stored(offset, False) / scale
    x = Wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    u = clamp_ste(_ste(x, _round(x)), 0, t.maxq)
    return ((u - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(N, K)
