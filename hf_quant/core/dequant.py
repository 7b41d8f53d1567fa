"""From packed buffers back to numbers: zero points, codes in group order, and W_hat.

These read the layout of `layout.py`; every kernel and format converter builds on them.
"""

from __future__ import annotations

import torch

from .packing import unpack_codes
from .spec import LayerSpec


def zero_points(qzeros: torch.Tensor | None, spec: LayerSpec, like: torch.Tensor) -> torch.Tensor:
    """Per-group integer zero points as fp32 (out, n_groups); implicit 2**(bits-1) when symmetric."""
    if qzeros is None:
        return torch.full(like.shape, spec.sym_zero, dtype=torch.float32, device=like.device)
    return qzeros.float()


def codes_by_group(qweight: torch.Tensor, spec: LayerSpec, in_features: int,
                   g_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The codes (out, in) with act-order channels sorted by group, and that permutation (None
    without g_idx). Packed kernels apply the same permutation to the activations."""
    codes = unpack_codes(qweight, spec.bits, in_features)
    if g_idx is None:
        return codes, None
    perm = torch.argsort(g_idx, stable=True)
    return codes[:, perm], perm


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    spec: LayerSpec,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """W_hat = (q - zero) * scale as `dtype` (out, in); channel i uses group g_idx[i] if given.

    Computed in `dtype` directly when the scales are stored in it: q - zero is a small integer, exact
    in any float type, so the product is rounded once and equals the fp32 result cast to `dtype`.
    Otherwise computed in fp32 and cast.
    """
    compute = dtype if scales.dtype == dtype else torch.float32
    q = unpack_codes(qweight, spec.bits, in_features)
    out_f = q.shape[0]
    gs = spec.effective_group_size(in_features)
    z = zero_points(qzeros, spec, scales).to(compute)
    if g_idx is not None:  # act-order: gather each channel's group
        g = g_idx.long()
        return q.to(compute).sub_(z[:, g]).mul_(scales.to(compute)[:, g]).to(dtype)
    W = q.reshape(out_f, -1, gs).to(compute).sub_(z.unsqueeze(-1)).mul_(scales.to(compute).unsqueeze(-1))
    return W.reshape(out_f, in_features).to(dtype)
