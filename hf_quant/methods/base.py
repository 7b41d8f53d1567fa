"""The method interface and its one registry.

A method turns a float weight `W` (out_features x in_features), plus the statistics it needs, into
integer codes and their grid (`QuantizedWeight`). It is described once, by `register_method`:

- `options`: a dataclass of the `QuantConfig` fields the method takes, validated when it is built
  (each field's `check` names the field); `QuantConfig` validates and resolves them through it, the
  CLI offers them, and the driver passes them to `quantize` as keyword arguments.
- `needs_calibration`: the block-wise driver collects the layer's Hessian H = 2/N X X^T and passes
  it as `H`.
  A bool, or a function of the method's options (w8a8 calibrates only to smooth): ask
  `Method.calibrates(options)`.
- `stage`: work on the whole float block before its layers are quantized (AWQ's scaling,
  OmniQuant's clipping training), with `observe` gathering what it needs from the float block's
  reference pass. What the stage returns per layer is passed to `quantize` as keyword arguments.
- `description`: how the model card names the method.
- `activation`: for methods that also quantize the activations at run time, a function of the
  method's options returning the activation quantizer's (name, params) that the layers' scheme
  carries (`runtime.scheme`); None for weight-only methods.
- `fixed_spec`: the LayerSpec fields the method always uses (e.g. LLM.int8: 8 bits, one scale per
  output row, symmetric); `QuantConfig` sets them and refuses `dynamic` overrides of them.
- `scale_dtype`: the dtype of the stored scales when it is not the model's (None).

Adding a method = one module in this package that calls `register_method`, imported in `__init__`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core import LayerSpec, QuantizedWeight
from ..core.registry import Registry

# --- options: fields of QuantConfig a method takes --------------------------------------------------

def option(default: Any, check: Callable[[str, Any], None], *, unused: Any = None, strict: bool = False,
           help: str = "", type: type | None = None) -> Any:
    """A dataclass field for a method option, i.e. a `QuantConfig` field of the same name.

    check(name, value): raise ValueError naming `QuantConfig.<name>` if the value is malformed.
    unused: the value `QuantConfig` stores when its method does not take this option and the user
        left it at None (e.g. `mse` -> False).
    strict: a value other than `unused` (or None) on a method that does not take the option raises
        ("has no meaning for method=...").
    help: one line for the command line's --help.
    type: the value's type for the command line, where the default (e.g. None) does not tell it.
    """
    return field(default=default, metadata={"check": check, "unused": unused, "strict": strict, "help": help,
                                            "type": type})


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"QuantConfig.{name}={value!r} must be True or False.")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"QuantConfig.{name}={value!r} must be a positive integer.")


def check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"QuantConfig.{name}={value!r} must be a non-negative integer.")


def check_non_negative_number(example: str) -> Callable[[str, Any], None]:
    """A finite number >= 0."""
    def check(name: str, value: Any) -> None:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0 and value != float("inf")
        if not ok:
            raise ValueError(f"QuantConfig.{name}={value!r} must be a finite number >= 0, e.g. {example}.")
    return check


def check_fraction(example: str) -> Callable[[str, Any], None]:
    """A number in (0, 1)."""
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"QuantConfig.{name}={value!r} must be a number in (0, 1), e.g. {example}.")
    return check


class Options:
    """Base of every method's options dataclass: checks each field when built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                f.metadata["check"](f.name, value)


# --- the statistic every calibrated method takes -----------------------------------------------------

HESSIAN_TILE = 1024  # fp64 sums: rows of x^T x computed (fp32) and added at a time


def accumulate_hessian(Hsum: torch.Tensor, x: torch.Tensor) -> int:
    """Add one batch of a layer's inputs x (..., in) to Hsum = sum x x^T (in place); returns the
    number of rows added. H = 2 Hsum / rows is the Hessian of the layer's reconstruction loss
    ||W X - W_hat X||^2 (GPTQ, eq. 1), which `needs_calibration` methods receive as `H`.
    The product is computed in fp32; an fp64 Hsum receives it a tile of rows at a time."""
    x = x.reshape(-1, x.shape[-1]).float()
    if Hsum.dtype == torch.float32:
        Hsum.addmm_(x.t(), x)
    else:
        for i in range(0, x.shape[1], HESSIAN_TILE):
            Hsum[i:i + HESSIAN_TILE] += x[:, i:i + HESSIAN_TILE].t() @ x
    return x.shape[0]


def hessian(Hsum: torch.Tensor, rows: int, inplace: bool = False) -> torch.Tensor:
    """H = 2 Hsum / rows in fp32 (an fp64 sum is divided in fp64 and rounded once), a tile of rows at a
    time: no full-size temporaries beside the result (an 11008-wide fp64 sum is 970 MB). inplace: an
    fp32 Hsum that is the caller's own copy becomes H in its own storage (the same values)."""
    if inplace and Hsum.dtype == torch.float32:
        return Hsum.mul_(2).div_(rows)
    H = torch.empty(Hsum.shape, dtype=torch.float32, device=Hsum.device)
    for i in range(0, Hsum.shape[0], HESSIAN_TILE):
        H[i:i + HESSIAN_TILE] = Hsum[i:i + HESSIAN_TILE].mul(2).div_(rows)
    return H


# --- block stages ----------------------------------------------------------------------------------

