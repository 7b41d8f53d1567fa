"""The uniform quantization grid shared by all methods (the `Quantizer` of GPTQ's reference code).

Asymmetric: scale = (max - min) / maxq, zero = round(-min / scale)  (min <= 0 <= max).
Symmetric:  scale = 2 * max|w| / maxq, zero = 2**(bits-1) (implicit, not stored).
q = clamp(round(w / scale) + zero, 0, maxq);  w_hat = (q - zero) * scale.
1 bit (symmetric only): the sign, q = [w >= 0], zero = 1/2, and scale = 2 * mean|w| over the group, so that
w_hat = +-mean|w| (the scale minimising ||w - s * sign(w)||^2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .spec import LayerSpec


# The clipping search of GPTQ's reference quantizer (`mse=True`): shrink factors 1, 0.99, ..., 0.21
# of the range, error measured as sum |w - w_hat|^2.4 per group.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4
MSE_CHUNK_ELEMENTS = 1 << 18
# On an accelerator the search is launch-bound, not cache-bound: chunks of 2**18 elements made ~1M small
# kernel launches per 7B-shaped block (GPTQ on an H200 had not finished one block in 80 s), so there the
# chunks hold up to 2**24 elements (64 MiB per fp32 temporary): a group's search is a few launches.
MSE_CHUNK_ELEMENTS_ACCEL = 1 << 24


# Faster forms of the clipping search, registered by the layers above (core imports nothing of hf_quant: the
# runtime's native CPU helpers register theirs on import). Each is called as
#     search(rows (n, gs) fp32, lo (n,), hi (n,), scale (n,), zero (n,), spec, scale_dtype)
# with the unshrunk grid in scale / zero, and returns the new (scale, zero), or None where it does not apply
# (another device, an unbuilt helper): then the next one, and last `_mse_search` here, the oracle, decide.
MseSearch = Callable[..., "tuple[torch.Tensor, torch.Tensor] | None"]
_MSE_SEARCHES: list[MseSearch] = []


def register_mse_search(search: MseSearch) -> None:
    """Add a faster form of the clipping search (see `_MSE_SEARCHES`); registering one twice adds it once."""
    if search not in _MSE_SEARCHES:
        _MSE_SEARCHES.append(search)


def _chunk_elements(device: torch.device) -> int:
    return MSE_CHUNK_ELEMENTS if device.type == "cpu" else MSE_CHUNK_ELEMENTS_ACCEL


def find_params(
    Wg: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, mse: bool = False,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for grouped weights `Wg` (..., group), fp32 in.

    The scale is rounded to `scale_dtype` (how it is stored) and returned in fp32, so that codes are
    computed against exactly the scale that the kernels will use. With `mse`, the range is shrunk to
    the factor that minimises the group's |w - w_hat|^2.4 (clipping outliers to refine the rest).
    `clip` = (low, high) factors (...,) in (0, 1] that shrink the group's min and max first (the
    clipping found by AWQ's search or learned by OmniQuant); symmetric grids use `high`.
    """
    if spec.bits == 1:
        return _sign_params(Wg, spec, scale_dtype, mse, clip)
    xmin = Wg.amin(-1).clamp(max=0)
    xmax = Wg.amax(-1).clamp(min=0)
    if clip is not None:
        if spec.sym:
            xmax = torch.maximum(xmin.abs(), xmax) * clip[1]
            xmin = -xmax
        else:
            xmin, xmax = xmin * clip[0], xmax * clip[1]
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale, zero = _grid(xmin, xmax, spec, scale_dtype)
    if not mse:
        return scale, zero
    # Rows in blocks and shrink factors in chunks that keep the temporaries near MSE_CHUNK_ELEMENTS (in the
    # core's L2: about 3x faster than one pass over all rows at once); every row is searched on its own, so
    # the result does not depend on the blocking.
    gs = Wg.shape[-1]
    flat, lo, hi = Wg.reshape(-1, gs), xmin.reshape(-1), xmax.reshape(-1)
    for search in _MSE_SEARCHES:
        found = search(flat, lo, hi, scale.reshape(-1), zero.reshape(-1), spec, scale_dtype)
        if found is not None:
            return found[0].view(xmin.shape), found[1].view(xmin.shape)
    scale, zero = scale.reshape(-1).clone(), zero.reshape(-1).clone()
    rows = max(1, _chunk_elements(Wg.device) // max(gs, 1))
    for r in range(0, flat.shape[0], rows):
        sl = slice(r, r + rows)
        scale[sl], zero[sl] = _mse_search(flat[sl], lo[sl], hi[sl], scale[sl], zero[sl], spec, scale_dtype)
    return scale.view(xmin.shape), zero.view(xmin.shape)


def _sign_params(Wg: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, mse: bool,
                 clip: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-bit grid: scale = 2 * mean|w| per group (rounded to nearest in `scale_dtype`; an all-zero group
    gets the smallest normal scale), zero = 1/2."""
    if not spec.sym:
        raise ValueError("a 1-bit grid is the sign (symmetric): use sym=True with bits=1.")
    if mse or clip is not None:
        raise ValueError("a 1-bit grid has no range to clip: use mse=False (and no learned clipping) with bits=1.")
    finfo = torch.finfo(scale_dtype)
    scale = (2 * Wg.abs().mean(-1)).clamp(min=finfo.tiny, max=finfo.max).to(scale_dtype).float()
    return scale, torch.full_like(scale, 0.5)


def _mse_search(Wg: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                spec: LayerSpec, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping search for rows `Wg` (rows, group): all shrink factors, in chunks; the first factor with the
    least error wins (as a loop over factors with a strict `<` would pick)."""
    shrink = 1 - torch.arange(int(MSE_MAX_SHRINK * MSE_GRID), device=Wg.device, dtype=torch.float32) / MSE_GRID
    chunk = max(1, _chunk_elements(Wg.device) // max(Wg.numel(), 1))
    best = torch.full_like(scale, float("inf"))
    for p in shrink.split(chunk):
        p = p.view(-1, *([1] * xmin.dim()))
        s, z = _grid(p * xmin, p * xmax, spec, scale_dtype)  # (P, ...)
        err = (dequantize(quantize(Wg, s, z, spec.maxq), s, z) - Wg).abs_().pow_(MSE_NORM).sum(-1)
        err_min, i = err.min(0)
        better = err_min < best
        best = torch.where(better, err_min, best)
        scale = torch.where(better, s.gather(0, i[None]).squeeze(0), scale)
        zero = torch.where(better, z.gather(0, i[None]).squeeze(0), zero)
    return scale, zero


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype):
    scale = store_scale((xmax - xmin) / spec.maxq, scale_dtype)
    for _ in range(2):  # keep every code's (q - zero) * scale inside scale_dtype (a no-op on ordinary weights)
        zero = torch.full_like(scale, spec.sym_zero) if spec.sym else torch.round(-xmin / scale).clamp(0, spec.maxq)
        scale = _fit_range(scale, zero, spec, scale_dtype)
    return scale, zero


def _fit_range(scale: torch.Tensor, zero: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """`scale`, lowered where the extreme code would dequantize beyond `scale_dtype`'s largest value
    (weights within a step of fp16's 65504: rounding the scale up would make them inf). There the
    extreme weight is clipped by less than a step. Elsewhere the scale is returned unchanged."""
    top = torch.finfo(scale_dtype).max
    steps = torch.maximum(zero, spec.maxq - zero).clamp(min=1)
    fitted = (top / steps).to(scale_dtype)
    fitted = torch.where(fitted.float() * steps > top, torch.nextafter(fitted, torch.zeros_like(fitted)), fitted)
    return torch.where(steps * scale > top, fitted.float(), scale)


def store_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 `scale` *up* to a finite, non-zero value of `scale_dtype`; returned as fp32.

    Rounding up keeps maxq steps spanning the group's range, so no weight is clipped by more than
    half a step (round-to-nearest could shrink the grid and clip the outliers, which matter most).
    """
    finfo = torch.finfo(scale_dtype)
    scale = scale.clamp(min=finfo.tiny, max=finfo.max)
    stored = scale.to(scale_dtype)
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored.float()


def quantize(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of `Wg` (..., group) on the grid (scale, zero) (..., ), as fp32 integers (1 bit: the sign)."""
    if maxq == 1:
        return (Wg >= 0).float()
    return torch.clamp(torch.round(Wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def group(W: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """View `W` (out, in) as (out, n_groups, group) in fp32."""
    out_f, in_f = W.shape
    return W.float().reshape(out_f, spec.groups(in_f), spec.effective_group_size(in_f))


def fake_quantize(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype,
                  clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W_hat (out, in) of round-to-nearest on each group's min/max grid (optionally clipped), fp32."""
    Wg = group(W, spec)
    scale, zero = find_params(Wg, spec, scale_dtype, clip=clip)
    return dequantize(quantize(Wg, scale, zero, spec.maxq), scale, zero).reshape(W.shape)


# --- the same grid in differentiable form (straight-through estimator) ----------------------------

def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    """clamp(x, lo, hi) forward; backward the gradient where lo <= x <= hi, *bounds included*, zero beyond. The codes
    at a grid's ends (a group's min and max, exactly 0 and maxq after rounding) keep their gradient, as torch's own
    clamp gave it up to 2.13; torch 2.14 passes none at the bounds (half with tensor bounds), which froze those weights
    in QAT and changed OmniQuant's clipping gradients."""
    return torch.where((x >= lo) & (x <= hi), x, x.detach().clamp(lo, hi))


def fake_quantize_ste(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """W_hat of `Wg` (..., group) on the grid (scale, zero) (...,), differentiable: gradients pass the
    rounding unchanged (STE) and reach `Wg`, `scale` and `zero`; clamped codes pass no gradient to `Wg`.
    1 bit: the sign, its gradient passed straight through where |w| <= scale (hardtanh STE)."""
    if maxq == 1:
        return sign_ste(Wg, scale.unsqueeze(-1)) * (scale.unsqueeze(-1) / 2)
    q = clamp_ste(round_ste(Wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


class _SignSTE(torch.autograd.Function):
    """+1 where w >= 0, else -1; backward: the gradient where |w| <= `bound`, zero beyond (hardtanh STE)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, bound)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, bound = ctx.saved_tensors
        return grad * (w.abs() <= bound).to(grad.dtype), None


def sign_ste(w: torch.Tensor, bound: torch.Tensor | float = 1.0) -> torch.Tensor:
    """sign(w) in {-1, +1} (0 counts as +) forward; straight-through gradient where |w| <= bound."""
    return _SignSTE.apply(w, torch.as_tensor(bound, dtype=w.dtype, device=w.device))
