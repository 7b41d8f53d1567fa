"""GGUF: hf_quant's calibrated files against llama.cpp's own quantizer, all judged by llama.cpp.

For each file type (default Q4_K_M, Q3_K_M and llama.cpp's Q2_K mix, here "Q2_K_M"), on the model's held-out
perplexity measured by llama.cpp on the same windows:
  - hf_quant GPTQ on the GGUF grids (QuantConfig(method="gptq", gguf=<mix>)), exported with export_gguf;
  - hf_quant RTN on the same grids (data-free);
  - llama.cpp's quantizer of a float (F32) export, plain and with an importance matrix.
The importance matrix is computed by llama.cpp's own `llama-imatrix` on the calibration text GPTQ draws its
windows from (hf_quant's packaged calibration.txt, every 512-token chunk of it: GPTQ sees 128 of them), and
the files are made by llama.cpp's own `llama-quantize --imatrix`. The Python binding ships neither tool:
`bash benchmarks/build_llama_tools.sh` builds both from the llama.cpp source the binding was built from (the
binding's sdist) and caches them; `--llama-tools DIR` names another build. Without the tools, the script
falls back to llama_model_quantize through the binding's C API with llama-imatrix's statistic (per weight, the
mean over the calibration tokens of x^2 per input column) computed by hf_quant on GPTQ's windows, and says so.
Then, for the record, the agreement figures of the export (tokenization, top-1, perplexity ratio, greedy
continuations) and tokens/s of llama.cpp, hf_quant's CPU path and bf16 transformers, in the same run.

    python benchmarks/bench_gguf.py [--model ../shared/models/ref-llama] [--mixes Q4_K_M Q3_K_M Q2_K_M]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant import QuantConfig
from hf_quant.calibration.data import calibration_windows
from hf_quant.eval import bundled_text
from hf_quant.eval_gguf import compare_with_llama_cpp, llama_cpp_perplexity, load_llama_cpp

ROOT = Path(__file__).resolve().parents[1]
FTYPES = {"Q4_K_M": "Q4_K_M", "Q5_K_M": "Q5_K_M", "Q3_K_M": "Q3_K_M", "Q2_K_M": "Q2_K"}
PROMPTS = ("The old man looked at the sea and", "Once upon a time there was", "In the morning the village")


def imatrix(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> mean of x^2 per input column of that weight over all calibration tokens."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            g = names.get_name(f"{n}.weight", try_suffixes=(".weight",))
            hooks.append(m.register_forward_pre_hook(hook(g)))
    with torch.no_grad():
        for w in windows.split(8):
            model(input_ids=w, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: (sums[k] / counts[k]).contiguous() for k in sums}


def llama_quantize(src: Path, dst: Path, ftype: str, imat: dict[str, torch.Tensor] | None) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), torch.get_num_threads()
    keep = []
    if imat:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imat) + 1))()
        for i, (name, v) in enumerate(imat.items()):
            buf = (ctypes.c_float * v.numel())(*v.tolist())
            keep += [buf, name.encode()]
            arr[i].name, arr[i].data, arr[i].size = keep[-1], ctypes.cast(buf, ctypes.POINTER(ctypes.c_float)), v.numel()
        arr[len(imat)].name = None  # terminator
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed: {rc}")


def find_llama_tools(where: str | None) -> Path | None:
    """The directory holding llama-imatrix and llama-quantize: `where`, else build_llama_tools.sh's cache for
    the installed binding's version; None if they are not there."""
    if where is None:
        import llama_cpp

        cache = os.environ.get("HF_QUANT_LLAMA_TOOLS", str(Path.home() / ".cache" / "hf_quant-llama-tools"))
        where = str(Path(cache) / llama_cpp.__version__)
    d = Path(where)
    return d if all((d / t).is_file() for t in ("llama-imatrix", "llama-quantize")) else None


