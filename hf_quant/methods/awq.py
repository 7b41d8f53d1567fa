"""AWQ (Lin et al., 2023): activation-aware weight quantization.

Salient weights are the input channels with large activations. Scaling channel j of W up by s_j
and its input down by s_j leaves W x unchanged in float but shrinks channel j's relative rounding
error (Section 3.2):  Q(W diag(s)) (diag(s)^-1 X) ~ W X.  The scales are s = s_X^alpha, with s_X the
mean |x| per input channel and alpha in [0, 1) found by grid search (eq. 5); the block-wise driver
runs that search on the block's output (`awq_scales`, this method's block stage) and folds diag(s)^-1 into
the operation before (a norm's weight, or the previous linear's rows), so no runtime op remains.

Then each layer's weight range is clipped: per group, the shrink factor of its min/max (1 down to
0.5) that minimises the layer's output error on the calibration inputs, || (W_hat - W) X ||^2 =
sum_groups dW_g H_gg dW_g^T, from the diagonal blocks of the Hessian H = 2/N X X^T.

Methods: "awq" (scales + clipping + round-to-nearest) and "awq+gptq" (scales, then GPTQ).

The fold (`foldable_groups`: the groups whose input scales fold, and into which op (`fold_target`);
`fold_scales`: divide that op's output by s, scale the group's weights by s, with the undo log) is
shared with w8a8's SmoothQuant smoothing (`w8a8.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn

from ..core import LayerSpec, QuantizedWeight, gguf, grid
from ..core.layers import FLOAT_LINEARS, linear_shape, linear_weight, set_linear_weight
from .base import BlockContext, register_method, restore
from .gptq import GPTQOptions, quantize_gptq
from .rtn import round_to_nearest

SCALE_GRID = 20  # alpha in {0, 1/20, ..., 19/20}
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # clip factors 1, 0.975, ..., 0.525


def candidate_scales(x_abs_mean: torch.Tensor) -> Iterator[tuple[float, torch.Tensor]]:
    """(alpha, s) for each grid point: s = s_X^alpha, normalised so that max(s) * min(s) = 1."""
    base = x_abs_mean.float().clamp(min=1e-4)
    for i in range(SCALE_GRID):
        alpha = i / SCALE_GRID
        s = base.pow(alpha)
        yield alpha, s / (s.max() * s.min()).sqrt()


def scaled_fake_quantize(W: torch.Tensor, s: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1: the layer as it acts on the unscaled input once s is folded in."""
    if spec.gguf is not None:
        return gguf.fake_quantize(W.float() * s, gguf.block_type(spec.gguf)) / s
    return grid.fake_quantize(W.float() * s, spec, scale_dtype) / s


def clip_search(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> torch.Tensor:
    """Per (row, group) shrink factor of the weight range minimising the output error dW_g H_gg dW_g^T
    (GGUF grids: per sub-block, each factor tried on every sub-block at once, super-scales refound)."""
    Wg = grid.group(W, spec)  # (out, G, gs); GGUF specs: group = the type's sub-block
    n_groups, gs = Wg.shape[1], Wg.shape[2]
    Hg = torch.stack([H[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(n_groups)]).float()
    best_err = torch.full(Wg.shape[:2], float("inf"), device=W.device)
    best = torch.ones(Wg.shape[:2], device=W.device)
    for i in range(CLIP_GRID):
        p = torch.full(Wg.shape[:2], 1 - CLIP_MAX_SHRINK * i / CLIP_GRID, device=W.device)
        if spec.gguf is not None:
            dW = gguf.fake_quantize(W.float(), gguf.block_type(spec.gguf), p).reshape(Wg.shape) - Wg
        else:
            scale, zero = grid.find_params(Wg, spec, scale_dtype, clip=(p, p))
            dW = grid.dequantize(grid.quantize(Wg, scale, zero, spec.maxq), scale, zero) - Wg
        err = torch.einsum("ogi,gij,ogj->og", dW, Hg, dW)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, p, best)
    return best


# --- the block stage: per-channel scales searched on the block output, folded into the previous op --

def observe_abs_mean(values: dict, head: str, x: torch.Tensor, n_windows: int) -> None:
    """s_X: mean |x| per input channel of each group, over the reference pass's windows."""
    x = x.detach().reshape(-1, x.shape[-1]).abs().float()
    values[head] = values.get(head, 0) + x.sum(0) / max(n_windows * x.shape[0], 1)


def norm_offset(module: nn.Module, width: int) -> float | None:
    """c where the module computes n(x) * (c + weight) (+ bias), elementwise over its `width` channels: 0 for
    LayerNorm / RMSNorm (and Cohere's, OLMo's, ... whatever their class is called), 1 for Gemma's x * (1 +
    weight); None for anything else. Found by probing the module's own forward on random rows with the
    weight set to 0, 1 and a random vector (bias 0), then restored: linear in the weight, and the offset
    constant over channels. Dividing c + weight (and the bias) by s then divides the output by s."""
    w = getattr(module, "weight", None)
    if isinstance(module, FLOAT_LINEARS) or not isinstance(w, torch.Tensor) or w.shape != (width,) \
            or not w.is_floating_point() or w.device.type == "meta":
        return None
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) and bias.shape == (width,) else None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, width, generator=g) * 3).to(w.device, w.dtype)
    r = torch.empty(width).uniform_(-1.5, 1.5, generator=g).exp().to(w.device, w.dtype)  # spread out: a
    # weight acting before a normalisation changes the output by far more than the rounding
    saved = [(t, t.data) for t in (w, bias) if t is not None]
    outs = []
    try:
        with torch.no_grad():
            if bias is not None:
                bias.data = torch.zeros_like(bias)
            for probe in (torch.zeros_like(w), torch.ones_like(w), r):
                w.data = probe
                y = module.forward(x)  # not through __call__: no hook of a calibration pass sees the probe
                if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                    return None
                outs.append(y.float())
    except Exception:  # noqa: BLE001  (a module this probe cannot drive is simply not a foldable norm)
        return None
    finally:
        for t, data in saved:
            t.data = data
    y0, y1, yr = outs
    a = y1 - y0  # n(x), if the module is n(x) * (c + weight)
    scale = a.abs().amax().item()
    if not torch.isfinite(a).all() or scale == 0:
        return None
    eps = 4 * torch.finfo(w.dtype).eps  # the module's dtype rounds each output (bf16: 2^-8 relative)
    for c in (0.0, 1.0):
        expected = a * (c + r.float())
        if (y0 - c * a).abs().amax() <= eps * scale and \
                (yr - expected).abs().amax() <= eps * expected.abs().amax():
            return c
    return None


