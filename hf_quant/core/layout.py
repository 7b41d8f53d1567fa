"""The tensors a quantized linear stores, by name, shape and dtype (format_version 2).

  {module}.qweight  uint8        (out_features, in_features * bits / 8)   packed codes (see packing.py)
  {module}.scales   model dtype  (out_features, n_groups)
  {module}.qzeros   uint8        (out_features, n_groups)                  only when sym=False
  {module}.g_idx    int32        (in_features,)                            only for act-order layers
  {module}.in_scales model dtype (in_features,)                            only for LayerSpec.in_scale (OneBit's g)
  {module}.bias     model dtype  (out_features,)                           only if the layer has one
1-bit codes are signs: W_hat = (q - 1/2) * scale, i.e. +-scale/2 (the scales hold twice OneBit's h).
n_groups = in_features / group_size, or 1 for group_size=-1. Without g_idx, input channel i belongs
to group i // group_size; with it, to group g_idx[i] (format_version 2; every group still has
group_size channels).
GGUF layers (`LayerSpec.gguf`, format_version 3) store only
  {module}.qweight  uint8        (out_features, in_features / block * block_bytes)  the GGUF blocks
(codes, scales and mins as llama.cpp lays them out; core/gguf.py), and the bias if any.
"""

from __future__ import annotations

import torch

from . import gguf
from .spec import LayerSpec


from .packing import packed_in_features

QUANT_BUFFERS = ("qweight", "scales", "qzeros", "g_idx", "in_scales")


def buffer_specs(
    in_features: int, out_features: int, spec: LayerSpec, float_dtype: torch.dtype | None
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Name -> (shape, dtype) of the stored quantized tensors (bias excluded); dtype None = any float."""
    if spec.gguf is not None:
        t = gguf.block_type(spec.gguf)
        return {"qweight": ((out_features, gguf.row_bytes(t, in_features)), torch.uint8)}
    n_groups = spec.groups(in_features)
    specs = {
        "qweight": ((out_features, packed_in_features(in_features, spec.bits)), torch.uint8),
        "scales": ((out_features, n_groups), float_dtype),
    }
    if not spec.sym:
        specs["qzeros"] = ((out_features, n_groups), torch.uint8)
    if spec.g_idx:
        specs["g_idx"] = ((in_features,), torch.int32)
    if spec.in_scale:
        specs["in_scales"] = ((in_features,), float_dtype)
    return specs


def packed_bytes(entries: dict[str, dict], modules: set[str] | None = None) -> int:
    """Bytes of the quantized tensors (qweight, scales, qzeros, g_idx, in_scales) in safetensors header `entries`,
    of every module, or of `modules` only."""
    total = 0
    for key, entry in entries.items():
        module, _, tensor = key.rpartition(".")
        if tensor in QUANT_BUFFERS and (modules is None or module in modules):
            start, end = entry["data_offsets"]
            total += end - start
    return total
