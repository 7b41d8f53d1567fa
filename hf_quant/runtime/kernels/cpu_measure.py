"""CPU dispatch by measurement: the candidate kernels of a layer are timed once per process, per
layer shape, format, activation dtype and row class, and the fastest is kept.

Mode (process-wide; env `HF_QUANT_CPU_DISPATCH`, or `cpu_dispatch(mode)`):
- "measure" (default): candidates are the registered kernels with `measured = True` that run the
  layer's scheme, except those that cast fp32 activations to bf16, unless torch's own fp32 matmul precision
  allows bf16 (`torch.set_float32_matmul_precision("medium")` or
  `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`: the user's consent to bf16 compute for fp32 matmuls).
- "measure_bf16": the same, plus the `<kernel>_bf16` kernels (fp32 models compute those layers in
  bf16: results move by bf16 rounding).
- "fixed": the priority order and fixed row thresholds (`choose_fixed`), as before.

A measurement runs on the first call of a layer in a new (shape, dtype, row class), at most once per
process for all layers of that shape: the per-call path stays one dict lookup. Each candidate gets a
budget of BUDGET_S of repeated calls (at least two; its fastest call counts), on random inputs of
the class's largest row count. Before the full-size timing, a candidate after the first is probed
on 1, 8 and 64 rows; it is dropped as soon as a probe is slower than PROBE_MARGIN x the best time so far
(a kernel is never faster on more rows), so a path that is hopeless at that size costs little. The margin:
a memory-bound kernel takes about as long on 1 row as on 8, so without one a single slow spell of a shared
machine during a probe dropped the fastest kernel (measured on a 2-vCPU VM). Candidates
within CONFIRM_WITHIN of the best are then timed again in CONFIRM_ROUNDS interleaved rounds (each
keeps its fastest call), and those rounds alone decide between them: timed one after the other, a close
call went to whichever candidate a slow spell of a shared machine missed (and a fast first timing, kept
as the minimum, still could). Up to COLD_MAX_ROWS rows, a layer whose weights are big next to the
last-level cache is timed cold (caches flushed before each call), as it runs inside a model.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ...core.devices import last_level_cache_bytes
from . import base
from .base import KERNELS, Kernel, choose_fixed, row_class

ENV = "HF_QUANT_CPU_DISPATCH"
MODES = ("measure", "measure_bf16", "fixed")
DEFAULT_MODE = "measure"
BUDGET_S = 0.02  # per candidate and (shape, class)
MAX_CALLS = 5
ROW_CUTS = (1, 8, 64, 256)  # measured row classes end here (and at every kernel's own row_cuts)
LAST_CLASS_ROWS = 512  # rows timed for the open-ended last class
PROBE_ROWS = (1, 8, 64)
PROBE_MARGIN = 1.5  # a probe this many times slower than the best so far drops its candidate
GIVE_UP = 4.0  # a call this many times slower than the best so far ends a candidate's timing
CONFIRM_WITHIN, CONFIRM_ROUNDS = 1.5, 3  # candidates within 1.5x of the best are timed again, interleaved
# Row classes up to COLD_MAX_ROWS are timed with the caches flushed before every call when the layer's weights
# take at least COLD_MIN_FRACTION of the last-level cache: in a model too big for the cache each layer finds
# its weights evicted by the other layers', and at few rows reading them is most of the time (timed warm, a
# kernel that computes faster but streams memory worse wins wrongly).
COLD_MAX_ROWS, COLD_MIN_FRACTION = 64, 1 / 8


@dataclass(frozen=True)
class Measurement:
    """One timing: the rows timed, seconds per call by candidate (None: dropped by a probe), the choice."""

    rows: int
    seconds: dict[str, float | None]
    choice: str


_TABLE: dict[tuple, Measurement] = {}
_LOCK = threading.RLock()
_state = {"mode": "fixed"}


def check_mode(mode: Any, source: str = "cpu_dispatch mode") -> str:
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not a CPU dispatch mode; use one of "
                         f"{', '.join(repr(m) for m in MODES)}.")
    return mode


def mode_from_env(environ: Any = os.environ) -> str:
    """The mode named by `HF_QUANT_CPU_DISPATCH` (default "measure"); a bad value raises ValueError."""
    return check_mode(environ.get(ENV, DEFAULT_MODE), ENV)


def get_cpu_dispatch() -> str:
    return _state["mode"]


class cpu_dispatch:
    """Set the CPU dispatch mode for the process ("measure", "measure_bf16" or "fixed"). As a context
    manager, the previous mode comes back on exit. Every layer chooses again on its next call; the
    measurements themselves are kept (`clear_measurements` drops them)."""

    def __init__(self, mode: str) -> None:
        check_mode(mode)
        self.previous = _state["mode"]
        _set_mode(mode)

    def __enter__(self) -> "cpu_dispatch":
        return self

    def __exit__(self, *exc: object) -> None:
        _set_mode(self.previous)


def _set_mode(mode: str) -> None:
    _state["mode"] = mode
    measuring = mode != "fixed"
    base._choice_hook[0] = measured_choice if measuring else None
    base.EXTRA_ROW_CUTS[:] = ROW_CUTS if measuring else ()
    base._choices_changed()  # new row classes; every live layer drops its cached choices (not its layouts)


def measurements() -> dict[tuple, Measurement]:
    """A copy of this process's measurements, keyed as `measured_choice` keys them."""
    with _LOCK:
        return dict(_TABLE)


