"""CPU timings of `hf_quant.QuantLinear`'s candidate kernels and of the measured dispatch's choice,
against float `F.linear` measured in the same run.

For every weight shape (in_features x out_features) and every number of activation rows M, it times:

* the baselines: `F.linear` with a random fp32 weight on fp32 activations, and with the same weight
  in bf16 on bf16 activations. `best float` is the faster of the two: every ratio is against it;
* `QuantLinear` made by round-to-nearest from that weight (bf16 scales, as in a bf16 checkpoint):
  4 bits with groups of 128 (asymmetric) and 8 bits per output channel (asymmetric); and the low-bit
  methods' layers, `QuantConfig(method="onebit")` (1-bit signs, SVID value vectors: in_scales and the
  output LayerNorm, which `layer(x)` includes) and `QuantConfig(method="bitnet")` (ternary 2-bit codes,
  int8 per-token activations on the int8 kernels), from their own random weights of the same shape, at
  `--lowbit-m` rows (default 1 and 64). Each on bf16 and on fp32 activations:
  - every candidate of the measured CPU dispatch (`hf_quant/runtime/kernels/cpu_measure.py`), its
    `forward` called directly (on x times the layer's in_scales, as `QuantLinear` calls it). A candidate that the dispatch's own measurement dropped (a probe on
    fewer rows was already slower than the best) is shown as `dropped`, not timed;
  - the layer itself (`layer(x)`, dispatch included) in mode "measure" and, for fp32 activations,
    in mode "measure_bf16" (fp32 layers may run in bf16). The `choice` columns name the kernel.

Before a kernel is timed, its output is compared with the reference kernel (dequantize + `F.linear`,
after the layer's activation quantization) on the same input; the relative Frobenius error must stay below 1e-3 for fp32 kernels and 2e-2 for
bf16 ones, or the script stops with exit status 1.

Each time is the median over `--reps` timed blocks of `torch.utils.benchmark.Timer` (at most 3 for
calls slower than 0.5 s), each block repeating the call for at least `--block-ms` milliseconds,
under `torch.inference_mode()`. Weights are cold, as a layer of a model finds them: each timed
function cycles through copies of its weights (distinct random weights, the same input) that
together exceed twice the last-level cache (`common.cold_copies`; the low-bit layers, whose weights are
small, get as many copies as that takes, up to LOWBIT_MOST_COPIES), so every call reads its weight
from memory while the activations stay in cache. `--warm` times one weight back to back instead (a
weight that fits stays in the cache: that flatters the smaller formats).
Ratios are `best float ms / ms` (> 1: the quantized layer is faster). The layer's own timings (the `choice`
columns, which the goals read) are paired: timed in the same rounds as the best float path (one block of each per
round, interleaved), the ratio the median of the rounds' ratios, with the float path's median time of those rounds
in parentheses. The machine's speed drifts during a run (on a cloud VM the two vCPUs may share one host core for a
while: `common.core_sharing`, printed at the start and the end), and a compute-bound quantized kernel and the
memory-bound float GEMV drift differently: a ratio of two times taken minutes apart measured the drift (the same
kernel read 2.36x as the choice and 3.15x as a candidate in one run on the Zen 1). The candidates are timed one
after the other, against the float times of the row's start (`--paired-candidates`: each paired as the choices are,
`ms (ratio (float ms of its rounds))`).

On a shared machine, other processes wreck CPU timings (with all cores in use, threads wait whole
scheduler ticks). On Linux the script measures the CPU other processes used during each
measurement, retries a disturbed one after a pause (`--retries`), and marks with `*` a time that
stayed disturbed, and the ratios computed from it.

Run (rows are printed as they are measured; the CPU flags first, the goals last):

    python benchmarks/bench_cpu.py            # Llama-7B shapes, M in {1, 8, 64, 512}
    python benchmarks/bench_cpu.py --small    # 1024-wide shapes, M in {1, 8, 64}, 2 blocks
    python benchmarks/bench_cpu.py --shapes 4096x4096 --m 1 16 --threads 4 --reps 9
    python benchmarks/bench_cpu.py --bits 1 2  # only the OneBit (1) and BitNet (2) rows, M in {1, 64}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from common import Rotation, cold_copies, core_sharing, cpu_summary

from hf_quant.calibration import quantize_layer
from hf_quant.config import LayerSpec, QuantConfig
from hf_quant.runtime.kernels import cpu_dispatch, select_kernel, use_kernel
from hf_quant.runtime.kernels.base import KERNELS
from hf_quant.runtime.kernels.cpu_measure import candidates, measurement_for
from hf_quant.runtime import QuantLinear

DEFAULT_SHAPES = ["4096x4096", "4096x11008", "11008x4096"]  # Llama-7B attention, MLP up, MLP down
SMALL_SHAPES = ["1024x1024", "1024x2816", "2816x1024"]
DEFAULT_M = [1, 8, 64, 512]
SMALL_M = [1, 8, 64]
QUANT_SPECS = [
    LayerSpec(bits=4, group_size=128, sym=False),  # cpu_int4
    LayerSpec(bits=8, group_size=-1, sym=False),  # cpu_int8
]
# The low-bit methods' layers (each from its own random weights), by their specs' bits: OneBit's 1-bit signs (the
# native_sign kernels) and BitNet's ternary 2-bit codes with int8 activations (the int8_token kernels)
LOWBIT = {1: "onebit", 2: "bitnet"}
LOWBIT_M = [1, 64]
LOWBIT_MOST_COPIES = 48
LABEL = {1: "1 (OneBit)", 2: "1.58 (BitNet)"}
MAX_REL_ERR = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}
SEED = 0
NOISE_CORES = 0.1  # cores kept busy by other processes above which a measurement is disturbed
SLOW_CALL_S, SLOW_REPS = 0.5, 3  # calls slower than this are timed in at most SLOW_REPS blocks


def parse_shape(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not IN_FEATURESxOUT_FEATURES, e.g. 4096x11008")
    return k, n


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help=f"use the quick shapes {' '.join(SMALL_SHAPES)}")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="KxN",
                   help=f"weight shapes in_features x out_features (default: {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--m", nargs="+", type=int, help="rows of activations (default: 1 8 64 512; --small: 1 8 64)")
    p.add_argument("--bits", nargs="+", type=int, choices=sorted({s.bits for s in QUANT_SPECS} | set(LOWBIT)),
                   help="only the quantized layers of these bits, 1: OneBit, 2: BitNet (default: all)")
    p.add_argument("--lowbit-m", nargs="+", type=int, default=LOWBIT_M,
                   help=f"rows of activations for the OneBit and BitNet layers (default: {' '.join(map(str, LOWBIT_M))})")
    p.add_argument("--paired-candidates", action="store_true",
                   help="time every candidate in the same rounds as the best float path too (its paired ratio; the "
                        "run takes about twice as long): candidates timed one after the other meet the machine's "
                        "drift, and only paired ratios compare them across a row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed blocks per measurement; the median is reported (default 5; --small: 2)")
    p.add_argument("--block-ms", type=float, default=None,
                   help="minimum duration of one timed block (ms; default 40, --small: 20)")
    p.add_argument("--retries", type=int, default=None,
                   help="re-measurements of a time disturbed by other processes (default 2; --small: 0)")
    p.add_argument("--warm", action="store_true",
                   help="one weight per shape, timed back to back (weights that fit stay in the cache), "
                        "instead of copies in rotation")
    args = p.parse_args()
    if args.shapes is None:
        args.shapes = [parse_shape(s) for s in (SMALL_SHAPES if args.small else DEFAULT_SHAPES)]
    args.m = args.m or (SMALL_M if args.small else DEFAULT_M)
    args.reps = args.reps or (2 if args.small else 5)
    args.block_ms = args.block_ms or (20.0 if args.small else 40.0)
    args.retries = (0 if args.small else 2) if args.retries is None else args.retries
    return args


class Timing(NamedTuple):
    ms: float
    disturbed: bool  # other processes used the CPU while it was measured

    def __str__(self) -> str:
        return f"{self.ms:.3f}" + ("*" if self.disturbed else "")


def speedup(baseline: Timing, t: Timing) -> str:
    return f"{baseline.ms / t.ms:.2f}x" + ("*" if baseline.disturbed or t.disturbed else "")


def paired(p: "Paired") -> str:
    """A paired ratio, with the float path's median time of those rounds: `2.41x (5.120)`."""
    return f"{p.ratio:.2f}x" + ("*" if p.t.disturbed else "") + f" ({p.base.ms:.3f})"


