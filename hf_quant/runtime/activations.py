"""The activation quantizers of the runtime schemes (registered in `scheme.ACTIVATIONS`).

`int8_token` (LLM.int8(), dynamic W8A8): per token (row of x), absmax int8 with round-half-to-even,
as bitsandbytes' `int8_vectorwise_quant`. With `threshold` > 0, the *outlier columns* (input
channels where any |x| of the batch reaches the threshold) are left in 16-bit: their products
with the weight columns are computed apart, in the activation dtype. As in bitsandbytes, only the
outlier elements themselves are left out of their row's absmax. `fake_quantize` gives x as the int8 kernels see it (dequantized), so `reference`
(F.linear(fake_quantize(x), W_hat)) is their oracle.
"""

from __future__ import annotations

import torch

from .scheme import ActivationQuantizer, register_activation


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Bool (in,) mask of the input channels where any |x| >= threshold over the rows of x2 (M, in),
    or None when threshold is 0 (no decomposition) or no column qualifies."""
    if threshold <= 0:
        return None
    cols = (x2.abs() >= threshold).any(dim=0)
    return cols if bool(cols.any()) else None


def quantize_rows(x2: torch.Tensor, cols: torch.Tensor | None, threshold: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (M, in), fp32 absmax per row (M,)) of x2, as bitsandbytes' `int8_vectorwise_quant`:
    the outlier *elements* (|x| >= threshold) are left out of their row's absmax, and the codes of
    the outlier columns `cols` are zero (those columns are computed apart)."""
    xf = x2.float()
    if cols is not None:
        xf = xf.masked_fill(xf.abs() >= threshold, 0.0)
    absmax = xf.abs().amax(dim=1)
    codes = torch.round(xf * (127.0 / absmax).unsqueeze(1))
    codes = torch.nan_to_num(codes, nan=0.0)  # an all-zero row
    if cols is not None:
        codes = codes.masked_fill(cols, 0.0)
    return codes.to(torch.int8), absmax


def fake_quantize_int8_token(x: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    cols = outlier_columns(x2, threshold)
    codes, absmax = quantize_rows(x2, cols, threshold)
    xq = codes.float() * (absmax / 127.0).unsqueeze(1)
    if cols is not None:
        xq = torch.where(cols, x2.float(), xq)
    return xq.to(x.dtype).reshape(x.shape)


INT8_TOKEN = register_activation(ActivationQuantizer("int8_token", fake_quantize_int8_token))
