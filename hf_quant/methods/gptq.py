"""GPTQ (Frantar et al., 2022): quantize one column at a time, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer's reconstruction loss.

For a layer y = W x with calibration inputs X (in x n), the loss ||W X - W_hat X||^2 has Hessian
H = 2 X X^T (per output row). Quantizing column q and updating the rest optimally (OBS, eq. 3):
    err = (w_q - quant(w_q)) / [H^-1]_qq,   W[:, q:] -= err * [H^-1]_{q, q:}
GPTQ takes the upper Cholesky factor of H^-1 (whose rows give exactly these updates in a fixed
column order), and applies them lazily in blocks of `block_size` columns (Section 3, "Lazy Batch-Updates").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import LayerSpec, QuantizedWeight, gguf, grid
from ..core.layers import all_finite
from .base import Options, check_bool, check_fraction, check_positive_int, option, register_method
from .rtn import mse_option


def block_size_option() -> int:
    """`QuantConfig.block_size`: lazy-update block width."""
    return option(128, check_positive_int, help="GPTQ: lazy-update block width (columns)")


def damp_percent_option() -> float:
    """`QuantConfig.damp_percent`: Hessian dampening, a fraction of its mean diagonal."""
    return option(0.01, check_fraction("0.01"), help="GPTQ: Hessian dampening, fraction of its mean diagonal")


@dataclass
class GPTQOptions(Options):
    block_size: int = block_size_option()
    damp_percent: float = damp_percent_option()
    desc_act: bool = option(False, check_bool, unused=False, strict=True, help="GPTQ act-order")
    static_groups: bool = option(False, check_bool, unused=False, strict=True,
                                 help="with --desc-act: group grids fixed in natural order (no g_idx)")
    # mse on by default: on ref-llama it lowers held-out perplexity at w4, w3 and w2 (benchmarks/README.md)
    mse: bool = mse_option(True)


def hessian_inverse_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (fp32), computed in H's own storage
    when H is fp32: H is overwritten (callers pass their own copy).

    Raises ValueError (not torch's LinAlgError) when H is not positive-definite even after dampening;
    `quantize_layer` adds the layer's name. (Non-finite entries are refused before, by `check_hessian`.)
    """
    H = H.float().contiguous()
    damp = damp_percent * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    # One (in, in) buffer throughout (for an 11008-wide layer each copy is 485 MB): LAPACK works on
    # column-major matrices, and torch copies a row-major input into a column-major one first, so the
    # factorizations run on H's transposed view (the same matrix: H is symmetric), then the factor's
    # storage is transposed in place back to row-major.
    Ht = H.mT
    try:
        L = torch.linalg.cholesky(Ht, out=Ht)
        Hinv = torch.cholesky_inverse(L, out=Ht)
        U = torch.linalg.cholesky(Hinv, upper=True, out=Ht)
    except torch.linalg.LinAlgError as e:
        larger = round(min(0.5, damp_percent * 10), 4) if damp_percent < 0.5 else "closer to 1"
        raise ValueError(
            f"GPTQ: the Hessian of the calibration inputs is not positive-definite even after dampening "
            f"with damp_percent={damp_percent} ({e}). Use a larger QuantConfig.damp_percent (e.g. {larger}), "
            "or more varied calibration data."
        ) from e
    if U.data_ptr() != H.data_ptr() or U.stride() != Ht.stride():  # torch did not work in place after all
        return U.contiguous()
    return transpose_square_(H)