def _machine_busy_s() -> float | None:
    """CPU seconds used by the whole machine since boot (Linux /proc/stat); None where unknown."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _others_during(measure: Callable[[], Any]) -> tuple[Any, float]:
    """(what `measure()` returns, the cores other processes used meanwhile)."""
    busy0, own0, wall0 = _machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
    result = measure()
    busy1, own1, wall1 = _machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
    if busy0 is None or busy1 is None:
        return result, 0.0
    return result, max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)


def _quietest(measure: Callable[[], Any], args: argparse.Namespace) -> tuple[Any, bool]:
    """`measure()`, retried after a pause (up to `args.retries` times) while other processes disturbed it: (the
    least disturbed result, whether it stayed disturbed)."""
    result, others = _others_during(measure)
    for _ in range(args.retries):
        if others <= NOISE_CORES:
            break
        time.sleep(2.0)
        result, others = min((result, others), _others_during(measure), key=lambda r: r[1])
    return result, others > NOISE_CORES


def _timer(fn: Callable, x: torch.Tensor, args: argparse.Namespace) -> tuple[Timer, int, float]:
    """`fn(x)`'s Timer (every copy of a `Rotation` called once first: its layouts are built before any timing),
    the calls per timed block, and one call's time (the estimate, also a warm-up call)."""
    for _ in range(len(getattr(fn, "fns", ()))):
        fn(x)
    timer = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    estimate = timer.timeit(1).mean
    return timer, max(1, round(args.block_ms / 1e3 / estimate)), estimate


