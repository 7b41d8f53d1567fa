"""GPTQ's CPU time: the grid's clipping search (native vs the torch oracle) and the statistics passes.

    python benchmarks/bench_gptq_cpu.py                    # the search on Llama-7B group shapes, w4/w3 g128, w2 g64
    python benchmarks/bench_gptq_cpu.py --gptq             # and GPTQ of ref-llama end to end, five ways

`core/grid.py find_params(mse=True)` tries 80 shrink factors of each group's range and keeps the one whose
|w - w_hat|^2.4 summed over the group is least. The oracle is the torch form (rows in L2-sized blocks, all factors
of a block at once); on a CPU the native helpers register a fused form (`native.mse_search`: one pass per factor
and row, the power in fp32 polynomials, a factor dropped as soon as its partial sum passes the best so far). Each
shape is one GPTQ group column: all output rows of a layer, one group of input channels (GPTQ calls the search
once per group, on the weights updated so far). Both forms run on the same rows in the same process, alternating,
best of `--repeats`; printed: their times, the ratio, and the share of rows where both chose the same grid (where
they differ the oracle's errors of the two grids are within ~1e-6 of each other: the power's rounding).

`--gptq` quantizes ref-llama (fp32, GPTQ w4 g128, the default clipping search on, `--windows` x 256 tokens) five
ways on the same windows: as shipped (native search; each group's statistics pass stops a window once the group's
layers have their inputs; the column steps between two groups' first columns in one native call), with the torch
search, with whole statistics passes (every window through the whole block, as before that stop), with the torch
column steps (one Python step per column), and with all three (hf_quant before them). It prints the seconds of each and whether the packed weights equal the first run's:
whole passes must give the same bytes; the torch search may not (one tie-break flipped anywhere changes every later
block's inputs; the search's own agreement is the table's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hf_quant from this tree
from common import cpu_summary  # noqa: E402

import hf_quant  # noqa: E402,F401  (registers the native search)
from hf_quant.core import LayerSpec, grid  # noqa: E402
from hf_quant.runtime.kernels import native  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
SHAPES = {"4096 rows (q/k/v/o, gate/up input)": 4096, "11008 rows (gate/up output, one group of down's input)": 11008}
SPECS = {"w4 g128": LayerSpec(4, 128, False), "w3 g128": LayerSpec(3, 128, False), "w2 g64": LayerSpec(2, 64, False)}


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def search_table(args: argparse.Namespace) -> None:
    print("| group column | grid | torch search ms | native ms | x torch | same grid |")
    print("|---|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for shape, rows in SHAPES.items():
        for name, spec in SPECS.items():
            W = torch.randn(rows, spec.group_size, generator=g) * 0.02
            W[torch.randint(0, rows, (rows // 50,), generator=g), 0] *= 15  # a few outlier weights, as in LLMs
            Wg = W.view(rows, 1, spec.group_size)
            saved = list(grid._MSE_SEARCHES)
            try:
                grid._MSE_SEARCHES.clear()
                t_torch, (s_ref, z_ref) = timed(lambda: grid.find_params(Wg, spec, torch.float16, True), args.repeats)
            finally:
                grid._MSE_SEARCHES[:] = saved
            t_native, (s, z) = timed(lambda: grid.find_params(Wg, spec, torch.float16, True), args.repeats)
            same = ((s == s_ref) & (z == z_ref)).float().mean().item()
            print(f"| {shape} | {name} | {t_torch * 1e3:.1f} | {t_native * 1e3:.1f} | {t_torch / t_native:.1f}x "
                  f"| {same:.2%} |", flush=True)


def gptq_end_to_end(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from hf_quant.calibration import blockwise
    from hf_quant.methods import gptq

    texts = [p.read_text(encoding="utf-8")[:40000] for p in sorted((SHARED / "data" / "corpus").glob("*.txt"))[:4]]
    whole_pass = blockwise._pass
    first = None
    print(f"\n| GPTQ w4 g128 of ref-llama (fp32, {args.windows} x 256 windows) | seconds | x shipped | per block "
          "| weights as shipped |")
    print("|---|---:|---:|---|---|")
    shipped = None
    modes = ("shipped", "torch search", "whole passes", "torch column steps",
             "torch search, whole passes, torch column steps")
    for mode in modes:
        saved, saved_steps = list(grid._MSE_SEARCHES), list(gptq._COLUMN_STEPS)
        try:
            if mode.startswith("torch search"):
                grid._MSE_SEARCHES.clear()
            if mode.endswith("torch column steps"):
                gptq._COLUMN_STEPS.clear()
            if "whole passes" in mode:
                blockwise._pass = lambda *a, heads=(), **k: whole_pass(*a, **k)
            cfg = hf_quant.QuantConfig(method="gptq", bits=4, group_size=128, dataset=texts, num_samples=args.windows,
                                       seq_len=256)
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=cfg)
            seconds = time.perf_counter() - t
        finally:
            grid._MSE_SEARCHES[:] = saved
            gptq._COLUMN_STEPS[:] = saved_steps
            blockwise._pass = whole_pass
        state = model.state_dict()
        first = first or state
        shipped = shipped or seconds
        same = all(torch.equal(first[k], state[k]) for k in first)
        blocks = ", ".join(f"{r['seconds']:.1f}" for r in model.hf_quantizer.calibration_report)
        print(f"| {mode} | {seconds:.1f} | {seconds / shipped:.2f} | {blocks} | {'identical' if same else 'differ'} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gptq", action="store_true", help="also GPTQ of ref-llama end to end, five ways")
    ap.add_argument("--windows", type=int, default=32, help="--gptq: calibration windows of 256 tokens")
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    args = ap.parse_args()
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    if not native.has_mse_search():
        sys.exit(f"the native clipping search is not built here: {native.unavailable_reason() or 'AVX2 + FMA needed'}")
    search_table(args)
    if args.gptq:
        gptq_end_to_end(args)


if __name__ == "__main__":
    main()
