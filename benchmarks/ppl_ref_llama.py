"""Perplexity table on ref-llama: bf16 vs RTN vs GPTQ (and variants) at several widths, baseline in the same run.

    python benchmarks/ppl_ref_llama.py [--model ../shared/models/ref-llama] [--configs w4g128 w3g128 w2g64]
        [--methods rtn gptq gptq+act]

Methods: a method name (rtn, gptq, awq, awq+gptq, omniquant, omniquant+gptq) plus options joined
by "+": act (desc_act), static (static_groups),
mse / nomse (clipping search on / off; default: on for GPTQ, off for RTN), nonseq
(true_sequential=False), sym. E.g. "gptq+act+static", "rtn+mse", "gptq+nomse".

Calibration: 128 windows x 512 tokens drawn from the first 97% of each file of ../shared/data/corpus
(the part the model was trained on). Evaluation: held-out text (last 3% of each file, bundled as
hf_quant/data/heldout.txt) and WikiText-2 test, all 512-token windows. Prints quantization seconds.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.methods import available_methods

SHARED = Path(__file__).resolve().parents[2] / "shared"


def calibration_text(corpus: Path) -> list[str]:
    texts = []
    for f in sorted(corpus.glob("*.txt")):
        t = f.read_text(encoding="utf-8")
        texts.append(t[: int(len(t) * 0.97)])
    return texts


OPTIONS = {"act": {"desc_act": True}, "static": {"static_groups": True}, "mse": {"mse": True}, "nomse": {"mse": False},
           "nonseq": {"true_sequential": False}, "sym": {"sym": True}}


def method_options(name: str) -> dict:
    parts = name.split("+")
    n = max(i for i in range(1, len(parts) + 1) if "+".join(parts[:i]) in available_methods())  # e.g. awq+gptq
    kwargs = {"method": "+".join(parts[:n])}
    for o in parts[n:]:
        kwargs.update(OPTIONS[o])
    return kwargs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    ap.add_argument("--configs", nargs="+", default=["w4g128", "w3g128", "w2g64"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gptq+act"])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--no-wikitext", action="store_true", help="held-out text only (WikiText-2 takes most of the time)")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    heldout = hf_quant.eval.bundled_text()
    wiki = (SHARED / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    calib = calibration_text(SHARED / "data" / "corpus")

    def evaluate(model):
        wiki_ppl = float("nan") if args.no_wikitext else hf_quant.eval.perplexity(model, tok, wiki)
        return hf_quant.eval.perplexity(model, tok, heldout), wiki_ppl

    base = evaluate(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16))
    rows = [("bf16", "-", base, 0.0)]
    for cfg_name in args.configs:
        bits, gs = map(int, re.fullmatch(r"w(\d)g(-?\d+)", cfg_name).groups())
        for method in args.methods:
            cfg = hf_quant.QuantConfig(bits=bits, group_size=gs, dataset=calib, num_samples=args.num_samples,
                                       seq_len=512, **method_options(method))
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, quantization_config=cfg)
            seconds = time.perf_counter() - start
            rows.append((method, cfg_name, evaluate(model), seconds))
            print(rows[-1], flush=True)

    rtn = {c: h for m, c, (h, _), _ in rows if m == "rtn"}
    print("\n| method | config | held-out ppl | vs bf16 | of RTN's increase removed | WikiText-2 test ppl | quantize s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, cfg_name, (h, w), s in rows:
        removed = ""
        if method != "rtn" and cfg_name in rtn and rtn[cfg_name] > base[0]:
            removed = f"{(rtn[cfg_name] - h) / (rtn[cfg_name] - base[0]):.0%}"
        print(f"| {method} | {cfg_name} | {h:.3f} | {h / base[0] - 1:+.2%} | {removed} | {w:.2f} | {s:.1f} |")


if __name__ == "__main__":
    main()
