"""Fused MoE experts as per-expert linear layers, and back (model surgery, no math).

transformers 5 stores a mixture of experts as one module holding 3-D weights, e.g. Mixtral's
`experts.gate_up_proj` (experts, 2 x ffn, hidden) and `experts.down_proj` (experts, hidden, ffn),
and declares their layout with `@use_experts_implementation` (attributes `has_gate`, `has_bias`,
`is_transposed`, `is_concatenated`, `has_post_expert_norm`, and the gate as `_apply_gate`). Nothing in
hf_quant quantizes a 3-D weight; a linear layer it quantizes with every method, kernel and format.

`unfuse` turns such a module into the same class with each expert's projection an `nn.Linear` child,
`experts.<e>.gate_up_proj` (or `up_proj`) and `experts.<e>.down_proj`, so that calibration sees each
expert's routed tokens, the layers are swapped for `QuantLinear`s like any other, PEFT's
`target_modules=["down_proj"]` reaches the experts too, and the checkpoint names cannot collide with the
per-expert names transformers' conversion mapping merges on load. A projection whose experts all stay in
float is fused back (`fuse_projection`): its 3-D weight keeps the name every loader knows. The
forward is the eager experts loop of transformers (`integrations.moe`), per-expert layer by layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layers import FLOAT_LINEARS

PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with its 3-D weights (the `use_experts_implementation` contract)."""
    down = getattr(module, "down_proj", None)
    return (not isinstance(module, UnfusedExperts) and isinstance(down, nn.Parameter) and down.dim() == 3
            and all(hasattr(module, a) for a in ("has_gate", "is_transposed", "num_experts")))


def projections(module: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


class Expert(nn.Module):
    """One expert's projections: `gate_up_proj` (or `up_proj`) and `down_proj`, each an nn.Linear (or the
    QuantLinear that replaced it)."""


class UnfusedExperts(nn.Module):
    """Mixed in before a transformers experts class (`unfuse`): the experts as children "0", "1", ..., each
    an `Expert`; a projection fused back in float (`fuse_projection`) stays a 3-D parameter."""

    def __reduce_ex__(self, protocol):  # pickle / deepcopy: the class is made at run time, its base is importable
        return _new_unfused, (_fused_class(self),), self.__dict__

    def _project(self, e: int, proj: str, x: torch.Tensor) -> torch.Tensor:
        fused = self._parameters.get(proj)
        if fused is None:
            return getattr(self._modules[str(e)], proj)(x)
        y = x @ fused[e] if self.is_transposed else F.linear(x, fused[e])
        bias = getattr(self, f"{proj}_bias", None) if self.has_bias else None
        return y if bias is None else y + bias[e]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        up, down = projections(self)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            if e >= self.num_experts:  # expert parallelism's sentinel: a slot routed to no local expert
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            h = self._project(e, up, hidden_states[token_idx])
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            y = self._project(e, down, h)
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final


_CLASSES: dict[type, type] = {}


def _unfused_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Unfused{cls.__name__}", (UnfusedExperts, cls),
                             {"__module__": cls.__module__, "__doc__": UnfusedExperts.__doc__})
    return _CLASSES[cls]


def _new_unfused(cls: type) -> UnfusedExperts:
    return object.__new__(_unfused_class(cls))


def _fused_class(module: UnfusedExperts) -> type:
    return next(c for c in type(module).__mro__[1:] if c is not UnfusedExperts and not issubclass(c, UnfusedExperts))


def unfuse(module: nn.Module) -> None:
    """Give a fused experts module (`is_fused_experts`) per-expert nn.Linear children in place of its 3-D weights
    and biases, on the same device and dtype (the meta device too). The function is unchanged: each expert's
    weight is its slice of the 3-D one, (out, in) (transposed where the module stores (in, out))."""
    experts = [Expert() for _ in range(module.num_experts)]
    for proj in projections(module):
        W = module._parameters.pop(proj)
        bias = module._parameters.pop(f"{proj}_bias", None) if module.has_bias else None
        for e, expert in enumerate(experts):
            w = W[e].t() if module.is_transposed else W[e]
            layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(w.detach().contiguous(), requires_grad=W.requires_grad)
            if bias is not None:
                layer.bias = nn.Parameter(bias[e].detach().clone(), requires_grad=bias.requires_grad)
            setattr(expert, proj, layer)
    for e, expert in enumerate(experts):
        module.add_module(str(e), expert)
    module.__class__ = _unfused_class(type(module))
    # transformers' `_init_weights` of the experts class initialises the 3-D weights by name (a reload's
    # `initialize_weights` of what the checkpoint did not fill): the children are initialised as the layers they are
    module._is_hf_initialized = True


def expert_layers(module: UnfusedExperts, proj: str) -> list[nn.Module]:
    """The per-expert layers of projection `proj` (empty where it is fused)."""
    return [] if proj in module._parameters else [getattr(module._modules[str(e)], proj)
                                                  for e in range(module.num_experts)]


