"""OmniQuant's learnable weight clipping (Shao et al., 2023), weight-only.

Each group's grid spans [sigmoid(beta) * min(W_g), sigmoid(gamma) * max(W_g)] (eq. 2), with gamma and
beta learned per group to minimise the block's output error against the float block (eq. 1), by
AdamW through a straight-through estimator for the rounding. The training loop is this method's
block stage (`learnable_clipping`), run by the block-wise driver; each step averages the gradient over
`windows_per_step` windows (1: the paper's per-window steps). Under torchrun the windows of a step are
spread over the processes and their gradients summed (in fp64), so N processes train as one does. The final quantization uses the
learned factors: "omniquant" (round-to-nearest on the learned grids) and "omniquant+gptq" (GPTQ on them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..core import LayerSpec, QuantizedWeight, gguf, grid
from ..core.layers import linear_weight, map_tensors
from .base import (BlockContext, Options, check_fraction, check_non_negative_int, check_positive_int, option,
                   register_method)
from .gptq import block_size_option, damp_percent_option, quantize_gptq
from .rtn import mse_option, round_to_nearest

LWC_INIT = 4.0  # sigmoid(4) = 0.982: training starts from (nearly) the full range, as in the paper


@dataclass
class LWCOptions(Options):
    epochs: int = option(2, check_non_negative_int, strict=True,
                         help="OmniQuant: clipping training passes over the calibration windows per block")
    learning_rate: float = option(5e-2, check_fraction("5e-2"), strict=True, help="OmniQuant: AdamW learning rate")
    windows_per_step: int = option(1, check_positive_int, strict=True,
                                   help="OmniQuant: calibration windows averaged per training step (a multiple of "
                                        "the process count spreads each step over torchrun's processes)")


@dataclass
class LWCGPTQOptions(LWCOptions):
    block_size: int = block_size_option()
    damp_percent: float = damp_percent_option()
    mse: bool = mse_option(False)


def lwc_fake_quantize(W: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """W_hat (out, in) on grids clipped by sigmoid(gamma), sigmoid(beta) (out, n_groups); differentiable.
    GGUF specs: the type's own grid (groups = its sub-blocks), through `gguf.fake_quantize_ste`."""
    if spec.gguf is not None:
        return gguf.fake_quantize_ste(W, gguf.block_type(spec.gguf), torch.sigmoid(beta), torch.sigmoid(gamma))
    Wg = grid.group(W, spec)
    hi, lo = torch.sigmoid(gamma), torch.sigmoid(beta)
    if spec.sym:
        xmax = hi * Wg.abs().amax(-1)
        scale = (2 * xmax / spec.maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, spec.sym_zero)
    else:
        xmax, xmin = hi * Wg.amax(-1).clamp(min=0), lo * Wg.amin(-1).clamp(max=0)
        scale = ((xmax - xmin) / spec.maxq).clamp(min=1e-8)
        zero = grid.round_ste(-xmin / scale)
    return grid.fake_quantize_ste(Wg, scale, zero, spec.maxq).reshape(W.shape)


def _float32(obj):
    return map_tensors(obj, lambda t: t.float() if t.is_floating_point() else t)