def clear_measurements() -> None:
    with _LOCK:
        _TABLE.clear()
    base._choices_changed()


def torch_allows_bf16() -> bool:
    """Whether torch's fp32 matmul precision on CPU is bf16: `torch.set_float32_matmul_precision("medium")` or
    `torch.backends.mkldnn.matmul.fp32_precision = "bf16"` (or the same set on `torch.backends.mkldnn` /
    `torch.backends`, which that inherits from). torch then lets fp32 matmuls compute in bf16, so the `_bf16`
    kernels are candidates in mode "measure" too."""
    try:
        mkldnn = torch.backends.mkldnn
        for precision in (mkldnn.matmul.fp32_precision, mkldnn.fp32_precision,
                          getattr(torch.backends, "fp32_precision", "none")):
            if precision != "none":
                return precision == "bf16"
        return False
    except AttributeError:  # a torch without the per-backend precision API
        try:
            return torch.get_float32_matmul_precision() == "medium"
        except RuntimeError:
            return False


def candidates(layer: Any, device: torch.device, dtype: torch.dtype, allow_bf16: bool | None = None) -> list[Kernel]:
    """The measured kernels that can run `layer` on `device` / `dtype` (any row count), fixed order. The
    `_bf16` kernels are in where `allow_bf16` says so; by default in mode "measure_bf16", and in mode "measure"
    when torch's fp32 matmul precision is bf16 (`torch_allows_bf16`)."""
    if allow_bf16 is None:
        allow_bf16 = _state["mode"] == "measure_bf16" or (dtype == torch.float32 and torch_allows_bf16())
    return [k for k in base._BY_PRIORITY
            if k.measured and (allow_bf16 or not getattr(k, "casts_to_bf16", False))
            and layer.scheme.activation_name in k.activations and k.accepts(layer, device, dtype)]


def class_rows(dtype: torch.dtype, rows: int) -> int:
    """The row count timed for the row class of `rows`: its largest member (LAST_CLASS_ROWS or more
    for the open-ended last class)."""
    i = row_class(dtype, rows)
    cuts = base._ROW_CUTS[dtype]
    return cuts[i] if i < len(cuts) else max(cuts[-1] + 1 if cuts else 1, LAST_CLASS_ROWS)


def measured_choice(layer: Any, device: torch.device, dtype: torch.dtype, rows: int) -> Kernel | None:
    """The fastest measured candidate for this layer's shape class (measured now if new). None (the
    fixed order decides) off the CPU, where the fixed choice is a kernel that did not opt in (a
    higher-priority custom kernel, an activation scheme's kernel), or with fewer than two candidates."""
    if device.type != "cpu":
        return None
    first = choose_fixed(layer, device, dtype, rows)
    found = candidates(layer, device, dtype)
    if not first.measured or len(found) < 2:
        return None
    timed_rows = class_rows(dtype, rows)
    key = _key(layer, dtype, timed_rows, found)
    entry = _TABLE.get(key)
    if entry is None:
        with _LOCK:
            entry = _TABLE.get(key)
            if entry is None:
                entry = _TABLE[key] = measure(layer, device, dtype, timed_rows, found, first)
    return KERNELS.get(entry.choice)


def measurement_for(layer: Any, device: torch.device, dtype: torch.dtype, rows: int,
                    allow_bf16: bool | None = None) -> Measurement | None:
    """The measurement that decides `rows` rows of `dtype` for `layer` (None if not taken yet)."""
    found = candidates(layer, device, dtype, allow_bf16)
    return _TABLE.get(_key(layer, dtype, class_rows(dtype, rows), found))