def block_producers(ctx: BlockContext) -> dict[str, str]:
    """For each group (by its first layer), the block module whose output is exactly the group's input."""
    made: dict[int, str] = {}
    read: dict[str, int] = {}
    keep: list[torch.Tensor] = []
    heads = {g[0]: g for g in ctx.groups}
    hooks = []
    for local, module in ctx.block.named_modules():
        full = ctx.prefix + local
        def hook(m, args, out, local=local, full=full):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                made.setdefault(id(out), local)
            if full in heads and args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                read[full] = id(args[0])
        if local:
            hooks.append(module.register_forward_hook(hook))
    try:
        ctx.run(ctx.inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    return {head: made[i] for head, i in read.items() if i in made}


def _linear_producer(ctx: BlockContext, consumer: str) -> tuple[str | None, str]:
    """The linear whose output rows feed `consumer`'s input channels one to one, or (None, why)."""
    parent, _, leaf = consumer[len(ctx.prefix):].rpartition(".")
    sib = (lambda n: f"{parent}.{n}" if parent else n)
    has = (lambda n: isinstance(_get(ctx.block, sib(n)), FLOAT_LINEARS))
    width = linear_shape(ctx.block.get_submodule(consumer[len(ctx.prefix):]))[0]
    if leaf == "down_proj" and has("up_proj") and has("gate_proj"):
        return sib("up_proj"), ""  # act(gate(x)) * up(x): linear in up's output
    if leaf in ("o_proj", "out_proj") and has("v_proj"):
        if linear_shape(ctx.block.get_submodule(sib("v_proj")))[1] == width:
            return sib("v_proj"), ""  # softmax(QK^T) V is linear in V, head by head
        return None, "its input mixes v_proj heads shared by several query heads (grouped-query attention)"
    if leaf == "fc2" and has("fc1"):
        cfg = ctx.model.config
        act = getattr(cfg, "activation_function", None) or getattr(cfg, "hidden_act", None)
        if act == "relu":
            return sib("fc1"), ""  # relu(x / s) = relu(x) / s for s > 0
        return None, f"its input comes through the {act} activation, which a scale does not pass through"
    return None, "no norm or linear feeds its input directly (e.g. a non-linearity or a fused projection)"


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _fold(ctx: BlockContext, target: FoldTarget, s: torch.Tensor) -> torch.Tensor:
    """Divide the producer's output channels by s (its weight rows / a norm's weight and bias). Returns the
    scales the group's layers are multiplied by: s, or for a norm with an offset (Gemma: c + weight) the
    scales that the rounded c + weight actually stored divide by, so that the float function is unchanged
    to the layers' rounding (near weight = -c, c + weight / s would otherwise lose its precision in bf16)."""
    producer = target.producer
    params = [producer.weight] + ([producer.bias] if getattr(producer, "bias", None) is not None else [])
    for p in params:
        ctx.undo.append((p, p.detach().clone()))
    with torch.no_grad():
        if target.is_norm and target.offset:
            s = _fold_offset_norm(producer.weight, s, target.offset)
        elif target.is_norm:
            producer.weight.div_(s.to(producer.weight.dtype))
        else:
            W = linear_weight(producer).float() / s.unsqueeze(1)
            set_linear_weight(producer, W)
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    return s


def _fold_offset_norm(weight: torch.Tensor, s: torch.Tensor, c: float) -> torch.Tensor:
    """weight <- (c + weight) / s - c, rounded to its dtype; returns (c + weight) / (c + new weight) per
    channel, the scale the norm's output really changed by. A channel whose new c + weight would round to 0
    (or change sign) keeps the nearest representable value of the same sign; a dead channel (c + weight = 0)
    is left as it is, with scale 1."""
    m = c + weight.float()
    target = m / s.float().to(m.device)
    new = (target - c).to(weight.dtype)
    stored = c + new.float()
    bad = (stored == 0) | (torch.sign(stored) != torch.sign(target))
    if bad.any():  # step one ulp from -c towards the target's sign (on the CPU: nextafter in any float dtype)
        start = torch.full(target.shape, -c, dtype=weight.dtype)
        step = torch.nextafter(start, torch.where(target.cpu() > 0, float("inf"), -float("inf")).to(weight.dtype))
        new = torch.where(bad, step.to(new.device), new)
        stored = c + new.float()
    dead = m == 0
    new = torch.where(dead, weight, new)
    weight.copy_(new)
    return torch.where(dead, torch.ones_like(m), m / torch.where(dead, torch.ones_like(stored), stored))


@dataclass
class FoldTarget:
    """Where a group's per-input-channel scales fold: `producer` (the block module at `local`) makes
    the group's input, channel for channel; `is_norm`: a norm's weight (and bias), else a linear's
    rows; `offset`: the norm's c in n(x) * (c + weight) (`norm_offset`). `producer` None: no such op,
    `why` says why."""

    producer: nn.Module | None
    local: str | None
    is_norm: bool = False
    why: str = ""
    offset: float = 0.0


def fold_target(ctx: BlockContext, head: str, producers: dict[str, str] | None = None) -> FoldTarget:
    """The op that group `head`'s input scales fold into: the norm whose output is exactly the
    input, else a linear whose output rows feed it one to one (`_linear_producer`). `producers`:
    `block_producers(ctx)`, computed once per block, before any fold (computed here if None)."""
    local = (block_producers(ctx) if producers is None else producers).get(head)
    producer = ctx.block.get_submodule(local) if local else None
    width = linear_shape(ctx.model.get_submodule(head))[0]
    offset = None if producer is None else norm_offset(producer, width)
    if offset is not None:
        return FoldTarget(producer, local, True, offset=offset)
    local, why = _linear_producer(ctx, head)
    if local is None:
        return FoldTarget(None, None, False, why)
    return FoldTarget(ctx.block.get_submodule(local), local, False)


def fold_scales(ctx: BlockContext, target: FoldTarget, layers: dict[str, nn.Module], W: dict[str, torch.Tensor],
                s: torch.Tensor) -> torch.Tensor:
    """Fold per-input-channel scales s into a group: the producer's output channels divided by s,
    each layer's weight set to W[name] * s (W: the layers' (out, in) fp32 weights); every tensor
    changed is recorded in `ctx.undo` first. The float function of the block is unchanged. Returns the
    scales applied to the layers (s, up to an offset norm's rounding: `_fold`)."""
    s = _fold(ctx, target, s)
    for n, m in layers.items():
        ctx.undo.append((m.weight, m.weight.detach().clone()))
        set_linear_weight(m, W[n] * s)
    return s


def foldable_groups(ctx: BlockContext, what: str
                    ) -> Iterator[tuple[list[str], FoldTarget, dict[str, nn.Module], dict[str, torch.Tensor]]]:
    """The block's groups whose input scales can fold, in order: (group, fold target, its layers,
    their fp32 (out, in) weights). Each other group gets a note "<layer>: no <what> (why)". The
    producers are found, and each fold is checked on the float block (`_folds_keep_the_block`), once,
    before the first fold."""
    producers = block_producers(ctx)
    plan: list[tuple[list[str], FoldTarget | None, str]] = []
    for group in ctx.groups:
        if group[0] not in ctx.observed:  # no calibration window reaches it (e.g. an unrouted expert)
            plan.append((group, None, "no calibration input reached it"))
            continue
        target = fold_target(ctx, group[0], producers)
        plan.append((group, target if target.producer is not None else None, target.why))
    exact = _folds_keep_the_block(ctx, [(g, t) for g, t, _ in plan if t is not None])
    for group, target, why in plan:
        head = group[0]
        if target is not None and not exact[head]:
            target, why = None, (f"{target.local}'s output is read by more than this group (e.g. a MoE router or "
                                 "fused experts): folding into it changes the block's float output")
        if target is None:
            ctx.notes.append(f"{head[len(ctx.prefix):]}: no {what} ({why})")
            continue
        layers = {n: ctx.model.get_submodule(n) for n in group}
        yield group, target, layers, {n: linear_weight(m).detach().float() for n, m in layers.items()}


def _folds_keep_the_block(ctx: BlockContext, candidates: list[tuple[list[str], FoldTarget]]) -> dict[str, bool]:
    """Per group (by its first layer): does folding into its target leave the float block's output as it was?
    It does not where another op also reads the target's output (a MoE router, stacked experts: consumers that
    are no linear of the group, or read a view or copy of it). Each fold is tried with scales of 2 and 1/2
    (exact in floating point: the output must come back bit for bit, up to 1e-5 relative; offset norms, whose
    fold rounds, to 2%) on the first reference window, against the block's output before, and undone."""
    if not candidates:
        return {}
    window = ctx.inputs[:min(1, len(ctx.reference))]
    ref = _flat(ctx.run(window)).to(ctx.device)
    norm = ctx.mean(ref.pow(2))  # every rank calls ctx.mean (a collective); no window anywhere: nan, no check
    exact = {}
    for group, target in candidates:
        layers = {n: ctx.model.get_submodule(n) for n in group}
        W = {n: linear_weight(m).detach().float() for n, m in layers.items()}
        width = next(iter(W.values())).shape[1]
        signs = torch.randint(0, 2, (width,), generator=torch.Generator().manual_seed(width)) * 2 - 1
        trial = SimpleNamespace(undo=[])
        try:
            fold_scales(trial, target, layers, W, torch.pow(2.0, signs.float()).to(next(iter(W.values())).device))
            got = _flat(ctx.run(window)).to(ctx.device)
        finally:
            restore(trial.undo)
        err = ctx.mean((got - ref).pow(2))
        exact[group[0]] = not (norm > 0) or err <= norm * (4e-4 if target.offset else 1e-10)
    return exact


def _flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The outputs' elements as one fp32 vector (none: a data-parallel rank without reference windows)."""
    return torch.cat([o.float().flatten() for o in outputs]) if outputs else torch.zeros(0)


@torch.no_grad()
def awq_scales(ctx: BlockContext) -> dict[str, dict]:
    """Search each group's scales on the block output (over the reference windows), and fold them in."""
    windows = ctx.inputs[:len(ctx.reference)]
    ref = _flat(ctx.reference).to(ctx.device)
    for group, target, layers, W in foldable_groups(ctx, "scaling"):
        head = group[0]
        best, best_err, best_alpha = None, float("inf"), 0.0
        for alpha, s in candidate_scales(ctx.observed[head]):
            overrides = {n: scaled_fake_quantize(W[n], s, ctx.targets[n], linear_weight(m).dtype)
                         for n, m in layers.items()}
            out = ctx.run(windows, overrides=overrides)
            err = ctx.mean((_flat(out) - ref).pow(2))
            if err < best_err:
                best, best_err, best_alpha = s, err, alpha
        if best is None:  # every candidate gave a NaN/inf block output
            raise ValueError(f"{head}: AWQ's scale search gets non-finite block outputs for every scale: the model "
                             "produces NaN/inf activations before this layer (check the checkpoint, e.g. its norm "
                             f"weights), or keep the layer in float with QuantConfig(modules_to_not_convert=[{head!r}]).")
        fold_scales(ctx, target, layers, W, best)
        ctx.notes.append(f"{','.join(n.rsplit('.', 1)[-1] for n in group)} <- {target.local}: alpha={best_alpha:.2f}")
    return {}


awq_scales.data_parallel = True  # its statistics and errors are summed over ranks (BlockContext.mean, observed)


@register_method("awq", needs_calibration=True, stage=awq_scales, observe=observe_abs_mean, gguf=True,
                 description="AWQ (activation-aware scales folded into the previous op, clipping search)")
def quantize_awq(W: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype, H: torch.Tensor) -> QuantizedWeight:
    """Round-to-nearest of the (already AWQ-scaled) W on grids clipped by `clip_search`."""
    p = clip_search(W, H, spec, scale_dtype)
    return round_to_nearest(W, spec, scale_dtype, clip=(p, p))


# AWQ's scaling, then GPTQ on the scaled layers (GPTQ's own options and defaults).
register_method("awq+gptq", needs_calibration=True, options=GPTQOptions, stage=awq_scales, observe=observe_abs_mean,
                description="AWQ scales, then GPTQ", gguf=True)(quantize_gptq)
