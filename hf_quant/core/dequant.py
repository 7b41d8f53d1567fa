"""From packed buffers back to numbers: zero points, codes in group order, and W_hat.

These read the layout of `layout.py`; every kernel and format converter builds on them.
"""

from __future__ import annotations

import torch

from . import gguf
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
    if spec.gguf is not None:  # block bytes: llama.cpp's fp32 weights, then cast
        return gguf.dequantize(qweight, gguf.block_type(spec.gguf), in_features).to(dtype)
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


# The largest dequantized weight magnitude a checkpoint may hold: fp16's largest value. No trained
# LLM weight comes near it, and fp16 kernels could not represent a larger one.
MAX_WEIGHT = 65504.0


def check_values(scales: torch.Tensor, qzeros: torch.Tensor | None, spec: LayerSpec, name: str) -> None:
    """Refuse stored grids that cannot be a quantized weight: non-finite scales, zero points beyond
    the code range, or a dequantized range beyond MAX_WEIGHT / the scales' dtype. (Zero points up to
    2**bits are accepted: GPTQ v1 checkpoints store zero - 1, and some hold a zero of 2**bits.)"""
    bad = ~torch.isfinite(scales)
    if bad.any():
        raise ValueError(f"{name}.scales: {int(bad.sum())} value(s) are NaN or inf; the checkpoint is corrupt. "
                         "Re-quantize the model or re-download the checkpoint.")
    zero = zero_points(qzeros, spec, scales)
    if qzeros is not None and zero.numel() and zero.max() > spec.maxq + 1:
        raise ValueError(f"{name}.qzeros: a zero point of {int(zero.max())} is outside the {spec.bits}-bit code range "
                         f"[0, {spec.maxq}]; the checkpoint is corrupt or does not match its quantization_config "
                         "(bits).")
    reach = torch.maximum(zero, spec.maxq - zero) * scales.float().abs()
    limit = min(MAX_WEIGHT, torch.finfo(scales.dtype).max) if scales.dtype.is_floating_point else MAX_WEIGHT
    if reach.numel() and reach.max() > limit:
        raise ValueError(f"{name}.scales: the grid reaches weights of magnitude {float(reach.max()):.3g}, beyond "
                         f"{limit:g} (the scales' dtype, and the largest weight hf_quant accepts); the checkpoint is "
                         "corrupt or was written with wrong scales.")
