"""End-to-end decode speed: greedy `generate` of 128 tokens, quantized vs bf16 (issue 4's goal: >= 2x).

    python benchmarks/bench_generate_gpu.py [--layers 8] [--hidden 4096] [--bits 4] [--kernels auto triton_gemv]

A Llama-shaped model with random bf16 weights is built on the GPU; the quantized copy is made in
memory with RTN (the kernels' speed does not depend on how the codes were found). Each run
generates from the same 16-token prompt with `min_new_tokens=max_new_tokens`, after a warm-up
run; "auto" is the dispatcher's choice, any other name is preferred wherever it applies
(`kernels.prefer_kernel`; e.g. the decode GEMV for the generated tokens, the usual kernel for the prompt).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import random_llama

import hf_quant
from hf_quant import kernels
from hf_quant.calibration import quantize_model
from hf_quant.runtime.convert import find_targets


def tokens_per_s(model, ids, new_tokens: int) -> float:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(ids, **kw)  # warm-up: kernel compilation, layouts, caches
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kernels", nargs="+", default=["auto", "triton_gemv"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate_gpu.py needs a CUDA device")
    model = random_llama(args.hidden, args.intermediate, args.layers, "cuda")
    ids = torch.randint(0, 32000, (1, 16), device="cuda")
    base = tokens_per_s(model, ids, args.new_tokens)

    qcfg = hf_quant.QuantConfig(method="rtn", bits=args.bits, group_size=args.group_size)
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, qcfg, find_targets(qmodel, qcfg, ["lm_head"]))
    del model
    print(f"{torch.cuda.get_device_name()}: Llama hidden {args.hidden}, {args.layers} blocks, bf16, "
          f"greedy {args.new_tokens} tokens; RTN w{args.bits} g{args.group_size}")
    print("| model | kernel | tokens/s | vs bf16 |")
    print("|---|---|---:|---:|")
    print(f"| bf16 | F.linear | {base:.1f} | 1.00x |")
    for name in args.kernels:
        if name == "auto":
            tps = tokens_per_s(qmodel, ids, args.new_tokens)
        else:
            with kernels.prefer_kernel(name):
                tps = tokens_per_s(qmodel, ids, args.new_tokens)
        print(f"| quantized | {name} | {tps:.1f} | {tps / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