def _key(layer: Any, dtype: torch.dtype, rows: int, found: list[Kernel]) -> tuple:
    spec = layer.spec
    return (layer.out_features, layer.in_features, spec.bits, spec.effective_group_size(layer.in_features), spec.gguf,
            layer.qzeros is None, layer.g_idx is not None, layer.bias is not None, layer.float_dtype, dtype, rows,
            torch.get_num_threads(), tuple(k.name for k in found))


@torch.no_grad()
def measure(layer: Any, device: torch.device, dtype: torch.dtype, rows: int, found: list[Kernel],
            first: Kernel | None = None) -> Measurement:
    """Time every candidate on `rows` random rows (`first`, the fixed choice, leads: its time prunes
    the others' probes); the fastest wins, ties to the earlier candidate."""
    order = sorted(found, key=lambda k: k is not first)  # stable: the rest keep priority order
    flush = _cache_flusher(layer, rows)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, layer.in_features, generator=g).to(device=device, dtype=dtype)
    seconds: dict[str, float | None] = {}
    layouts: dict[str, Any] = {}
    best = math.inf
    for kernel in order:
        prepared = layouts[kernel.name] = kernel.prepare(layer, device, dtype)  # losers leave no layout behind
        if any(time_call(kernel, layer, x[:p], prepared, 0.0, GIVE_UP * best, flush) >= PROBE_MARGIN * best
               for p in PROBE_ROWS if p < rows and best < math.inf):
            seconds[kernel.name] = None
            continue
        seconds[kernel.name] = t = time_call(kernel, layer, x, prepared, BUDGET_S, GIVE_UP * best, flush)
        best = min(best, t)
    close = [k for k in order if seconds[k.name] is not None and seconds[k.name] <= CONFIRM_WITHIN * best]
    if len(close) > 1:  # close calls: decided by interleaved rounds alone (each keeps its fastest), so that a slow
        again = dict.fromkeys((k.name for k in close), math.inf)  # spell of a shared machine hits every contender
        for _ in range(CONFIRM_ROUNDS):  # alike; their first timings, taken minutes apart at worst, do not count
            for kernel in close:
                again[kernel.name] = min(again[kernel.name], time_call(kernel, layer, x, layouts[kernel.name], 0.0,
                                                                       flush=flush))
        seconds.update(again)
    # the choice among the close ones, the best among them (a candidate beyond CONFIRM_WITHIN lost already, and its
    # first timing must not meet the rounds' times: a slow spell during the rounds would hand it the layer)
    choice = min((k.name for k in close), key=lambda n: seconds[n])
    cache = getattr(layer, "_prepared", None)
    if isinstance(cache, dict):  # the winner's layout is the one this layer will use: not built twice
        winner = KERNELS.get(choice)
        cache.setdefault((winner.layout or winner.name, device, dtype), layouts[choice])
    return Measurement(rows, seconds, choice)


def _cache_flusher(layer: Any, rows: int) -> Any:
    """A function that evicts the caches (reads a buffer of twice the last-level cache), or None where the
    layer is timed warm (many rows, or weights small next to the cache). The buffer lives as long as the
    function: one measurement."""
    llc = last_level_cache_bytes()
    weight_bytes = sum(t.numel() * t.element_size() for t in layer.tracked_buffers())
    if rows > COLD_MAX_ROWS or weight_bytes < COLD_MIN_FRACTION * llc:
        return None
    buf = torch.ones(2 * llc // 4, dtype=torch.int32)

    def flush() -> None:
        buf.sum()

    return flush


def time_call(kernel: Kernel, layer: Any, x: torch.Tensor, prepared: Any, budget_s: float,
              give_up_s: float = math.inf, flush: Any = None) -> float:
    """Seconds of `kernel.forward(layer, x, prepared)`: the fastest of at least two calls (the first
    may pay one-time costs: oneDNN primitives for a new shape, first-touch memory), repeated until
    `budget_s` is spent, at most MAX_CALLS. From the second call on, a call slower than `give_up_s` ends
    it (hopeless); the first never does, since it may be slow once only (a kernel dropped on its first call
    was how oneDNN lost every 512-row measurement on a 16-core AMX Xeon: creating the primitive for a new row
    count took longer than the whole GEMM). `flush`, if given, runs before every call (untimed)."""
    best, spent, calls = math.inf, 0.0, 0
    while calls < 2 or (spent < budget_s and calls < MAX_CALLS):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        kernel.forward(layer, x, prepared)
        dt = time.perf_counter() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
        if calls >= 2 and dt > give_up_s:
            break
    return best


_set_mode(mode_from_env())
