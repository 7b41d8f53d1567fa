"""CPU timings of `hf_quant.QuantLinear` against float `F.linear`, measured in the same run.

For every weight shape (in_features x out_features) and every number of activation rows M, it times:

* the baselines: `F.linear` with a random fp32 weight on fp32 activations, and with the same
  weight in bf16 on bf16 activations;
* `QuantLinear` made by round-to-nearest from that weight (bf16 scales, as in a bf16 checkpoint):
  4 bits with groups of 128 (asymmetric) and 8 bits per output channel (asymmetric, the int8 fast
  path), each on bf16 and on fp32 activations. The `kernel` column names the kernel that ran.

Before a quantized config is timed, its output is compared with the reference kernel
(dequantize + `F.linear`, forced with `hf_quant.kernels.use_kernel("reference")`) on the same input;
the relative Frobenius error (printed as `rel err`) must stay below 1e-3 for fp32 activations and
2e-2 for bf16, or the script stops with exit status 1. That first call also builds the kernel's
cached weight layout, so it doubles as the warm-up.

Each time is the median over `--reps` timed blocks of `torch.utils.benchmark.Timer` (at most 3 for
calls slower than 0.5 s), each block repeating the call for at least `--block-ms` milliseconds,
under `torch.inference_mode()`.
Speedup `vs X` = X ms / QuantLinear ms (> 1: the quantized layer is faster). Every row is compared
with bf16 `F.linear`; rows with fp32 activations also with fp32 `F.linear`.

On a shared machine, other processes wreck CPU timings (with all cores in use, threads wait whole
scheduler ticks). On Linux the script measures the CPU other processes used during each
measurement, retries a disturbed one after a pause (`--retries`), and marks with `*` a time that
stayed disturbed, and the speedups computed from it.

Run (rows are printed as they are measured):

    python benchmarks/bench_cpu.py            # Llama-7B shapes, M in {1, 8, 64, 512}; ~6 minutes on 2 cores
    python benchmarks/bench_cpu.py --small    # 1024-wide shapes, about a minute
    python benchmarks/bench_cpu.py --shapes 4096x4096 --m 1 16 --threads 4 --reps 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from hf_quant.calibration import quantize_layer
from hf_quant.config import LayerSpec
from hf_quant.runtime.kernels import select_kernel, use_kernel
from hf_quant.runtime import QuantLinear

DEFAULT_SHAPES = ["4096x4096", "4096x11008", "11008x4096"]  # Llama-7B attention, MLP up, MLP down
SMALL_SHAPES = ["1024x1024", "1024x2816", "2816x1024"]
DEFAULT_M = [1, 8, 64, 512]
QUANT_SPECS = [
    LayerSpec(bits=4, group_size=128, sym=False),  # cpu_int4
    LayerSpec(bits=8, group_size=-1, sym=False),  # cpu_int8
]
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
    p.add_argument("--m", nargs="+", type=int, default=DEFAULT_M, help="rows of activations (default: 1 8 64 512)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--reps", type=int, default=5, help="timed blocks per measurement; the median is reported")
    p.add_argument("--block-ms", type=float, default=40.0, help="minimum duration of one timed block (ms)")
    p.add_argument("--retries", type=int, default=2, help="re-measurements of a time disturbed by other processes")
    args = p.parse_args()
    if args.shapes is None:
        args.shapes = [parse_shape(s) for s in (SMALL_SHAPES if args.small else DEFAULT_SHAPES)]
    return args


class Timing(NamedTuple):
    ms: float
    disturbed: bool  # other processes used the CPU while it was measured

    def __str__(self) -> str:
        return f"{self.ms:.3f}" + ("*" if self.disturbed else "")


def speedup(baseline: Timing, t: Timing) -> str:
    return f"{baseline.ms / t.ms:.2f}x" + ("*" if baseline.disturbed or t.disturbed else "")


def _machine_busy_s() -> float | None:
    """CPU seconds used by the whole machine since boot (Linux /proc/stat); None where unknown."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _measure(timer: Timer, number: int, reps: int) -> tuple[float, float]:
    """(median seconds per call over `reps` blocks of `number` calls, cores used by other processes)."""
    busy0, own0, wall0 = _machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
    median = statistics.median(timer.timeit(number).mean for _ in range(reps))
    busy1, own1, wall1 = _machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
    if busy0 is None or busy1 is None:
        return median, 0.0
    return median, max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)


