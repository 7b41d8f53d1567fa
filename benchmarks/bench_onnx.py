"""ONNX Runtime against PyTorch on CPU: perplexity of the exported GPTQ model, and prefill / decode speed.

    python benchmarks/bench_onnx.py                       # both parts
    python benchmarks/bench_onnx.py --skip-ppl            # speed only
    python benchmarks/bench_onnx.py --skip-speed --windows 16
    python benchmarks/bench_onnx.py --ops                 # one MatMulNBits node against F.linear, nothing else

Perplexity: ref-llama, GPTQ w4 g128 (128 x 512-token calibration windows from the first 97% of each corpus
file), held-out text (hf_quant/data/heldout.txt) in 512-token windows: hf_quant in PyTorch (fp32) against the
same model exported with `export_onnx` and run by onnxruntime at MatMulNBits accuracy level 0 (fp32 compute)
and 4 (int8 compute); bf16 float in the same run.

Speed, batch 1, on ref-llama (GPTQ w4 g128) and a random Llama (hidden 2048, intermediate 5632, 8 layers, 16
heads / 4 KV heads, vocab 32000; RTN w4 g128): prefill of 512 tokens (ms, tokens/s) and greedy decode after a
128-token prompt (tokens/s over 32 steps, the prompt excluded), for
- onnxruntime MatMulNBits 4-bit (accuracy level 4 and 0),
- onnxruntime float (the float model exported in fp32),
- hf_quant's PyTorch CPU path (the faster of fp32 and bf16 activations),
- PyTorch float (the faster of fp32 and bf16 `F.linear`),
each the best of a few runs, all in the same process (one at a time). The ratios are to PyTorch float.

`--ops`: where prefill time goes without a model: one `MatMulNBits` node (4-bit, accuracy level 4, block sizes
32 / 64 / 128, with and without zero points; random codes) on the random Llama's three linear shapes at 512
rows and at 1 row, against fp32 and bf16 `F.linear` of the same shape, each the best of `--runs` + 2 calls
after a warm-up call.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_quant  # noqa: E402
from common import cpu_summary, random_llama  # noqa: E402
from ppl_ref_llama import calibration_text  # noqa: E402
from hf_quant.io import onnx as ox  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF = SHARED / "models" / "ref-llama"


def heldout_windows(tokenizer, seq_len: int, windows: int | None) -> torch.Tensor:
    """The windows `hf_quant.eval.perplexity` scores (bundled held-out text, non-overlapping), for onnxruntime."""
    ids = tokenizer(hf_quant.eval.bundled_text(), return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len if windows is None else min(windows, ids.numel() // seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                   ids[:, 1:].reshape(-1), reduction="sum"))


def ort_ppl(session, windows: torch.Tensor) -> float:
    total = 0.0
    for w in windows.split(4):
        logits, _ = ox.run_session(session, w)
        total += nll_sum(logits, w)
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def export(model, root: Path, name: str, **kw) -> Path:
    t = time.perf_counter()
    out = hf_quant.export_onnx(model, root / name, **kw)
    print(f"  exported {name} in {time.perf_counter() - t:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Speed


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_speed(model, prefill_ids: torch.Tensor, prompt: torch.Tensor, steps: int, runs: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of a PyTorch model, greedy, KV cache."""
    def prefill():
        with torch.no_grad():
            model(input_ids=prefill_ids, use_cache=False)

    def generate(n):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    prefill()
    t_prefill = best(prefill, runs)
    generate(2)
    t_full, t_one = best(lambda: generate(steps + 1), runs), best(lambda: generate(1), runs)
    return t_prefill, steps / max(t_full - t_one, 1e-9)


def ort_speed(session, prefill_ids: torch.Tensor, prompt: torch.Tensor, steps: int, runs: int) -> tuple[float, float]:
    def prefill():
        ox.run_session(session, prefill_ids)

    def decode():
        logits, past = ox.run_session(session, prompt)
        t = time.perf_counter()
        for _ in range(steps):
            logits, past = ox.run_session(session, logits[:, -1:].argmax(-1), past)
        return time.perf_counter() - t

    prefill()
    t_prefill = best(prefill, runs)
    decode()
    t_decode = min(decode() for _ in range(runs))
    return t_prefill, steps / t_decode


