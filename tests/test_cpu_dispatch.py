"""The measured CPU dispatch (runtime/kernels/cpu_measure.py): every candidate against the reference,
the choice cached per shape class, the modes, and their validation. The rest of the suite runs in
mode "fixed" (conftest.py)."""

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_quant import kernels
from hf_quant.config import LayerSpec
from hf_quant.runtime.kernels import cpu_measure
from hf_quant.runtime.kernels.base import KERNELS, choose_fixed

from .test_kernels import make_layer, rel_err

CPU = torch.device("cpu")


@pytest.fixture()
def fresh_table(monkeypatch):
    """An empty measurement table for the test (the process-wide one is left as it was)."""
    monkeypatch.setattr(cpu_measure, "_TABLE", {})


@pytest.fixture()
def fake_timer(monkeypatch, fresh_table):
    """time_call replaced by a deterministic fake: dequant_tiles is fastest, cpu_int4 next; records calls."""
    calls = []
    speed = {"dequant_tiles": 1.0, "cpu_int4": 2.0, "cpu_int8": 2.0}

    def fake(kernel, layer, x, prepared, budget_s, give_up_s=None, flush=None):
        calls.append((kernel.name, x.shape[0]))
        return speed.get(kernel.name, 3.0) * 1e-3 * x.shape[0] / 64

    monkeypatch.setattr(cpu_measure, "time_call", fake)
    return calls


def _forward(kernel, layer, x):
    return kernel.forward(layer, x, kernel.prepare(layer, CPU, x.dtype))


