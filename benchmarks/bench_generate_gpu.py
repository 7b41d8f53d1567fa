"""End-to-end decode speed: greedy `generate` of 128 tokens, quantized vs bf16 (issue 4's goal: >= 2x).

    python benchmarks/bench_generate_gpu.py [--layers 8] [--hidden 4096] [--bits 4] [--kernels auto triton_gemv]
    python benchmarks/bench_generate_gpu.py --cuda-graphs     # both with CUDA graphs: the goal's measurement

A Llama-shaped model with random bf16 weights is built on the GPU; the quantized copy is made in
memory with RTN (the kernels' speed does not depend on how the codes were found). Each run
generates from the same 16-token prompt with `min_new_tokens=max_new_tokens`, after warm-up runs
(compiles, layouts; the fastest later run counts). "auto" is the dispatcher's choice (the CUDA
dispatch table); any other name is preferred wherever it applies (`kernels.prefer_kernel`; e.g. the
decode GEMV for the generated tokens, the usual kernel for the prompt).

`--cuda-graphs`: bf16 and quantized both run with a static KV cache and the decode step compiled by
transformers with `torch.compile(mode="reduce-overhead")` (CUDA graphs; `common.cuda_graph_kwargs`);
three runs each, the first two compile and capture. Without it, both run eagerly.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hf_quant from this tree
from common import random_llama, tokens_per_s  # noqa: E402

import hf_quant  # noqa: E402
from hf_quant import kernels  # noqa: E402
from hf_quant.calibration import quantize_model  # noqa: E402
from hf_quant.runtime.convert import find_targets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kernels", nargs="+", default=["auto"])
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="static cache + torch.compile(mode='reduce-overhead') for bf16 and quantized alike")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate_gpu.py needs a CUDA device")
    graphs = args.cuda_graphs
    model = random_llama(args.hidden, args.intermediate, args.layers, "cuda", args.vocab)
    ids = torch.randint(0, args.vocab, (1, 16), device="cuda")
    base = tokens_per_s(model, ids, args.new_tokens, cuda_graphs=graphs)

    qcfg = hf_quant.QuantConfig(method="rtn", bits=args.bits, group_size=args.group_size)
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, qcfg, find_targets(qmodel, qcfg, ["lm_head"]))
    del model
    if graphs:
        torch._dynamo.reset()
    torch.cuda.empty_cache()
    mode = "CUDA graphs (static cache, torch.compile reduce-overhead)" if graphs else "eager"
    print(f"{torch.cuda.get_device_name()}: Llama hidden {args.hidden}, {args.layers} blocks, bf16, "
          f"greedy {args.new_tokens} tokens, {mode}; RTN w{args.bits} g{args.group_size}")
    print("| model | kernel | tokens/s | vs bf16 | run seconds |")
    print("|---|---|---:|---:|---|")
    print(f"| bf16 | F.linear | {base['tokens_per_s']:.1f} | 1.00x | {base['seconds']} |")
    for name in args.kernels:
        if name == "auto":
            r = tokens_per_s(qmodel, ids, args.new_tokens, cuda_graphs=graphs)
        else:
            with kernels.prefer_kernel(name):
                r = tokens_per_s(qmodel, ids, args.new_tokens, cuda_graphs=graphs)
        print(f"| quantized | {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{r['seconds']} |", flush=True)
        if graphs:
            torch._dynamo.reset()  # the next kernel choice compiles and captures anew


if __name__ == "__main__":
    main()