def learnable_clipping(ctx: BlockContext) -> dict[str, dict]:
    """Learn gamma, beta per (row, group) of every target layer of the block, on the block's output
    error against the float block (fp32 copy), `config.epochs` passes over the cached windows, the gradient of
    each step averaged over `config.windows_per_step` consecutive windows of the run. Data-parallel: each rank
    backpropagates the windows of the step that it holds (window g is on rank g % world) and the gradients are
    summed over ranks, so every rank takes the same step, the one a single process takes (bit for bit with one
    window per step; up to the order of the additions otherwise)."""
    names = [n for g in ctx.groups for n in g]
    block = copy.deepcopy(ctx.block).float()
    for p in block.parameters():
        p.requires_grad_(False)
    local = {n: n[len(ctx.prefix):] for n in names}
    W = {n: linear_weight(block.get_submodule(local[n])).detach() for n in names}
    shapes = {n: (W[n].shape[0], ctx.targets[n].groups(W[n].shape[1])) for n in names}
    gamma = {n: torch.full(shapes[n], LWC_INIT, device=ctx.device, requires_grad=True) for n in names}
    beta = {n: torch.full(shapes[n], LWC_INIT, device=ctx.device, requires_grad=True) for n in names}
    params = list(gamma.values()) + list(beta.values())

    def window(i: int) -> list:  # in fp32, converted when used (not every window at once)
        args, kwargs = ctx.inputs[i]
        return [(_float32(args), _float32(kwargs))]

    with torch.no_grad():
        targets = [ctx.run(window(i), block=block)[0] for i in range(len(ctx.inputs))]
    n_windows = int(_summed(ctx, [len(ctx.inputs)])[0])
    per_step = ctx.config.windows_per_step
    opt = torch.optim.AdamW(params, lr=ctx.config.learning_rate, weight_decay=0)
    first = last = None
    for _ in range(ctx.config.epochs):
        total = 0.0
        for start in range(0, n_windows, per_step):
            step = range(start, min(start + per_step, n_windows))
            mine = [g // ctx.world for g in step if g % ctx.world == ctx.rank]
            opt.zero_grad(set_to_none=True)
            if mine:
                with torch.enable_grad():
                    overrides = {n: lwc_fake_quantize(W[n], gamma[n], beta[n], ctx.targets[n]) for n in names}
                    losses = []
                    for i in mine:
                        out = ctx.run(window(i), block=block, overrides=overrides, keep_graph=True)[0]
                        losses.append(torch.nn.functional.mse_loss(out, targets[i].to(out.device)))
                    (sum(losses) / len(step)).backward()
                total += sum(loss.item() for loss in losses)
            if ctx.world > 1:  # every rank the whole step's gradient (zeros from a rank without a window in it)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    ctx.all_reduce(p.grad)
            opt.step()
        total = _summed(ctx, [total])[0]
        first = total / n_windows if first is None else first
        last = total / n_windows
    if first is not None:
        ctx.notes.append(f"lwc loss {first:.3e} -> {last:.3e} over {ctx.config.epochs} epochs")
    return {n: {"clip": (torch.sigmoid(beta[n]).detach(), torch.sigmoid(gamma[n]).detach())} for n in names}


def _summed(ctx: BlockContext, values: list[float]) -> list[float]:
    """`values` summed over the ranks of a data-parallel run (themselves in one process)."""
    if ctx.world == 1:
        return values
    return ctx.all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


learnable_clipping.data_parallel = True  # gradients summed over ranks (above)


@register_method("omniquant", needs_calibration=True, options=LWCOptions, stage=learnable_clipping, gguf=True,
                 description="OmniQuant learnable weight clipping")
def quantize_omniquant(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, H: torch.Tensor,
                       clip: tuple[torch.Tensor, torch.Tensor], epochs: int = 2,
                       learning_rate: float = 5e-2, windows_per_step: int = 1) -> QuantizedWeight:
    """Round-to-nearest on the grids clipped by the learned factors `clip` = (low, high) (out, n_groups)."""
    return round_to_nearest(W, spec, scale_dtype, clip=clip)


@register_method("omniquant+gptq", needs_calibration=True, options=LWCGPTQOptions, stage=learnable_clipping,
                 gguf=True, description="OmniQuant learnable weight clipping, then GPTQ")
def quantize_omniquant_gptq(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, H: torch.Tensor,
                            clip: tuple[torch.Tensor, torch.Tensor], epochs: int = 2, learning_rate: float = 5e-2,
                            windows_per_step: int = 1, block_size: int = 128, damp_percent: float = 0.01,
                            mse: bool = False) -> QuantizedWeight:
    """GPTQ whose group grids are clipped by the learned factors."""
    return quantize_gptq(W, spec, scale_dtype, H, block_size=block_size, damp_percent=damp_percent, mse=mse,
                         clip=clip)
