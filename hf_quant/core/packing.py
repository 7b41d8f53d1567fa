"""Bit packing of integer codes (format_version 1).

Each row of codes (one output channel, `in_features` codes) is a little-endian bit stream: code `i`
occupies bits [bits*i, bits*(i+1)) of the row, stored as uint8 bytes. Every 8 codes make exactly
`bits` bytes, so a row takes in_features * bits / 8 bytes (in_features must be a multiple of 8).
For 4 bits this is "low nibble = even column"; for 8 bits, one code per byte.
"""

from __future__ import annotations

import torch


def packed_in_features(in_features: int, bits: int) -> int:
    """Bytes per row of packed codes."""
    return in_features * bits // 8


PACK_CHUNK_ELEMS = 1 << 22  # codes per step of the 3-bit packing (int64 temporaries of 32 MB)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (out, in) in [0, 2**bits) -> packed uint8 (out, in * bits // 8)."""
    out_f, in_f = codes.shape
    if in_f % 8:
        raise ValueError(f"pack_codes: in_features={in_f} must be a multiple of 8")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if 8 % bits == 0:  # 2 and 4 bits: byte j holds codes per*j .. per*j+per-1, the first in the low bits
        per = 8 // bits
        c = codes.to(torch.uint8).reshape(out_f, in_f // per, per)
        packed = c[..., 0].clone()
        for i in range(1, per):
            packed |= c[..., i] << (bits * i)
        return packed
    # 3 bits: 8 codes in a 24-bit little-endian word; int64 arithmetic a slice of rows at a time
    out = torch.empty(out_f, in_f // 8 * bits, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    step = max(1, PACK_CHUNK_ELEMS // in_f)
    for r in range(0, out_f, step):
        words = (codes[r:r + step].reshape(-1, in_f // 8, 8).to(torch.int64) << shifts).sum(-1)  # bits*8 bits
        out[r:r + step] = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(-1, in_f // 8 * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: packed uint8 (out, in*bits/8) -> uint8 codes (out, in)."""
    out_f = packed.shape[0]
    if bits == 8:
        return packed
    maxq = (1 << bits) - 1
    if 8 % bits == 0:  # 2 and 4 bits: codes never straddle a byte
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & maxq).reshape(out_f, in_features)
    # 3 bits: 8 codes in a 24-bit little-endian word
    b = packed.reshape(out_f, in_features // 8, bits).to(torch.int32)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int32) * 8
    words = (b << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * bits
    return ((words.unsqueeze(-1) >> shifts) & maxq).to(torch.uint8).reshape(out_f, in_features)
