"""Block stages: work a method does on a whole float block before its layers are quantized.

A stage gets the block (on the work device), its target layers grouped by shared input, and the
cached block inputs. It may change the block's float weights in a way that keeps its function
(AWQ's scaling, folded into the op before), recording every tensor it changes in `undo` so that a
failed quantization can put them back, and returns keyword arguments for each layer's quantizer
(OmniQuant's learned clipping). Registry: `register_stage(name)`; a method names its stage.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..algorithms import awq, omniquant
from ..config import LayerSpec, QuantConfig
from ..nn.convert import linear_shape, linear_weight, set_linear_weight
from . import map_tensors

logger = logging.getLogger("hf_quant")

# Calibration windows the AWQ scale search runs the block on, per candidate scale.
AWQ_SEARCH_WINDOWS = 16


@dataclass
class BlockContext:
    model: nn.Module
    block: nn.Module
    prefix: str  # "model.layers.3."
    groups: list[list[str]]  # full names of target layers, grouped by shared input, in forward order
    targets: dict[str, LayerSpec]
    config: QuantConfig
    inputs: list[tuple[tuple, dict]]
    device: torch.device
    run: Callable[..., Any]  # run(inputs, block=None, overrides=None) -> list of block outputs
    undo: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_STAGES: dict[str, Callable[[BlockContext], dict[str, dict]]] = {}


def register_stage(name: str) -> Callable:
    def deco(fn):
        if name in _STAGES:
            raise ValueError(f"block stage {name!r} is already registered")
        _STAGES[name] = fn
        return fn
    return deco


def get_stage(name: str) -> Callable[[BlockContext], dict[str, dict]]:
    return _STAGES[name]


# --- AWQ: per-channel scales folded into the previous op -------------------------------------------

def _is_foldable_norm(module: nn.Module, width: int) -> bool:
    """LayerNorm / RMSNorm computing weight * normalised(x) (+ bias): dividing weight (and bias) by s
    divides the output by s. Gemma-style norms (x * (1 + weight)) are not of that form."""
    name = type(module).__name__
    plain = isinstance(module, nn.LayerNorm) or (name.endswith("RMSNorm") and not name.startswith("Gemma"))
    w = getattr(module, "weight", None)
    return plain and isinstance(w, torch.Tensor) and w.shape == (width,)


def _producers(ctx: BlockContext) -> dict[str, str]:
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
    has = (lambda n: isinstance(_get(ctx.block, sib(n)), (nn.Linear, Conv1D)))
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


def _fold(ctx: BlockContext, producer: nn.Module, s: torch.Tensor, is_norm: bool) -> None:
    """Divide the producer's output channels by s (its weight rows / a norm's weight and bias)."""
    params = [producer.weight] + ([producer.bias] if getattr(producer, "bias", None) is not None else [])
    for p in params:
        ctx.undo.append((p, p.detach().clone()))
    with torch.no_grad():
        if is_norm:
            producer.weight.div_(s.to(producer.weight.dtype))
        else:
            W = linear_weight(producer).float() / s.unsqueeze(1)
            set_linear_weight(producer, W)
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))


@register_stage("awq")
@torch.no_grad()
def awq_scales(ctx: BlockContext) -> dict[str, dict]:
    """Search each group's scales on the block output, and fold them in (module doc of algorithms/awq.py)."""
    windows = ctx.inputs[:AWQ_SEARCH_WINDOWS]
    producers = _producers(ctx)
    x_abs: dict[str, torch.Tensor] = {}
    hooks = []
    for group in ctx.groups:
        def hook(m, args, out, head=group[0]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().float()
            x_abs[head] = x_abs.get(head, 0) + x.sum(0) / max(len(windows) * x.shape[0], 1)
        hooks.append(ctx.model.get_submodule(group[0]).register_forward_hook(hook))
    try:
        reference = ctx.run(windows)
    finally:
        for h in hooks:
            h.remove()
    ref = torch.cat([r.float().flatten() for r in reference])
    for group in ctx.groups:
        head = group[0]
        if head not in x_abs:  # no calibration window reaches it (e.g. an unrouted expert)
            ctx.notes.append(f"{head[len(ctx.prefix):]}: no scaling (no calibration input reached it)")
            continue
        local = producers.get(head)
        producer = ctx.block.get_submodule(local) if local else None
        width = linear_shape(ctx.model.get_submodule(head))[0]
        is_norm = producer is not None and _is_foldable_norm(producer, width)
        if not is_norm:
            local, why = _linear_producer(ctx, head)
            if local is None:
                ctx.notes.append(f"{head[len(ctx.prefix):]}: no scaling ({why})")
                continue
            producer = ctx.block.get_submodule(local)
        layers = {n: ctx.model.get_submodule(n) for n in group}
        W = {n: linear_weight(m).detach().float() for n, m in layers.items()}
        best, best_err, best_alpha = None, float("inf"), 0.0
        for alpha, s in awq.candidate_scales(x_abs[head]):
            overrides = {n: awq.scaled_fake_quantize(W[n], s, ctx.targets[n], linear_weight(m).dtype)
                         for n, m in layers.items()}
            out = ctx.run(windows, overrides=overrides)
            err = (torch.cat([o.float().flatten() for o in out]) - ref).pow(2).mean().item()
            if err < best_err:
                best, best_err, best_alpha = s, err, alpha
        _fold(ctx, producer, best, is_norm)
        for n, m in layers.items():
            ctx.undo.append((m.weight, m.weight.detach().clone()))
            set_linear_weight(m, W[n] * best)
        ctx.notes.append(f"{','.join(n.rsplit('.', 1)[-1] for n in group)} <- {local}: alpha={best_alpha:.2f}")
    return {}


# --- OmniQuant: learnable weight clipping ----------------------------------------------------------

def _float32(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.float() if t.is_floating_point() else t)


@register_stage("lwc")
def learnable_clipping(ctx: BlockContext) -> dict[str, dict]:
    """Learn gamma, beta per (row, group) of every target layer of the block, on the block's output
    error against the float block (fp32 copy), `config.epochs` passes over the cached windows."""
    names = [n for g in ctx.groups for n in g]
    block = copy.deepcopy(ctx.block).float()
    for p in block.parameters():
        p.requires_grad_(False)
    local = {n: n[len(ctx.prefix):] for n in names}
    W = {n: linear_weight(block.get_submodule(local[n])).detach() for n in names}
    shapes = {n: (W[n].shape[0], ctx.targets[n].groups(W[n].shape[1])) for n in names}
    gamma = {n: torch.full(shapes[n], omniquant.LWC_INIT, device=ctx.device, requires_grad=True) for n in names}
    beta = {n: torch.full(shapes[n], omniquant.LWC_INIT, device=ctx.device, requires_grad=True) for n in names}
    inputs = [(_float32(a), _float32(k)) for a, k in ctx.inputs]
    with torch.no_grad():
        targets = ctx.run(inputs, block=block)
    opt = torch.optim.AdamW(list(gamma.values()) + list(beta.values()), lr=ctx.config.learning_rate, weight_decay=0)
    first = last = None
    for _ in range(ctx.config.epochs):
        total = 0.0
        for i in range(len(inputs)):
            with torch.enable_grad():
                overrides = {n: omniquant.lwc_fake_quantize(W[n], gamma[n], beta[n], ctx.targets[n]) for n in names}
                out = ctx.run(inputs[i:i + 1], block=block, overrides=overrides, keep_graph=True)[0]
                loss = torch.nn.functional.mse_loss(out, targets[i].to(out.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            total += loss.item()
        first = total / len(inputs) if first is None else first
        last = total / len(inputs)
    if first is not None:
        ctx.notes.append(f"lwc loss {first:.3e} -> {last:.3e} over {ctx.config.epochs} epochs")
    return {n: {"clip": (torch.sigmoid(beta[n]).detach(), torch.sigmoid(gamma[n]).detach())} for n in names}
