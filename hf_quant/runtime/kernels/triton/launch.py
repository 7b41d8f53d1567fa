"""Relaunching compiled Triton kernels without `JITFunction.run` (opt-in: HF_QUANT_TRITON_FAST_LAUNCH=1).

On an H200 host an eager quantized linear at M = 1 cost ~119 us of host time against 19 us for `F.linear`;
~63 us of it was `launch_matmul`, most of that Triton's `JITFunction.run` (argument binding, 17 native
specializations, the cache key, global-value checks, then the launcher). The GPU part is ~7 us. `Launcher`
keeps the `CompiledKernel` that `JITFunction.run` returns, under a key built from what Triton specializes on
(every constexpr's value; for the other arguments: a tensor's dtype and 16-byte alignment, an int's == 1,
divisibility by 16 and width; floats, bools and None by kind; the launch options and the grid), and
relaunches it through the compiled kernel's own runner (`CompiledKernel[grid](*args)`, the same call
`JITFunction.run` ends in, in Triton 3.6 to 3.9).

Safety: off unless the environment variable is 1, never under Triton's interpreter, and the first fast
launch of every key is checked: after the launch through `JITFunction.run`, the compiled kernel runs again
into a copy of the output as it was before (a kernel may write part of it) and both must be equal (one sync, once per key); any mismatch or exception turns the fast
path off for the process, with a warning naming the reason.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch

ENV = "HF_QUANT_TRITON_FAST_LAUNCH"
OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")
_EMPTY = inspect.Parameter.empty
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_STATE: dict[str, Any] = {"enabled": os.environ.get(ENV, "0") == "1", "off_reason": None}


def enabled() -> bool:
    return bool(_STATE["enabled"]) and not _INTERPRET


def set_enabled(on: bool) -> None:
    """Turn the fast relaunch on or off for this process (what HF_QUANT_TRITON_FAST_LAUNCH sets at import)."""
    _STATE["enabled"], _STATE["off_reason"] = bool(on), None


def off_reason() -> str | None:
    """Why the fast path turned itself off (a failed check), or None."""
    return _STATE["off_reason"]


def _turn_off(reason: str) -> None:
    _STATE["enabled"], _STATE["off_reason"] = False, reason
    warnings.warn(f"hf_quant: fast Triton relaunch turned off ({reason}); kernels launch through "
                  f"JITFunction.run. Please report this with your Triton version.", RuntimeWarning, stacklevel=3)


def _current_device() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else -1


def arg_key(v: Any) -> Any:
    """What Triton specializes a runtime argument on (its key differs exactly when Triton's would)."""
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool):
        return ("b",)
    if isinstance(v, int):
        return ("i", v == 1, v % 16 == 0, -(2**31) <= v < 2**31, v >= 2**63)
    if isinstance(v, float):
        return ("f",)
    if v is None:
        return None
    return ("?", type(v).__name__, v)


class Launcher:
    """`launcher(grid, *args, out=i, **kwargs)` launches `fn[grid](*args, **kwargs)`; argument `out` (an index
    into the kernel's parameters) is the output tensor that the first-launch check compares."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        params = getattr(fn, "params", None)
        self.names = [p.name for p in params] if params is not None else None
        self.constexpr = [bool(p.is_constexpr) for p in params] if params is not None else None
        self.defaults = ([p.default for p in params] if params is not None and all(hasattr(p, "default") for p in params)
                         else None)
        self.cache: dict[tuple, Any] = {}

    def full_args(self, args: tuple, kwargs: dict) -> list | None:
        """Every kernel parameter's value in signature order (constexprs and defaults included), or None."""
        if self.names is None or self.defaults is None:
            return None
        full = list(args)
        for name, default in zip(self.names[len(args):], self.defaults[len(args):]):
            v = kwargs.get(name, default)
            if v is _EMPTY:
                return None
            full.append(v)
        return full

    def __call__(self, grid: tuple, *args: Any, out: int, **kwargs: Any) -> None:
        if not enabled():
            self.fn[grid](*args, **kwargs)
            return
        full = self.full_args(args, kwargs)
        if full is None:
            _turn_off(f"cannot read the parameters of {getattr(self.fn, '__name__', self.fn)}")
            self.fn[grid](*args, **kwargs)
            return
        grid = tuple(grid) + (1,) * (3 - len(grid))
        key = (_current_device(), grid, tuple(v if c else arg_key(v) for v, c in zip(full, self.constexpr)),
               tuple(kwargs.get(k) for k in OPTIONS))  # the device: a compiled kernel's handle is per context
        compiled = self.cache.get(key)
        if compiled is not None:
            compiled[grid](*full)
            return
        first = full[out]
        check = first.clone()  # as the output was before the launch: a kernel may write only part of it
        compiled = self.fn[grid](*args, **kwargs)  # compiles if needed, launches, returns the CompiledKernel
        try:
            # every argument aliasing the output points at the copy: the check never writes the caller's tensor
            compiled[grid](*[check if v is first else v for v in full])
            same = torch.equal(check, first)
        except Exception as e:  # noqa: BLE001 - an API this Triton does not have: fall back for good
            _turn_off(f"{type(e).__name__}: {str(e)[:200]}")
            return
        if not same:
            _turn_off(f"a relaunch of {getattr(self.fn, '__name__', 'a kernel')} computed a different output")
            return
        self.cache[key] = compiled


