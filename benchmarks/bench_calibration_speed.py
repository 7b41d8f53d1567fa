"""Calibration speed: hf_quant's GPTQ against the reference GPTQ code (IST-DASLab's `gptq.py`) driven block by
block, on the same machine, model and calibration windows, in one invocation.

    python benchmarks/bench_calibration_speed.py --reference /path/to/IST-DASLab/gptq [--model DIR]
        [--samples 32] [--seq-len 512] [--bits 4] [--group-size 128] [--sym]

The reference is not part of hf_quant: pass a checkout of https://github.com/IST-DASLab/gptq (its `gptq.py` and
`quant.py` are imported from there, unchanged). It is driven as its own `llama.py` drives it (`llama_sequential`
with --true-sequential): per block, the groups k/v/q, o, up/gate, down in turn, each calibrated on all windows
through forward hooks (`GPTQ.add_batch`), quantized (`GPTQ.fasterquant`, percdamp 0.01, act-order off, its
min/max grid unless --mse), its fake-quantized weight written back, then the block's outputs recomputed for the
next block. On a machine without CUDA, its `torch.cuda.synchronize()` is made a no-op (the only CUDA call on
its CPU path).

hf_quant runs `from_pretrained(..., quantization_config=QuantConfig(method="gptq", ...))` with the same
windows (token ids), the same grid options and `true_sequential=True`, once per `--hf-dtype` choice of
`calibration_dtype` ("auto": fp32 on CPUs without native bf16, the model's dtype elsewhere). Every run is a
fresh process (so that none inherits another's warm caches, allocations or kernel measurements), `--repeats`
times; the fastest counts. Its time is the one it logs for the calibration ("calibrated N blocks ... in X s":
block-input capture through the last block), the reference's the same span. Both print seconds per window and
the ratio. Each also reports the held-out perplexity of its quantized model on a few windows of hf_quant's
packaged held-out text, so that the two are seen to do the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_summary  # noqa: E402

from hf_quant.config import CALIBRATION_DTYPES  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama"
SEQUENTIAL = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
              ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]  # the reference llama.py's --true-sequential


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, type=Path,
                   help="a checkout of IST-DASLab/gptq (the directory holding gptq.py and quant.py)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a Llama-architecture checkpoint (default: ref-llama)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    p.add_argument("--mse", action="store_true", help="both: search a clipped grid (the reference's --mse; default off)")
    p.add_argument("--reference-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the dtype the reference's model is loaded in (default float32, as its README's runs)")
    p.add_argument("--hf-dtype", nargs="+", default=["auto", "float32"], choices=CALIBRATION_DTYPES,
                   help="hf_quant runs, by QuantConfig.calibration_dtype (default: auto float32); the model is "
                        "loaded in its own dtype")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows for the perplexity check")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="fresh-process runs of each; the fastest counts (default 2)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the child process of one run
    return p.parse_args(argv)


def windows_for(model_dir: Path, samples: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from hf_quant.calibration.data import calibration_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    return calibration_windows(None, lambda: tok, samples, seq_len, 0, len(tok))


def heldout_ppl(model, model_dir: Path, n_windows: int, seq_len: int) -> float:
    from transformers import AutoTokenizer

    from hf_quant.eval import perplexity

    return perplexity(model, AutoTokenizer.from_pretrained(model_dir), seq_len=seq_len, max_windows=n_windows)


class _CalibrationTime(logging.Handler):
    PATTERN = re.compile(r"calibrated (\d+) blocks on \S+ in ([0-9.]+) s")

    def __init__(self) -> None:
        super().__init__()
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = self.PATTERN.search(record.getMessage())
        if m:
            self.seconds = float(m.group(2))


def run_hf_quant(args, windows: torch.Tensor, calibration_dtype: str) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    import hf_quant

    cfg = hf_quant.QuantConfig(method="gptq", bits=args.bits, group_size=args.group_size, sym=args.sym,
                               mse=args.mse, true_sequential=True, dataset=list(windows), num_samples=len(windows),
                               seq_len=windows.shape[1], calibration_dtype=calibration_dtype)
    handler = _CalibrationTime()
    log = logging.getLogger("hf_quant")
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg)
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
    if handler.seconds is None:
        raise RuntimeError("hf_quant did not log its calibration time")
    return handler.seconds, heldout_ppl(model, args.model, args.eval_windows, args.seq_len)


def _load_reference(ref_dir: Path):
    if not (ref_dir / "gptq.py").is_file() or not (ref_dir / "quant.py").is_file():
        raise SystemExit(f"--reference {ref_dir}: no gptq.py / quant.py there; pass a checkout of IST-DASLab/gptq")
    sys.path.insert(0, str(ref_dir))
    gptq, quant = importlib.import_module("gptq"), importlib.import_module("quant")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # its only CUDA call on the CPU path (timing in fasterquant)
    return gptq.GPTQ, quant.Quantizer


@torch.no_grad()
def run_reference(args, windows: torch.Tensor) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    from hf_quant.calibration.blockwise import capture_block_inputs

    GPTQ, Quantizer = _load_reference(args.reference)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.reference_dtype))
    model.config.use_cache = False
    blocks = model.model.layers
    start = time.perf_counter()
    inputs = capture_block_inputs(model, blocks[0], windows)
    for block in blocks:
        for names in SEQUENTIAL:
            subset = {n: block.get_submodule(n) for n in names}
            gptq = {}
            for n, layer in subset.items():
                gptq[n] = GPTQ(layer)
                gptq[n].quantizer = Quantizer()
                gptq[n].quantizer.configure(args.bits, perchannel=True, sym=args.sym, mse=args.mse)
            handles = [layer.register_forward_hook(lambda _, inp, out, n=n: gptq[n].add_batch(inp[0].data, out.data))
                       for n, layer in subset.items()]
            for a, kw in inputs:
                block(*a, **kw)
            for h in handles:
                h.remove()
            with contextlib.redirect_stdout(io.StringIO()):  # its per-layer prints
                for n in subset:
                    gptq[n].fasterquant(percdamp=0.01, groupsize=args.group_size, actorder=False)
                    gptq[n].free()
        outs = [block(*a, **kw) for a, kw in inputs]
        inputs = [(((o[0] if isinstance(o, tuple) else o),) + tuple(a[1:]), kw) for o, (a, kw) in zip(outs, inputs)]
    seconds = time.perf_counter() - start
    return seconds, heldout_ppl(model, args.model, args.eval_windows, args.seq_len)


def _one(args, windows: torch.Tensor, run: str) -> dict:
    seconds, ppl = run_reference(args, windows) if run == "reference" else run_hf_quant(args, windows, run)
    return {"seconds": seconds, "ppl": ppl}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # a child: one run, its result as the last line of stdout
        print(json.dumps(_one(args, windows_for(args.model, args.samples, args.seq_len), args.one)))
        return
    print(cpu_summary())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}; GPTQ w{args.bits} "
          f"g{args.group_size} {'sym' if args.sym else 'asym'}, mse {'on' if args.mse else 'off'}, true-sequential; "
          f"{args.samples} x {args.seq_len} windows (hf_quant's packaged text, seed 0); each run in a fresh process, "
          f"{args.repeats} time(s), the fastest counts")
    rows = []
    for run in ["reference", *args.hf_dtype]:
        results = []
        for _ in range(args.repeats):
            child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", run],
                                   capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"the {run} run failed:\n{child.stderr[-3000:]}")
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        best = min(results, key=lambda r: r["seconds"])
        name = (f"reference gptq.py ({args.reference_dtype} model)" if run == "reference"
                else f"hf_quant (calibration_dtype={run})")
        rows.append((name, best["seconds"], best["ppl"], [r["seconds"] for r in results]))
    ref_s = rows[0][1]
    print()
    print("| run | calibration s (all runs) | s / window | x reference (> 1: faster) | held-out ppl |")
    print("|---|---:|---:|---:|---:|")
    for name, s, ppl, all_s in rows:
        print(f"| {name} | {s:.1f} ({', '.join(f'{t:.1f}' for t in all_s)}) | {s / args.samples:.3f} | "
              f"{ref_s / s:.2f}x | {ppl:.3f} |")


if __name__ == "__main__":
    main()
