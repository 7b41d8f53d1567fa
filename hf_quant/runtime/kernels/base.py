"""Kernel registry and selection by device, dtype, scheme and row count.

A kernel states what it runs: `supports(layer, device, dtype)` (bits, group size, device, dtype),
`activations` (the activation schemes it implements; None = weight-only) and `max_rows(dtype)` (the
most rows, i.e. tokens, it takes). The highest-priority kernel that runs a call is chosen, and the
choice is cached on the layer per (device, dtype, row class), where the row classes are cut at
every kernel's `row_cuts` (its `max_rows` by default): the same input shape class never selects twice. Kernel-specific weight
layouts are built once by `prepare` and cached on the layer; the layer drops both caches when its
buffers change (`QuantLinear.invalidate_kernels`), never checking on each call.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ...core.registry import Registry


class Kernel:
    """Base class: override `supports`, `forward`, and `prepare` if the kernel needs its own layout."""

    name: str = ""
    layout: str = ""  # kernels with the same non-empty layout share one prepared layout per layer
    priority: int = 0
    activations: tuple[str | None, ...] = (None,)
    # A candidate of the measured CPU dispatch (kernels/cpu_measure.py): in mode "measure" the fastest
    # measured kernel that runs a CPU layer is chosen, whatever its `max_rows` and `chosen` say.
    measured: bool = False
    gguf: bool = False  # runs layers holding GGUF block bytes (LayerSpec.gguf)
    # runs 1-bit layers (sign codes, zero 1/2: LayerSpec.sym_zero), and adds `layer.kernel_bias` (not
    # `layer.bias`: a layer with an output norm adds its bias after the norm)
    one_bit: bool = False

    def accepts(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        """`supports`, and never a GGUF layer unless the kernel reads GGUF blocks, nor a 1-bit one unless it
        runs those."""
        return ((self.gguf or layer.spec.gguf is None) and (self.one_bit or layer.spec.bits != 1)
                and self.supports(layer, device, dtype))

    def supports(self, layer: Any, device: torch.device, dtype: torch.dtype) -> bool:
        raise NotImplementedError

    def max_rows(self, dtype: torch.dtype) -> int | None:
        """The most rows (leading dims flattened) this kernel runs in `dtype`; None = no limit."""
        return None

    def row_cuts(self, dtype: torch.dtype) -> tuple[int, ...]:
        """Row counts where this kernel's choice or launch may change (row classes end at them)."""
        limit = self.max_rows(dtype)
        return () if limit is None else (limit,)

    def chosen(self, layer: Any, rows: int) -> bool:
        """Whether automatic selection takes this kernel for `rows` (e.g. by a dispatch table); a
        kernel that returns False still runs when forced or preferred."""
        return True

    def prepare(self, layer: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return None

    def forward(self, layer: Any, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        raise NotImplementedError

    def runs(self, layer: Any, device: torch.device, dtype: torch.dtype, rows: int) -> bool:
        limit = self.max_rows(dtype)
        return (layer.scheme.activation_name in self.activations and (limit is None or rows <= limit)
                and self.accepts(layer, device, dtype))


KERNELS: Registry[Kernel] = Registry("kernel")
_BY_PRIORITY: list[Kernel] = []
_ROW_CUTS: dict[torch.dtype, list[int]] = {}
_forced = threading.local()
_forcing_anywhere = [0]  # use_kernel / prefer_kernel blocks open in any thread: the fast path checks only this
# Installed by kernels/cpu_measure.py in mode "measure": a choice consulted before the priority order
# (None: fall through), and the extra row cuts of the row classes it measures.
_choice_hook: list = [None]
EXTRA_ROW_CUTS: list[int] = []


def register_kernel(kernel: Kernel) -> Kernel:
    KERNELS.register(kernel.name, kernel)
    _registry_changed()
    return kernel


def unregister_kernel(name: str) -> Kernel:
    kernel = KERNELS.unregister(name)
    _registry_changed()
    return kernel


_LISTENERS: list = []  # called when the set of kernels changes: layers drop their cached choices


def _registry_changed() -> None:
    _BY_PRIORITY[:] = sorted(KERNELS.values(), key=lambda k: -k.priority)  # stable: ties by name
    _ROW_CUTS.clear()
    for listener in _LISTENERS:
        listener()


_CHOICE_LISTENERS: list = []  # called when only the choice rules change: layers drop their choices, keep layouts


def _choices_changed() -> None:
    """The rules that choose among the same kernels changed (the CPU dispatch mode, the CUDA dispatch
    table): every live layer chooses again on its next call; its prepared layouts stay valid."""
    _ROW_CUTS.clear()
    for listener in _CHOICE_LISTENERS:
        listener()


def available_kernels() -> list[str]:
    return [k.name for k in _BY_PRIORITY]


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def row_class(dtype: torch.dtype, rows: int) -> int:
    """Index of the row range `rows` falls in, between the kernels' `row_cuts` for `dtype`."""
    cuts = _ROW_CUTS.get(dtype)
    if cuts is None:
        cuts = _ROW_CUTS[dtype] = sorted({cut for k in _BY_PRIORITY for cut in k.row_cuts(dtype)}
                                         | set(EXTRA_ROW_CUTS))
    return bisect.bisect_left(cuts, rows)


@contextlib.contextmanager
def _thread_setting(attr: str, name: str) -> Iterator[None]:
    """Set `_forced.<attr>` to kernel `name` for this thread inside the block."""
    KERNELS.get(name)  # unknown names raise here
    prev = getattr(_forced, attr, None)
    setattr(_forced, attr, name)
    _forcing_anywhere[0] += 1
    try:
        yield
    finally:
        setattr(_forced, attr, prev)
        _forcing_anywhere[0] -= 1


def use_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Force one kernel (e.g. "reference") inside the block; errors if it cannot run a layer."""
    return _thread_setting("name", name)


def prefer_kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Inside the block, run kernel `name` wherever it supports the layer and input, and the usual
    choice elsewhere (e.g. a decode-only kernel during `generate`, whose prompt it cannot run)."""
    return _thread_setting("preferred", name)


def forcing() -> bool:
    """Whether `use_kernel` / `prefer_kernel` may be active (in any thread): the choice cache is then
    bypassed and `select_kernel` reads this thread's setting."""
    return _forcing_anywhere[0] > 0


def select_kernel(layer: Any, x: torch.Tensor) -> Kernel:
    """The kernel that runs `layer` on `x`: forced, else preferred where it runs, else by priority."""
    device, dtype, rows = x.device, x.dtype, rows_of(x)
    forced = getattr(_forced, "name", None)
    if forced is not None:
        kernel = KERNELS.get(forced)
        if not kernel.runs(layer, device, dtype, rows):
            raise ValueError(
                f"kernel {forced!r} cannot run {layer.extra_repr()} on {x.device.type}/{x.dtype} inputs; "
                f"use one of {[k.name for k in _BY_PRIORITY if k.runs(layer, device, dtype, rows)]}."
            )
        return kernel
    preferred = getattr(_forced, "preferred", None)
    if preferred is not None and KERNELS.get(preferred).runs(layer, device, dtype, rows):
        return KERNELS.get(preferred)
    return choose(layer, device, dtype, rows)


def choose(layer: Any, device: torch.device, dtype: torch.dtype, rows: int) -> Kernel:
    """The automatic choice for `rows` rows of `dtype` on `device`: the measured choice where one
    applies (CPU, mode "measure"), else `choose_fixed`. Needs no tensor on `device`."""
    hook = _choice_hook[0]
    if hook is not None:
        kernel = hook(layer, device, dtype, rows)
        if kernel is not None:
            return kernel
    return choose_fixed(layer, device, dtype, rows)


def choose_fixed(layer: Any, device: torch.device, dtype: torch.dtype, rows: int) -> Kernel:
    """The highest-priority kernel that runs `rows` rows and takes them (`Kernel.chosen`, e.g. a
    dispatch table)."""
    for kernel in _BY_PRIORITY:
        if kernel.runs(layer, device, dtype, rows) and kernel.chosen(layer, rows):
            return kernel
    raise RuntimeError(f"no kernel supports {layer.extra_repr()} on {device.type}/{dtype}")