def restore(undo: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put every tensor an undo log (`BlockContext.undo`: (tensor, its copy before the change)) recorded back, the
    last change first."""
    with torch.no_grad():
        for tensor, original in reversed(undo):
            tensor.copy_(original.to(tensor.device))


@dataclass
class BlockContext:
    """What a block stage works on. `reference` holds the float block's fp32 outputs on the first
    len(reference) cached windows, computed by the driver's reference pass (with the method's
    `observe` hooks on each group's first layer, whose results are in `observed`)."""

    model: nn.Module
    block: nn.Module
    prefix: str  # "model.layers.3."
    groups: list[list[str]]  # full names of target layers, grouped by shared input, in forward order
    targets: dict[str, LayerSpec]
    config: Any  # the QuantConfig
    inputs: list[tuple[tuple, dict]]
    device: torch.device
    run: Callable[..., Any]  # run(inputs, block=None, overrides=None, keep_graph=False) -> block outputs
    reference: list[torch.Tensor] = field(default_factory=list)
    observed: dict[str, Any] = field(default_factory=dict)
    undo: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # mean(t): the mean of t's elements over every process's reference windows (data-parallel calibration;
    # t.mean() in one process). A stage that compares errors through it can run data-parallel (mark the stage
    # function with `data_parallel = True`).
    mean: Callable[[torch.Tensor], float] = field(default=lambda t: t.mean().item())
    # Data-parallel calibration: this process's rank among `world` (inputs holds windows rank, rank + world, ...
    # of the run) and all_reduce(t), which replaces t in place by its sum over ranks (added in fp64; the identity
    # in one process). A stage that trains sums its gradients through it (OmniQuant).
    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)


# observe(values, head, x, n_windows): accumulate what the stage needs from input x of group `head`
Observer = Callable[[dict, str, torch.Tensor, int], None]


# --- the registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[..., QuantizedWeight]
    needs_calibration: bool | Callable[..., bool]
    options: type | None = None
    description: str = ""
    stage: Callable[[BlockContext], dict[str, dict]] | None = None
    observe: Observer | None = None
    activation: Callable[..., tuple[str, dict[str, Any]] | None] | None = None
    fixed_spec: dict[str, Any] | None = None
    scale_dtype: torch.dtype | None = None
    gguf: bool = False  # quantizes onto GGUF block types (QuantConfig.gguf)
    one_bit: bool = False  # takes bits=1 (sign codes)
    # fixed_spec is enforced: a user's bits / group_size / sym other than the fixed value is refused by name
    # (else silently replaced by it)
    strict_spec: bool = False
    input_scale: bool = False  # its layers store `in_scales` (LayerSpec.in_scale)
    output_norm: Callable[..., bool] | None = None  # output_norm(**options): the layers normalise their product

    def calibrates(self, options: dict[str, Any]) -> bool:
        """Whether the method reads calibration data with these options."""
        need = self.needs_calibration
        return bool(need(**options)) if callable(need) else bool(need)

    def activation_of(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """(activation quantizer name, params) for layers quantized with `options`, or None."""
        return None if self.activation is None else self.activation(**options)

    def output_norm_of(self, options: dict[str, Any]) -> bool:
        """Whether layers quantized with `options` normalise their product (OneBit)."""
        return False if self.output_norm is None else bool(self.output_norm(**options))

    @property
    def option_fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.options)} if self.options else {}

    @property
    def act_order(self) -> bool:
        """The method honours `desc_act`/`static_groups` and returns a `g_idx` when `spec.g_idx`."""
        return "desc_act" in self.option_fields

    def default(self, name: str) -> Any:
        return self.option_fields[name].default

    def options_from(self, config: Any) -> dict:
        """The QuantConfig fields this method takes, validated by its options dataclass, as keyword arguments."""
        if self.options is None:
            return {}
        return dataclasses.asdict(self.options(**{n: getattr(config, n) for n in self.option_fields}))


METHODS: Registry[Method] = Registry("quantization method")


def register_method(name: str, *, needs_calibration: bool | Callable[..., bool], options: type | None = None, description: str = "",
                    stage: Callable | None = None, observe: Observer | None = None,
                    activation: Callable | None = None, fixed_spec: dict[str, Any] | None = None,
                    scale_dtype: torch.dtype | None = None, gguf: bool = False, one_bit: bool = False,
                    strict_spec: bool = False, input_scale: bool = False,
                    output_norm: Callable[..., bool] | None = None) -> Callable:
    """Decorator registering `fn(W, spec, scale_dtype, **stats, **options) -> QuantizedWeight` under `name`."""

    def deco(fn: Callable[..., QuantizedWeight]) -> Callable[..., QuantizedWeight]:
        if options is not None and not (dataclasses.is_dataclass(options) and issubclass(options, Options)):
            raise TypeError(f"method {name!r}: options must be a dataclass deriving from hf_quant.methods.Options")
        METHODS.register(name, Method(name, fn, needs_calibration, options, description or name, stage, observe,
                                      activation, fixed_spec, scale_dtype, gguf, one_bit, strict_spec, input_scale,
                                      output_norm))
        return fn

    return deco


def get_method(name: str) -> Method:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return METHODS.names()


def option_fields() -> dict[str, dataclasses.Field]:
    """Every method option by name (the first method that declares it defines its check)."""
    fields: dict[str, dataclasses.Field] = {}
    for method in METHODS.values():
        for n, f in method.option_fields.items():
            fields.setdefault(n, f)
    return fields


def methods_taking(option_name: str) -> list[str]:
    return [m.name for m in METHODS.values() if option_name in m.option_fields]
