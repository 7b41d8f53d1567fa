"""One GPU session in one call: versions and bandwidth, kernel correctness, the goal table, a dispatch
table tuned from it, the int8 (W8A8 / LLM.int8) kernel, OneBit / BitNet layers, end-to-end `generate`
speed, and GPTQ calibration speed.

    python benchmarks/gpu_session.py --out $OUT                 # one H200, one call of at most 8 minutes
    python benchmarks/gpu_session.py --dry-run --out /tmp/gs    # the same code on CPU, under 90 s on 2 cores
    python benchmarks/gpu_session.py --retune OLD/results.json --out DIR   # the dispatch table again from a saved goal table

Writes under --out: `results.json` (rewritten after every stage and every goal-table row group, so that a
timeout still leaves results), `log.txt` (every progress line, flushed as written) and
`dispatch_table.json` (the tuned table: load it with HF_QUANT_TRITON_TABLE=dispatch_table.json, or copy
it into hf_quant/runtime/kernels/triton/table.py), and the whole output of the stages that run a script
(`gptq_output.txt`, `host_int8_cpu.txt`, `host_cpu.txt`). Nothing else is written there.

Stages, in order (each has a soft cap, `--cap NAME=SECONDS`; a stage that finds less than its minimum of
the global `--budget-s` left is recorded as skipped, with the reason; an exception is recorded with its
traceback and the next stage runs; a watchdog ends the process at budget + `--grace-s` after saving):

1. `versions`: torch / triton / transformers / hf_quant versions, GPU name and SM count, the CPU's flags,
   and the copy bandwidth of a 1 GiB device-to-device copy (`triton.testing.do_bench`): bytes read +
   written per second, and the read bandwidth (bytes read per second, half of that) that the floor uses.
2. `correctness`: every Triton kernel against the reference kernel, bits {2,3,4,8} x {fp16, bf16} x
   (group 128, group 128 + act-order, per-channel), random shapes, M in {1,3,8,16,100,300} where the kernel
   takes M; twice each on CUDA (the split-K counters must be back at zero). Runs in worker processes (a
   kernel that crashes the CUDA context takes one worker down, not the session); every failure is recorded.
3. `goal_table`: K x N in {4096x4096, 4096x11008, 11008x4096, 8192x8192, 8192x28672}, M in {1,4,16,64,256,4096},
   bits {4,8,3,2} (group 128; 8 bits per-channel). For each (shape, M, bits): fp16 and bf16 `F.linear`,
   tinygemm (`_weight_int4pack_mm`, bf16, int4 g128), every hf_quant kernel that runs the layer at that M
   (forced with `use_kernel`) and the dispatcher's own choice ("auto"), each checked against the reference.
   Columns: ms (`do_bench` median), x fp16 / x bf16 / x tinygemm (their ms / this ms: > 1 is faster), % of
   the bandwidth floor (bytes read: packed weight at bits/8 bytes per weight, fp16 scales and zeros, x and y,
   over the measured read bandwidth). Order: M=1 4-bit on every shape first, then M 4..64 4-bit, then the
   other widths, then M 256 and 4096 (only auto + baselines there when time is short). While
   `correctness` runs, worker processes compile the goal table's Triton kernels into Triton's cache.
4. `tune`: per (row class, bits), the fastest of triton_gemv / triton_splitk / triton_dequant (median over
   the measured shapes and M of its time over the best time there); classes not measured get the choice of
   both neighbours where they agree. Written as `dispatch` in results.json and as dispatch_table.json.
5. `int8`: the `int8_token` scheme's CUDA kernel (`cuda_int8_token`) for plain W8A8 and LLM.int8
   (threshold 6, inputs with ~0.5% outlier columns) on the Llama-7B shapes, M in {1,16,64,256,4096}:
   relative error against the reference kernel, ms, and ratios to bf16 and fp16 `F.linear`; at M <= 16 also
   the ms with the fast Triton relaunch (`triton/launch.py`) and whether it gave the same output.
6. `lowbit`: OneBit (1-bit signs with both value vectors and the output LayerNorm, on the Triton block
   kernels) and BitNet b1.58 (ternary codes, int8 per-token activations on `cuda_int8_token`) layers on the
   int8 shapes, M in {1, 16, 256}: the dispatcher's choice, its error against the reference, x bf16 F.linear.
7. `overhead`: where an eager call's host cost goes (one 4-bit layer, M = 1): host microseconds per call and
   the timer's ms for F.linear, `layer(x)`, the kernel's `forward` without dispatch, and `launch_matmul` alone,
   the last two also with the fast Triton relaunch (`triton/launch.py`; whether it stayed on and gave the same
   output), and a cProfile of `layer(x)`.
8. `generate`: greedy `generate` tokens/s, bf16 against RTN w4 g128 (`quantize_model`), eager, eager with the
   fast Triton relaunch (`triton/launch.py`, opt-in: `eager_fast`), and with CUDA graphs (static cache + `torch.compile(mode="reduce-overhead")` through transformers' CompileConfig),
   on a 4096-hidden Llama (4 blocks) and a ref-llama-shaped one (hidden 512, 8 blocks, GQA 8/4).
9. `gptq`: `benchmarks/bench_gptq_gpu.py --layers 1 --samples 32 --stacks 8` in a subprocess, capped (a stack
   sample of every thread every 8 s shows where calibration spends its time); its output goes into results.json
   and, whole, into `gptq_output.txt`.
10. `host_cpu`: the GPU machine's host CPU rows of `bench_int8_cpu.py` and `bench_cpu.py --bits 4 8` (Llama-7B
   shapes 4096x4096 and 11008x4096, all threads), outputs in `host_int8_cpu.txt` / `host_cpu.txt`.

`--dry-run` (automatic without CUDA) runs the same stages on CPU: TRITON_INTERPRET=1 before Triton is
imported, one 256x384 shape, M in {1,4,16,20}, the Triton kernels called directly (prepare/forward: the
dispatcher only lets them run on CUDA), `time.perf_counter` timings (one call per interpreted kernel), no
tinygemm and no CUDA graphs (recorded as skipped, with the reason), and a tiny `bench_gptq_gpu.py --small
--device cpu`. Its timings mean nothing; it checks that every code path runs.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the budget counts from here, imports included

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(BENCH), str(ROOT)):  # hf_quant from this tree, `common` from benchmarks/
    if _p not in sys.path:
        sys.path.insert(0, _p)

GOAL_SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x8192", "8192x28672"]  # K x N = in x out
GOAL_MS = [1, 4, 16, 64, 256, 4096]
GOAL_BITS = [4, 8, 3, 2]
GROUP = 128  # 8 bits: per channel (-1)
DRY_SHAPES = ["128x256"]
DRY_MS = [1, 4, 16, 20]
TOL = 1e-2  # relative error against the reference kernel in the same activation dtype (as tests/test_triton.py)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
STAGES = ["versions", "correctness", "goal_table", "tune", "int8", "lowbit", "overhead", "generate", "gptq",
          "host_cpu"]
CAPS = {"versions": 20, "correctness": 60, "goal_table": 160, "tune": 5, "int8": 30, "lowbit": 20, "overhead": 15,
        "generate": 120, "gptq": 65, "host_cpu": 200}
DRY_CAPS = {"versions": 5, "correctness": 24, "goal_table": 16, "tune": 3, "int8": 6, "lowbit": 6, "overhead": 4,
            "generate": 8, "gptq": 30, "host_cpu": 30}
MIN_S = {"versions": 1, "correctness": 10, "goal_table": 10, "tune": 0.5, "int8": 8, "lowbit": 5, "overhead": 5,
         "generate": 20, "gptq": 30, "host_cpu": 60}
DRY_MIN_S = {"versions": 1, "correctness": 5, "goal_table": 5, "tune": 0.5, "int8": 2, "lowbit": 2, "overhead": 1,
             "generate": 4, "gptq": 18, "host_cpu": 5}
LOWBIT_MS = [1, 16, 256]
INT8_SHAPES = ["4096x4096", "4096x11008", "11008x4096"]
INT8_MS = [1, 16, 64, 256, 4096]
COLUMNS = ["shape", "K", "N", "M", "bits", "group", "dtype", "kernel", "auto_choice", "cuda_choice", "ms", "x_fp16", "x_bf16",
           "x_tinygemm", "pct_floor", "rel_err", "ok"]
BASELINES = ("F.linear fp16", "F.linear bf16", "tinygemm int4 g128")


def setup_env(dry: bool) -> None:
    """Before hf_quant (and so Triton) is imported: Triton's interpreter for CPU tensors in a dry run."""
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # e.g. inherited from a test session
    if "hf_quant" in sys.modules and dry != (os.environ.get("TRITON_INTERPRET") == "1"):
        print("warning: hf_quant was imported before setup_env; TRITON_INTERPRET may not apply", file=sys.stderr)


# --- helpers shared with bench_gpu.py -------------------------------------------------------------------


def parse_shape(shape: str) -> tuple[int, int]:
    K, N = map(int, shape.lower().split("x"))
    return K, N


def group_for(bits: int, group: int = GROUP) -> int:
    return -1 if bits == 8 else group


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quant_layer(W: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype = torch.float16, sym: bool = False,
                act_order: bool = False, bias: torch.Tensor | None = None, seed: int = 0):
    """A QuantLinear from the float weight W (out, in) on W's device: RTN, or act-order GPTQ with a random
    diagonal Hessian (so that g_idx really permutes the channels), as tests/test_kernels.py builds them."""
    from hf_quant.config import LayerSpec
    from hf_quant.methods import get_method
    from hf_quant.runtime import QuantLinear

    spec = LayerSpec(bits, group, sym, act_order)
    if act_order:
        g = torch.Generator().manual_seed(seed)
        H = torch.diag(torch.rand(W.shape[1], generator=g) + 0.5).to(W.device)
        qw = get_method("gptq").quantize(W.float(), spec, scale_dtype, H=H, desc_act=True)
    else:
        qw = get_method("rtn").quantize(W.float(), spec, scale_dtype)
    return QuantLinear.from_quantized(qw, spec, bias)