def transpose_square_(A: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """A (n, n) contiguous, transposed in its own storage, a pair of tiles at a time (temporaries of one
    tile): returns A, which now holds the transpose."""
    n = A.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            a, b = A[i:i + tile, j:j + tile], A[j:j + tile, i:i + tile]
            tmp = a.t().clone()
            if i != j:
                a.copy_(b.t())
                b.copy_(tmp)
            else:
                a.copy_(tmp)
    return A


def check_hessian(H: torch.Tensor) -> None:
    """Refuse a Hessian with NaN/inf entries (non-finite calibration inputs), before any factorization."""
    if not all_finite(H):
        bad = (~torch.isfinite(H)).sum().item()
        raise ValueError(f"GPTQ: the Hessian has {bad} NaN/inf entries: the calibration inputs contain NaN/inf.")


# Fused forms of a run of GPTQ's column steps (one grid per column known), registered by the layers above (methods
# import nothing of them: the runtime's native CPU helpers register theirs on import). Each is called as
#     steps(W1, Hinv1, c0, c1, scale, zero, group, maxq, codes, col0, Err1)
# for the columns c0 .. c1 of a block (see `column_loop`; group: int32 (block,), each column's index into the
# (rows, G) scale / zero; codes: the (rows, in) uint8 codes, block column i at col0 + i), and returns True when it
# did them exactly as the torch steps do, False where it does not apply.
ColumnSteps = Callable[..., bool]
_COLUMN_STEPS: list[ColumnSteps] = []


def register_column_steps(steps: ColumnSteps) -> None:
    """Add a fused form of GPTQ's column steps (see `_COLUMN_STEPS`); registering one twice adds it once."""
    if steps not in _COLUMN_STEPS:
        _COLUMN_STEPS.append(steps)


def column_loop(W: torch.Tensor, Hinv: torch.Tensor, block_size: int,
                step: Callable[[int, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor],
                run: Callable[..., int] | None = None) -> None:
    """GPTQ's column order with lazy batch updates (Section 3), updating W in place.

    `step(col, w, ahead)` quantizes column `col` (its updated weights `w`) and returns w_hat; `ahead(n)`
    gives the updated weights of columns col .. col+n (for a group's grid found at its first column).
    `run(i1, i, W1, Hinv1, Err1, ahead)`, if given, may do the block's columns i .. i+n at once (the same updates
    of W1 and Err1 as n steps) and returns n, or 0 to leave column i to `step`."""
    in_f = W.shape[1]
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        i = 0
        while i < i2 - i1:
            ahead = lambda n, i=i, W1=W1, i2=i2: _ahead(W1, W, i, i2, n)  # noqa: E731
            n = run(i1, i, W1, Hinv1, Err1, ahead) if run is not None else 0
            if n:
                i += n
                continue
            w = W1[:, i]
            w_hat = step(i1 + i, w, ahead)
            err = (w - w_hat) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
            i += 1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


def _ahead(W1: torch.Tensor, W: torch.Tensor, i: int, i2: int, n: int) -> torch.Tensor:
    """Columns i .. i+n of the block's updated weights W1, continued into W past the block (i2): only
    the n columns asked for are copied (the rest of W can be most of the matrix)."""
    inside = W1.shape[1] - i
    if n <= inside:
        return W1[:, i:i + n]
    return torch.cat([W1[:, i:], W[:, i2:i2 + n - inside]], dim=1)


@register_method("gptq", needs_calibration=True, options=GPTQOptions, description="GPTQ", gguf=True)
def quantize_gptq(
    W: torch.Tensor,
    spec: LayerSpec,
    scale_dtype: torch.dtype,
    H: torch.Tensor,
    block_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    static_groups: bool = False,
    mse: bool = False,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
    inplace: bool = False,
) -> QuantizedWeight:
    """GPTQ of `W` (out, in) given the Hessian `H` (in, in) of its calibration inputs.

    inplace: W and H are the caller's scratch copies, which GPTQ overwrites instead of cloning (for an
    11008-wide layer a copy of H is 485 MB); the calibration driver passes its own fresh copies.

    desc_act ("act-order", Section 4 of the paper's code release): process input channels by
    decreasing diag(H), so the channels with the largest activations are quantized first, while the
    most columns remain to absorb their error. Groups are then formed in that order and returned as
    `g_idx`, unless `static_groups` fixes each natural-order group's grid from the unquantized W first.
    clip: per (row, group) (low, high) factors shrinking each grid's range (OmniQuant's learned
    clipping, in natural group order: not with act-order regrouping).
    """
    W = W.float() if inplace else W.clone().float()
    H = H.float() if inplace else H.clone().float()
    check_hessian(H)
    out_f, in_f = W.shape
    if clip is not None and desc_act and not static_groups:
        raise ValueError("GPTQ with learned clipping keeps natural-order groups: use desc_act=False or static_groups.")
    if desc_act and not static_groups and spec.groups(in_f) > 1 and not spec.g_idx:
        raise ValueError("GPTQ with desc_act regroups channels: the layer spec must store a g_idx "
                         "(QuantConfig.layer_spec sets it), or use static_groups=True.")
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, quantize zeros
    H[dead, dead] = 1
    W[:, dead] = 0
    if spec.gguf is not None:
        return _gptq_gguf(W, H, spec, block_size, damp_percent, mse, clip)

    gs = spec.effective_group_size(in_f)
    n_groups = spec.groups(in_f)
    scale = torch.empty(out_f, n_groups, device=W.device)
    zero = torch.empty(out_f, n_groups, device=W.device)
    if static_groups:  # every grid from the original weights, in natural channel order
        Wg = grid.group(W, spec)
        scale[:], zero[:] = grid.find_params(Wg, spec, scale_dtype, mse, clip)

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if desc_act else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = hessian_inverse_cholesky(H, damp_percent)  # overwrites H: this function's own copy
    del H
    # group of the channel at each processing position
    natural = torch.arange(in_f, device=W.device)
    group_of = (perm if perm is not None and static_groups else natural) // gs
    groups = group_of.tolist()  # host copy: no device sync per column on GPU

    codes = torch.empty(out_f, in_f, device=W.device, dtype=torch.uint8)  # integer-valued q: stored exactly

    found_at = [-1]  # the column whose group grid was found last (`run` refusing leaves its column to `step`)

    def grids(col: int, ahead: Callable[[int], torch.Tensor]) -> None:
        if not static_groups and col % gs == 0 and col != found_at[0]:  # a new group: its grid from updated weights
            found_at[0] = col
            g = groups[col]
            scale[:, g], zero[:, g] = grid.find_params(ahead(gs), spec, scale_dtype, mse,
                                                       None if clip is None else (clip[0][:, g], clip[1][:, g]))

    def step(col: int, w: torch.Tensor, ahead: Callable[[int], torch.Tensor]) -> torch.Tensor:
        g = groups[col]
        grids(col, ahead)
        q = grid.quantize(w.unsqueeze(-1), scale[:, g], zero[:, g], spec.maxq).squeeze(-1)
        codes[:, col] = q
        return (q - zero[:, g]) * scale[:, g]

    group32 = group_of.to(torch.int32)

    def run(i1: int, i: int, W1: torch.Tensor, Hinv1: torch.Tensor, Err1: torch.Tensor,
            ahead: Callable[[int], torch.Tensor]) -> int:
        """The columns from i to the next group's first (a grid found there from updated weights) at once."""
        col = i1 + i
        end = W1.shape[1] if static_groups else min(W1.shape[1], i + gs - col % gs)
        grids(col, ahead)
        args = (W1, Hinv1, i, end, scale, zero, group32[i1:i1 + W1.shape[1]], spec.maxq, codes, i1, Err1)
        return end - i if any(steps(*args) for steps in _COLUMN_STEPS) else 0  # 0: `step`, on the grid just found

    fused = _COLUMN_STEPS and W.device.type == "cpu" and W.dtype == torch.float32
    column_loop(W, Hinv, block_size, step, run if fused else None)

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]  # back to natural channel order
        if spec.g_idx:
            g_idx = group_of[inv].to(torch.int32)  # channel perm[j] was in group j // gs
    return QuantizedWeight(
        codes=codes,
        scale=scale.to(scale_dtype),
        zero=None if spec.sym else zero.to(torch.uint8),
        g_idx=g_idx,
    )


def _gptq_gguf(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, block_size: int, damp_percent: float, mse: bool,
               clip: tuple[torch.Tensor, torch.Tensor] | None) -> QuantizedWeight:
    """GPTQ onto a GGUF block type: at each (super-)block's first column, the block's grid (sub-block
    scales and mins, already rounded the way the format stores them against fp16 super-scales) is found
    from the updated weights, as the group step does (with `mse`, each sub-block's range clipped by the
    search of `gguf.mse_clip`); then column by column as above."""
    t = gguf.block_type(spec.gguf)
    out_f, in_f = W.shape
    gguf.check_shape(t, in_f, "GPTQ")
    Hinv = hessian_inverse_cholesky(H, damp_percent)  # overwrites H: quantize_gptq's own copy
    found: list[gguf.Blocks] = []
    codes = torch.empty(out_f, in_f, device=W.device)
    scale = torch.empty(out_f, in_f, device=W.device)  # each column's sub-block grid
    zero = torch.empty(out_f, in_f, device=W.device)
    inv = torch.empty(out_f, in_f, device=W.device)  # 1 / scale (0 for an all-zero sub-block)

    def step(col: int, w: torch.Tensor, ahead: Callable[[int], torch.Tensor]) -> torch.Tensor:
        if col % t.block == 0:
            subs = slice(col // t.sub, (col + t.block) // t.sub)  # learned clipping of these sub-blocks, if any
            f = gguf.find_grid(ahead(t.block), t, None if clip is None else (clip[0][:, subs], clip[1][:, subs]), mse)
            s, z = gguf.column_grid(f, t)
            scale[:, col:col + t.block] = s.repeat_interleave(t.sub, -1)
            zero[:, col:col + t.block] = z.repeat_interleave(t.sub, -1)
            inv[:, col:col + t.block] = torch.where(s == 0, 0.0, 1 / s).repeat_interleave(t.sub, -1)
            found.append(f)
        q = torch.round(w * inv[:, col] + zero[:, col]).clamp_(0, t.maxq)
        codes[:, col] = q
        return (q - zero[:, col]) * scale[:, col]

    column_loop(W, Hinv, block_size, step)
    return gguf.quantized_weight(gguf.join_blocks(found, codes.to(torch.uint8)), t)
