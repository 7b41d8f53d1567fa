"""End-to-end CPU decode speed: greedy `generate`, quantized vs the faster float model, ms per generated token.

    python benchmarks/bench_generate_cpu.py                       # ref-llama (../shared), or the bundled tiny-llama
    python benchmarks/bench_generate_cpu.py --model PATH --schemes rtn4 rtn8 llm_int8 w8a8 --dtypes float32 bfloat16
    python benchmarks/bench_generate_cpu.py --random 2048 5632 4  # a random Llama of that hidden / MLP size / depth

What a user sees when a model decodes on the CPU: the quantized linears' kernels, the dispatch and kernel-call
overhead of every layer, and everything else the model does per token (attention, norms, the float lm_head,
`generate`'s own work), which quantization does not change. Small models are where the per-call overhead shows.

The float baseline is the model in fp32 and in bf16 (on CPUs without native bf16 fp32 is the faster); the faster
one counts. Each quantized variant (data-free: `rtn4` / `rtn8` = RTN 4 / 8 bits in groups of 128; `llm_int8` with
threshold 6; `w8a8` = dynamic W8A8, threshold 0, no smoothing) is built from the same checkpoint, in each of
`--dtypes`, and timed in interleaved rounds with the float baseline: per round one greedy generate of each, of
`--new-tokens` tokens and of one token (the prompt's forward and the first token), the difference over
`--new-tokens - 1` being the decode time per token. The ratio is the median of the rounds' ratios (> 1: the
quantized model decodes faster); its ms/token is the median over rounds. `--breakdown` also times the quantized
linears (all calls, wall time) in a separate run, and the same layers of the float model: the time of a token
spent in them, and per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hf_quant from this tree
from common import core_sharing, cpu_summary, random_llama  # noqa: E402

import hf_quant  # noqa: E402
from hf_quant.runtime import QuantLinear  # noqa: E402
from hf_quant.runtime.kernels.base import row_class  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = (ROOT.parent / "shared" / "models" / "ref-llama", ROOT / "tests" / "assets" / "tiny-llama")
SCHEMES = {
    "rtn4": dict(method="rtn", bits=4, group_size=128),
    "rtn8": dict(method="rtn", bits=8, group_size=128),
    "llm_int8": dict(method="llm_int8", threshold=6.0),
    "w8a8": dict(method="llm_int8", threshold=0.0),
}


def load(args: argparse.Namespace, dtype: torch.dtype, scheme: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kw = {} if scheme is None else dict(quantization_config=hf_quant.QuantConfig(**SCHEMES[scheme]))
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kw).eval()


def generate_seconds(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    return time.perf_counter() - t


def decode_ms(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    """ms per decoded token: (generate of `tokens` - generate of 1) / (tokens - 1)."""
    return (generate_seconds(model, ids, tokens) - generate_seconds(model, ids, 1)) / (tokens - 1) * 1e3


def linear_share(model: torch.nn.Module, ids: torch.Tensor, tokens: int, names: set[str]) -> tuple[float, float, int]:
    """(ms per token in the linears named `names`, us per call, calls per token) of one decode, by wrapping their
    forward (the quantized linears; in the float model the same layers)."""
    spent = [0.0, 0]
    originals = {}
    for name, module in model.named_modules():
        if name in names:
            originals[module] = module.forward

            def timed(x, _f=module.forward):
                t = time.perf_counter()
                y = _f(x)
                spent[0] += time.perf_counter() - t
                spent[1] += 1
                return y

            module.forward = timed
    try:
        generate_seconds(model, ids, 1)
        spent[:] = [0.0, 0]
        generate_seconds(model, ids, 1)
        first, first_calls = spent[0], spent[1]
        spent[:] = [0.0, 0]
        generate_seconds(model, ids, tokens)
        total, calls = spent[0] - first, spent[1] - first_calls
    finally:
        for module in originals:
            del module.forward  # the instance attribute: the class's forward again
    steps = tokens - 1
    return total / steps * 1e3, total / max(calls, 1) * 1e6, calls // steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a causal LM checkpoint (default: ref-llama, else tiny-llama)")
    ap.add_argument("--random", nargs=3, type=int, metavar=("HIDDEN", "INTERMEDIATE", "LAYERS"),
                    help="a random Llama of these sizes (saved to a temporary directory) instead of a checkpoint")
    ap.add_argument("--schemes", nargs="+", default=["rtn4", "rtn8", "llm_int8", "w8a8"], choices=list(SCHEMES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=33, help="tokens per timed generate (default 33: 32 decode steps)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (random ids)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant (default 5)")
    ap.add_argument("--breakdown", action="store_true", help="also time the quantized linears of each variant")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (one decode step after the first token)")
    tmp = None
    if args.random:
        import tempfile

        hidden, inter, layers = args.random
        tmp = tempfile.TemporaryDirectory()
        random_llama(hidden, inter, layers, "cpu", vocab=32000).save_pretrained(tmp.name)
        args.model = Path(tmp.name)
        name = f"random Llama hidden {hidden}, MLP {inter}, {layers} layers"
    else:
        args.model = args.model or next((p for p in DEFAULT_MODELS if p.exists()), None)
        if args.model is None:
            raise SystemExit("no model: pass --model PATH or --random HIDDEN INTERMEDIATE LAYERS")
        name = str(args.model)

    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    print(core_sharing())
    print(f"model: {name}; prompt {args.prompt} tokens, {args.new_tokens - 1} decode steps per timed generate, "
          f"{args.rounds} rounds")
    torch.manual_seed(0)
    floats = {d: load(args, getattr(torch, d), None) for d in ("float32", "bfloat16")}
    ids = torch.randint(0, floats["float32"].config.vocab_size, (1, args.prompt))
    for model in floats.values():  # warm-up
        decode_ms(model, ids, 4)
    float_ms = {d: statistics.median(decode_ms(m, ids, args.new_tokens) for _ in range(3)) for d, m in floats.items()}
    best = min(float_ms, key=float_ms.get)
    print(f"float: fp32 {float_ms['float32']:.2f} ms/token, bf16 {float_ms['bfloat16']:.2f} ms/token; baseline: {best}")
    baseline = floats[best]
    del floats  # the slower float model is not needed any more
    header = "| scheme | dtype | kernel (decode) | ms/token | float ms/token (same rounds) | x float |"
    if args.breakdown:
        header += " linears ms/token (float's) | us/call (float's) | calls/token |"
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for scheme in args.schemes:
        for dtype in args.dtypes:
            model = load(args, getattr(torch, dtype), scheme)
            decode_ms(model, ids, 4)  # warm-up: kernel choices (measured dispatch), layouts
            layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
            decode = row_class(getattr(torch, dtype), 1)
            kernel = next((e[0].__self__.name for key, e in layer._kernel_cache.items() if key[2] == decode), "?")
            ratios, times, base_times = [], [], []
            for r in range(args.rounds):
                pair = [(model, times), (baseline, base_times)]
                for m, out in (pair if r % 2 == 0 else pair[::-1]):  # alternate the order
                    out.append(decode_ms(m, ids, args.new_tokens))
                ratios.append(base_times[-1] / times[-1])
            row = (f"| {scheme} | {dtype} | {kernel} | {statistics.median(times):.2f} | "
                   f"{statistics.median(base_times):.2f} | {statistics.median(ratios):.2f}x |")
            if args.breakdown:
                names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
                ms, us, calls = linear_share(model, ids, args.new_tokens, names)
                fms, fus, _ = linear_share(baseline, ids, args.new_tokens, names)
                row += f" {ms:.2f} ({fms:.2f}) | {us:.0f} ({fus:.0f}) | {calls} |"
            print(row, flush=True)
            del model
    print("\n" + core_sharing())
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
