"""OneBit (Xu et al., 2024): 1-bit weights with two value vectors.

Each linear becomes y = LN(((x * g) @ sign(W)^T) * h) + bias (eq. 3; the LayerNorm without affine
parameters is the paper's normalisation, `output_norm`), with g (in,) and h (out,) in 16-bit. The
starting point is the sign-value-independent decomposition (SVID, sec. 3.3): W ~ sign(W) * (h g^T) with
h g^T the best rank-1 approximation of |W| (its leading singular pair, non-negative by Perron-Frobenius:
what the paper's rank-1 NMF finds), found by power iteration. `init="absmean"` is the plain alternative
the paper compares against (h = mean|W| per row, g = 1). Rounding alone loses most of the model: OneBit
is trained afterwards (`hf_quant.training.prepare`, distillation), and its trained g, h and latent
weights' signs are what `convert` stores through `quantize_onebit(W, ..., g=, h=)`.

Storage: 1-bit codes q = [W >= 0], `scales` = 2h (a 1-bit grid is w_hat = (q - 1/2) * scale) and
`in_scales` = g, in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core import LayerSpec, QuantizedWeight
from .base import Options, check_bool, option, register_method

ONEBIT_SPEC = {"bits": 1, "group_size": -1, "sym": True}
INITS = ("svid", "absmean")
POWER_ITERATIONS = 30


def _check_init(name: str, value: Any) -> None:
    if value not in INITS:
        raise ValueError(f"QuantConfig.{name}={value!r} is not supported; use one of {list(INITS)}.")


@dataclass
class OneBitOptions(Options):
    init: str = option("svid", _check_init, strict=True,
                       help="OneBit: value vectors from SVID (rank-1 of |W|) or absmean (h = mean|W| per row, g = 1)")
    output_norm: bool = option(True, check_bool, strict=True,
                               help="OneBit: LayerNorm (no affine) on each layer's product, as in the paper")


def svid(W: torch.Tensor, iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (out,), g (in,)) >= 0 with h g^T the best rank-1 approximation of |W| in Frobenius norm: the
    leading singular pair of |W| by power iteration, the singular value split evenly between them."""
    A = W.float().abs()
    v = A.mean(0)
    v = v / v.norm().clamp(min=1e-30)
    for _ in range(iterations):
        u = A @ v
        u = u / u.norm().clamp(min=1e-30)
        v = A.t() @ u
        sigma = v.norm()
        v = v / sigma.clamp(min=1e-30)
    root = sigma.sqrt()
    return u * root, v * root


def absmean_vectors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, g) = (mean|W| per row, ones): sign(W) * mean|W| per row, the 1-bit round-to-nearest."""
    return W.float().abs().mean(1), torch.ones(W.shape[1], device=W.device)


def onebit_weight(W: torch.Tensor, h: torch.Tensor, g: torch.Tensor, scale_dtype: torch.dtype) -> QuantizedWeight:
    """Codes [W >= 0], scale 2h and in_scale g, each rounded once to `scale_dtype` (as stored)."""
    finfo = torch.finfo(scale_dtype)
    h = h.float().clamp(min=finfo.tiny, max=finfo.max / 2).to(scale_dtype)
    g = g.float().clamp(min=-finfo.max, max=finfo.max).to(scale_dtype)
    return QuantizedWeight(codes=(W >= 0).to(torch.uint8), scale=(2 * h.float()).to(scale_dtype).unsqueeze(1),
                           zero=None, in_scale=g)


def _output_norm(output_norm: bool = True, **_: Any) -> bool:
    return output_norm


@register_method("onebit", needs_calibration=False, options=OneBitOptions, fixed_spec=ONEBIT_SPEC, strict_spec=True,
                 one_bit=True, input_scale=True, output_norm=_output_norm,
                 description="OneBit (1-bit signs, two value vectors by SVID; train with hf_quant.training)")
def quantize_onebit(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, init: str = "svid",
                    output_norm: bool = True, h: torch.Tensor | None = None, g: torch.Tensor | None = None
                    ) -> QuantizedWeight:
    """OneBit's layer from W (out, in): the signs of W and the value vectors `h`, `g` (trained ones from
    `training.convert`), else those of `init` ("svid" or "absmean")."""
    if h is None or g is None:
        h, g = svid(W) if init == "svid" else absmean_vectors(W)
    return onebit_weight(W, h, g, scale_dtype)