def _reps(estimate: float, args: argparse.Namespace) -> int:
    return min(args.reps, SLOW_REPS) if estimate > SLOW_CALL_S else args.reps


def time_fn(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, args: argparse.Namespace) -> Timing:
    """Median time of `fn(x)` (a `Rotation` over weight copies: cold weights); a measurement disturbed
    by other processes is retried, the quietest kept."""
    timer, number, estimate = _timer(fn, x, args)
    reps = _reps(estimate, args)
    median, disturbed = _quietest(lambda: statistics.median(timer.timeit(number).mean for _ in range(reps)), args)
    return Timing(median * 1e3, disturbed)


class Paired(NamedTuple):
    """A quantized call timed in the same rounds as the best float call: medians, and the median of the rounds'
    ratios (the ratio each round saw: the machine's speed drifts between rounds, and a compute-bound quantized
    kernel and a memory-bound float one drift differently)."""
    t: Timing
    base: Timing
    ratio: float


def time_paired(fn: Callable, x: torch.Tensor, base_fn: Callable, x_base: torch.Tensor,
                args: argparse.Namespace) -> Paired:
    """`fn(x)` and `base_fn(x_base)` (both `Rotation`s over cold copies) timed in interleaved rounds (at least 3),
    one block of each per round (which comes first alternates); a measurement disturbed by other processes is
    retried as `time_fn` does."""
    timers = [_timer(fn, x, args), _timer(base_fn, x_base, args)]
    rounds = max(3, _reps(max(estimate for _, _, estimate in timers), args))

    def measure() -> tuple[list[float], list[float]]:
        times: tuple[list[float], list[float]] = ([], [])
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                timer, number, _ = timers[i]
                times[i].append(timer.timeit(number).mean)
        return times

    (ts, bs), disturbed = _quietest(measure, args)
    return Paired(Timing(statistics.median(ts) * 1e3, disturbed), Timing(statistics.median(bs) * 1e3, disturbed),
                  statistics.median(b / t for t, b in zip(ts, bs)))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return ((y - ref).norm() / ref.norm()).item()


class Table:
    """Markdown table printed row by row, so a long or aborted run still shows what it measured."""

    COLUMNS = ["shape (KxN)", "M", "bits", "act", "best float ms", "choice (measure)", "ms", "x float (paired)",
               "choice (measure_bf16)", "ms", "x float (paired)", "candidates: ms (x float)"]

    def __init__(self) -> None:
        print("| " + " | ".join(self.COLUMNS) + " |")
        right = ("ms", "x float (paired)", "best float ms")
        print("|" + "|".join("---:" if c in right else "---" for c in self.COLUMNS) + "|", flush=True)

    def row(self, *cells: object) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def make_layers(k: int, n: int, w16: torch.Tensor, bits: list[int] | None = None) -> dict[LayerSpec, QuantLinear]:
    """One QuantLinear per spec, quantized (RTN) from a bf16 nn.Linear holding `w16`.

    Made outside inference_mode, as the layers of a loaded model are; only the forwards run under it.
    """
    layers = {}
    for spec in QUANT_SPECS:
        if bits and spec.bits not in bits:
            continue
        layers[spec] = quantize_layer(f"{k}x{n}", bf16_linear(k, n, w16), spec, method="rtn")
    return layers


