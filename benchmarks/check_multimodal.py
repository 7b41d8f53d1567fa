"""Vision-language models quantized: ref-llama as the language model of a Llava, quantized with hf_quant's
defaults (language model quantized and calibrated on text, vision tower and projector in float) beside ref-llama
alone, in one run.

    python benchmarks/check_multimodal.py [--methods rtn gptq] [--config w4g128] [--num-samples 32]
        [--windows 40] [--images 8] [--dtype float32]

The Llava (built in a temporary directory, nothing downloaded): ref-llama's weights as its language model and
output head, a CLIP vision tower (4 layers, width 256, 64x64 images in 16x16 patches: 16 image tokens) and the
two-layer projector, both random (no trained vision encoder ships with this project). On text, the Llava computes
ref-llama's function, so its held-out perplexity equals ref-llama's, and a calibration method given the same
text must produce the same codes for the language model: the check counts the layers whose packed codes, scales
and zeros are equal to those of ref-llama quantized alone. On image prompts (a random image between two
held-out text pieces), the relative error of the logits against the float Llava is printed, with the text-only
error beside it. Also printed: the share of the parameters left in float and the packed size.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, CLIPVisionConfig,
                          LlavaConfig, LlavaForConditionalGeneration)

import hf_quant
from hf_quant.runtime import multimodal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_summary  # noqa: E402
from ppl_ref_llama import SHARED, calibration_text, method_options  # noqa: E402

IMAGE_SIZE, PATCH = 64, 16


def build_llava(text_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write a Llava checkpoint whose language model and head are the Llama at `text_dir` (module docstring)."""
    text = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    image_token = text.config.vocab_size - 1  # a token the prompts below never use as text
    config = LlavaConfig(text_config=text.config.to_dict(), vision_config=vision.to_dict(), image_token_id=image_token,
                         vision_feature_layer=-2)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        llava.model.language_model.load_state_dict(text.model.state_dict())
        llava.lm_head.load_state_dict(text.lm_head.state_dict())
    llava.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(text_dir).save_pretrained(out)
    return Path(out)


def image_prompts(tok, texts: list[str], n: int, image_token: int, image_tokens: int) -> list[tuple]:
    """n (input_ids, pixel_values): 32 text tokens, one random image's tokens, 32 more text tokens."""
    g = torch.Generator().manual_seed(1)
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    prompts = []
    for i in range(n):
        before, after = ids[i * 64: i * 64 + 32], ids[i * 64 + 32: i * 64 + 64]
        prompt = torch.cat([before, torch.full((image_tokens,), image_token), after])[None]
        prompts.append((prompt, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)))
    return prompts


def codes(model, prefix: str) -> dict[str, tuple]:
    return {n.removeprefix(prefix): (m.qweight, m.scales, m.qzeros) for n, m in model.named_modules()
            if isinstance(m, hf_quant.QuantLinear)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--config", default="w4g128")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=40, help="held-out 512-token windows scored")
    ap.add_argument("--images", type=int, default=8, help="image prompts scored")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    bits, gs = map(int, re.fullmatch(r"w(\d)g(-?\d+)", args.config).groups())
    tok = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_text(SHARED / "data" / "corpus")
    heldout = [p.read_text(encoding="utf-8")[-20000:] for p in sorted((SHARED / "data" / "corpus").glob("*.txt"))]

    def ppl(model):
        return hf_quant.eval.perplexity(model, tok, max_windows=args.windows)

    def logits(model, ids, pixels=None):
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=None if pixels is None else pixels.to(dtype)).logits.float()

    with tempfile.TemporaryDirectory() as tmp:
        vlm_dir = build_llava(args.model, Path(tmp) / "llava")
        float_vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=dtype).eval()
        image_token = float_vlm.config.image_token_id
        prompts = image_prompts(tok, heldout, args.images, image_token, (IMAGE_SIZE // PATCH) ** 2)
        reference = [(logits(float_vlm, ids, px), logits(float_vlm, ids[:, :32])) for ids, px in prompts]
        dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        rows = [("float", "ref-llama", ppl(dense), None, None, None, None, 1.0),
                ("float", "Llava(ref-llama)", ppl(float_vlm), None, None, None, None, 1.0)]
        total = {"ref-llama": sum(p.numel() for p in dense.parameters()),
                 "Llava(ref-llama)": sum(p.numel() for p in float_vlm.parameters())}
        print(rows, flush=True)
        del dense
        for method in args.methods:
            cfg = dict(bits=bits, group_size=gs, dataset=calib, num_samples=args.num_samples, seq_len=512,
                       **method_options(method))
            start = time.perf_counter()
            alone = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                         quantization_config=hf_quant.QuantConfig(**cfg))
            s_alone = time.perf_counter() - start
            start = time.perf_counter()
            vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=dtype,
                                                              quantization_config=hf_quant.QuantConfig(**cfg))
            s_vlm = time.perf_counter() - start
            a, b = codes(alone, "model."), codes(vlm, "model.language_model.")
            equal = sum(all(torch.equal(x, y) for x, y in zip(a[n], b[n])) for n in a if n in b)
            same = f"{equal}/{len(a)}" + ("" if b.keys() == a.keys() else f" (layers differ: {len(b)} vs {len(a)})")
            image_err = sum(((logits(vlm, ids, px) - r).norm() / r.norm()).item()
                            for (ids, px), (r, _) in zip(prompts, reference)) / len(prompts)
            text_err = sum(((logits(vlm, ids[:, :32]) - t).norm() / t.norm()).item()
                           for (ids, _), (_, t) in zip(prompts, reference)) / len(prompts)
            left = {}
            for name, model in (("ref-llama", alone), ("Llava(ref-llama)", vlm)):
                floats = sum(p.numel() for n, p in model.named_parameters())
                left[name] = floats / total[name]
            packed = sum(m.qweight.numel() * m.qweight.element_size() for m in vlm.modules()
                         if isinstance(m, hf_quant.QuantLinear))
            rows.append((method, "ref-llama", ppl(alone), s_alone, None, None, None, left["ref-llama"]))
            rows.append((method, "Llava(ref-llama)", ppl(vlm), s_vlm, same, image_err, text_err,
                         left["Llava(ref-llama)"]))
            print(rows[-2:], f"packed {packed / 2**20:.1f} MiB; float modules kept: "
                  f"{multimodal.non_text_modules(vlm)}", flush=True)
            del alone, vlm
    base = {name: p for m, name, p, *_ in rows if m == "float"}
    print(f"\n{args.dtype}, {args.config}, {args.num_samples} x 512 calibration tokens, {cpu_summary()}")
    print("| method | model | held-out ppl | vs its float | quantize s | LM codes equal to ref-llama's | "
          "image-prompt logits rel. err | text-only rel. err | float params left |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, name, p, s, same, ie, te, left in rows:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(f"| {method} | {name} | {p:.3f} | {p / base[name] - 1:+.2%} | {fmt(s, '.1f')} | {same or ''} | "
              f"{fmt(ie, '.4f')} | {fmt(te, '.4f')} | {left:.1%} |")


if __name__ == "__main__":
    main()