def kernel_names(layer, dtype: torch.dtype, M: int) -> list[str]:
    """hf_quant kernels that run `layer` on CUDA at M rows (asked with a CUDA device even on CPU: the
    checks read only the device type), by priority; never the reference."""
    from hf_quant import kernels

    cuda = torch.device("cuda")
    return [name for name in kernels.available_kernels()
            if name != "reference" and kernels.base.KERNELS.get(name).runs(layer, cuda, dtype, M)]


def cuda_choice(layer, dtype: torch.dtype, M: int) -> str:
    """What the dispatcher picks for `layer` at M rows of `dtype` on CUDA (asked without a GPU)."""
    from hf_quant.runtime.kernels import base

    return base.choose(layer, torch.device("cuda"), dtype, M).name


def triton_kernel_names() -> tuple[str, ...]:
    try:
        from hf_quant.runtime.kernels.triton import table
    except ImportError:  # pragma: no cover
        return ()
    return table.KERNELS


def run_kernel(layer, x: torch.Tensor, name: str) -> torch.Tensor:
    """`name`'s output ("auto": the dispatcher's choice). On CUDA, and for the reference, forced with
    `use_kernel`; on CPU the kernel is called directly with the layer's cached layout, since the
    dispatcher refuses the CUDA-only Triton kernels there (Triton's interpreter runs them)."""
    from hf_quant import kernels

    with torch.no_grad():
        if name == "auto":
            return layer(x)
        if x.is_cuda or name == "reference":
            with kernels.use_kernel(name):
                return layer(x)
        k = kernels.base.KERNELS.get(name)
        return k.forward(layer, x, layer.prepared(k, x.device, x.dtype))