def speed_rows(label: str, float_model, quantized, root: Path, args) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    vocab = float_model.config.vocab_size
    prefill_ids = torch.randint(0, vocab, (1, args.prefill), generator=g)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
    rows = []

    def add(name, prefill_s, decode_tps):
        rows.append((label, name, prefill_s * 1e3, args.prefill / prefill_s, decode_tps))
        print(f"  {label} | {name}: prefill {prefill_s * 1e3:.1f} ms, decode {decode_tps:.1f} tok/s", flush=True)

    floats = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(float_model).to(dtype)
        floats[dtype] = torch_speed(m, prefill_ids, prompt, args.steps, args.runs)
        add(f"PyTorch float {str(dtype)[6:]}", *floats[dtype])
        del m
    best_float = (min(v[0] for v in floats.values()), max(v[1] for v in floats.values()))
    add("PyTorch float (best)", *best_float)
    fl = export(float_model.float(), root, f"{label}-float")
    add("onnxruntime float (fp32)", *ort_speed(ox.load_session(fl), prefill_ids, prompt, args.steps, args.runs))
    for level in (4, 0):
        out = export(quantized, root, f"{label}-q4-acc{level}", accuracy_level=level)
        add(f"onnxruntime MatMulNBits 4-bit, accuracy {level}",
            *ort_speed(ox.load_session(out), prefill_ids, prompt, args.steps, args.runs))
    q_speeds = []
    for dtype in (torch.float32, torch.bfloat16):
        cast_floats(quantized, dtype)
        q_speeds.append(torch_speed(quantized, prefill_ids, prompt, args.steps, args.runs))
        add(f"hf_quant PyTorch ({str(dtype)[6:]} activations)", *q_speeds[-1])
    cast_floats(quantized, torch.float32)
    add("hf_quant PyTorch (best)", min(v[0] for v in q_speeds), max(v[1] for v in q_speeds))
    return rows, best_float


def cast_floats(model, dtype: torch.dtype) -> None:
    """Every float parameter and buffer to `dtype`, except the quantized layers' stored grid (transformers
    refuses `.to(dtype)` on a quantized model)."""
    keep = {id(t) for m in model.modules() if isinstance(m, hf_quant.QuantLinear) for t in m.buffers(recurse=False)}
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and id(t) not in keep:
                t.data = t.data.to(dtype)


