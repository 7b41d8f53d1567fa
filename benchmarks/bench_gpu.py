"""Quantized linear on the GPU vs fp16 / bf16 `F.linear` and torch's tinygemm int4 (`_weight_int4pack_mm`).

    python benchmarks/bench_gpu.py [--shapes 4096x4096 ...] [--ms 1 4 16 64 256 4096] [--bits 4 8 3 2]
                                   [--dtypes fp16 bf16] [--group-size 128]

For every shape (K x N = in x out features), width, batch M and activation dtype: each hf_quant kernel
that runs the layer at M (`kernels.base.KERNELS.get(name).runs(...)`, forced with `use_kernel`) and the
dispatcher's own choice ("auto") is checked against the reference kernel (relative error < 1e-2) and
timed with `triton.testing.do_bench` (median), next to fp16 and bf16 `F.linear` and tinygemm (bf16
activations, int4 g128, on random codes). A failed check or an exception is recorded and the run goes
on; the failures are listed at the end and the exit status is 1 if there were any.

Ratios "x fp16" etc. = that baseline's ms / this ms (> 1: faster). "% floor" = the time to read the
bytes once at the measured read bandwidth, over this time. Bytes: the packed weight at bits/8 bytes
per weight, an fp16 scale and zero per group and row, x and y. Read bandwidth: a 1 GiB
device-to-device copy moves 2 GiB (read + write), so bytes read per second is half the copy's
read+write figure. 8 bits are per-channel (group -1).

The time-capped version of this, with the dispatch tuning, is `gpu_session.py`'s goal_table stage;
both measure through the same code (`gpu_session.GoalBench`).
"""

from __future__ import annotations

import argparse
import sys

import torch

import gpu_session as gs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=gs.GOAL_SHAPES)
    ap.add_argument("--ms", nargs="+", type=int, default=gs.GOAL_MS)
    ap.add_argument("--bits", nargs="+", type=int, default=gs.GOAL_BITS)
    ap.add_argument("--dtypes", nargs="+", choices=list(gs.DTYPES), default=["fp16", "bf16"])
    ap.add_argument("--group-size", type=int, default=gs.GROUP)
    ap.add_argument("--warmup-ms", type=float, default=25)
    ap.add_argument("--rep-ms", type=float, default=100)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (Triton's interpreter, "
                                                     "perf_counter timings; use tiny --shapes)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (or --device cpu for a smoke run with tiny shapes)")
    gs.setup_env(device.type != "cuda")
    if device.type != "cuda":
        torch.set_num_threads(1)
    from hf_quant import kernels

    bw = gs.copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    print(f"{name}, torch {torch.__version__}; copy {bw['copy_read_plus_write_GB_s']:.0f} GB/s "
          f"(read + write), read bandwidth for the floor {bw['read_GB_s']:.0f} GB/s; kernels: {kernels.available_kernels()}")
    print("| K x N | M | bits | act | kernel | ms | x fp16 | x bf16 | x tinygemm | % floor | rel err |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    timer = gs.Timer(device.type == "cuda", args.warmup_ms, args.rep_ms)
    gb = gs.GoalBench(device, timer, bw["read_bytes_per_ms"], group=args.group_size)
    failures = []

    def f(v, fmt):
        return "" if v is None else fmt.format(v)

    for shape in args.shapes:
        for bits in args.bits:
            for M in args.ms:
                for dt in args.dtypes:
                    try:
                        rows = gb.rows(shape, bits, M, gs.DTYPES[dt])
                    except Exception as e:  # the layer or the reference itself failed: record, go on
                        failures.append(f"{shape} M={M} w{bits} {dt}: {type(e).__name__}: {e}")
                        print(f"| {shape} | {M} | {bits} | {dt} | ERROR {type(e).__name__}: {str(e)[:200]} |", flush=True)
                        continue
                    for r in rows:
                        name = r["kernel"] + (f" -> {r['auto_choice']}" if r.get("auto_choice") else "")
                        print(f"| {shape} | {M} | {r['bits']} | {r['dtype']} | {name} | {f(r['ms'], '{:.4f}')} | "
                              f"{f(r['x_fp16'], '{:.2f}x')} | {f(r['x_bf16'], '{:.2f}x')} | {f(r['x_tinygemm'], '{:.2f}x')} | "
                              f"{f(r['pct_floor'], '{:.0f}%')} | {f(r['rel_err'], '{:.1e}')}"
                              f"{' FAIL ' + r.get('error', '') if not r['ok'] else ''} |", flush=True)
                        if not r["ok"] and r["kernel"] not in gs.BASELINES:
                            failures.append(f"{shape} M={M} w{bits} {r['dtype']} {r['kernel']}: rel err {r['rel_err']} "
                                            f"{r.get('error', '')}")
        gb.free()  # the next shape's weights replace this one's
    if gb.tinygemm_reason:
        print(f"tinygemm: {gb.tinygemm_reason}")
    if failures:
        print(f"\n{len(failures)} failures:")
        for line in failures:
            print("  " + line)
        return 1
    print("\nno failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
