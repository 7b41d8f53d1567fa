"""Held-out perplexity of the int8 schemes on ref-llama, and on a copy with planted activation outliers.

    python benchmarks/ppl_int8.py [--model ../shared/models/ref-llama] [--factor 32] [--channels 4]
        [--max-windows N]

Rows, each against the bf16 model measured in the same run:
- `llm_int8` (threshold 6): int8 rows, int8 tokens, outlier columns in 16-bit;
- `llm_int8` with threshold 0 and `w8a8` without smoothing (`smooth=None`): plain dynamic
  per-token int8, no decomposition (the same computation);
- `w8a8` with SmoothQuant smoothing (`smooth=0.5`, calibrated on the head of the corpus), if the
  method is installed.

The planted copy scales `--channels` hidden channels of every RMSNorm weight up by `--factor` and
the matching input columns of the linears that read that norm down by the same factor. A power of
two keeps the bf16 float function bit for bit (checked: its perplexity is printed too). The
normalised hidden states then carry a few large columns, like the emergent outliers of large
models that LLM.int8() is built for. The number of outlier columns (|x| >= 6) that each layer sees
on the first evaluation batch is printed per layer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.eval_outliers import plant_outliers
from hf_quant.methods import available_methods
from hf_quant.runtime.activations import outlier_columns

SHARED = Path(__file__).resolve().parents[2] / "shared"


def calibration_text(corpus: Path) -> list[str]:
    return [f.read_text(encoding="utf-8")[: int(f.stat().st_size * 0.97)] for f in sorted(corpus.glob("*.txt"))]


@torch.no_grad()
def outliers_per_layer(model: torch.nn.Module, ids: torch.Tensor, threshold: float = 6.0) -> dict[str, int]:
    """Input channels with any |x| >= threshold, per quantized layer, on one batch."""
    counts: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, hf_quant.QuantLinear):
            def hook(mod, args, _name=name):
                cols = outlier_columns(args[0].reshape(-1, args[0].shape[-1]), threshold)
                counts[_name] = 0 if cols is None else int(cols.sum())
            hooks.append(m.register_forward_pre_hook(hook))
    model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    ap.add_argument("--factor", type=float, default=32.0)
    ap.add_argument("--channels", type=int, default=4, help="planted outlier channels per norm")
    ap.add_argument("--max-windows", type=int, default=None, help="held-out 512-token windows (default: all)")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration windows for smoothing")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    heldout = hf_quant.eval.bundled_text()
    calib = calibration_text(SHARED / "data" / "corpus")
    first = tok(heldout, return_tensors="pt").input_ids[0][: 4 * 512].reshape(4, 512)

    def ppl(model) -> float:
        return hf_quant.eval.perplexity(model, tok, heldout, max_windows=args.max_windows)

    configs = [("llm_int8", dict(method="llm_int8", threshold=6.0)),
               ("llm_int8 threshold 0 (plain W8A8)", dict(method="llm_int8", threshold=0.0))]
    if "w8a8" in available_methods():
        configs.append(("w8a8 (no smoothing)", dict(method="w8a8", smooth=None)))
        configs.append(("w8a8 + smooth 0.5", dict(method="w8a8", smooth=0.5, dataset=calib,
                                                  num_samples=args.num_samples, seq_len=512,
                                                  true_sequential=False)))
    configs = [(n, c) for n, c in configs if c["method"] in available_methods()]

    with tempfile.TemporaryDirectory() as tmp:
        planted = Path(tmp) / "planted"
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        channels = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        channels = sorted(channels[: args.channels].tolist())
        plant_outliers(model, channels, args.factor)
        model.save_pretrained(planted)
        tok.save_pretrained(planted)

        results = []
        for label, path in (("ref-llama", Path(args.model)), (f"planted x{args.factor:g} on {channels}", planted)):
            base = ppl(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
            results.append((label, "bf16", base, 0.0, None))
            print(results[-1], flush=True)
            for name, kwargs in configs:
                start = time.perf_counter()
                qm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                          quantization_config=hf_quant.QuantConfig(**kwargs))
                seconds = time.perf_counter() - start
                counts = outliers_per_layer(qm, first) if name == "llm_int8" else None
                results.append((label, name, ppl(qm), seconds, counts))
                print(results[-1][:4], flush=True)

    print("\n| model | scheme | held-out ppl | vs bf16 | quantize s |")
    print("|---|---|---:|---:|---:|")
    base = {}
    for label, name, p, s, _ in results:
        base.setdefault(label, p)
        print(f"| {label} | {name} | {p:.3f} | {p / base[label] - 1:+.2%} | {s:.1f} |")
    for label, name, _, _, counts in results:
        if counts:
            per_kind: dict[str, list[int]] = {}
            for layer, n in counts.items():
                per_kind.setdefault(layer.rsplit(".", 1)[-1], []).append(n)
            summary = ", ".join(f"{k} {min(v)}-{max(v)}" for k, v in per_kind.items())
            print(f"\noutlier columns (|x| >= 6, first 4 windows) per layer, {label}: {summary}")


if __name__ == "__main__":
    main()