def matmul_nbits_session(K: int, N: int, block_size: int, zero_points: bool, g: torch.Generator, threads: int):
    """An onnxruntime session of one 4-bit MatMulNBits node (accuracy level 4) with random codes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k_blocks = -(-K // block_size)
    codes = torch.randint(0, 16, (N, k_blocks, block_size), generator=g)
    inits = [numpy_helper.from_array(ox.pack_bits(codes, 4).numpy(), "B"),
             numpy_helper.from_array((torch.rand(N, k_blocks, generator=g) + 0.5).numpy(), "scales")]
    if zero_points:
        inits.append(numpy_helper.from_array(
            ox.pack_bits(torch.randint(0, 16, (N, k_blocks), generator=g), 4).reshape(-1).numpy(), "zero_points"))
    node = helper.make_node("MatMulNBits", ["A"] + [t.name for t in inits], ["Y"], domain="com.microsoft", K=K, N=N,
                            bits=4, block_size=block_size, accuracy_level=4)
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ox.OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def op_rows(runs: int) -> None:
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    print("\n### One MatMulNBits node (4-bit, accuracy 4) against F.linear, same shape\n")
    print("| K x N | M | fp32 ms | bf16 ms | MatMulNBits ms: block 32 / 64 / 128, symmetric | with zero points | "
          "best x best float |")
    print("|---|---:|---:|---:|---|---|---:|")
    for K, N in ((2048, 5632), (5632, 2048), (2048, 2048)):
        W = torch.randn(N, K, generator=g)
        sessions = {(bs, zp): matmul_nbits_session(K, N, bs, zp, g, threads) for zp in (False, True)
                    for bs in (32, 64, 128)}
        for M in (512, 1):
            x = torch.randn(M, K, generator=g)
            xb, Wb, a = x.bfloat16(), W.bfloat16(), x.numpy()
            fns = {"fp32": lambda: F.linear(x, W), "bf16": lambda: F.linear(xb, Wb)}
            fns.update({key: (lambda s=s: s.run(None, {"A": a})) for key, s in sessions.items()})
            # each function in its own block of calls: interleaving two runtimes' thread pools makes each wait
            # on the other's spinning threads (measured: up to 6x on a 2-core M = 1 bf16 call)
            t = {}
            for k, fn in fns.items():
                fn()  # warm-up
                t[k] = best(fn, runs + 2)
            fl = min(t["fp32"], t["bf16"])
            mnb = lambda zp: " / ".join(f"{t[(bs, zp)] * 1e3:.2f}" for bs in (32, 64, 128))  # noqa: E731
            quant = min(v for k, v in t.items() if isinstance(k, tuple))
            print(f"| {K}x{N} | {M} | {t['fp32'] * 1e3:.2f} | {t['bf16'] * 1e3:.2f} | {mnb(False)} | {mnb(True)} | "
                  f"{fl / quant:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random-only", action="store_true")
    ap.add_argument("--ops", action="store_true", help="only one MatMulNBits node against F.linear (seconds)")
    args = ap.parse_args()
    import onnxruntime

    print(f"CPU: {cpu_summary()}; torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"{onnxruntime.__version__}", flush=True)
    if args.ops:
        op_rows(args.runs)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_onnx-"))
    tok = AutoTokenizer.from_pretrained(REF)
    gptq = None
    if not (args.skip_ppl and args.random_only):
        t = time.perf_counter()
        cfg = hf_quant.QuantConfig(method="gptq", bits=4, group_size=128, dataset=calibration_text(SHARED / "data" / "corpus"),
                                   num_samples=args.num_samples, seq_len=512)
        gptq = AutoModelForCausalLM.from_pretrained(REF, dtype=torch.float32, quantization_config=cfg).eval()
        print(f"  GPTQ w4 g128 calibrated in {time.perf_counter() - t:.0f} s", flush=True)
    if not args.skip_ppl:
        windows = heldout_windows(tok, 512, args.windows)
        bf16 = AutoModelForCausalLM.from_pretrained(REF, dtype=torch.bfloat16).eval()
        torch_ppl = lambda m: hf_quant.eval.perplexity(m, tok, seq_len=512, max_windows=args.windows)  # noqa: E731
        rows = [("bf16 (PyTorch)", torch_ppl(bf16))]
        del bf16
        ref = torch_ppl(gptq)
        rows.append(("GPTQ w4 g128, hf_quant PyTorch fp32", ref))
        for level in (0, 4):
            out = export(gptq, root, f"ppl-acc{level}", accuracy_level=level)
            rows.append((f"GPTQ w4 g128, onnxruntime accuracy_level {level}", ort_ppl(ox.load_session(out), windows)))
        print(f"\n### ref-llama held-out perplexity ({windows.shape[0]} x 512 tokens)\n")
        print("| model | perplexity | vs hf_quant |\n|---|---:|---:|")
        for name, ppl in rows:
            print(f"| {name} | {ppl:.3f} | {100 * (ppl / ref - 1):+.3f}% |")
        print(flush=True)
    if not args.skip_speed:
        all_rows = []
        if not args.random_only:
            ref_float = AutoModelForCausalLM.from_pretrained(REF, dtype=torch.float32).eval()
            all_rows.append(speed_rows("ref-llama", ref_float, gptq, root, args))
            del ref_float
        rnd = random_llama(2048, 5632, 8, "cpu", vocab=32000, heads=16, kv_heads=4).float()
        q = hf_quant.quantize(copy.deepcopy(rnd), hf_quant.QuantConfig(method="rtn", bits=4, group_size=128)).eval()
        all_rows.append(speed_rows("llama-2048x8", rnd, q, root, args))
        print(f"\n### Speed, batch 1 (prefill {args.prefill} tokens; decode {args.steps} tokens after a "
              f"{args.prompt}-token prompt)\n")
        print("| model | runtime | prefill ms | prefill tok/s | x PyTorch float | decode tok/s | x PyTorch float |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for rows, (bp, bd) in all_rows:
            for label, name, ms, ptps, dtps in rows:
                print(f"| {label} | {name} | {ms:.1f} | {ptps:.0f} | {bp * 1e3 / ms:.2f}x | {dtps:.1f} | {dtps / bd:.2f}x |")
    print(f"\n(exports under {root})")


if __name__ == "__main__":
    main()