def fuse_projection(module: UnfusedExperts, proj: str) -> None:
    """Stack the float per-expert layers of `proj` back into the module's 3-D weight (and bias)."""
    layers = expert_layers(module, proj)
    if not layers:
        return
    if not all(type(m) in FLOAT_LINEARS for m in layers):
        raise ValueError(f"{type(module).__name__}.{proj}: only float layers fuse back; dequantize the model first.")
    W = torch.stack([m.weight.detach().t() if module.is_transposed else m.weight.detach() for m in layers])
    module.register_parameter(proj, nn.Parameter(W, requires_grad=layers[0].weight.requires_grad))
    if layers[0].bias is not None:
        module.register_parameter(f"{proj}_bias", nn.Parameter(torch.stack([m.bias.detach() for m in layers]),
                                                               requires_grad=layers[0].bias.requires_grad))
    for e in range(module.num_experts):
        delattr(module._modules[str(e)], proj)
    if all(p in module._parameters for p in projections(module)):
        for e in range(module.num_experts):
            del module._modules[str(e)]
        module.__class__ = _fused_class(module)
        module.__dict__.pop("_is_hf_initialized", None)


def fuse(model: nn.Module) -> list[str]:
    """Fuse every unfused experts module of `model` back (all its layers must be float); returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    for name in names:
        module = model.get_submodule(name)
        for proj in projections(module):
            fuse_projection(module, proj)
    return names


def unfused_experts(model: nn.Module) -> dict[str, UnfusedExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}


def projection_of(model: nn.Module, name: str) -> tuple[str, str] | None:
    """(experts module name, projection) if `name` is a per-expert layer of an unfused experts module, else None."""
    parent, _, proj = name.rpartition(".")
    experts, _, index = parent.rpartition(".")
    if proj not in PROJECTIONS or not index.isdigit() or not experts:
        return None
    try:
        module = model.get_submodule(experts)
    except AttributeError:
        return None
    return (experts, proj) if isinstance(module, UnfusedExperts) else None


def refuse_unfused(model: nn.Module, who: str, engine: str) -> None:
    """Raise, naming the first one, if `model` holds MoE experts quantized per expert: the format `who` writes is
    loaded by `engine`, which builds transformers' fused 3-D experts and reads no per-expert layers."""
    name = next(iter(unfused_experts(model)), None)
    if name is not None:
        raise ValueError(f"{who}: {name} holds MoE experts quantized per expert ({name}.<e>.gate_up_proj, ...), which "
                         f"{engine} cannot load: it builds the experts as transformers' fused 3-D weights. Save the "
                         "model in hf_quant's own format (save_pretrained / push_to_hub), or keep the experts in "
                         "float for this export: QuantConfig(..., dynamic={r'-:\\.experts\\.\\d+\\.': {}}).")


def fused_names(name: str, module: UnfusedExperts) -> dict[str, str]:
    """The 3-D tensors transformers holds for an unfused experts module at `name`: their full names by the
    per-module attribute (`gate_up_proj`, `gate_up_proj_bias`, `down_proj`, ...)."""
    attrs = [a for proj in projections(module) for a in (proj, f"{proj}_bias" if module.has_bias else None) if a]
    return {a: f"{name}.{a}" for a in attrs}


def load_fused(module: UnfusedExperts, attr: str, value: torch.Tensor, name: str = "") -> None:
    """Fill an unfused experts module (e.g. on the meta device) from the fused tensor `attr` (`gate_up_proj`,
    `down_proj_bias`, ...) as transformers holds it: each expert's layer gets its slice (transposed where the module
    stores (in, out)), or a projection fused back takes the whole tensor; in the dtype of what it replaces. `name`: the
    module's, for the error a tensor of another shape gets."""
    proj = attr.removesuffix("_bias")
    bias = attr != proj
    if attr in module._parameters:
        expected = tuple(module._parameters[attr].shape)
    else:
        layer = getattr(module._modules["0"], proj)
        part = tuple((layer.bias if bias else layer.weight).shape)
        expected = (module.num_experts, *(part if bias or not module.is_transposed else part[::-1]))
    if tuple(value.shape) != expected:
        raise ValueError(f"{name or type(module).__name__}.{attr}: the checkpoint's tensors make shape {tuple(value.shape)}, "
                         f"the model needs {expected} ({module.num_experts} experts); the checkpoint is incomplete "
                         "or belongs to another configuration.")
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value.to(old.dtype), requires_grad=False)
        return
    for e in range(module.num_experts):
        layer = getattr(module._modules[str(e)], proj)
        old = layer.bias if bias else layer.weight
        part = value[e] if bias or not module.is_transposed else value[e].t()
        setattr(layer, "bias" if bias else "weight",
                nn.Parameter(part.to(old.dtype, copy=True).contiguous(), requires_grad=False))
