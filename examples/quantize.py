"""Quantize a causal LM in one line, then compare it with the float model.

    python examples/quantize.py                                  # tiny-llama shipped in tests/assets
    python examples/quantize.py --model ../shared/models/ref-llama --bits 4 --group-size 128

Prints the size of the quantized layers before/after (measured on disk), held-out perplexity
before/after on the bundled text, a generated sentence, and checks that the saved model reloads
with bit-identical logits.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny-llama"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    ap.add_argument("--text", help="text file for perplexity (default: the bundled held-out text)")
    ap.add_argument("--max-windows", type=int, default=None, help="cap on 512-token windows")
    ap.add_argument("--prompt", default="It is a truth universally acknowledged")
    ap.add_argument("--out", help="where to save the quantized model (default: a temporary directory)")
    args = ap.parse_args()

    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    ppl_base = hf_quant.eval.perplexity(base, tok, text, max_windows=args.max_windows)
    del base

    config = hf_quant.QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                                  desc_act=args.desc_act)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, quantization_config=config)
    seconds = time.perf_counter() - start
    ppl_q = hf_quant.eval.perplexity(model, tok, text, max_windows=args.max_windows)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        model.save_pretrained(out)
        packed, bf16 = hf_quant.eval.quantized_size_on_disk(model, out)
        again = AutoModelForCausalLM.from_pretrained(out)
        ids = tok(args.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            identical = torch.equal(model(ids).logits, again(ids).logits)
        total_q, total_base = dir_size(out), dir_size(Path(args.model))

    generated = model.generate(ids, max_new_tokens=24, do_sample=False)
    name = Path(args.model).name
    print(f"\nmodel: {name}   method={args.method} bits={args.bits} group_size={args.group_size} "
          f"sym={args.sym}   quantized in {seconds:.1f} s")
    print(f"quantized layers: bf16 {bf16 / 2**20:.2f} MiB -> packed {packed / 2**20:.2f} MiB on disk "
          f"({packed / bf16:.3f}x)")
    print(f"checkpoint files: {total_base / 2**20:.2f} MiB -> {total_q / 2**20:.2f} MiB "
          "(embeddings / lm_head stay in bf16)")
    print(f"held-out perplexity: bf16 {ppl_base:.3f} -> quantized {ppl_q:.3f} ({ppl_q / ppl_base - 1:+.2%})")
    print(f"reload from disk: logits {'bit-identical' if identical else 'DIFFER'}")
    print(f"generate: {tok.decode(generated[0], skip_special_tokens=True)!r}")
    if not identical:
        raise SystemExit("reloaded model differs from the saved one")


if __name__ == "__main__":
    main()
