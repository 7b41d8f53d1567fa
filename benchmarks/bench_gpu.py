"""Quantized linear on the GPU vs fp16 `F.linear` and torch's tinygemm int4 (`_weight_int4pack_mm`).

    python benchmarks/bench_gpu.py [--shapes 4096x4096 ...] [--ms 1 16 64 4096] [--bits 4 8 3 2]

For every shape (K x N = in x out features), batch M and width: first checks each quantized kernel
against the reference kernel (relative error < 1e-2, else it stops), then times with
`triton.testing.do_bench` (median): fp16 `F.linear`, tinygemm int4 (bf16 activations, 4 bits
only), and each hf_quant kernel that supports the layer (the dispatcher's choice is marked *).
Ratios are against fp16 measured in the same run; "% floor" = the time to read the packed weight,
scales and zeros once at the copy bandwidth measured in the same run, divided by the kernel's time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hf_quant import kernels
from hf_quant.methods import get_method
from hf_quant.config import LayerSpec
from hf_quant.runtime import QuantLinear

SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x8192", "8192x28672"]


def copy_bandwidth() -> float:
    """Bytes per ms of a large device-to-device copy (read + write counted)."""
    import triton.testing

    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16, 64, 4096])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 8, 3, 2])
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s "
          f"(read+write); kernels: {kernels.available_kernels()}")
    print("| K x N | M | bits | kernel | ms | vs fp16 | vs tinygemm | % floor | rel err |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        K, N = map(int, shape.split("x"))
        W = torch.randn(N, K, device="cuda") * 0.02
        W16 = W.half()
        for bits in args.bits:
            gs = -1 if bits == 8 else args.group_size
            spec = LayerSpec(bits, gs, False)
            layer = QuantLinear.from_quantized(get_method("rtn").quantize(W, spec, torch.float16), spec, None)
            n_groups = spec.groups(K)
            floor_ms = (N * K * bits / 8 + 2 * N * n_groups * 2) / (bw / 2)
            tiny = None
            if bits == 4 and hasattr(torch.ops.aten, "_weight_int4pack_mm"):
                q = torch.randint(0, 16, (N, K), dtype=torch.int32, device="cuda")
                packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                try:
                    tiny_w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
                    sz = torch.randn(K // 128, N, 2, device="cuda", dtype=torch.bfloat16)
                    tiny = (tiny_w, sz)
                except RuntimeError as e:  # layout differs between torch releases
                    print(f"tinygemm unavailable: {e}")
            for M in args.ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                t16 = triton.testing.do_bench(lambda: F.linear(x, W16))
                t_tiny = None
                if tiny is not None:
                    xb = x.bfloat16()
                    t_tiny = triton.testing.do_bench(lambda: torch.ops.aten._weight_int4pack_mm(xb, tiny[0], 128, tiny[1]))
                with kernels.use_kernel("reference"):
                    ref = layer(x)
                chosen = kernels.select_kernel(layer, x).name
                print(f"| {shape} | {M} | fp16 | F.linear | {t16:.4f} | 1.00x | | | |")
                if t_tiny is not None:
                    print(f"| {shape} | {M} | 4 | tinygemm (bf16) | {t_tiny:.4f} | {t16 / t_tiny:.2f}x | 1.00x | "
                          f"{100 * floor_ms / t_tiny:.0f}% | |")
                for name in kernels.available_kernels():
                    if name == "reference" or not kernels.dispatch._KERNELS[name].supports(layer, x):
                        continue
                    with kernels.use_kernel(name):
                        out = layer(x)
                        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                        if err > 1e-2:
                            raise SystemExit(f"{name} disagrees with the reference on {shape} M={M} bits={bits}: {err:.2e}")
                        t = triton.testing.do_bench(lambda: layer(x))
                    vs_tiny = f"{t_tiny / t:.2f}x" if t_tiny else ""
                    mark = "*" if name == chosen else ""
                    print(f"| {shape} | {M} | {bits} | {name}{mark} | {t:.4f} | {t16 / t:.2f}x | {vs_tiny} | "
                          f"{100 * floor_ms / t:.0f}% | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