class Timer:
    """Milliseconds of one call of fn: `triton.testing.do_bench` median on CUDA (L2 flushed between
    calls), else the median of `cpu_reps` perf_counter timings after one warm-up call."""

    graph = False  # --timer graph: replay one CUDA graph of fn (GPU time alone, no host launch cost)
    graph_fallbacks = 0  # calls that could not be captured (a host sync inside) and were timed eagerly

    def __init__(self, cuda: bool, warmup_ms: float = 10, rep_ms: float = 40, cpu_reps: int = 3):
        self.cuda, self.warmup_ms, self.rep_ms, self.cpu_reps = cuda, warmup_ms, rep_ms, cpu_reps

    def __call__(self, fn) -> float:
        if self.cuda:
            import triton.testing

            with torch.no_grad():
                if Timer.graph:
                    try:
                        return float(triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median"))
                    except Exception:  # a sync (nonzero, .item()) cannot be captured: time it eagerly
                        Timer.graph_fallbacks += 1
                        torch.cuda.synchronize()
                try:
                    return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
                except TypeError:  # an old do_bench without return_mode
                    return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5])[0])
        with torch.no_grad():
            fn()
            ts = []
            for _ in range(self.cpu_reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
        return 1e3 * statistics.median(ts)


def time_kernel(layer, x: torch.Tensor, name: str, timer: Timer) -> float:
    if x.is_cuda and name != "auto":
        from hf_quant import kernels

        with kernels.use_kernel(name):
            return timer(lambda: layer(x))
    return timer(lambda: run_kernel(layer, x, name))


def weight_bytes(N: int, K: int, bits: int, group: int) -> float:
    """The packed weight at bits/8 bytes per weight, plus an fp16 scale and an fp16 zero per group and row."""
    groups = 1 if group == -1 else -(-K // group)
    return N * K * bits / 8 + N * groups * 2 * 2


def copy_bandwidth(device: torch.device) -> dict:
    """A device-to-device copy of 1 GiB (64 MiB on CPU). A copy reads and writes every byte: read+write
    bytes per second is the usual figure; the floor uses the read bandwidth, bytes read per second."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        ms = float(triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median"))
    else:
        ms = Timer(False, cpu_reps=5)(lambda: dst.copy_(src))
    return {"copy_bytes": n, "copy_ms": ms, "copy_read_plus_write_GB_s": 2 * n / ms / 1e6,
            "read_GB_s": n / ms / 1e6, "read_bytes_per_ms": n / ms}


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    import triton.testing

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = float(triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median"))
    return 2 * n**3 / ms / 1e9


def tinygemm_fn(K: int, N: int, device: torch.device, group: int = 128, inner_k_tiles: int = 8):
    """torch's tinygemm int4 matmul (bf16 activations, group `group`) on random codes, scales and zeros.
    torch >= 2.5 packs uint8 (N, K / 2), two codes a byte, high nibble first; older releases took int32
    (N, K). Raises if this torch cannot run it (the caller records why)."""
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, device=device)
    convert = torch.ops.aten._convert_weight_to_int4pack
    try:
        packed = convert((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous(), inner_k_tiles)
    except RuntimeError as first:
        try:
            packed = convert(q.contiguous(), inner_k_tiles)
        except RuntimeError:
            raise first from None
    del q
    sz = (torch.rand(-(-K // group), N, 2, device=device) * 0.01).to(torch.bfloat16)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)

    y = fn(torch.randn(2, K, device=device, dtype=torch.bfloat16))
    if y.shape != (2, N):
        raise RuntimeError(f"tinygemm returned {tuple(y.shape)}, expected (2, {N})")
    return fn


def goal_plan(ms: list[int], bits: list[int]) -> list[tuple[str, list[int], list[int]]]:
    """Tiers of (M values, widths), most important first: M=1 4-bit, M<=64 4-bit, M<=64 other widths, M>64."""
    small, big = [m for m in ms if m <= 64], [m for m in ms if m > 64]
    first = 4 if 4 in bits else bits[0]
    other = [b for b in bits if b != first]
    tiers = []
    if 1 in small:
        tiers.append((f"M=1 {first}-bit", [1], [first]))
    if [m for m in small if m != 1]:
        tiers.append((f"M={','.join(map(str, [m for m in small if m != 1]))} {first}-bit",
                      [m for m in small if m != 1], [first]))
    if small and other:
        tiers.append((f"M<=64 {','.join(map(str, other))}-bit", small, other))
    if big:
        tiers.append((f"M={','.join(map(str, big))}", big, bits))
    return tiers


class GoalBench:
    """The goal table's measurements. Per shape: fp16/bf16 weights, tinygemm's packed weight, the
    quantized layers per width, the baselines per M (all cached until `free`)."""

    def __init__(self, device: torch.device, timer: Timer, read_bytes_per_ms: float | None, log=print,
                 tinygemm: bool = True, group: int = GROUP):
        self.device, self.timer, self.read_bw, self.log, self.group = device, timer, read_bytes_per_ms, log, group
        self.cuda = device.type == "cuda"
        self.tinygemm_on = tinygemm and self.cuda and hasattr(torch.ops.aten, "_weight_int4pack_mm")
        self.tinygemm_reason = None if self.tinygemm_on else (
            "CPU run: tinygemm's CUDA kernel is not timed" if not self.cuda else "torch has no _weight_int4pack_mm")
        self.weights: dict = {}
        self.layers: dict = {}
        self.tiny: dict = {}
        self.base: dict = {}

    def float_weights(self, shape: str):
        if shape not in self.weights:
            K, N = parse_shape(shape)
            g = torch.Generator(device=self.device).manual_seed(K * 7919 + N)
            W = torch.randn(N, K, generator=g, device=self.device) * 0.02
            self.weights[shape] = (W.half(), W.bfloat16())
            del W
        return self.weights[shape]

    def layer(self, shape: str, bits: int):
        key = (shape, bits)
        if key not in self.layers:
            W16, _ = self.float_weights(shape)
            self.layers[key] = quant_layer(W16, bits, group_for(bits, self.group))
        return self.layers[key]

    def tinygemm(self, shape: str):
        if not self.tinygemm_on:
            return None
        if shape not in self.tiny:
            K, N = parse_shape(shape)
            try:
                self.tiny[shape] = tinygemm_fn(K, N, self.device)
            except Exception as e:  # layouts and signatures move between torch releases
                self.tiny[shape] = None
                self.tinygemm_reason = f"{type(e).__name__}: {str(e)[:300]}"
                self.log(f"tinygemm unavailable on {shape}: {self.tinygemm_reason}")
        return self.tiny[shape]

    def free(self) -> None:
        self.weights.clear()
        self.layers.clear()
        self.tiny.clear()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _x(self, shape: str, M: int, dtype: torch.dtype) -> torch.Tensor:
        K, N = parse_shape(shape)
        g = torch.Generator(device=self.device).manual_seed(M * 131 + K)
        return torch.randn(M, K, generator=g, device=self.device).to(dtype)

    def _floor_pct(self, wbytes: float, shape: str, M: int, ms: float | None) -> float | None:
        if not ms or not self.read_bw:
            return None
        K, N = parse_shape(shape)
        return 100 * (wbytes + 2 * M * K + 2 * M * N) / self.read_bw / ms

    def _row(self, shape: str, M: int, bits: int, group: int | None, dtype: str, kernel: str, ms: float | None,
             wbytes: float, **kw) -> dict:
        K, N = parse_shape(shape)
        base = self.base.get((shape, M), {})

        def x(name: str) -> float | None:
            t = base.get(name)
            return t / ms if t and ms else None

        row = dict(shape=shape, K=K, N=N, M=M, bits=bits, group=group, dtype=dtype, kernel=kernel, auto_choice=None,
                   cuda_choice=None, ms=ms, x_fp16=x("F.linear fp16"), x_bf16=x("F.linear bf16"), x_tinygemm=x("tinygemm int4 g128"),
                   pct_floor=self._floor_pct(wbytes, shape, M, ms), rel_err=None, ok=ms is not None)
        row.update(kw)
        return row

    def baseline_rows(self, shape: str, M: int) -> list[dict]:
        """fp16 / bf16 F.linear and tinygemm at (shape, M), once (later calls return [])."""
        if (shape, M) in self.base:
            return []
        K, N = parse_shape(shape)
        W16, Wbf = self.float_weights(shape)
        x16 = self._x(shape, M, torch.float16)
        xbf = x16.bfloat16()
        base = self.base[(shape, M)] = {}
        meas = [("F.linear fp16", 16, lambda: torch.nn.functional.linear(x16, W16), N * K * 2, "fp16"),
                ("F.linear bf16", 16, lambda: torch.nn.functional.linear(xbf, Wbf), N * K * 2, "bf16")]
        tiny = self.tinygemm(shape)
        if tiny is not None:
            meas.append(("tinygemm int4 g128", 4, lambda: tiny(xbf), weight_bytes(N, K, 4, 128), "bf16"))
        out = []
        for name, bits, fn, wb, dt in meas:
            err = None
            try:
                ms = self.timer(fn)
            except Exception as e:
                ms, err = None, f"{type(e).__name__}: {str(e)[:300]}"
            base[name] = ms
            out.append((name, bits, wb, dt, ms, err))
        rows = []
        for name, bits, wb, dt, ms, err in out:
            row = self._row(shape, M, bits, None, dt, name, ms, wb)
            if err:
                row["error"] = err
            rows.append(row)
        if tiny is None and self.cuda:
            base["tinygemm int4 g128"] = None
        return rows

    def rows(self, shape: str, bits: int, M: int, dtype: torch.dtype, kernels: list[str] | None = None) -> list[dict]:
        """Baselines (first time at (shape, M)), then each hf_quant kernel that runs the layer at M (or
        only `kernels`), then "auto"; each checked against the reference kernel."""
        from hf_quant import kernels as hk

        rows = self.baseline_rows(shape, M)
        K, N = parse_shape(shape)
        group = group_for(bits, self.group)
        layer = self.layer(shape, bits)
        x = self._x(shape, M, dtype)
        dname = [k for k, v in DTYPES.items() if v == dtype][0]
        wb = weight_bytes(N, K, bits, group)
        ref = run_kernel(layer, x, "reference")
        names = kernel_names(layer, dtype, M) if kernels is None else [k for k in kernels if k != "auto"]
        for name in names + ["auto"]:
            extra = {}
            try:
                t = time.perf_counter()
                out = run_kernel(layer, x, name)
                t_once = 1e3 * (time.perf_counter() - t)
                err = rel_err(out, ref)
                ok = out.shape == ref.shape and out.dtype == dtype and err < TOL  # NaN fails
                del out
                if not self.cuda and name.startswith("triton_"):
                    ms = t_once  # the interpreter: one call is the timing
                else:
                    ms = time_kernel(layer, x, name, self.timer)
                if name == "auto":
                    extra["auto_choice"] = hk.select_kernel(layer, x).name
                    extra["cuda_choice"] = cuda_choice(layer, dtype, M)
            except Exception as e:
                ms, err, ok = None, None, False
                extra["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(self._row(shape, M, bits, group, dname, name, ms, wb, rel_err=err, ok=ok, **extra))
        del ref, x
        return rows


def summarize_goal(rows: list[dict]) -> list[str]:
    """Markdown lines: per (shape, M, bits), the auto choice and the fastest correct kernel."""
    lines = ["| K x N | M | bits | auto (kernel) ms | x fp16 | x bf16 | x tinygemm | % floor | fastest | its ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    groups: dict = {}
    for r in rows:
        if r["kernel"] not in BASELINES:
            groups.setdefault((r["shape"], r["M"], r["bits"], r["dtype"]), []).append(r)

    def f(v, fmt):
        return "" if v is None else fmt.format(v)

    for (shape, M, bits, _), rs in groups.items():
        auto = next((r for r in rs if r["kernel"] == "auto"), None)
        good = [r for r in rs if r["ok"] and r["ms"] and r["kernel"] != "auto"]
        best = min(good, key=lambda r: r["ms"]) if good else None
        a = auto or {}
        lines.append(f"| {shape} | {M} | {bits} | {f(a.get('ms'), '{:.4f}')} ({a.get('auto_choice') or '-'}) | "
                     f"{f(a.get('x_fp16'), '{:.2f}x')} | {f(a.get('x_bf16'), '{:.2f}x')} | "
                     f"{f(a.get('x_tinygemm'), '{:.2f}x')} | {f(a.get('pct_floor'), '{:.0f}%')} | "
                     f"{best['kernel'] if best else '-'} | {f(best['ms'] if best else None, '{:.4f}')} |")
    return lines


# --- tuning --------------------------------------------------------------------------------------------


def tune_dispatch(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """From goal-table rows: per (row class, bits) the Triton kernel with the lowest median of (its time /
    the fastest table kernel's time) over the measured (shape, M, dtype) points of the class. Only rows
    that matched the reference count; a kernel must be measured at half the points or more. Unmeasured
    classes take the choice of the nearest measured classes on both sides where those agree (and the
    kernel takes that many rows). Returns (dispatch in load_table's format, details)."""
    from hf_quant.runtime.kernels.triton import table

    points: dict = {}
    for r in rows:
        if r.get("kernel") in table.KERNELS and r.get("ok") and r.get("ms"):
            cls = table.row_class(r["M"])
            pts = points.setdefault((cls, r["bits"]), {})
            pts.setdefault((r["shape"], r["M"], r["dtype"]), {})[r["kernel"]] = r["ms"]
    order = list(table.ROW_CUTS) + [None]
    choices = []
    for (cls, bits), pts in points.items():
        ratios: dict = {}
        for times in pts.values():
            best = min(times.values())
            for k, t in times.items():
                ratios.setdefault(k, []).append(t / best)
        need = (len(pts) + 1) // 2
        score = {k: statistics.median(v) for k, v in ratios.items() if len(v) >= need}
        if not score:
            continue
        pick = min(score, key=score.get)
        current = table.DISPATCH.get((cls, bits)) or table.DISPATCH[(cls, None)]
        gain = [times[current] / times[pick] for times in pts.values() if current in times and pick in times]
        choices.append(dict(rows=table.rows_label(cls), bits=bits, kernel=pick, inferred=False, points=len(pts),
                            median_ratio_to_best={k: round(v, 4) for k, v in sorted(score.items())},
                            current=current, speedup_vs_current=statistics.median(gain) if gain else None,
                            _cls=cls))
    for bits in sorted({c["bits"] for c in choices}):
        measured = {c["_cls"]: c["kernel"] for c in choices if c["bits"] == bits}
        for i, cls in enumerate(order):
            if cls in measured:
                continue
            lo = next((measured[c] for c in reversed(order[:i]) if c in measured), None)
            hi = next((measured[c] for c in order[i + 1:] if c in measured), None)
            limit = table._LIMITS.get(lo) if lo else None
            if lo and lo == hi and (limit is None or (cls is not None and cls <= limit)):
                choices.append(dict(rows=table.rows_label(cls), bits=bits, kernel=lo, inferred=True, points=0,
                                    current=table.DISPATCH.get((cls, bits)) or table.DISPATCH[(cls, None)], _cls=cls))
    choices.sort(key=lambda c: (c["bits"], order.index(c["_cls"])))
    for c in choices:
        c.pop("_cls")
    dispatch = [{"rows": c["rows"], "bits": c["bits"], "kernel": c["kernel"]} for c in choices]
    return dispatch, choices


def check_dispatch(path: Path) -> None:
    """Load the table with table.load_table (raises on a bad entry), then put the built-in table back."""
    from hf_quant.runtime.kernels.triton import table

    saved = dict(table.DISPATCH)
    try:
        table.load_table(str(path))
    finally:
        table.DISPATCH.clear()
        table.DISPATCH.update(saved)
        table._changed()


# --- worker processes: correctness checks and Triton compiles ------------------------------------------


def correctness_units(dry: bool, seed: int = 0) -> list[dict]:
    """Random layers for the correctness stage, most important first. CUDA: 24 configurations (bits x
    dtype x {g128, g128 + act-order, per-channel}), each on a small shape at every M and a medium one at
    M 1, 16, 300. Dry run: 8 configurations, small shapes, two M each."""
    rng = random.Random(seed)
    if dry:
        cfgs = [(4, "fp16", 128, True), (4, "bf16", -1, False), (8, "bf16", 128, True), (8, "fp16", -1, False),
                (3, "fp16", 128, False), (3, "bf16", 128, True), (2, "bf16", 128, False), (2, "fp16", -1, False),
                (1, "bf16", 128, False)]
    else:
        cfgs = [(b, d, g, a) for b in (4, 8, 3, 2) for d in ("fp16", "bf16") for g, a in ((128, False), (128, True), (-1, False))]
        cfgs += [(1, d, g, False) for d in ("fp16", "bf16") for g in (128, -1)]  # 1-bit signs (OneBit, RTN 1-bit)
    ms_small = [1, 3, 8, 16, 100, 300]
    small, medium = [], []
    for i, (bits, dt, group, act) in enumerate(cfgs):
        base = dict(bits=bits, dtype=dt, group=group, act_order=act, sym=i % 2 == 1 or bits == 1)
        if group == -1:
            K = rng.choice([200, 328, 1000]) if not dry else rng.choice([136, 200])
        else:
            K = 128 * rng.randint(2 if act else 1, 2 if dry else 4)
        Ms = [[1, 3, 16, 100, 300, 8, 1, 20, 4][i]] if dry else ms_small
        small.append(dict(base, id=f"s{i}", K=K, N=rng.randint(1, 200 if dry else 300), bias=True, Ms=Ms, seed=i))
        if not dry:
            K = rng.randint(1000, 3000) if group == -1 else 128 * rng.randint(8, 24)
            medium.append(dict(base, id=f"m{i}", K=K, N=rng.randint(300, 1400), bias=False, Ms=[1, 16, 300], seed=100 + i))
    return small + medium


def correctness_unit(u: dict, device: torch.device):
    from hf_quant.runtime.kernels.base import KERNELS

    dtype = DTYPES[u["dtype"]]
    g = torch.Generator().manual_seed(u["seed"])
    W = (torch.randn(u["N"], u["K"], generator=g) * 0.05).to(device)
    b = torch.randn(u["N"], generator=g).to(device) if u["bias"] else None
    layer = quant_layer(W, u["bits"], u["group"], dtype, u["sym"], u["act_order"], b, u["seed"])
    cfg = {k: u[k] for k in ("bits", "dtype", "group", "act_order", "sym", "K", "N", "bias")}
    cuda = torch.device("cuda")
    for M in u["Ms"]:
        x = torch.randn(M, u["K"], generator=g).to(device, dtype)
        ref = run_kernel(layer, x, "reference")
        for name in triton_kernel_names():
            if not KERNELS.get(name).runs(layer, cuda, dtype, M):
                continue
            rec = dict(cfg, unit=u["id"], kernel=name, M=M)
            try:
                t = time.perf_counter()
                out = run_kernel(layer, x, name)
                errs = [rel_err(out, ref)]
                good = out.shape == ref.shape and out.dtype == dtype
                if device.type == "cuda":  # again: the split-K arrival counters must be back at zero
                    out2 = run_kernel(layer, x, name)
                    errs.append(rel_err(out2, ref))
                    torch.cuda.synchronize()
                rec.update(rel_err=errs[0], rel_err_2nd=errs[1] if len(errs) > 1 else None,
                           ok=bool(good and all(e < TOL for e in errs)), seconds=round(time.perf_counter() - t, 3))
                if not good:
                    rec["error"] = f"output {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}"
            except Exception as e:
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            yield rec


def goal_precompile_units(shapes: list[str], ms: list[int], bits: list[int], dtype: str) -> list[dict]:
    """The goal table's Triton launches, in the goal table's order (M > 64 compiles one dequantize kernel)."""
    units = []
    for _, tier_ms, tier_bits in goal_plan(ms, bits):
        tier_ms = [m for m in tier_ms if m <= 64] or [min(tier_ms)]
        for shape in shapes:
            for b in tier_bits:
                units.append(dict(id=f"{shape}/{b}/{tier_ms}", shape=shape, bits=b, Ms=tier_ms, dtype=dtype))
    return units


def precompile_unit(u: dict, device: torch.device):
    from hf_quant.runtime.kernels.base import KERNELS

    K, N = parse_shape(u["shape"])
    dtype = DTYPES[u["dtype"]]
    W = torch.randn(N, K, device=device, dtype=torch.float16) * 0.02
    layer = quant_layer(W, u["bits"], group_for(u["bits"]))
    del W
    for M in u["Ms"]:
        x = torch.randn(M, K, device=device, dtype=dtype)
        for name in triton_kernel_names():
            if KERNELS.get(name).runs(layer, torch.device("cuda"), dtype, M):
                t = time.perf_counter()
                run_kernel(layer, x, name)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                yield dict(unit=u["id"], kernel=name, M=M, seconds=round(time.perf_counter() - t, 3))


def worker_main(task_path: str) -> int:
    task = json.loads(Path(task_path).read_text())
    setup_env(task["dry"])
    torch.set_num_threads(1)
    device = torch.device("cpu" if task["dry"] else "cuda")
    fn = {"correctness": correctness_unit, "precompile": precompile_unit}[task["kind"]]
    with open(task["out"], "a") as out:
        def put(rec: dict) -> None:
            out.write(json.dumps(rec) + "\n")
            out.flush()

        for i, u in enumerate(task["units"]):
            if i and time.time() > task["deadline"]:  # the first always runs: a slow start still checks something
                put({"unit": u["id"], "status": "not_run", "reason": "deadline"})
                continue
            t = time.perf_counter()
            try:
                for rec in fn(u, device):
                    put({"type": "check", **rec})
                put({"unit": u["id"], "status": "done", "seconds": round(time.perf_counter() - t, 2)})
            except Exception as e:
                put({"unit": u["id"], "status": "error", "error": f"{type(e).__name__}: {str(e)[:400]}",
                     "traceback": traceback.format_exc()[-3000:]})
    return 0


def child_env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if dry:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # workers launch kernels or run the interpreter: one thread each
    return env


class Pool:
    """Worker processes (`gpu_session.py --worker TASK`), units dealt round robin so that every worker
    starts with the most important; each writes JSON lines, so a killed worker leaves what it did."""

    def __init__(self, sess: Session, kind: str, units: list[dict], n_workers: int, deadline_epoch: float):
        self.kind, self.units, self.deadline = kind, units, deadline_epoch
        self.dir = Path(tempfile.mkdtemp(prefix=f"gpu_session_{kind}_"))
        self.workers = []
        self.started = time.time()
        n = max(1, min(n_workers, len(units)))
        env = child_env(sess.dry)
        for i in range(n):
            task = dict(kind=kind, dry=sess.dry, units=units[i::n], out=str(self.dir / f"w{i}.jsonl"), deadline=deadline_epoch)
            tp = self.dir / f"w{i}.json"
            tp.write_text(json.dumps(task))
            log = open(self.dir / f"w{i}.log", "w")
            p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(tp)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
            log.close()
            sess.children.append(p)
            self.workers.append(dict(proc=p, out=self.dir / f"w{i}.jsonl", log=self.dir / f"w{i}.log", killed=False))

    def running(self) -> bool:
        return any(w["proc"].poll() is None for w in self.workers)

    def wait(self, until_epoch: float) -> None:
        """Until every worker ended, or until `until_epoch`; then kill those still running."""
        while self.running() and time.time() < until_epoch:
            time.sleep(0.2)
        for w in self.workers:
            if w["proc"].poll() is None:
                w["proc"].kill()
                w["proc"].wait()
                w["killed"] = True

    def collect(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(check records, unit records, per-worker info)."""
        checks, units, info = [], [], []
        for w in self.workers:
            try:
                lines = w["out"].read_text().splitlines()
            except FileNotFoundError:
                lines = []
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                (checks if rec.get("type") == "check" else units).append(rec)
            try:
                tail = w["log"].read_text()[-2000:]
            except FileNotFoundError:
                tail = ""
            info.append(dict(rc=w["proc"].returncode, killed=w["killed"], log_tail=tail))
        shutil.rmtree(self.dir, ignore_errors=True)
        return checks, units, info


# --- the session ---------------------------------------------------------------------------------------


class Stage:
    def __init__(self, sess: Session, name: str, rec: dict, deadline: float):
        self.sess, self.name, self.rec, self.deadline = sess, name, rec, deadline

    def left(self) -> float:
        return min(self.deadline, self.sess.end) - time.perf_counter()

    def log(self, msg: str) -> None:
        self.sess.log(msg)

    def save(self) -> None:
        self.sess.save()

    def skip(self, reason: str) -> None:
        self.rec.update(status="skipped", reason=reason)
        self.log(f"{self.name}: skipped: {reason}")

    def skip_part(self, what: str, reason: str) -> None:
        self.rec.setdefault("skipped_parts", []).append({"what": what, "reason": reason})
        self.log(f"{self.name}: skipped {what}: {reason}")

    def error(self, what: str, exc: BaseException) -> None:
        self.rec.setdefault("errors", []).append({"what": what, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                                                  "traceback": traceback.format_exc()[-4000:]})
        self.log(f"{self.name}: {what} failed: {type(exc).__name__}: {str(exc)[:300]}")


class Session:
    def __init__(self, args: argparse.Namespace, dry: bool):
        self.args, self.dry = args, dry
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.end = T_START + args.budget_s
        self.lock = threading.RLock()
        self.children: list[subprocess.Popen] = []
        self.current: str | None = None
        self.read_bw: float | None = None  # bytes read per ms
        self.precompile: Pool | None = None
        self.device = torch.device("cpu" if dry else "cuda")
        self.caps = dict(DRY_CAPS if dry else CAPS)
        for item in args.cap or []:
            name, _, s = item.partition("=")
            self.caps[name] = float(s)
        self.min_s = DRY_MIN_S if dry else MIN_S
        self._log = open(self.out / "log.txt", "w")
        self.results: dict = {
            "meta": {"argv": sys.argv[1:], "dry_run": dry, "budget_s": args.budget_s, "caps_s": self.caps,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "tolerance": TOL,
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"},
            "stages": {}, "dispatch": None,
        }

    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def left(self) -> float:
        return self.end - time.perf_counter()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        with self.lock:
            print(line, flush=True)
            self._log.write(line + "\n")
            self._log.flush()

    def save(self) -> None:
        with self.lock:
            self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
            text = None
            for _ in range(5):  # the main thread may be adding to the results while the watchdog saves
                try:
                    text = json.dumps(self.results, indent=1, default=str)
                    break
                except RuntimeError:
                    time.sleep(0.05)
            if text is None:
                return
            tmp = self.out / "results.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / "results.json")

    def kill_children(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()

    def stop(self, why: str, code: int) -> None:
        """Save and leave now (watchdog, SIGTERM): the stage running is marked, the rest skipped."""
        with self.lock:
            self.log(f"stopping: {why}")
            stages = self.results["stages"]
            if self.current and self.current in stages:
                stages[self.current].update(status="error", error=why)
            for name in STAGES:
                stages.setdefault(name, {"status": "skipped", "reason": why})
            self.results["meta"]["stopped"] = why
            self.kill_children()
            self.save()
        os._exit(code)

    def watchdog(self) -> None:
        limit = self.end + self.args.grace_s
        while time.perf_counter() < limit:
            time.sleep(0.5)
        self.stop(f"watchdog: still running {self.args.grace_s:.0f}s past the {self.args.budget_s:.0f}s budget "
                  f"(stage {self.current})", 3)

    def stage(self, name: str, fn) -> None:
        rec: dict = {"status": "running"}
        self.results["stages"][name] = rec
        selected = [s for s in (self.args.stages or STAGES) if s not in (self.args.skip or [])]
        if name not in selected:
            rec.update(status="skipped", reason="not selected (--stages / --skip)")
            self.save()
            return
        left = self.left()
        if left < self.min_s[name]:
            rec.update(status="skipped", reason=f"time budget: {left:.1f}s left of {self.args.budget_s:.0f}s, "
                                                f"the stage needs {self.min_s[name]}s")
            self.log(f"== {name}: skipped ({rec['reason']})")
            self.save()
            return
        cap = min(self.caps[name], left)
        rec["cap_s"] = round(cap, 1)
        self.log(f"== {name} (soft cap {cap:.0f}s, {left:.0f}s of the budget left)")
        self.current = name
        self.save()
        t = time.perf_counter()
        st = Stage(self, name, rec, t + cap)
        try:
            fn(st)
            if rec["status"] == "running":
                rec["status"] = "error" if rec.get("errors") else "ok"
        except Exception as e:
            rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}", traceback=traceback.format_exc())
            self.log(f"{name} failed:\n{traceback.format_exc()}")
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception:
                    pass
        rec["seconds"] = round(time.perf_counter() - t, 1)
        self.current = None
        self.log(f"== {name}: {rec['status']} in {rec['seconds']}s")
        self.save()

    def n_workers(self) -> int:
        if self.args.workers:
            return self.args.workers
        return 2 if self.dry else max(2, (os.cpu_count() or 4) - 2)


# --- stages --------------------------------------------------------------------------------------------


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:
        return f"unavailable ({type(e).__name__})"


def _cpu_info() -> dict:
    info = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and "cpu_model" not in info:
                info["cpu_model"] = val.strip()
            if key in ("flags", "Features") and "cpu_flags" not in info:
                info["cpu_flags"] = val.strip()
    except OSError:
        pass
    return info


def stage_versions(st: Stage) -> None:
    import hf_quant

    sess = st.sess
    r = st.rec["result"] = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "triton": _version("triton"), "transformers": _version("transformers"),
                            "hf_quant": hf_quant.__version__, "kernels": hf_quant.kernels.available_kernels()}
    try:
        r["git_head"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=5).stdout.strip() or None
    except Exception:
        r["git_head"] = None
    r.update(_cpu_info())
    if sess.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        r.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                 gpu_memory_GiB=round(p.total_memory / 2**30, 1), l2_MiB=getattr(p, "L2_cache_size", 0) / 2**20 or None)
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu"
            r["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                                             text=True, timeout=10).stdout.strip()
        except Exception as e:
            r["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    else:
        r["gpu"] = None
    bw = copy_bandwidth(sess.device)
    r.update(bw)
    sess.read_bw = bw["read_bytes_per_ms"]
    st.log(f"{r.get('gpu') or 'CPU'}; torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}; "
           f"copy {bw['copy_read_plus_write_GB_s']:.0f} GB/s read+write, read {bw['read_GB_s']:.0f} GB/s")
    if sess.device.type == "cuda":
        r["matmul_bf16_8192_TFLOPs"] = matmul_tflops(sess.device)
        st.log(f"SMs {r['sm_count']}, bf16 8192^3 matmul {r['matmul_bf16_8192_TFLOPs']:.0f} TFLOP/s")


def start_precompile(sess: Session) -> None:
    """Compile the goal table's Triton kernels into Triton's on-disk cache, in parallel worker
    processes, while the correctness stage runs (compiles would otherwise dominate the goal table's
    time). Started after `versions`, so that the bandwidth measurement has the GPU to itself."""
    a = sess.args
    selected = [s for s in (a.stages or STAGES) if s not in (a.skip or [])]
    if sess.dry or "goal_table" not in selected or a.no_precompile:
        return
    units = goal_precompile_units(a.shapes or GOAL_SHAPES, a.ms or GOAL_MS, a.bits or GOAL_BITS, a.dtype)
    n = sess.n_workers() // 2 if "correctness" in selected else sess.n_workers()
    deadline = time.time() + min(sess.left(), sess.args.precompile_s)
    sess.precompile = Pool(sess, "precompile", units, max(1, n), deadline)
    sess.log(f"precompile: {len(units)} units on {len(sess.precompile.workers)} workers (Triton cache)")


def stage_correctness(st: Stage) -> None:
    sess = st.sess
    units = correctness_units(sess.dry, sess.args.seed)
    n = sess.n_workers() - (len(sess.precompile.workers) if sess.precompile and sess.precompile.running() else 0)
    margin = 6.0 if sess.dry else 4.0  # workers start no layer after the deadline, and finish the one they are on
    deadline = time.time() + max(1.0, st.left() - margin)
    pool = Pool(sess, "correctness", units, max(1, n), deadline)
    st.log(f"correctness: {len(units)} layers on {len(pool.workers)} workers, starting layers until "
           f"{st.left() - margin:.0f}s from now")
    last, kill_at = 0.0, deadline + margin - 1

    def count(what: str) -> int:
        return sum(w["out"].read_text().count(what) for w in pool.workers if w["out"].exists())

    # past the cap, wait on only while no check has come back yet (slow worker start-up), within the budget
    while pool.running() and (time.time() < kill_at or (count('"type": "check"') == 0 and sess.left() > 5)):
        time.sleep(0.5)
        if time.time() - last > 10:
            last = time.time()
            done = count('"status": "done"')
            st.log(f"correctness: {done}/{len(units)} layers done")
    pool.wait(0)
    checks, unit_recs, info = pool.collect()
    failures = [c for c in checks if not c.get("ok")]
    failures += [dict(u, what="layer") for u in unit_recs if u.get("status") == "error"]
    crashed = [dict(i, what="worker crashed") for i in info if i["rc"] not in (0, None) and not i["killed"]]
    failures += crashed
    status = {u["unit"]: u["status"] for u in unit_recs}
    summary: dict = {}
    for c in checks:
        key = f"{c['kernel']} {c['dtype']} w{c['bits']}"
        s = summary.setdefault(key, {"checks": 0, "failures": 0, "max_rel_err": 0.0})
        s["checks"] += 1
        s["failures"] += 0 if c.get("ok") else 1
        errs = [e for e in (c.get("rel_err"), c.get("rel_err_2nd")) if e is not None]
        if errs:
            s["max_rel_err"] = max(s["max_rel_err"], max(errs)) if not any(math.isnan(e) for e in errs) else float("nan")
    st.rec["result"] = dict(
        n_checks=len(checks), n_failures=len(failures), failures=failures[:200], summary=summary,
        units_total=len(units), units_done=sum(1 for v in status.values() if v == "done"),
        units_not_run=sum(1 for v in status.values() if v == "not_run"),
        units_unfinished=sum(1 for u in units if u["id"] not in status),
        workers=[{k: v for k, v in i.items() if k != "log_tail" or i["rc"] not in (0, None)} for i in info],
        checks=checks)
    res = st.rec["result"]
    res["truncated"] = res["units_not_run"] + res["units_unfinished"] > 0
    for key, s in sorted(summary.items()):
        st.log(f"  {key}: {s['checks']} checks, {s['failures']} failures, max rel err {s['max_rel_err']:.2e}")
    for f in failures[:20]:
        st.log(f"  FAIL {json.dumps({k: v for k, v in f.items() if k not in ('traceback', 'log_tail')})[:400]}")
    for c in crashed:
        st.log(f"  worker crashed rc={c['rc']}: ...{c['log_tail'][-800:]}")
    st.log(f"correctness: {len(checks)} checks, {len(failures)} failures; layers {res['units_done']}/{len(units)} done, "
           f"{res['units_not_run']} not run (time), {res['units_unfinished']} unfinished")
    if failures:
        st.rec["status"] = "failed"
    if len(checks) == 0 and not failures:
        st.rec["status"] = "error"
        st.rec["error"] = "no check ran"


def stage_goal_table(st: Stage) -> None:
    sess, a = st.sess, st.sess.args
    shapes = a.shapes or (DRY_SHAPES if sess.dry else GOAL_SHAPES)
    ms = a.ms or (DRY_MS if sess.dry else GOAL_MS)
    bits = a.bits or GOAL_BITS
    dtype = DTYPES[a.dtype]
    res = st.rec["result"] = dict(columns=COLUMNS, dtype=a.dtype, shapes=shapes, ms=ms, bits=bits, group=GROUP,
                                  read_GB_s=sess.read_bw / 1e6 if sess.read_bw else None, rows=[], done=[],
                                  truncated=False, lite=[],
                                  timer="perf_counter, one call per interpreted kernel" if sess.dry else
                                  f"triton.testing.do_bench median, warmup {a.warmup_ms} ms, rep {a.rep_ms} ms")
    if sess.dry:
        st.skip_part("precompile", "Triton's interpreter compiles nothing")
    elif sess.precompile is not None:
        pool = sess.precompile
        until = min(pool.deadline, time.time() + max(0.0, st.left() - 0.6 * sess.caps["goal_table"]))
        st.log(f"goal_table: waiting up to {max(0.0, until - time.time()):.0f}s for the precompile workers")
        pool.wait(until)
        checks, units, info = pool.collect()
        res["precompile"] = dict(units=len(pool.units), done=sum(1 for u in units if u.get("status") == "done"),
                                 launches=len(checks), seconds=round(time.time() - pool.started, 1),
                                 compile_s_sum=round(sum(c.get("seconds", 0) for c in checks), 1),
                                 errors=[u for u in units if u.get("status") == "error"][:20],
                                 killed=sum(1 for i in info if i["killed"]))
        st.log(f"precompile: {res['precompile']['done']}/{len(pool.units)} units, {len(checks)} launches "
               f"({res['precompile']['compile_s_sum']:.0f}s of compile+run summed), "
               f"{res['precompile']['seconds']:.0f}s wall")
        sess.precompile = None
    if sess.read_bw is None:
        st.skip_part("pct_floor", "no bandwidth measured (versions stage)")
    timer = Timer(sess.device.type == "cuda", a.warmup_ms, a.rep_ms, cpu_reps=1 if sess.dry else 3)
    gb = GoalBench(sess.device, timer, sess.read_bw, log=st.log)
    lite_s = 2.0 if sess.dry else 25.0  # M > 64 with less than this left: only auto and the baselines

    def measure_all() -> None:
        for tier, tier_ms, tier_bits in goal_plan(ms, bits):
            for shape in shapes:
                n0 = len(res["rows"])
                for b in tier_bits:
                    for M in tier_ms:
                        if st.left() < 1.0:
                            res["truncated"] = True
                            st.skip_part(f"rows from {tier} {shape} w{b} M={M} on", "the stage's time cap")
                            return
                        lite = M > 64 and st.left() < lite_s
                        if lite:
                            res["lite"].append([shape, b, M])
                        res["rows"].extend(gb.rows(shape, b, M, dtype, kernels=["auto"] if lite else None))
                res["done"].append([tier, shape])
                new = res["rows"][n0:]
                bad = [r for r in new if not r["ok"]]
                st.log(f"goal {tier} {shape}: {len(new)} rows, {len(bad)} not ok")
                for line in summarize_goal(new)[2:]:
                    st.log("  " + line)
                for r in bad:
                    st.log(f"  NOT OK {r['kernel']} M={r['M']} w{r['bits']}: rel err {r['rel_err']} {r.get('error', '')}")
                st.save()

    try:
        measure_all()
    finally:
        res["tinygemm"] = "ok" if gb.tinygemm_reason is None else gb.tinygemm_reason
        if gb.tinygemm_reason:
            st.skip_part("tinygemm", gb.tinygemm_reason)
        gb.free()
        bad = [r for r in res["rows"] if not r["ok"] and r["kernel"] not in BASELINES]
        res["n_rows"], res["n_not_ok"] = len(res["rows"]), len(bad)
        for line in summarize_goal(res["rows"]):
            st.log(line)
    if bad:  # a quantized kernel disagreed with the reference, or raised
        st.rec["status"] = "failed"


def stage_tune(st: Stage) -> None:
    sess = st.sess
    rows = (sess.results["stages"].get("goal_table", {}).get("result") or {}).get("rows") or []
    if not rows:
        st.skip("no goal-table rows to tune from")
        sess.results["dispatch"] = []
        return
    dispatch, choices = tune_dispatch(rows)
    path = sess.out / "dispatch_table.json"
    path.write_text(json.dumps(dispatch, indent=1) + "\n")
    check_dispatch(path)
    sess.results["dispatch"] = dispatch
    st.rec["result"] = dict(dispatch=dispatch, choices=choices, path=path.name, validated_with="table.load_table",
                            note="interpreter timings in a dry run: the format is checked, not the choice" if sess.dry else
                            "HF_QUANT_TRITON_TABLE=dispatch_table.json, or copy into table.DISPATCH")
    for c in choices:
        gain = c.get("speedup_vs_current")
        now = "same as the table now" if c["current"] == c["kernel"] else \
            f"table now: {c['current']}" + (f", {gain:.2f}x faster than it" if gain else "")
        st.log(f"  rows {c['rows']:>6} w{c['bits']}: {c['kernel']}{' (inferred)' if c['inferred'] else ''} ({now})")


def stage_int8(st: Stage) -> None:
    """The int8_token scheme's CUDA kernel (`cuda_int8_token`: Triton per-token quantization,
    `torch._int_mm`, Triton epilogue) for plain W8A8 (threshold 0) and LLM.int8 (threshold 6, inputs
    with ~0.5% outlier columns x20), against the reference kernel and bf16 / fp16 `F.linear`."""
    import torch.nn.functional as F

    from hf_quant import kernels
    from hf_quant.config import LayerSpec
    from hf_quant.methods.llm_int8 import int8_rowwise
    from hf_quant.runtime import ActivationSpec, QuantLinear
    from hf_quant.runtime.kernels.triton import int8 as T
    from hf_quant.runtime.kernels.triton import launch

    sess, a, dev = st.sess, st.sess.args, st.sess.device
    shapes = DRY_SHAPES[:1] if sess.dry else INT8_SHAPES
    ms = [1, 20] if sess.dry else INT8_MS
    timer = Timer(dev.type == "cuda", a.warmup_ms, a.rep_ms, cpu_reps=1)
    res = st.rec["result"] = dict(rows=[], shapes=shapes, ms=ms, dtype="bf16",
                                  timer="perf_counter, one call (interpreter)" if sess.dry else "triton.testing.do_bench median")
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        K, N = parse_shape(shape)
        W = torch.randn(N, K, generator=g) * 0.02
        layers = {t: QuantLinear.from_quantized(int8_rowwise(W), LayerSpec(8, -1, True, False), None,
                                                activation=ActivationSpec("int8_token", (("threshold", t),))).to(dev)
                  for t in (0.0, 6.0)}
        w16 = {d: layers[0.0].dequantize().to(dev, d) for d in (torch.bfloat16, torch.float16)}
        prepared = {t: T.CUDA_INT8.prepare(layer, dev, torch.bfloat16) for t, layer in layers.items()}
        for M in ms:
            if st.left() < (1 if sess.dry else 4):
                st.skip_part(f"{shape} M={M} on", f"time: {st.left():.0f}s left in the stage")
                break
            x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16)
            xo = x.clone()
            xo[:, torch.randperm(K, generator=g)[:max(1, K // 200)].to(dev)] *= 20
            base = {d: timer(lambda d=d: F.linear(x.to(d), w16[d])) for d in w16}
            for t, inp in ((0.0, x), (6.0, xo)):
                layer = layers[t]
                try:
                    out = T.CUDA_INT8.forward(layer, inp, prepared[t])
                    with kernels.use_kernel("reference"):
                        ref = layer(inp)
                    err = rel_err(out, ref)
                    t_ms = timer(lambda layer=layer, inp=inp, t=t: T.CUDA_INT8.forward(layer, inp, prepared[t]))
                    row = dict(shape=shape, M=M, threshold=t, ms=t_ms, rel_err=err, ok=err < 2e-2,
                               x_bf16=base[torch.bfloat16] / t_ms, x_fp16=base[torch.float16] / t_ms)
                    if M <= 16:  # launch-bound rows: the same with the fast Triton relaunch (triton/launch.py)
                        launch.set_enabled(True)
                        try:
                            fast_out = T.CUDA_INT8.forward(layer, inp, prepared[t])
                            row.update(ms_fast_relaunch=timer(lambda layer=layer, inp=inp, t=t: T.CUDA_INT8.forward(
                                layer, inp, prepared[t])), fast_path_on=launch.enabled(),
                                same_output=bool(torch.equal(fast_out, out)))
                        finally:
                            launch.set_enabled(False)
                    st.log(f"int8 {shape} M={M} threshold={t:g}: {t_ms:.3f} ms, x bf16 {row['x_bf16']:.2f}, "
                           f"x fp16 {row['x_fp16']:.2f}, rel err {err:.1e}"
                           + (f"; fast relaunch {row['ms_fast_relaunch']:.3f} ms (on: {row['fast_path_on']}, same: "
                              f"{row['same_output']})" if "ms_fast_relaunch" in row else ""))
                except Exception as e:
                    st.error(f"int8 {shape} M={M} threshold={t:g}", e)
                    row = dict(shape=shape, M=M, threshold=t, error=f"{type(e).__name__}: {str(e)[:300]}")
                res["rows"].append(row)
            st.save()
    res["n_failures"] = sum(1 for r in res["rows"] if not r.get("ok"))


def stage_lowbit(st: Stage) -> None:
    """OneBit (1-bit signs, per-row h, per-channel g, output LayerNorm: the Triton block kernels at 1 bit) and
    BitNet b1.58 (ternary codes on the int8_token kernel) layers on the Llama-7B shapes: the whole layer as the
    dispatcher runs it ("auto"), its error against the reference kernel, and ratios to bf16 `F.linear`."""
    import torch.nn.functional as F

    from hf_quant import kernels
    from hf_quant.config import LayerSpec
    from hf_quant.methods.bitnet import BITNET_SPEC, int8_activation, quantize_bitnet
    from hf_quant.methods.onebit import quantize_onebit
    from hf_quant.runtime import ActivationSpec, QuantLinear

    sess, a, dev = st.sess, st.sess.args, st.sess.device
    shapes = DRY_SHAPES[:1] if sess.dry else INT8_SHAPES
    ms = [1, 20] if sess.dry else LOWBIT_MS
    timer = Timer(dev.type == "cuda", a.warmup_ms, a.rep_ms, cpu_reps=1)
    res = st.rec["result"] = dict(rows=[], shapes=shapes, ms=ms, dtype="bf16")
    g = torch.Generator().manual_seed(0)
    onebit_spec, bitnet_spec = LayerSpec(1, -1, True, in_scale=True), LayerSpec(**BITNET_SPEC)
    for shape in shapes:
        K, N = parse_shape(shape)
        W = torch.randn(N, K, generator=g) * 0.02
        layers = {"onebit": QuantLinear.from_quantized(quantize_onebit(W, onebit_spec, torch.bfloat16), onebit_spec,
                                                       None, output_norm=True).to(dev),
                  "bitnet": QuantLinear.from_quantized(quantize_bitnet(W, bitnet_spec, torch.bfloat16), bitnet_spec,
                                                       None, activation=ActivationSpec.of(int8_activation())).to(dev)}
        w16 = W.to(dev, torch.bfloat16)
        for M in ms:
            if st.left() < (1 if sess.dry else 3):
                st.skip_part(f"{shape} M={M} on", f"time: {st.left():.0f}s left in the stage")
                break
            x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16)
            base = timer(lambda: F.linear(x, w16))
            for name, layer in layers.items():
                try:
                    with torch.no_grad():
                        out = layer(x)
                        with kernels.use_kernel("reference"):
                            ref = layer(x)
                    err = rel_err(out, ref)
                    t_ms = timer(lambda layer=layer: layer(x))
                    row = dict(shape=shape, M=M, layer=name, ms=t_ms, rel_err=err, ok=err < TOL, x_bf16=base / t_ms)
                    st.log(f"lowbit {name} {shape} M={M}: {t_ms:.3f} ms, x bf16 {row['x_bf16']:.2f}, rel err {err:.1e}")
                except Exception as e:
                    st.error(f"lowbit {name} {shape} M={M}", e)
                    row = dict(shape=shape, M=M, layer=name, error=f"{type(e).__name__}: {str(e)[:300]}")
                res["rows"].append(row)
            st.save()
    res["n_failures"] = sum(1 for r in res["rows"] if not r.get("ok"))


def stage_overhead(st: Stage) -> None:
    """Where an eager call's host cost goes (the first H200 run: >= ~0.04 ms per quantized call against a GPU time
    of 0.007-0.07 ms at M = 1). One 4-bit g128 layer, M = 1, fp16: host microseconds per call (perf_counter over
    back-to-back calls, no sync inside: the GPU is faster than the host here, so this is the launch path) and the
    timer's ms, for F.linear, the whole layer (`layer(x)`: dispatch + kernel forward), the kernel's `forward`
    with the prepared layout (no dispatch), and `launch_matmul` with a precomputed launch (Triton's launcher and
    the output / workspace allocations alone)."""
    import torch.nn.functional as F

    from hf_quant.runtime.kernels.triton import launch, qgemm, table

    sess, a, dev = st.sess, st.sess.args, st.sess.device
    shape = DRY_SHAPES[0] if sess.dry else "4096x4096"
    K, N = parse_shape(shape)
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(N, K, generator=g) * 0.02).to(dev)
    layer = quant_layer(W, 4, 128 if K % 128 == 0 else -1)
    x = torch.randn(1, K, generator=g).to(dev, torch.float16)
    w16 = W.to(torch.float16)
    kernel = qgemm.GEMV
    blocks = layer.prepared(kernel, dev, x.dtype)
    x2 = qgemm._rows(blocks, x)
    cfg = kernel.launch(1, blocks.geo, table.sm_count(dev) if dev.type == "cuda" else 132)
    calls = {"F.linear fp16": lambda: F.linear(x, w16),
             "layer(x) (auto)": lambda: run_kernel(layer, x, "auto"),
             "kernel.forward (no dispatch)": lambda: kernel.forward(layer, x, blocks),
             "launch_matmul (precomputed launch)": lambda: qgemm.launch_matmul("gemv", blocks, x2, None, cfg)}
    calls["layer(x) (auto, fast relaunch)"] = calls["layer(x) (auto)"]  # triton/launch.py, opt-in
    calls["launch_matmul (fast relaunch)"] = calls["launch_matmul (precomputed launch)"]
    timer = Timer(dev.type == "cuda", a.warmup_ms, a.rep_ms, cpu_reps=1)
    reps = 3 if sess.dry else 300
    res = st.rec["result"] = dict(shape=shape, M=1, bits=4, rows=[])
    ref_out = calls["launch_matmul (precomputed launch)"]()
    for name, fn in calls.items():
        launch.set_enabled("fast relaunch" in name)
        try:
            with torch.no_grad():
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
                host_us = 1e6 * (time.perf_counter() - t) / reps
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            row = dict(call=name, host_us=round(host_us, 2), timer_ms=timer(fn))
            if "fast relaunch" in name:
                row.update(fast_path_on=launch.enabled(), off_reason=launch.off_reason(),
                           same_output=bool(torch.equal(calls["launch_matmul (fast relaunch)"](), ref_out)))
            st.log(f"overhead {shape} M=1: {name}: host {host_us:.1f} us/call, timer {row['timer_ms']:.4f} ms"
                   + (f" (fast path on: {row['fast_path_on']}, same output: {row['same_output']}"
                      f"{', off: ' + str(row['off_reason']) if row['off_reason'] else ''})" if "fast_path_on" in row else ""))
        except Exception as e:
            st.error(f"overhead {name}", e)
            row = dict(call=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            launch.set_enabled(False)
        res["rows"].append(row)
        st.save()
    # a Python-level profile of the whole layer call: which functions the host time goes to
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(reps):
            run_kernel(layer, x, "auto")
        prof.disable()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    res["profile_layer_call"] = f"{reps} calls of layer(x)\n" + buf.getvalue()[-9000:]
    st.log("overhead: cProfile of layer(x), by own time:\n" + "\n".join(buf.getvalue().splitlines()[-40:]))
    st.save()


def stage_generate(st: Stage) -> None:
    import hf_quant
    from common import random_llama, tokens_per_s
    from hf_quant.calibration import quantize_model
    from hf_quant.runtime.convert import find_targets
    from hf_quant.runtime.kernels.triton import launch

    sess, dev = st.sess, st.sess.device
    if sess.dry:
        models = [("tiny-llama", dict(hidden=256, intermediate=512, layers=2, vocab=1024), 8)]
        modes = ["eager", "eager_fast"]
        st.skip_part("cuda_graphs", "no CUDA: graphs and reduce-overhead need a GPU")
    else:
        models = [("llama-4096x11008 (4 blocks)", dict(hidden=4096, intermediate=11008, layers=4, vocab=32000), 128),
                  ("ref-llama shape (512x1536, 8 blocks, GQA 8/4)",
                   dict(hidden=512, intermediate=1536, layers=8, vocab=8192, heads=8, kv_heads=4), 128)]
        modes = ["eager", "eager_fast", "cuda_graphs"]  # eager_fast: triton/launch.py's relaunch (opt-in)
    res = st.rec["result"] = {"rows": [], "quant": "RTN w4 g128, lm_head kept in bf16", "prompt_tokens": 16}
    rows = res["rows"]
    qcfg = hf_quant.QuantConfig(method="rtn", bits=4, group_size=128)
    for mname, spec, new_tokens in models:
        if st.left() < (3 if sess.dry else 15):
            st.skip_part(mname, f"time: {st.left():.0f}s left in the stage")
            continue
        model = qmodel = None
        eager_bf16: float | None = None  # this model's eager bf16 tokens/s: eager_fast reuses it
        try:
            kw = dict(spec)
            vocab = kw.pop("vocab")
            model = random_llama(kw.pop("hidden"), kw.pop("intermediate"), kw.pop("layers"), str(dev), vocab, **kw)
            qmodel = copy.deepcopy(model)
            quantize_model(qmodel, qcfg, find_targets(qmodel, qcfg, ["lm_head"]))
            ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
            layer = qmodel.model.layers[0].mlp.down_proj
            decode_kernel = hf_quant.kernels.select_kernel(layer, torch.zeros(1, layer.in_features, device=dev,
                                                                              dtype=torch.bfloat16)).name
            for mode in modes:
                graphs = mode == "cuda_graphs"
                need = 60 if graphs else 5
                if not sess.dry and st.left() < need:
                    st.skip_part(f"{mname} {mode}", f"time: {st.left():.0f}s left in the stage, {need}s needed")
                    continue
                out = {}
                fast = mode == "eager_fast"
                pairs = (("bf16", model), ("w4g128", qmodel))
                if fast and eager_bf16 is not None:  # bf16 does not launch hf_quant kernels: eager's figure stands
                    out["bf16"], pairs = eager_bf16, pairs[1:]
                for which, m in pairs:
                    launch.set_enabled(fast)
                    try:
                        r = tokens_per_s(m, ids, new_tokens, cuda_graphs=graphs)
                        out[which] = r["tokens_per_s"]
                        rows.append(dict(model=mname, mode=mode, weights=which, new_tokens=new_tokens,
                                         decode_kernel=decode_kernel if which != "bf16" else "F.linear", **r))
                        st.log(f"generate {mname} {mode} {which}: {r['tokens_per_s']:.1f} tokens/s (runs {r['seconds']} s)")
                        if fast:
                            rows[-1].update(fast_path_on=launch.enabled(), off_reason=launch.off_reason())
                    except Exception as e:
                        st.error(f"{mname} {mode} {which}", e)
                        rows.append(dict(model=mname, mode=mode, weights=which, error=f"{type(e).__name__}: {str(e)[:300]}"))
                    finally:
                        launch.set_enabled(False)
                    st.save()
                if mode == "eager":
                    eager_bf16 = out.get("bf16")
                if "bf16" in out and "w4g128" in out:
                    ratio = out["w4g128"] / out["bf16"]
                    rows.append(dict(model=mname, mode=mode, weights="ratio w4g128 / bf16", ratio=ratio))
                    st.log(f"generate {mname} {mode}: quantized / bf16 = {ratio:.2f}x")
                if graphs:
                    torch._dynamo.reset()
        except Exception as e:
            st.error(mname, e)
        finally:
            del model, qmodel
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    lines = ["| model | mode | weights | tokens/s | ratio |", "|---|---|---|---:|---:|"]
    for r in rows:
        if "ratio" in r:
            lines.append(f"| {r['model']} | {r['mode']} | quantized / bf16 | | {r['ratio']:.2f}x |")
        elif "tokens_per_s" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['weights']} | {r['tokens_per_s']:.1f} | |")
    for line in lines:
        st.log(line)


def run_child(st: Stage, cmd: list, timeout: float, save_as: str) -> tuple[dict, str]:
    """Run a benchmark script as a subprocess (all threads: OMP_NUM_THREADS unset) for at most `timeout`
    seconds; its whole output goes to --out/`save_as`. Returns (record, the output's lines joined)."""
    sess = st.sess
    st.log(f"{st.name}: {' '.join(str(c) for c in cmd[1:])} (timeout {timeout:.0f}s)")
    env = child_env(sess.dry)
    env.pop("OMP_NUM_THREADS", None)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))
    sess.children.append(p)
    t = time.perf_counter()
    try:
        out, _ = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        timed_out = True
    (sess.out / save_as).write_text(out or "")
    lines = [line.split("\r")[-1] for line in (out or "").splitlines()]
    text = "\n".join(line for line in lines if line.strip())
    rec = dict(cmd=[str(c) for c in cmd[1:]], rc=p.returncode, timed_out=timed_out,
               seconds=round(time.perf_counter() - t, 1), output=save_as, output_tail=text[-6000:])
    return rec, text


def _child_failed(st: Stage, rec: dict, text: str, script: str, timeout: float) -> bool:
    if rec["timed_out"]:
        st.skip(f"{script} ran past the stage's {timeout:.0f}s cap (partial output kept)")
    elif rec["rc"] != 0:
        st.rec.update(status="error", error=f"{script} exited {rec['rc']}")
        st.log(text[-3000:])
    return rec["timed_out"] or rec["rc"] != 0


def stage_gptq(st: Stage) -> None:
    sess = st.sess
    if sess.dry:
        extra = ["--small", "--device", "cpu", "--layers", "1", "--samples", "4", "--variants", "gptq"]
    else:
        # one block, 32 x 2048 tokens, with a stack sample every 8 s: where the time goes (the 128-window
        # run of 2026-12-04 had not finished its first block in 80 s)
        extra = ["--layers", "1", "--samples", "32", "--variants", "gptq", "--stacks", "8"]
    timeout = max(1.0, st.left() - 1)
    rec, text = run_child(st, [sys.executable, str(BENCH / "bench_gptq_gpu.py")] + extra, timeout, "gptq_output.txt")
    lines = text.splitlines()
    rec.update(table=[line for line in lines if line.startswith("|")],
               per_block=[line for line in lines if "blocks [" in line])
    st.rec["result"] = rec
    for line in rec["per_block"] + rec["table"]:
        st.log("  " + line)
    _child_failed(st, rec, text, "bench_gptq_gpu.py", timeout)


def stage_host_cpu(st: Stage) -> None:
    """The host CPU's rows of the CPU benchmarks (issue 16 asks for the table of every CPU we get to run
    on; a GPU machine's host may have AMX): `bench_int8_cpu.py` (int8_token kernels vs the best float
    F.linear) and `bench_cpu.py --bits 4 8` (weight-only kernels and the measured dispatch), Llama-7B
    shapes, all threads, each output saved whole (host_int8_cpu.txt, host_cpu.txt)."""
    sess = st.sess
    # two of the three Llama-7B shapes (on a 16-core host the full tables took over 5 minutes; the cold-cache
    # flushes of a large L3 are most of it)
    shapes = ["4096x4096", "11008x4096"]
    runs = [("bench_int8_cpu.py", ["--shapes", *shapes], "host_int8_cpu.txt", 0.45),
            ("bench_cpu.py", ["--shapes", *shapes, "--m", "1", "8", "64", "--bits", "4", "8", "--reps", "3",
                              "--block-ms", "20"], "host_cpu.txt", 1.0)]
    if sess.dry:  # the code path only: one tiny shape
        runs = [("bench_cpu.py", ["--shapes", "128x256", "--m", "1", "--bits", "4", "--reps", "1",
                                  "--block-ms", "1", "--retries", "0"], "host_cpu.txt", 1.0)]
    st.rec["result"] = res = {}
    for script, extra, save_as, share in runs:
        timeout = max(1.0, st.left() * share - 1)
        rec, text = run_child(st, [sys.executable, str(BENCH / script)] + extra, timeout, save_as)
        res[script] = rec
        for line in text.splitlines():
            if line.startswith(("CPU", "|")) or "x" in line[:12] and "|" in line:
                st.log("  " + line)
        st.save()
        if _child_failed(st, rec, text, script, timeout) and not rec["timed_out"]:
            return  # a script that ran out of time printed its rows so far: the next one still runs


def retune(args: argparse.Namespace) -> int:
    data = json.loads(Path(args.retune).read_text())
    rows = (data["stages"]["goal_table"].get("result") or {}).get("rows") or []
    dispatch, choices = tune_dispatch(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dispatch_table.json"
    path.write_text(json.dumps(dispatch, indent=1) + "\n")
    check_dispatch(path)
    for c in choices:
        print(json.dumps(c))
    print(f"wrote {path} ({len(dispatch)} entries)")
    return 0


def final_summary(sess: Session) -> int:
    st = sess.results["stages"]
    sess.log("== summary")
    bad = 0
    for name in STAGES:
        rec = st.get(name, {})
        s = rec.get("status", "missing")
        bad += s not in ("ok", "skipped")
        why = rec.get("reason") or rec.get("error") or ""
        secs = f"{rec['seconds']}s" if "seconds" in rec else "-"
        sess.log(f"  {name:12s} {s:8s} {secs:>7s} {why[:200]}")
    if Timer.graph:
        sess.log(f"  timer: CUDA graph replay (GPU time); {Timer.graph_fallbacks} calls not capturable, timed eagerly")
    c = (st.get("correctness", {}).get("result") or {})
    if c:
        sess.log(f"  correctness: {c.get('n_checks')} checks, {c.get('n_failures')} failures")
    g = st.get("goal_table", {}).get("result") or {}
    if g.get("rows"):
        lines = summarize_goal([r for r in g["rows"] if r["bits"] == 4 or r["M"] == 1])
        for line in lines:
            sess.log(line)
    if sess.results.get("dispatch"):
        sess.log(f"  dispatch: {json.dumps(sess.results['dispatch'])}")
    for r in (st.get("generate", {}).get("result") or {}).get("rows", []):
        if "ratio" in r:
            sess.log(f"  generate {r['model']} {r['mode']}: quantized / bf16 = {r['ratio']:.2f}x")
    sess.log(f"  total {sess.elapsed():.0f}s of a {sess.args.budget_s:.0f}s budget; results in {sess.out}/results.json")
    sess.save()
    return 1 if bad else 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_session_out")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes (automatic without CUDA)")
    ap.add_argument("--budget-s", type=float, default=None, help="global time budget (default 450; dry run 75)")
    ap.add_argument("--grace-s", type=float, default=None, help="the watchdog stops the process this long past the budget")
    ap.add_argument("--cap", action="append", help="a stage's soft cap, NAME=SECONDS (repeatable)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages (the others are recorded as skipped)")
    ap.add_argument("--skip", nargs="+", choices=STAGES)
    ap.add_argument("--shapes", nargs="+", help="goal-table shapes KxN")
    ap.add_argument("--ms", nargs="+", type=int)
    ap.add_argument("--bits", nargs="+", type=int)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="activation dtype of the goal table's quantized rows")
    ap.add_argument("--timer", choices=["events", "graph"], default="events",
                    help="events: do_bench (host launch cost included, as a model runs eagerly); graph: "
                         "do_bench_cudagraph (GPU time alone, as under CUDA graphs)")
    ap.add_argument("--warmup-ms", type=float, default=10)
    ap.add_argument("--rep-ms", type=float, default=40)
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs - 2; dry run 2)")
    ap.add_argument("--precompile-s", type=float, default=110, help="how long the precompile workers may run")
    ap.add_argument("--no-precompile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retune", metavar="RESULTS_JSON", help="only rebuild dispatch_table.json from a saved goal table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    dry = args.dry_run or args.retune is not None or not torch.cuda.is_available()
    setup_env(dry)
    if args.retune:
        return retune(args)
    if args.budget_s is None:
        args.budget_s = 75.0 if dry else 450.0
    if args.grace_s is None:
        args.grace_s = 30.0 if dry else 20.0
    if dry:  # one thread: tiny ops on a shared 2-core machine otherwise stall on the busy core
        torch.set_num_threads(1)
    Timer.graph = args.timer == "graph" and not dry
    sess = Session(args, dry)
    sess.log(f"gpu_session: {'DRY RUN on CPU (Triton interpreter)' if dry else 'CUDA'}; budget {args.budget_s:.0f}s, "
             f"out {sess.out}")
    threading.Thread(target=sess.watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sess.stop("SIGTERM", 143))
    sess.save()
    sess.stage("versions", stage_versions)
    try:
        start_precompile(sess)
    except Exception as e:
        sess.log(f"precompile could not start: {type(e).__name__}: {e}")
    sess.stage("correctness", stage_correctness)
    sess.stage("goal_table", stage_goal_table)
    if sess.precompile is not None:  # the goal table did not run: stop the compiles
        sess.precompile.wait(0)
        sess.precompile.collect()
        sess.precompile = None
    sess.stage("tune", stage_tune)
    sess.stage("int8", stage_int8)
    sess.stage("lowbit", stage_lowbit)
    sess.stage("overhead", stage_overhead)
    sess.stage("generate", stage_generate)
    sess.stage("gptq", stage_gptq)
    sess.stage("host_cpu", stage_host_cpu)
    sess.kill_children()
    return final_summary(sess)


if __name__ == "__main__":
    sys.exit(main())