def time_fn(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, args: argparse.Namespace) -> Timing:
    """Median time of `fn(x)`; a measurement disturbed by other processes is retried, the quietest kept."""
    timer = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    estimate = timer.timeit(1).mean  # also a warm-up call
    number = max(1, round(args.block_ms / 1e3 / estimate))
    reps = min(args.reps, SLOW_REPS) if estimate > SLOW_CALL_S else args.reps
    median, others = _measure(timer, number, reps)
    for _ in range(args.retries):
        if others <= NOISE_CORES:
            break
        time.sleep(2.0)
        median, others = min((median, others), _measure(timer, number, reps), key=lambda r: r[1])
    return Timing(median * 1e3, others > NOISE_CORES)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return ((y - ref).norm() / ref.norm()).item()


class Table:
    """Markdown table printed row by row, so a long or aborted run still shows what it measured."""

    COLUMNS = ["shape (KxN)", "M", "act", "bits", "kernel", "rel err", "ms",
               "bf16 F.linear ms", "vs bf16", "fp32 F.linear ms", "vs fp32"]

    def __init__(self) -> None:
        print("| " + " | ".join(self.COLUMNS) + " |")
        print("|" + "|".join("---" if i < 5 else "---:" for i in range(len(self.COLUMNS))) + "|", flush=True)

    def row(self, *cells: object) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def make_layers(k: int, n: int, w16: torch.Tensor) -> dict[LayerSpec, QuantLinear]:
    """One QuantLinear per spec, quantized (RTN) from a bf16 nn.Linear holding `w16`.

    Made outside inference_mode, as the layers of a loaded model are; only the forwards run under it.
    """
    layers = {}
    for spec in QUANT_SPECS:
        linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(w16)
        layers[spec] = quantize_layer(f"{k}x{n}", linear, spec, method="rtn")
    return layers


@torch.inference_mode()
def bench_m(w32: torch.Tensor, layers: dict[LayerSpec, QuantLinear], m: int,
            args: argparse.Namespace, table: Table) -> None:
    """The two baselines, then every quantized layer on bf16 and on fp32 activations of `m` rows."""
    n, k = w32.shape
    w16 = w32.to(torch.bfloat16)
    x32 = torch.randn(m, k)
    x16 = x32.to(torch.bfloat16)
    base32 = time_fn(lambda x: F.linear(x, w32), x32, args)
    base16 = time_fn(lambda x: F.linear(x, w16), x16, args)
    for spec, layer in layers.items():
        for x in (x16, x32):
            act, limit = DTYPE_NAME[x.dtype], MAX_REL_ERR[x.dtype]
            kernel = select_kernel(layer, x).name
            y = layer(x)  # builds and caches the kernel's layout: also the warm-up
            with use_kernel("reference"):
                err = rel_err(y, layer(x))
            if not err < limit:
                sys.exit(f"\nFAILED: {k}x{n} M={m} {act} {spec}: kernel {kernel!r} differs from the "
                         f"reference by {err:.2e} (limit {limit:.0e})")
            t = time_fn(layer, x, args)
            fp32 = x.dtype == torch.float32
            table.row(f"{k}x{n}", m, act, spec.bits, kernel, f"{err:.1e}", t, base16, speedup(base16, t),
                      base32 if fp32 else "-", speedup(base32, t) if fp32 else "-")


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), "
          f"median of {args.reps} blocks >= {args.block_ms:g} ms")
    print("QuantLinear: RTN from the bf16 weight, bf16 scales; 4 bits: group 128, asym; 8 bits: per-channel, asym.")
    print("vs X = X ms / QuantLinear ms (> 1: QuantLinear faster). "
          f"*: other processes used > {NOISE_CORES:g} core while it was timed.\n")
    table = Table()
    for k, n in args.shapes:
        w32 = torch.randn(n, k) / k**0.5
        layers = make_layers(k, n, w32.to(torch.bfloat16))
        for m in args.m:
            bench_m(w32, layers, m, args, table)


if __name__ == "__main__":
    main()
