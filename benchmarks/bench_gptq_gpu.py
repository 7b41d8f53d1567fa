"""GPTQ calibration speed and memory on a Llama-shaped model (the GPU acceptance benchmark).

    python benchmarks/bench_gptq_gpu.py                      # hidden 4096, intermediate 11008, 4 blocks,
                                                             # 128 x 2048 calibration tokens, on CUDA
    python benchmarks/bench_gptq_gpu.py --small --device cpu # a minutes-long smoke run of the same path

Random bf16 weights are saved to a temporary directory and quantized through the one-line API:
`from_pretrained(path, quantization_config=QuantConfig(method="gptq", ...))` with the model loaded on
the CPU and `calibration_device` set, so that one block at a time is on the accelerator. Prints, per
variant: seconds per block (from the calibration summary), total seconds, peak accelerator memory,
the size of one block, and each block's output error against the float block; then checks one
quantized layer on the accelerator against the reference kernel.
"""

from __future__ import annotations

import argparse
import faulthandler
import tempfile
import time

import torch
from common import random_llama
from transformers import AutoModelForCausalLM

import hf_quant
from hf_quant import kernels


def build(path: str, hidden: int, intermediate: int, layers: int, vocab: int) -> float:
    """Save a random Llama-shaped model to `path`; returns one block's size in GiB."""
    model = random_llama(hidden, intermediate, layers, "cpu", vocab)
    model.save_pretrained(path)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return block / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="hidden 512, intermediate 1408, 128 x 256 tokens")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--variants", nargs="+", default=["gptq", "gptq+act"])
    ap.add_argument("--stacks", type=float, default=0.0, metavar="SECONDS",
                    help="print every thread's Python stack to stderr every SECONDS (a sampling profile of where "
                         "calibration spends its time)")
    args = ap.parse_args()
    if args.stacks > 0:
        faulthandler.dump_traceback_later(args.stacks, repeat=True)
    if args.small:
        args.hidden, args.intermediate, args.seq_len = 512, 1408, 256
    vocab = 32000
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (and --small) on this machine")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        block_gib = build(tmp, args.hidden, args.intermediate, args.layers, vocab)
        print(f"built and saved a random {args.layers}-block model in {time.perf_counter() - t:.1f} s "
              f"(one block: {block_gib:.2f} GiB bf16)", flush=True)
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(0, vocab, (args.seq_len,), generator=g) for _ in range(args.samples)]
        for variant in args.variants:
            method, *opts = variant.split("+")
            cfg = hf_quant.QuantConfig(method=method, bits=4, group_size=128, dataset=ids,
                                       num_samples=args.samples, seq_len=args.seq_len,
                                       calibration_device=args.device, desc_act="act" in opts)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, quantization_config=cfg)
            total = time.perf_counter() - t
            report = model.hf_quantizer.calibration_report
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            per_block = [r["seconds"] for r in report]
            errors = [r["output_error"] for r in report]
            print(f"{variant}: blocks {['%.1f' % s for s in per_block]} s, output errors "
                  f"{['%.2e' % e for e in errors]}", flush=True)
            rows.append((variant, sum(per_block) / len(per_block), max(per_block), total, peak, max(errors)))

            layer = model.model.layers[0].mlp.down_proj.to(args.device)
            x = torch.randn(8, layer.in_features, dtype=torch.bfloat16, device=args.device)
            with kernels.use_kernel("reference"):
                ref = layer(x).float()
            out = layer(x).float()
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"  {kernels.select_kernel(layer, x).name} vs reference on {args.device}: rel. error {err:.2e}")
            assert err < 2e-2, err
            del model, layer

    tokens = args.samples * args.seq_len
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\nGPTQ w4 g128, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} blocks, "
          f"{args.samples} x {args.seq_len} = {tokens} calibration tokens, on {dev}; one block {block_gib:.2f} GiB")
    print("| variant | s / block (mean) | s / block (max) | from_pretrained s | peak GPU GiB | max block output error |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, mean, mx, total, peak, err in rows:
        print(f"| {variant} | {mean:.2f} | {mx:.2f} | {total:.1f} | {peak:.2f} | {err:.2e} |")


if __name__ == "__main__":
    main()