def bf16_linear(k: int, n: int, w16: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    linear.weight.data.copy_(w16)
    return linear


def lowbit_spec(method: str) -> LayerSpec:
    return QuantConfig(method=method).layer_spec("model.layers.0.mlp.up_proj")


def runtime_bytes(method: str, k: int, n: int) -> int:
    """Bytes of weight a call reads: OneBit's packed bits; BitNet's codes as the int8 kernels hold them."""
    return n * k // 8 if method == "onebit" else n * k


def make_lowbit_copies(k: int, n: int, method: str, warm: bool) -> list[QuantLinear]:
    """Copies of a `QuantConfig(method=...)` layer, each from its own random bf16 weight: as many as make them
    cold together (`cold_copies` of the bytes a call reads, at most LOWBIT_MOST_COPIES), or one with `warm`."""
    count = 1 if warm else cold_copies(runtime_bytes(method, k, n), most=LOWBIT_MOST_COPIES)
    return [quantize_layer(f"{k}x{n}", bf16_linear(k, n, (torch.randn(n, k) / k**0.5).to(torch.bfloat16)),
                           lowbit_spec(method), method=method) for _ in range(count)]


def label(spec: LayerSpec) -> str:
    return LABEL.get(spec.bits, str(spec.bits))


def checked(name: str, y: torch.Tensor, ref: torch.Tensor, bf16: bool, where: str) -> None:
    err, limit = rel_err(y, ref), MAX_REL_ERR[torch.bfloat16 if bf16 else torch.float32]
    if not err < limit:
        sys.exit(f"\nFAILED: {where}: kernel {name!r} differs from the reference by {err:.2e} (limit {limit:.0e})")


def time_choice(copies: list[QuantLinear], x: torch.Tensor, mode: str, ref: torch.Tensor, base: tuple,
                args: argparse.Namespace, where: str) -> tuple[str, Paired]:
    """The layer itself (its copies in rotation) in `mode`, in the same rounds as the best float path `base`
    (its Rotation, its input): (the kernel it chose, the paired timing)."""
    layer = copies[0]
    with cpu_dispatch(mode):
        name = select_kernel(layer, x).name  # measures, if this class is new (the copies share it)
        checked(name, layer(x), ref, x.dtype == torch.bfloat16 or name.endswith("_bf16"), where)
        return name, time_paired(Rotation(copies), x, base[0], base[1], args)


@torch.inference_mode()
def bench_m(w32s: list[torch.Tensor], quantized: dict[LayerSpec, list[QuantLinear]], m: int,
            args: argparse.Namespace, table: Table, results: list) -> None:
    """The two baselines, then every quantized layer's candidates and choices on bf16 and fp32
    activations; every timed function cycles through the weight copies."""
    n, k = w32s[0].shape
    w16s = [w.to(torch.bfloat16) for w in w32s]
    x32 = torch.randn(m, k)
    x16 = x32.to(torch.bfloat16)
    float32 = Rotation([lambda x, w=w: F.linear(x, w) for w in w32s])
    float16 = Rotation([lambda x, w=w: F.linear(x, w) for w in w16s])
    base32, base16 = time_fn(float32, x32, args), time_fn(float16, x16, args)
    best = min(base32, base16, key=lambda t: t.ms)
    best_name = "fp32" if best is base32 else "bf16"
    best_call = (float32, x32) if best is base32 else (float16, x16)  # the choices are timed in its rounds
    for spec, layers in quantized.items():
        if m not in (args.lowbit_m if spec.bits in LOWBIT else args.m):
            continue
        layer = layers[0]
        for x in (x16, x32):
            act, fp32 = DTYPE_NAME[x.dtype], x.dtype == torch.float32
            where = f"{k}x{n} M={m} {act} {spec}"
            with use_kernel("reference"):
                ref = layer(x)
            choice, p_choice = time_choice(layers, x, "measure", ref, best_call, args, where)
            choice16, p_choice16 = (time_choice(layers, x, "measure_bf16", ref, best_call, args, where) if fp32
                                    else ("-", None))
            entry = measurement_for(layer, x.device, x.dtype, m, allow_bf16=fp32)  # the widest one
            # a kernel's input and product: x times the in_scales (OneBit), without the output norm
            xk = x if layer.in_scales is None else x * layer.in_scales.to(x.dtype)
            ref_k = KERNELS.get("reference").forward(layer, xk, None)
            cells = []
            for kernel in candidates(layer, x.device, x.dtype, allow_bf16=True):
                if entry is not None and entry.seconds.get(kernel.name, 0.0) is None:
                    cells.append(f"{kernel.name} dropped")
                    continue
                checked(kernel.name, kernel.forward(layer, xk, layer.prepared(kernel, x.device, x.dtype)), ref_k,
                        not fp32 or kernel.name.endswith("_bf16"), where)
                calls = [lambda x, kernel=kernel, c=c, p=c.prepared(kernel, x.device, x.dtype): kernel.forward(c, x, p)
                         for c in layers]
                if args.paired_candidates:
                    p = time_paired(Rotation(calls), xk, best_call[0], best_call[1], args)
                    cells.append(f"{kernel.name} {p.t} ({paired(p)})")
                else:
                    t = time_fn(Rotation(calls), xk, args)
                    cells.append(f"{kernel.name} {t} ({speedup(best, t)})")
            for c in layers:
                c.invalidate_kernels()  # drop the candidates' layouts
            results.append((label(spec), m, act, "measure", p_choice.ratio))
            if fp32:
                results.append((label(spec), m, act, "measure_bf16", p_choice16.ratio))
            table.row(f"{k}x{n}", m, label(spec), act, f"{best} ({best_name})", choice, p_choice.t,
                      paired(p_choice), choice16, p_choice16.t if fp32 else "-", paired(p_choice16) if fp32 else "-",
                      "; ".join(cells))


GOALS = [(1, 2.5), (8, 1.2), (64, 0.8)]  # (smallest M, the least ratio to the best float path)


def goal_for(m: int) -> float | None:
    return next((g for lo, g in reversed(GOALS) if m >= lo), None)


def report_goals(results: list) -> None:
    """Per bits, M, activation dtype and mode: the worst ratio over shapes against the goal."""
    print("\nGoals (measured choice vs the faster of fp32 and bf16 F.linear; worst shape):")
    print("| bits | M | act | mode | worst x float | goal | met |")
    print("|---|---|---|---|---:|---:|---|")
    groups: dict[tuple, list[float]] = {}
    for bits, m, act, mode, ratio in results:  # bits: the table's label
        groups.setdefault((bits, m, act, mode), []).append(ratio)
    for (bits, m, act, mode), ratios in groups.items():
        goal = goal_for(m)
        if goal is None:
            continue
        worst = min(ratios)
        print(f"| {bits} | {m} | {act} | {mode} | {worst:.2f}x | {goal:g}x | {'yes' if worst >= goal else 'no'} |")


@torch.inference_mode()
def warm_up(seconds: float = 1.0) -> None:
    """Run both float baselines for a while first: thread pools, oneDNN primitives, CPU clocks."""
    w, x = torch.randn(1024, 1024), torch.randn(64, 1024)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        F.linear(x, w), F.linear(x.bfloat16(), w.bfloat16()), F.linear(x[:1], w)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    print(f"CPU: {cpu_summary()}")
    print(f"At the start, {core_sharing()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), "
          f"median of {args.reps} blocks >= {args.block_ms:g} ms; "
          + ("warm: one weight, calls back to back" if args.warm else
             "cold weights: copies called in rotation, together more than twice the last-level cache"))
    print("QuantLinear: RTN from the bf16 weight, bf16 scales; 4 bits: group 128, asym; 8 bits: per-channel, asym; "
          f"OneBit and BitNet (QuantConfig(method=...), own random weights) at M in {args.lowbit_m}.")
    print("x float = best float ms / ms (> 1: QuantLinear faster). "
          f"*: other processes used > {NOISE_CORES:g} core while it was timed.\n")
    warm_up()
    table = Table()
    results: list = []
    rtn = [spec for spec in QUANT_SPECS if not args.bits or spec.bits in args.bits]
    lowbit = [bits for bits in LOWBIT if not args.bits or bits in args.bits]
    ms = sorted({*(args.m if rtn else ()), *(args.lowbit_m if lowbit else ())})
    for k, n in args.shapes:
        smallest = min(spec.bits for spec in rtn) * n * k // 8 if rtn else 2 * n * k  # else: the bf16 baseline's
        n_copies = 1 if args.warm else cold_copies(smallest)
        w32s, quantized = [], {}
        for _ in range(n_copies):
            w32 = torch.randn(n, k) / k**0.5
            w32s.append(w32)
            for spec, layer in make_layers(k, n, w32.to(torch.bfloat16), args.bits).items():
                quantized.setdefault(spec, []).append(layer)
        for bits in lowbit:
            layers = make_lowbit_copies(k, n, LOWBIT[bits], args.warm)
            quantized[layers[0].spec] = layers
        print(f"<!-- {k}x{n}: {n_copies} weight copies in rotation"
              + "".join(f"; {LOWBIT[b]}: {len(quantized[lowbit_spec(LOWBIT[b])])}" for b in lowbit) + " -->", flush=True)
        for m in ms:
            bench_m(w32s, quantized, m, args, table, results)
    report_goals(results)
    print(f"\nAt the end, {core_sharing()}")


if __name__ == "__main__":
    main()