def llama_imatrix(tools: Path, src: Path, text: Path, dst: Path, seq_len: int) -> Path:
    """llama.cpp's importance matrix of the model `src` over every `seq_len`-token chunk of `text`."""
    cmd = [str(tools / "llama-imatrix"), "-m", str(src), "-f", str(text), "-o", str(dst), "-c", str(seq_len),
           "-t", str(torch.get_num_threads()), "--no-ppl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not dst.is_file():
        raise RuntimeError(f"llama-imatrix failed ({done.returncode}):\n{done.stderr[-2000:]}")
    chunks = [ln for ln in done.stderr.splitlines() if "chunks" in ln and "tokenizing" not in ln][-1:]
    print(f"llama-imatrix: {' '.join(chunks) or 'done'}")
    return dst


def llama_quantize_tool(tools: Path, src: Path, dst: Path, ftype: str, imat: Path | None) -> None:
    cmd = [str(tools / "llama-quantize")] + (["--imatrix", str(imat)] if imat else []) + [
        str(src), str(dst), ftype, str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize {ftype} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def size_mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def speed(model, llm, tok, n_prompt=256, n_new=32, reps=3) -> dict[str, float]:
    """tokens/s: prompt (one forward of n_prompt tokens) and decode (n_new greedy tokens)."""
    ids = tok(bundled_text()[:8000], add_special_tokens=False).input_ids[:n_prompt]
    out = {}
    if llm is not None:
        best_p = best_d = float("inf")
        for _ in range(reps):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            best_p = min(best_p, time.perf_counter() - t)
            t = time.perf_counter()
            for _i in range(n_new):  # greedy decode, one token per eval
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            best_d = min(best_d, time.perf_counter() - t)
        return {"prompt_tok_s": n_prompt / best_p, "decode_tok_s": n_new / best_d}
    x = torch.tensor([ids])
    best_p = best_d = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            model(input_ids=x, use_cache=False)
            best_p = min(best_p, time.perf_counter() - t)
            t = time.perf_counter()
            model.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           attention_mask=torch.ones_like(x))
            best_d = min(best_d, time.perf_counter() - t - best_p)
    out = {"prompt_tok_s": n_prompt / best_p, "decode_tok_s": n_new / best_d}
    return out


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "ref-llama"))
    ap.add_argument("--mixes", nargs="*", default=["Q4_K_M", "Q3_K_M", "Q2_K_M"], choices=sorted(FTYPES))
    ap.add_argument("--agreement", nargs="*", default=["Q8_0", "Q4_K"], metavar="TYPE",
                    help="plain GGUF types whose GPTQ export is compared with llama.cpp (top-1, ppl, greedy)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--llama-tools", default=None, help="directory with llama-imatrix and llama-quantize (default: "
                    "the cache of benchmarks/build_llama_tools.sh)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    flt = AutoModelForCausalLM.from_pretrained(args.model)
    print(f"model {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    heldout = tok(bundled_text(), add_special_tokens=False).input_ids
    calib = calibration_windows(None, lambda: tok, args.num_samples, args.seq_len, 0,
                                flt.config.vocab_size)
    results: dict = {"rows": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = hf_quant.export_gguf(flt, d / "f32.gguf", tok)
        ppl_f32 = llama_cpp_perplexity(src, heldout, args.seq_len, args.windows)
        print(f"\nllama.cpp perplexity of the float (F32) export: {ppl_f32:.4f}")
        tools = find_llama_tools(args.llama_tools)
        if tools is not None:
            imat = llama_imatrix(tools, src, ROOT / "hf_quant" / "data" / "calibration.txt", d / "imatrix.gguf",
                                 args.seq_len)
            print(f"importance matrix and quantization by llama.cpp's own tools ({tools})")
        else:
            imat = imatrix(flt.float(), calib)
            print("llama-imatrix / llama-quantize not built (bash benchmarks/build_llama_tools.sh): importance matrix "
                  "computed by hf_quant, quantization through llama_model_quantize")
        results["imatrix_by"] = "llama-imatrix" if tools is not None else "hf_quant"
        flt = AutoModelForCausalLM.from_pretrained(args.model)
        rows, gptq_models = [], {}
        for mix in args.mixes:
            ftype = FTYPES[mix]
            files = {}
            for method in ("gptq", "rtn"):
                cfg = QuantConfig(method=method, gguf=mix, **({"num_samples": args.num_samples, "seq_len": args.seq_len}
                                                              if method == "gptq" else {}))
                t = time.perf_counter()
                model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg)
                secs = time.perf_counter() - t
                files[f"hf_quant {method.upper()}"] = (hf_quant.export_gguf(model, d / f"{method}-{mix}.gguf", tok), secs)
                if method == "gptq":
                    gptq_models[mix] = model
            for label, im in (("llama.cpp quantize", None), ("llama.cpp quantize + imatrix", imat)):
                out = d / f"lc-{mix}-{'im' if im is not None else 'plain'}.gguf"
                t = time.perf_counter()
                if tools is not None:
                    llama_quantize_tool(tools, src, out, ftype, im)
                else:
                    llama_quantize(src, out, ftype, im)
                files[label] = (out, time.perf_counter() - t)
            for label, (path, secs) in files.items():
                ppl = llama_cpp_perplexity(path, heldout, args.seq_len, args.windows)
                rows.append({"type": mix, "file": label, "ppl": ppl, "mib": size_mib(path), "seconds": secs})
            # the file rounds the float embeddings (and a float lm_head) to the mix's types as llama.cpp does, so
            # the model that computes the file's function is its import (linears: the same blocks)
            as_exported = hf_quant.import_gguf(files["hf_quant GPTQ"][0])
            agree = compare_with_llama_cpp(as_exported, tok, files["hf_quant GPTQ"][0], seq_len=args.seq_len,
                                           max_windows=args.windows or 8, prompts=PROMPTS)
            results.setdefault("agreement", {})[mix] = {
                "tokenization_equal": agree.tokenization_equal, "top1": agree.top1_agreement,
                "ppl_hf_quant": agree.ppl_hf_quant, "ppl_llama_cpp": agree.ppl_llama_cpp,
                "greedy": [{k: g[k] for k in ("prompt", "match", "first_divergence")} for g in agree.greedy]}
        for type_ in args.agreement:
            cfg = QuantConfig(method="gptq", gguf=type_, num_samples=args.num_samples, seq_len=args.seq_len)
            gptq_models[type_] = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg)
            path = hf_quant.export_gguf(gptq_models[type_], d / f"gptq-{type_}.gguf", tok)
            # llama.cpp computes in fp32: the same file in fp32 (the import) is the like-for-like comparison; the
            # calibrated model in its own dtype (bf16 for ref-llama) adds bf16 rounding on hf_quant's side
            for label, model in ((type_, hf_quant.import_gguf(path, dtype=torch.float32)),
                                 (f"{type_} ({DTYPE_NAMES.get(gptq_models[type_].dtype, gptq_models[type_].dtype)} model)",
                                  gptq_models[type_])):
                agree = compare_with_llama_cpp(model, tok, path, seq_len=args.seq_len,
                                               max_windows=args.windows or 8, prompts=PROMPTS)
                results.setdefault("agreement", {})[label] = {
                    "tokenization_equal": agree.tokenization_equal, "top1": agree.top1_agreement,
                    "ppl_hf_quant": agree.ppl_hf_quant, "ppl_llama_cpp": agree.ppl_llama_cpp,
                    "greedy": [{k: g[k] for k in ("prompt", "match", "first_divergence")} for g in agree.greedy]}
        results["rows"] = rows
        print("\n| type | file | llama.cpp held-out ppl | vs F32 | size MiB | quantize s |")
        print("|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['type']} | {r['file']} | {r['ppl']:.4f} | {r['ppl'] / ppl_f32 - 1:+.2%} | {r['mib']:.2f} | "
                  f"{r['seconds']:.1f} |")
        print("\nGoal: hf_quant GPTQ below llama.cpp + imatrix at every type:" if args.mixes else "")
        for mix in args.mixes:
            by = {r["file"]: r["ppl"] for r in rows if r["type"] == mix}
            g, im = by["hf_quant GPTQ"], by["llama.cpp quantize + imatrix"]
            print(f"  {mix}: GPTQ {g:.4f} vs imatrix {im:.4f} ({g / im - 1:+.2%}) -> {'met' if g < im else 'NOT met'}")
        print("\nAgreement of hf_quant with llama.cpp running the export (plain types: the file imported in fp32, "
              "then the calibrated model in its own dtype; mixes: the import of the file):")
        for mix, a in results["agreement"].items():
            print(f"  {mix}: tokenization equal {a['tokenization_equal']}, top-1 {a['top1']:.4f}, ppl hf_quant "
                  f"{a['ppl_hf_quant']:.4f} vs llama.cpp {a['ppl_llama_cpp']:.4f} "
                  f"({a['ppl_llama_cpp'] / a['ppl_hf_quant'] - 1:+.3%}); greedy: "
                  + ", ".join("match" if g["match"] else f"diverges at {g['first_divergence']}" for g in a["greedy"]))
        if args.no_speed:
            return _finish(args, results)
        # speed, for the record: the first mix's GPTQ file
        mix = (args.mixes or args.agreement)[0]
        path = d / f"gptq-{mix}.gguf"
        llm = load_llama_cpp(path, n_ctx=512)
        bf16 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        sp = {f"llama.cpp ({mix})": speed(None, llm, tok), f"hf_quant ({mix}, CPU dispatch)": speed(gptq_models[mix], None, tok),
              "transformers bf16": speed(bf16, None, tok)}
        results["speed"] = sp
        print("\n| engine | prompt tok/s (256) | decode tok/s (32) |\n|---|---:|---:|")
        for k, v in sp.items():
            print(f"| {k} | {v['prompt_tok_s']:.0f} | {v['decode_tok_s']:.1f} |")
    _finish(args, results)


def _finish(args, results) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
