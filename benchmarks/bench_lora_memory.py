"""Peak memory of LoRA training: an hf_quant 4-bit base against the bf16 base, measured in the same run.

    python benchmarks/bench_lora_memory.py                 # CPU, Llama-shaped (hidden 2048, 8 blocks): ~5 min on 2 cores
    python benchmarks/bench_lora_memory.py --device cuda   # GPU: peak CUDA memory instead of RSS

Both checkpoints (random bf16 weights; RTN w4 g128 of the same weights) are written to a
temporary directory first. Each variant then runs in its own fresh process, so peaks do not mix:
load the checkpoint, LoRA (r=16) on every linear, gradient checkpointing, `--steps` AdamW steps
on random tokens (`--batch` x `--seq`), the same recipe for both. Reported:
- CPU: peak resident memory of that process (VmHWM) minus its resident memory after imports
  (the libraries are the same in both);
- CUDA: `torch.cuda.max_memory_allocated()`.
and the ratio quantized / bf16 (< 1: the quantized base needs less). The checkpoints' size on disk
is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """This process's resident high-water mark (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so every worker would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def worker(path: str, device: str, steps: int, batch: int, seq: int) -> None:
    """One variant in this process; prints a JSON line."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import hf_quant  # noqa: F401
    from hf_quant import compat

    base_rss = rss_mib()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    compat.enable_activation_checkpointing(model, use_reentrant=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    losses = []
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    out = {"seconds": time.perf_counter() - start, "losses": losses}
    if device == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mib"] = peak_rss_mib() - base_rss
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.device, args.steps, args.batch, args.seq)
        return

    import torch

    import hf_quant
    from common import random_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = random_llama(args.hidden, args.intermediate, args.layers, "cpu", vocab=args.vocab)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "bf16")
        hf_quant.quantize(model, hf_quant.QuantConfig(method="rtn", bits=4, group_size=128))
        model.save_pretrained(Path(tmp) / "w4g128")
        del model
        print(f"Llama-shaped model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} blocks, "
              f"vocab {args.vocab}: {n_params / 1e6:.0f}M parameters; LoRA r=16 on all linears, gradient "
              f"checkpointing, {args.steps} AdamW steps of {args.batch}x{args.seq} tokens on {args.device} "
              f"(torch {torch.__version__})\n")
        rows = {}
        for name in ("bf16", "w4g128"):
            path = Path(tmp) / name
            disk = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
            cmd = [sys.executable, __file__, "--worker", str(path), "--device", args.device, "--steps",
                   str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
            if proc.returncode:
                sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
            rows[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "disk": disk}
        what = "peak CUDA allocated" if args.device == "cuda" else "peak RSS above imports"
        print(f"| base | checkpoint MiB | {what}, MiB | vs bf16 | s | losses |")
        print("|---|---:|---:|---:|---:|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['disk']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] / rows['bf16']['peak_mib']:.2f}x "
                  f"| {r['seconds']:.0f} | {' '.join(f'{x:.3f}' for x in r['losses'])} |")


if __name__ == "__main__":
    main()
