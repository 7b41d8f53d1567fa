"""The opt-in fast relaunch of compiled Triton kernels (`triton/launch.py`), with a fake JIT function: which
calls go through `JITFunction.run`, the specialization key, the first-launch check and its fallback.
(On a GPU, benchmarks/gpu_session.py's `overhead` stage times it.)"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

from .conftest import TRITON_KERNELS_UNAVAILABLE  # noqa: E402

if TRITON_KERNELS_UNAVAILABLE:
    pytest.skip(TRITON_KERNELS_UNAVAILABLE, allow_module_level=True)
from hf_quant.runtime.kernels.triton import launch  # noqa: E402


def _param(name, constexpr=False, default=inspect.Parameter.empty):
    return types.SimpleNamespace(name=name, is_constexpr=constexpr, default=default)


class FakeJit:
    """`fn[grid](*args, **kwargs)` writes x * SCALE into y and returns a compiled kernel whose runner does the
    same from all parameters in order (as Triton's `CompiledKernel[grid](*args)`), or `relaunch` instead."""

    __name__ = "fake_kernel"
    params = [_param("x_ptr"), _param("y_ptr"), _param("M"), _param("SCALE", True), _param("FLAG", True, False)]

    def __init__(self, relaunch=None):
        self.slow, self.fast, self.relaunch = [], [], relaunch

    def __getitem__(self, grid):
        def run(x, y, M, SCALE, FLAG=False, num_warps=4):
            self.slow.append((grid, M, SCALE, FLAG))
            y.copy_(x * SCALE)
            return types.SimpleNamespace(__getitem__=None, run=self._compiled(grid))
        return run

    def _compiled(self, grid0):
        fake = self

        class Compiled:
            def __getitem__(self, grid):
                def runner(x, y, M, SCALE, FLAG):
                    fake.fast.append((grid, M, SCALE, FLAG))
                    if fake.relaunch is not None:
                        return fake.relaunch(x, y)
                    y.copy_(x * SCALE)
                return runner
        return Compiled()


class FakeJitCompiled(FakeJit):
    def __getitem__(self, grid):
        inner = super().__getitem__(grid)

        def run(*args, **kwargs):
            inner(*args, **kwargs)
            return self._compiled(grid)
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRET", False)
    launch.set_enabled(True)
    yield
    launch.set_enabled(False)


def _call(launcher, x, M=3, SCALE=2, **kw):
    y = torch.empty_like(x)
    launcher((4,), x, y, M, out=1, SCALE=SCALE, num_warps=4, **kw)
    return y


def test_disabled_always_goes_through_the_jit_function():
    fn = FakeJitCompiled()
    launcher = launch.Launcher(fn)
    assert not launch.enabled()
    x = torch.arange(8.0)
    for _ in range(3):
        assert torch.equal(_call(launcher, x), 2 * x)
    assert len(fn.slow) == 3 and fn.fast == [] and launcher.cache == {}


def test_a_key_is_checked_once_then_relaunched_directly(fast):
    fn = FakeJitCompiled()
    launcher = launch.Launcher(fn)
    x = torch.arange(8.0)
    assert torch.equal(_call(launcher, x), 2 * x)
    assert len(fn.slow) == 1 and len(fn.fast) == 1  # the first launch, then the checking relaunch
    for _ in range(3):
        assert torch.equal(_call(launcher, x), 2 * x)
    assert len(fn.slow) == 1 and len(fn.fast) == 4
    assert fn.fast[-1] == ((4, 1, 1), 3, 2, False)  # every parameter in order, the default filled in


@pytest.mark.parametrize("change", ["constexpr", "int_is_one", "int_divisible_by_16", "misaligned", "dtype", "default"])
def test_anything_triton_specializes_on_makes_a_new_key(fast, change):
    fn = FakeJitCompiled()
    launcher = launch.Launcher(fn)
    x = torch.arange(16.0)
    _call(launcher, x[:8])
    kw = {}
    if change == "constexpr":
        kw["SCALE"] = 3
    elif change == "int_is_one":
        kw["M"] = 1
    elif change == "int_divisible_by_16":
        kw["M"] = 32
    elif change == "misaligned":
        x = x[1:9]  # 4 bytes off the allocation
    elif change == "dtype":
        x = x.double()[:8]
    else:
        kw["FLAG"] = True
    y = _call(launcher, x[:8] if change != "misaligned" else x, **kw)
    assert len(fn.slow) == 2 and len(launcher.cache) == 2
    assert torch.equal(y, (x[:8] if change != "misaligned" else x) * kw.get("SCALE", 2))


def test_a_relaunch_that_disagrees_turns_the_fast_path_off(fast):
    fn = FakeJitCompiled(relaunch=lambda x, y: y.copy_(x * 5))
    launcher = launch.Launcher(fn)
    x = torch.arange(8.0)
    with pytest.warns(RuntimeWarning, match="different output"):
        y = _call(launcher, x)
    assert torch.equal(y, 2 * x)  # the first launch's output stands
    assert not launch.enabled() and "different output" in launch.off_reason()
    assert torch.equal(_call(launcher, x), 2 * x) and len(fn.slow) == 2 and launcher.cache == {}


def test_a_triton_without_the_runner_api_falls_back(fast):
    fn = FakeJit()  # fn[grid](...) returns an object without CompiledKernel's runner
    launcher = launch.Launcher(fn)
    x = torch.arange(8.0)
    with pytest.warns(RuntimeWarning, match="turned off"):
        assert torch.equal(_call(launcher, x), 2 * x)
    assert not launch.enabled() and torch.equal(_call(launcher, x), 2 * x)


def test_arg_keys_follow_tritons_specialization():
    k = launch.arg_key
    assert k(1) != k(17) and k(16) != k(17) and k(17) == k(33) and k(2**31) != k(2**31 - 17)
    t = torch.zeros(8)
    assert k(t) == k(torch.ones(8)) and k(t) != k(t[1:]) and k(t) != k(t.half()) and k(None) is None
    assert k(0.5) == k(2.0) and k(True) == k(False)
