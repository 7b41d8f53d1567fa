"""Dequantize-then-matmul kernels, for any device and layout.

`reference` (fp32 dequantization) is the oracle every kernel is tested against and is only run when
forced; `dequant_matmul` dequantizes into the activation dtype and is the general fallback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..config import LayerSpec
from ..formats.packing import unpack_codes
from .dispatch import Kernel, register_kernel


def zero_points(qzeros: torch.Tensor | None, spec: LayerSpec, like: torch.Tensor) -> torch.Tensor:
    """Per-group integer zero points as fp32 (out, n_groups); implicit 2**(bits-1) when symmetric."""
    if qzeros is None:
        return torch.full(like.shape, 2 ** (spec.bits - 1), dtype=torch.float32, device=like.device)
    return qzeros.float()


def codes_by_group(layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's codes (out, in) with act-order channels sorted by group, and that permutation
    (None without g_idx). Packed kernels apply the same permutation to the activations."""
    codes = unpack_codes(layer.qweight, layer.spec.bits, layer.in_features)
    if layer.g_idx is None:
        return codes, None
    perm = torch.argsort(layer.g_idx, stable=True)
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


class ReferenceKernel(Kernel):
    """The oracle: fp32 dequantization. Never chosen automatically; force it with `use_kernel`."""

    name = "reference"
    priority = -1

    def supports(self, layer: Any, x: torch.Tensor) -> bool:
        return x.is_floating_point()

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features,
                              g_idx=layer.g_idx)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, W.to(x.dtype), bias)


register_kernel(ReferenceKernel())


class DequantMatmulKernel(Kernel):
    """Any device, layout and batch: dequantize into the activation dtype, then one `F.linear`.

    The fallback where no packed kernel applies, and the faster choice for large batches (prefill),
    where one dequantization is amortised over many rows.
    """

    name = "dequant_matmul"
    priority = 0

    def supports(self, layer: Any, x: torch.Tensor) -> bool:
        return x.is_floating_point()

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        W = dequantize_weight(layer.qweight, layer.scales, layer.qzeros, layer.spec, layer.in_features, x.dtype,
                              layer.g_idx)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, W, bias)


register_kernel(DequantMatmulKernel())
