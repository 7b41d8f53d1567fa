"""CPU timings of `hf_quant.QuantLinear` against float `F.linear`, measured in the same run.

For every weight shape (in_features x out_features) and every number of activation rows M, it times:

* the baselines: `F.linear` with a random fp32 weight on fp32 activations, and with the same
  weight in bf16 on bf16 activations;
* `QuantLinear` made by round-to-nearest from that weight (bf16 scales, as in a bf16 checkpoint):
  4 bits with groups of 128 (asymmetric) and 8 bits per output channel (asymmetric, the int8 fast
  path), each on bf16 and on fp32 activations.

Before a quantized config is timed, its output is compared with the reference kernel
(dequantize + `F.linear`, forced with `hf_quant.kernels.use_kernel("reference")`) on the same input;
the relative Frobenius error must stay below 1e-3 for fp32 activations and 2e-2 for bf16, or the
script stops with exit status 1. That first call also builds the kernel's cached weight layout, so
it doubles as the warm-up.

Each time is the median over `--reps` timed blocks of `torch.utils.benchmark.Timer`, each block
repeating the call for at least `--block-ms` milliseconds, under `torch.inference_mode()`.
Speedup = baseline ms / QuantLinear ms (> 1: the quantized layer is faster). Every row is compared
with bf16 `F.linear`; rows with fp32 activations are also compared with fp32 `F.linear`.

Run (rows are printed as they are measured):

    python benchmarks/bench_cpu.py            # Llama-7B shapes, M in {1, 8, 64}; a few minutes on 2 cores
    python benchmarks/bench_cpu.py --small    # 1024-wide shapes, quick
    python benchmarks/bench_cpu.py --shapes 4096x4096 --m 1 16 --threads 4 --reps 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from hf_quant.calibration import quantize_layer
from hf_quant.config import LayerSpec
from hf_quant.kernels import select_kernel, use_kernel
from hf_quant.nn import QuantLinear

DEFAULT_SHAPES = ["4096x4096", "4096x11008", "11008x4096"]  # Llama-7B attention, MLP up, MLP down
SMALL_SHAPES = ["1024x1024", "1024x2816", "2816x1024"]
DEFAULT_M = [1, 8, 64]
QUANT_SPECS = [
    LayerSpec(bits=4, group_size=128, sym=False),
    LayerSpec(bits=8, group_size=-1, sym=False),
]
MAX_REL_ERR = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}
SEED = 0


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
    p.add_argument("--m", nargs="+", type=int, default=DEFAULT_M, help="rows of activations (default: 1 8 64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--reps", type=int, default=5, help="timed blocks per measurement; the median is reported")
    p.add_argument("--block-ms", type=float, default=40.0, help="minimum duration of one timed block")
    args = p.parse_args()
    if args.shapes is None:
        args.shapes = [parse_shape(s) for s in (SMALL_SHAPES if args.small else DEFAULT_SHAPES)]
    return args


def time_ms(fn, x: torch.Tensor, reps: int, block_ms: float) -> float:
    """Median milliseconds per call of `fn(x)` over `reps` blocks of at least `block_ms` each."""
    timer = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    estimate = timer.timeit(1).mean  # also a warm-up call
    number = max(1, int(block_ms / 1e3 / max(estimate, 1e-9)))
    per_call = [timer.timeit(number).mean for _ in range(reps)]
    return statistics.median(per_call) * 1e3


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

    Called outside inference_mode: the kernel dispatcher reads the buffers' version counters,
    which inference tensors do not have.
    """
    layers = {}
    for spec in QUANT_SPECS:
        linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(w16)
        layers[spec] = quantize_layer(f"{k}x{n}", linear, spec, method="rtn")
    return layers


@torch.inference_mode()
def bench_m(w32: torch.Tensor, w16: torch.Tensor, layers: dict[LayerSpec, QuantLinear], m: int,
            args: argparse.Namespace, table: Table) -> None:
    """Baselines, then every quantized config on bf16 and fp32 activations of `m` rows."""
    n, k = w32.shape
    x32 = torch.randn(m, k)
    x16 = x32.to(torch.bfloat16)
    base = {
        torch.float32: time_ms(lambda x: F.linear(x, w32), x32, args.reps, args.block_ms),
        torch.bfloat16: time_ms(lambda x: F.linear(x, w16), x16, args.reps, args.block_ms),
    }
    for spec, layer in layers.items():
        for x in (x16, x32):
            name, limit = DTYPE_NAME[x.dtype], MAX_REL_ERR[x.dtype]
            kernel = select_kernel(layer, x).name
            y = layer(x)  # builds and caches the kernel's layout: also the warm-up
            with use_kernel("reference"):
                err = rel_err(y, layer(x))
            if not err < limit:
                sys.exit(f"\nFAILED: {k}x{n} M={m} {name} {spec}: kernel {kernel!r} differs from the "
                         f"reference by {err:.2e} (limit {limit:.0e})")
            t = time_ms(layer, x, args.reps, args.block_ms)
            vs32 = x.dtype == torch.float32
            table.row(f"{k}x{n}", m, name, spec.bits, kernel, f"{err:.1e}", f"{t:.3f}",
                      f"{base[torch.bfloat16]:.3f}", f"{base[torch.bfloat16] / t:.2f}x",
                      f"{base[torch.float32]:.3f}" if vs32 else "-",
                      f"{base[torch.float32] / t:.2f}x" if vs32 else "-")


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"reps={args.reps} (median), block >= {args.block_ms:g} ms, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work skews the timings)")
    print("QuantLinear: RTN from the bf16 weight, bf16 scales; 4-bit: group 128 asym; 8-bit: per-channel asym.")
    print("vs X = X ms / QuantLinear ms (> 1: QuantLinear faster).\n")
    table = Table()
    for k, n in args.shapes:
        w32 = torch.randn(n, k) / k**0.5
        w16 = w32.to(torch.bfloat16)
        layers = make_layers(k, n, w16)
        for m in args.m:
            bench_m(w32, w16, layers, m, args, table)


if __name__ == "__main__":
    main()
