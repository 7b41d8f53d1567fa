"""Accuracy of `cpu_int8_split` (8-bit weight-only layers on the int8 GEMM, the activations as 2-3 int8
terms) on real activations: held-out perplexity of ref-llama quantized RTN w8 per channel, with the same
quantized weights run by
- the reference kernel with fp32 activations (the model's buffers cast to fp32: the "exact" result);
- the reference kernel with bf16 activations (what every bf16 kernel computes up to float rounding);
- `cpu_int8_split` with bf16 activations (forced at every row count: the windows run 4096 rows a call);
on ref-llama and on a copy with planted activation outliers (4 hidden channels x32, function unchanged).

    python benchmarks/ppl_split.py [--model ../shared/models/ref-llama] [--max-windows 16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant import kernels
from hf_quant.eval_outliers import plant_outliers

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    ap.add_argument("--max-windows", type=int, default=16, help="held-out 512-token windows")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    cfg = hf_quant.QuantConfig(method="rtn", bits=8, group_size=-1)

    def ppl(model) -> float:
        return hf_quant.eval.perplexity(model, tok, max_windows=args.max_windows)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        channels = sorted(torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(0))[:4].tolist())
        plant_outliers(model, channels, 32.0)
        model.save_pretrained(tmp)
        for label, path in (("ref-llama", args.model), (f"planted x32 on {channels}", tmp)):
            qm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=cfg)
            res = {}
            for name in ("reference", "cpu_int8_split"):
                with kernels.prefer_kernel(name):
                    res[f"{name}, bf16 activations"] = ppl(qm)
            torch.nn.Module.float(qm)  # the same quantized weights, fp32 activations
            with kernels.use_kernel("reference"):
                exact = ppl(qm)
            rows.append((label, "reference, fp32 activations (exact)", exact, exact))
            rows += [(label, k, v, exact) for k, v in res.items()]
            for r in rows[-3:]:
                print(r, flush=True)
    print("\n| model (RTN w8 per channel) | kernel | held-out ppl | vs fp32 activations |")
    print("|---|---|---:|---:|")
    for label, name, p, exact in rows:
        print(f"| {label} | {name} | {p:.4f} | {p / exact - 1:+.4%} |")


if __name__ == "__main__":
    main()
