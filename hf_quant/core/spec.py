"""What one quantized linear is: its layout spec, and the result every method returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


@dataclass(frozen=True)
class LayerSpec:
    """How one linear layer is quantized: the fields that fix its packed layout."""

    bits: int
    group_size: int  # -1: one group per output channel
    sym: bool
    g_idx: bool = False  # stores a `g_idx` (group of each input channel): act-order GPTQ
    # A GGUF block type (core/gguf.py): `qweight` then holds the type's block bytes, exactly as in a
    # .gguf file, and no scales/zeros (bits, group_size (the sub-block) and sym follow the type).
    gguf: str | None = None
    # Stores `in_scales` (in_features,): a per-input-channel factor g, W_hat[o, i] = ((q - zero) * scale)[o, i] * g[i]
    # (OneBit's value vector; the kernels see x * g and the weight without it).
    in_scale: bool = False

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> float:
        """The implicit zero point of a symmetric grid, 2**(bits-1) (the middle code); 1/2 for 1 bit, whose
        two codes are the signs: w_hat = (q - 1/2) * scale = +-scale / 2."""
        return 0.5 if self.bits == 1 else 2 ** (self.bits - 1)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class QuantizedWeight:
    """Integer codes and their grid, the result of every method.

    codes: uint8 (out, in), values in [0, maxq]; `W_hat = (codes - zero) * scale` per group.
    scale: (out, n_groups) in the dtype it will be stored in (codes were rounded against it).
    zero:  uint8 (out, n_groups) integer zero points, or None for a symmetric grid.
    g_idx: int32 (in,) group of each input channel when groups are not contiguous (act-order), else None.
    raw:   GGUF layers: the block bytes (out, row_bytes) uint8 that hold codes and scales exactly; `scale`
           then gives the effective per-sub-block scales (fp32, informational) and `zero` is None.
    in_scale: (in,) per-input-channel factors g in the scales' dtype (`LayerSpec.in_scale`), else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    in_scale: torch.Tensor | None = None
