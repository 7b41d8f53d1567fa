"""Python overhead of one `QuantLinear.forward` at M=1, next to `F.linear` on the same input.

    python benchmarks/bench_overhead.py [--iters 20000] [--repeats 7] [--json]

The quantized layer's kernel is replaced by a no-op (a registered kernel of top priority that returns
a preallocated output), so what is timed is hf_quant's own per-call work: the module call, dispatch,
the kernel choice and layout caches, autograd decisions. `F.linear` is timed on the same 1x64 input
with a 64x64 weight, in fp32 and in bf16 (on CPUs without AVX-512 bf16 the bf16 product is the
slower one); the faster of the two is the baseline, and at that size its time is its call overhead.
Also shown: the same layer with its real kernel (cpu_int4 on a 64->64 4-bit layer: torch's packed
op has a fixed cost of its own), under `torch.no_grad()` (generation) and with autograd on
(training-time forward of a frozen base, input without grad).

The same script runs against older hf_quant trees whose kernels took `supports(layer, x)` /
`prepare(layer, x)`: the no-op kernel accepts either signature.
"""

from __future__ import annotations

import argparse
import json
import timeit

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf_quant
from hf_quant import kernels

from common import cpu_summary

IN = OUT = 64


class NoopKernel(kernels.Kernel):
    name = "bench_noop"
    priority = 10_000
    activations = (None,)

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def supports(self, *args) -> bool:
        return True

    def max_rows(self, dtype) -> int | None:
        return None

    def prepare(self, *args):
        return ()  # a (trivial) layout, so that the staleness check of layout kernels is timed too

    def forward(self, layer, x, prepared):
        return self.out


def best_us(fn, iters: int, repeats: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=iters, repeat=repeats)) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT, bias=False).to(torch.bfloat16)
    from hf_quant.calibration import quantize_layer

    layer = quantize_layer("fc", lin, hf_quant.LayerSpec(4, 32, False), "rtn")
    x = torch.randn(1, IN, dtype=torch.bfloat16)
    W = lin.weight.detach()
    x32, W32 = x.float(), W.float()

    rows = []
    for mode, ctx in (("no_grad", torch.no_grad), ("grad on", torch.enable_grad)):
        with ctx():
            f32 = best_us(lambda: F.linear(x32, W32), args.iters, args.repeats)
            bf16 = best_us(lambda: F.linear(x, W), args.iters, args.repeats)
            real = best_us(lambda: layer(x), args.iters, args.repeats)
            rows.append({"mode": mode, "F.linear_fp32_us": f32, "F.linear_bf16_us": bf16,
                         "F.linear_us": min(f32, bf16), "quant_real_kernel_us": real})
    kernels.register_kernel(NoopKernel(torch.empty(1, OUT, dtype=torch.bfloat16)))
    for row, (mode, ctx) in zip(rows, (("no_grad", torch.no_grad), ("grad on", torch.enable_grad))):
        with ctx():
            row["quant_noop_kernel_us"] = best_us(lambda: layer(x), args.iters, args.repeats)
            row["noop_over_F.linear"] = row["quant_noop_kernel_us"] / row["F.linear_us"]

    if args.json:
        print(json.dumps({"cpu": cpu_summary(), "torch": torch.__version__, "rows": rows}))
        return
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; 1 thread; best of {args.repeats} x {args.iters}")
    print("ratio = QuantLinear with the no-op kernel / the faster F.linear")
    print(f"{'mode':<9} {'F.linear fp32':>14} {'F.linear bf16':>14} {'QuantLinear (no-op)':>20} {'ratio':>7} "
          f"{'QuantLinear (cpu_int4)':>23}")
    for r in rows:
        print(f"{r['mode']:<9} {r['F.linear_fp32_us']:>12.2f}us {r['F.linear_bf16_us']:>12.2f}us "
              f"{r['quant_noop_kernel_us']:>18.2f}us {r['noop_over_F.linear']:>6.2f}x {r['quant_real_kernel_us']:>21.2f}us")


if __name__ == "__main__":
    main()