_SPECS = st.builds(LayerSpec, st.sampled_from([2, 3, 4, 8]), st.sampled_from([-1, 32, 64, 128]), st.booleans(),
                   st.booleans())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(spec=_SPECS, bias=st.booleans(), k_mult=st.integers(1, 3),
       out_f=st.sampled_from([16, 48, 272, 300]),  # 272, 300: more than one dequant_tiles tile
       m=st.sampled_from([1, 3, 17]), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_every_candidate_matches_reference(spec, bias, k_mult, out_f, m, dtype, seed):
    in_f = k_mult * (128 if spec.group_size == -1 else spec.group_size)
    if spec.g_idx and not in_f > spec.group_size > 0:  # act-order only where there are several groups
        spec = LayerSpec(spec.bits, spec.group_size, spec.sym)
    layer, _ = make_layer(out_f, in_f, spec, bias, seed=seed)
    x = torch.randn(2, m, in_f, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    found = cpu_measure.candidates(layer, CPU, dtype, allow_bf16=True)
    assert {"dequant_matmul", "dequant_tiles"} <= {k.name for k in found}
    for kernel in found:
        out = _forward(kernel, layer, x)
        assert out.shape == ref.shape and out.dtype == dtype, kernel.name
        exact = dtype == torch.float32 and not getattr(kernel, "casts_to_bf16", False)
        # bf16 paths: tinygemm also rounds its zero term (8 - z) * scale to bf16, and at 2 bits a weight
        # is a small difference of two such terms: ~1% typical, up to ~5% on 16 outputs of 2 rows
        assert rel_err(out, ref) < (1e-3 if exact else 3e-2 if spec.bits > 2 else 6e-2), kernel.name


@pytest.mark.parametrize("spec,in_f,layout", [
    (LayerSpec(4, 128, False), 256, "nibbles"), (LayerSpec(4, -1, True), 96, "nibbles"),
    (LayerSpec(3, 64, False, True), 192, "nibbles"), (LayerSpec(2, 32, True), 64, "nibbles"),
    (LayerSpec(8, -1, False), 64, "rows8"), (LayerSpec(8, -1, True), 64, "rows8"),
    (LayerSpec(8, 32, False), 64, "generic"), (LayerSpec(8, 32, True, True), 96, "generic")])
@pytest.mark.parametrize("rows", [3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_tiles_layouts_match_reference(monkeypatch, spec, in_f, layout, rows, dtype):
    """Each prepared layout of dequant_tiles, over several tiles (the last one partial) and in both GEMM
    orientations (ROWS_MAJOR_FROM cut between the two row counts), against the reference."""
    kernel = KERNELS.get("dequant_tiles")
    monkeypatch.setattr(type(kernel), "TILE_N", 32)
    monkeypatch.setattr(type(kernel), "ROWS_MAJOR_FROM", 8)
    layer, _ = make_layer(80, in_f, spec, bias=True, seed=rows)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    prepared = kernel.prepare(layer, CPU, dtype)
    assert prepared[0] == layout
    out = kernel.forward(layer, x, prepared)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_dequant_tiles_int8_fp16_does_not_overflow():
    """fp16 activations of a few hundred: x times raw int8 codes would pass 65504 in fp16."""
    layer, _ = make_layer(64, 1024, LayerSpec(8, -1, True), bias=False)
    x = torch.full((2, 1024), 300.0, dtype=torch.float16)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    kernel = KERNELS.get("dequant_tiles")
    out = kernel.forward(layer, x, kernel.prepare(layer, CPU, torch.float16))
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


def test_bf16_cast_deviation_on_fp32_activations():
    """What mode "measure_bf16" costs an fp32 model: the `_bf16` kernels round x and y to bf16.
    Measured here (4-bit g128 and 8-bit per channel, 512x1024, 16 rows): about 3e-3 relative error
    against the fp32 reference, where the fp32 kernels stay below 1e-6."""
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    for spec, name in ((LayerSpec(4, 128, False), "cpu_int4"), (LayerSpec(8, -1, False), "cpu_int8")):
        layer, _ = make_layer(1024, 512, spec, bias=True)
        with kernels.use_kernel("reference"):
            ref = layer(x)
        err_fp32 = rel_err(_forward(KERNELS.get("dequant_tiles"), layer, x), ref)
        for cast in (f"{name}_bf16", "dequant_tiles_bf16"):
            err = rel_err(_forward(KERNELS.get(cast), layer, x), ref)
            assert 1e-4 < err < 1e-2, (cast, err)
        assert err_fp32 < 1e-5


def test_measured_choice_is_the_fastest_candidate_and_cached(fake_timer):
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    twin, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False, seed=1)  # same shape and format
    with kernels.cpu_dispatch("measure"):
        x = torch.randn(5, 256)
        assert kernels.select_kernel(layer, x).name == "dequant_tiles"
        timed = len(fake_timer)
        names = {n for n, _ in fake_timer}
        assert names == {k.name for k in cpu_measure.candidates(layer, CPU, torch.float32)}
        assert not any(n.endswith("_bf16") for n in names)  # "measure" never casts fp32 to bf16
        assert {rows for _, rows in fake_timer} >= {8}  # the class's largest row count
        kernels.select_kernel(layer, torch.randn(6, 256))  # same class
        kernels.select_kernel(twin, x)  # same shape class, another layer
        twin(x), twin(x)
        assert len(fake_timer) == timed  # no new timing
        (entry,) = cpu_measure.measurements().values()
        assert entry.rows == 8 and entry.choice == "dequant_tiles"
        assert all(t is None or t > 0 for t in entry.seconds.values())
        kernels.select_kernel(layer, torch.randn(1, 256))  # a new row class: measured once more
        assert len(fake_timer) > timed and len(cpu_measure.measurements()) == 2


def test_the_winners_layout_is_kept_and_no_losers(fake_timer):
    """The measurement's layout of the chosen kernel becomes the layer's (not prepared twice)."""
    layer, _ = make_layer(64, 256, LayerSpec(8, -1, False), bias=False)
    with kernels.cpu_dispatch("measure"):
        assert kernels.select_kernel(layer, torch.randn(5, 256)).name == "dequant_tiles"
        assert {key[0] for key in layer._prepared} == {"dequant_tiles"}


def _two_phase_timer(monkeypatch, first: dict, later: dict) -> list:
    """A fake `time_call`: a kernel's first call on a row count takes first[name] ms (per 8 rows), every later
    call later[name] (others 50 ms). Returns the (name, rows) log of the calls."""
    calls = []

    def fake(kernel, layer, x, prepared, budget_s, give_up_s=None, flush=None):
        seen = sum(1 for n, r in calls if n == kernel.name and r == x.shape[0])
        calls.append((kernel.name, x.shape[0]))
        table = first if seen == 0 else later
        return table.get(kernel.name, 50.0) * 1e-3 * x.shape[0] / 8

    monkeypatch.setattr(cpu_measure, "time_call", fake)
    return calls


def test_close_candidates_are_timed_again_interleaved(monkeypatch, fresh_table):
    """Two candidates within CONFIRM_WITHIN of each other get CONFIRM_ROUNDS more calls each, in
    alternation; each keeps its fastest time, so a slow first timing does not decide."""
    first = {"dequant_tiles": 1.0, "cpu_int4": 1.2}  # cpu_int4's first timing was unlucky ...
    later = {"dequant_tiles": 1.0, "cpu_int4": 0.7}  # ... its later calls are faster

    calls = _two_phase_timer(monkeypatch, first, later)
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    with kernels.cpu_dispatch("measure"):
        assert kernels.select_kernel(layer, torch.randn(5, 256)).name == "cpu_int4"
    full = [n for n, r in calls if r == 8]
    tail = full[-2 * cpu_measure.CONFIRM_ROUNDS:]
    assert sorted(set(tail)) == ["cpu_int4", "dequant_tiles"]
    assert all(a != b for a, b in zip(tail, tail[1:]))  # interleaved


def test_close_candidates_are_decided_by_the_interleaved_rounds_alone(monkeypatch, fresh_table):
    """A first timing taken in a fast spell of the machine does not win against the interleaved rounds: the
    kernel that reads faster in them, where every contender meets the same spell, is chosen."""
    first = {"dequant_tiles": 1.0, "cpu_int4": 0.75}  # cpu_int4 timed first while the machine was fast ...
    later = {"dequant_tiles": 0.8, "cpu_int4": 1.0}  # ... slower than dequant_tiles side by side

    _two_phase_timer(monkeypatch, first, later)
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    with kernels.cpu_dispatch("measure"):
        assert kernels.select_kernel(layer, torch.randn(5, 256)).name == "dequant_tiles"
    (entry,) = cpu_measure.measurements().values()
    assert entry.seconds["cpu_int4"] == pytest.approx(1e-3) and entry.seconds["dequant_tiles"] == pytest.approx(8e-4)


def test_a_slow_spell_in_the_rounds_does_not_hand_the_layer_to_a_distant_candidate(monkeypatch, fresh_table):
    """A candidate beyond CONFIRM_WITHIN of the best is out: when the interleaved rounds of the close ones meet a slow
    spell (all of them 3x slower), its first timing, faster than theirs now, does not win."""
    first = {"dequant_tiles": 1.0, "cpu_int4": 1.1, "dequant_matmul": 1.8}
    later = {"dequant_tiles": 3.0, "cpu_int4": 3.3, "dequant_matmul": 5.4}  # the rounds in a slow spell

    calls = _two_phase_timer(monkeypatch, first, later)
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    with kernels.cpu_dispatch("measure"):
        assert kernels.select_kernel(layer, torch.randn(5, 256)).name == "dequant_tiles"
    assert ("dequant_matmul", 8) in calls and calls.count(("dequant_matmul", 8)) == 1  # timed once, not in the rounds


def test_probes_drop_hopeless_candidates_cheaply(monkeypatch, fresh_table):
    """A candidate slower on a few rows than the best on all rows is never timed at full size."""
    calls = []

    def fake(kernel, layer, x, prepared, budget_s, give_up_s=None, flush=None):
        calls.append((kernel.name, x.shape[0]))
        per_row = {"dequant_matmul": 1e-3, "cpu_int8": 1.0}.get(kernel.name, 1e-2)
        return per_row * x.shape[0]

    monkeypatch.setattr(cpu_measure, "time_call", fake)
    layer, _ = make_layer(32, 256, LayerSpec(8, -1, False), bias=False)
    with kernels.cpu_dispatch("measure"):
        assert kernels.select_kernel(layer, torch.randn(300, 256)).name == "dequant_matmul"
    (entry,) = cpu_measure.measurements().values()
    assert entry.rows == 512 and entry.seconds["cpu_int8"] is None
    assert ("cpu_int8", 512) not in calls and ("cpu_int8", 1) in calls
    assert calls[-1][0] != "dequant_matmul" and calls[0][0] == "dequant_matmul"  # the fixed choice leads


def test_a_slow_spell_in_a_probe_does_not_drop_the_fastest(monkeypatch, fresh_table):
    """A memory-bound kernel takes about as long on 1 row as on all: a probe that a slow spell made 1.3x slower
    than its true time reads slower than the best so far, but within PROBE_MARGIN it is still timed, and wins."""
    def fake(kernel, layer, x, prepared, budget_s, give_up_s=None, flush=None):
        if kernel.name == "dequant_matmul":  # the fixed choice leads: 1.0 ms on every row count
            return 1.0e-3
        if kernel.name == "dequant_tiles":  # 0.8 ms at every row count; its probe hit a slow spell
            return 0.8e-3 * (1.3 if x.shape[0] < 8 else 1.0)
        return 1.0

    monkeypatch.setattr(cpu_measure, "time_call", fake)
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    with kernels.cpu_dispatch("measure"):
        assert kernels.select_kernel(layer, torch.randn(8, 256)).name == "dequant_tiles"


def test_bf16_candidates_only_when_allowed(fake_timer):
    layer, _ = make_layer(64, 256, LayerSpec(8, -1, False), bias=False)
    x = torch.randn(2, 256)
    with kernels.cpu_dispatch("measure_bf16"):
        kernels.select_kernel(layer, x)
    assert any(n.endswith("_bf16") for n, _ in fake_timer)
    with kernels.cpu_dispatch("measure_bf16"):  # bf16 activations: nothing to cast
        assert not any(k.name.endswith("_bf16") for k in cpu_measure.candidates(layer, CPU, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [LayerSpec(4, 128, False), LayerSpec(8, -1, True)])
def test_fp32_compute_of_bf16_activations(dtype, spec):
    """The `_fp32` wrappers (bf16/fp16 activations through a prefill kernel's fp32 path, for CPUs without native
    bf16 GEMMs): default-mode candidates for 16-bit activations only, and at least as close to the exact product as
    the reference's own 16-bit arithmetic."""
    layer, _ = make_layer(272, 256, spec, bias=True, seed=3)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    with kernels.cpu_dispatch("measure"):
        names16 = {k.name for k in cpu_measure.candidates(layer, CPU, dtype)}
        names32 = {k.name for k in cpu_measure.candidates(layer, CPU, torch.float32, allow_bf16=True)}
    wrapped = {n for n in names16 if n.endswith("_fp32")}
    assert {"dequant_tiles_fp32"} <= wrapped and not any(n.endswith("_fp32") for n in names32)
    truth = x.double() @ layer.dequantize().double().t() + layer.bias.double()
    with kernels.use_kernel("reference"):
        err_ref = rel_err(layer(x), truth)
    for name in wrapped:
        out = _forward(KERNELS.get(name), layer, x)
        assert out.dtype == dtype and out.shape == truth.shape
        assert rel_err(out, truth) <= err_ref * 1.01 + 1e-6, name


@pytest.fixture()
def torch_fp32_precision():
    """torch's CPU fp32 matmul precision, restored after the test."""
    matmul = torch.backends.mkldnn.matmul
    legacy, saved = torch.get_float32_matmul_precision(), matmul.fp32_precision
    yield matmul
    torch.backends.mkldnn.fp32_precision = "none"
    torch.set_float32_matmul_precision(legacy)
    matmul.fp32_precision = saved
    assert torch.get_float32_matmul_precision() == legacy


@pytest.mark.parametrize("how", ["legacy", "mkldnn.matmul", "mkldnn"])
def test_torch_fp32_precision_bf16_allows_bf16_candidates(fake_timer, torch_fp32_precision, how):
    """Mode "measure" follows torch's own consent: with fp32 matmul precision bf16 ("medium"), the `_bf16`
    kernels are candidates for fp32 activations; with "ieee" / "highest" they are not."""
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    with kernels.cpu_dispatch("measure"):
        assert not cpu_measure.torch_allows_bf16()
        assert not any(k.name.endswith("_bf16") for k in cpu_measure.candidates(layer, CPU, torch.float32))
        if how == "legacy":
            torch.set_float32_matmul_precision("medium")
        elif how == "mkldnn":  # inherited by mkldnn.matmul
            torch.backends.mkldnn.fp32_precision = "bf16"
        else:
            torch_fp32_precision.fp32_precision = "bf16"
        assert cpu_measure.torch_allows_bf16()
        names = {k.name for k in cpu_measure.candidates(layer, CPU, torch.float32)}
        assert {"cpu_int4_bf16", "dequant_tiles_bf16"} <= names
        assert not any(k.name.endswith("_bf16") for k in cpu_measure.candidates(layer, CPU, torch.bfloat16))
        kernels.select_kernel(layer, torch.randn(2, 256))
        assert any(n.endswith("_bf16") for n, _ in fake_timer)
        torch_fp32_precision.fp32_precision = "ieee"
        torch.backends.mkldnn.fp32_precision = "none"
        assert not cpu_measure.torch_allows_bf16()
        assert not any(k.name.endswith("_bf16") for k in cpu_measure.candidates(layer, CPU, torch.float32))


def test_fixed_mode_never_measures(monkeypatch):
    def refuse(*args):
        raise AssertionError("timed in mode 'fixed'")

    monkeypatch.setattr(cpu_measure, "time_call", refuse)
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=True)
    with kernels.cpu_dispatch("fixed"):
        for rows, dtype in ((1, torch.bfloat16), (385, torch.bfloat16), (4, torch.float32), (5, torch.float32)):
            x = torch.randn(rows, 256, dtype=dtype)
            assert kernels.select_kernel(layer, x) is choose_fixed(layer, CPU, dtype, rows)
            layer(x)
    assert kernels.get_cpu_dispatch() == "fixed"


def test_real_measurement_runs_and_matches_reference(fresh_table):
    """Unpatched timer on a small layer: the choice is a candidate and the layer's output is right."""
    layer, _ = make_layer(96, 256, LayerSpec(4, 64, False), bias=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 256, dtype=dtype)
        with kernels.cpu_dispatch("measure"):
            chosen = kernels.select_kernel(layer, x)
            out = layer(x)
            assert chosen in cpu_measure.candidates(layer, CPU, dtype)
        with kernels.use_kernel("reference"):
            ref = layer(x)
        assert rel_err(out, ref) < (1e-3 if dtype == torch.float32 else 2e-2)


def test_mode_change_drops_cached_choices_but_keeps_layouts(fake_timer):
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    x = torch.randn(2, 256)
    with kernels.cpu_dispatch("fixed"):
        layer(x)
        assert layer._kernel_cache
        layouts = dict(layer._prepared)
        assert layouts
        with kernels.cpu_dispatch("measure"):
            assert not layer._kernel_cache and kernels.get_cpu_dispatch() == "measure"
            assert all(layer._prepared[k] is v for k, v in layouts.items())  # not rebuilt on a mode switch
            layer(x)
            assert [e[0].__self__.name for e in layer._kernel_cache.values()] == ["dequant_tiles"]
        assert kernels.get_cpu_dispatch() == "fixed" and not layer._kernel_cache
        assert all(layer._prepared[k] is v for k, v in layouts.items())
    kernels.base.register_kernel(kernels.base.unregister_kernel("dequant_tiles"))  # the kernels changed:
    assert not layer._prepared  # layouts are dropped too


def test_activation_schemes_measure_only_their_own_kernels(fresh_table):
    """An activation scheme no measured kernel runs keeps the fixed choice; int8_token layers are
    measured among the exact int8 GEMMs only (never a weight-only kernel), where the CPU has them."""
    from hf_quant.runtime.kernels import int8 as I

    from .test_int8_kernels import int8_layer
    layer = types.SimpleNamespace(scheme=types.SimpleNamespace(activation_name="some_other_scheme"))
    with kernels.cpu_dispatch("measure_bf16"):
        assert cpu_measure.candidates(layer, CPU, torch.float32) == []
        assert cpu_measure.measured_choice(layer, CPU, torch.float32, 1) is None
    layer = int8_layer(48, 128, 6.0, True)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with kernels.cpu_dispatch("measure"):
        names = {k.name for k in cpu_measure.candidates(layer, CPU, torch.bfloat16)}
        chosen = kernels.select_kernel(layer, x).name
        out = layer(x)
    if I.exact_int8_dot():
        assert names <= {"cpu_int8_fbgemm", "cpu_int8_onednn", "cpu_int8_intmm", "cpu_int8_native",
                         "cpu_int8_native_amx", "cpu_int8_token_w8"}
        assert "cpu_int8_token_w8" in names and chosen in names
        if len(names) >= 2:
            assert cpu_measure.measurement_for(layer, CPU, torch.bfloat16, 3).choice == chosen
    else:  # hf_quant's own GEMM (its AVX2 form) where built, else one candidate: nothing to time
        native = {"cpu_int8_native"} if I.NATIVE.supports(layer, CPU, torch.bfloat16) else set()
        assert names == {"cpu_int8_token_w8"} | native and chosen in names
    with kernels.use_kernel("reference"):
        assert rel_err(out, layer(x)) < 2e-2


@pytest.mark.parametrize("value", ["", "Measure", "fast", "auto"])
def test_bad_modes_are_refused_by_name(value):
    with pytest.raises(ValueError, match=r"HF_QUANT_CPU_DISPATCH=.*'measure', 'measure_bf16', 'fixed'"):
        cpu_measure.mode_from_env({"HF_QUANT_CPU_DISPATCH": value})
    with pytest.raises(ValueError, match=r"cpu_dispatch mode=.*'measure', 'measure_bf16', 'fixed'"):
        kernels.cpu_dispatch(value)
    assert kernels.get_cpu_dispatch() == "fixed"  # unchanged


def test_env_default_is_measure():
    assert cpu_measure.mode_from_env({}) == "measure"
    assert cpu_measure.mode_from_env({"HF_QUANT_CPU_DISPATCH": "measure_bf16"}) == "measure_bf16"


def test_time_call_takes_the_fastest_of_at_least_two_calls_and_gives_up(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(cpu_measure, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def kernel(durations):
        def forward(layer, x, prepared):
            clock[0] += durations.pop(0)
        return types.SimpleNamespace(forward=forward)

    cold_then_warm = [0.003, 0.001, 0.002, 0.002, 0.002, 0.002]
    assert cpu_measure.time_call(kernel(cold_then_warm), None, None, None, 0.0) == 0.001  # two calls
    assert len(cold_then_warm) == 4
    many = [0.001] * 6
    cpu_measure.time_call(kernel(many), None, None, None, 1.0)  # budget left: at most MAX_CALLS
    assert len(many) == 6 - cpu_measure.MAX_CALLS
    hopeless = [0.003, 0.002, 0.001]
    assert cpu_measure.time_call(kernel(hopeless), None, None, None, 1.0, give_up_s=0.001) == 0.002
    assert hopeless == [0.001]  # two calls only
    slow_once = [0.05, 0.001, 0.001, 0.001]  # a one-time cost on the first call (a new oneDNN primitive)
    assert cpu_measure.time_call(kernel(slow_once), None, None, None, 0.0, give_up_s=0.002) == pytest.approx(0.001)


def test_a_higher_priority_kernel_that_does_not_opt_in_keeps_winning(fake_timer):
    """Measuring replaces only the choice among measured kernels: a custom kernel of higher priority
    (e.g. benchmarks/bench_overhead.py's no-op kernel) still runs."""
    from hf_quant.runtime.kernels.base import register_kernel, unregister_kernel

    class Custom(kernels.Kernel):
        name, priority = "test_custom_cpu", 99

        def supports(self, layer, device, dtype):
            return device.type == "cpu"

    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    register_kernel(Custom())
    try:
        with kernels.cpu_dispatch("measure"):
            assert kernels.select_kernel(layer, torch.randn(2, 256)).name == "test_custom_cpu"
        assert fake_timer == []
    finally:
        unregister_kernel("test_custom_cpu")


def test_few_rows_on_big_weights_are_timed_cold(monkeypatch):
    """Up to COLD_MAX_ROWS rows, a layer whose weights take COLD_MIN_FRACTION of the last-level cache or more is
    timed with the caches flushed before every call (as a layer of a big model finds them); more rows, or a small
    weight, are timed warm."""
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False)
    weight = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.qzeros))
    monkeypatch.setattr(cpu_measure, "last_level_cache_bytes", lambda: int(weight / cpu_measure.COLD_MIN_FRACTION))
    flush = cpu_measure._cache_flusher(layer, cpu_measure.COLD_MAX_ROWS)
    assert flush is not None and cpu_measure._cache_flusher(layer, cpu_measure.COLD_MAX_ROWS + 1) is None
    monkeypatch.setattr(cpu_measure, "last_level_cache_bytes", lambda: int(weight / cpu_measure.COLD_MIN_FRACTION) + 64)
    assert cpu_measure._cache_flusher(layer, 1) is None  # small next to the cache: warm
    flushes = []
    kernel = KERNELS.get("reference")
    cpu_measure.time_call(kernel, layer, torch.randn(2, 256), None, 0.0, flush=lambda: flushes.append(1))
    assert len(flushes) == 2  # before each of the (at least) two calls
