"""Streaming calibration on a model larger than half the machine's memory: peak resident memory and time.

Generates (never downloads) a random-weight Llama-shaped checkpoint, by default hidden 4096, intermediate 11008,
12 blocks, vocabulary 32000 in bf16 (about 6 GB, one safetensors shard per block), written tensor by tensor so the
generator itself stays small. Then quantizes it with GPTQ w4 g128 on 32 x 256 random calibration tokens, each path in
a fresh process whose peak resident memory (VmHWM) and wall time are reported:

  - streaming: `hf_quant.quantize_checkpoint(src, dst, cfg)` (what `hf-quant quantize` runs);
  - in memory: `from_pretrained(src, quantization_config=cfg)` + `save_pretrained(dst)` (--skip-in-memory to skip);
  - spilled (--spill): streaming with the calibration activations spilled to disk (spill_activations=True);
  - offloaded (--offload MAX_MEMORY, e.g. 2GiB): `from_pretrained(src, quantization_config=cfg, device_map="auto",
    max_memory={"cpu": MAX_MEMORY})` + `save_pretrained(dst)`: the float model does not fit, so the blocks stay on
    disk and are calibrated one at a time; the quantized model is held in memory.

The outputs are compared byte for byte.

    python benchmarks/bench_streaming.py [--dir /tmp/hfq-streaming] [--layers 12] [--skip-in-memory]
                                         [--in-memory-limit-s SECONDS] [--offload MAX_MEMORY] [--skip-streaming]
                                         [--spill]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
import hf_quant
from hf_quant import QuantConfig
from hf_quant.streaming import peak_memory_mb
mode, src, dst, n, seq, max_memory = sys.argv[1:4] + [int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]]
vocab = json.load(open(f"{src}/config.json"))["vocab_size"]
g = torch.Generator().manual_seed(0)
data = [torch.randint(0, vocab, (seq,), generator=g) for _ in range(n)]
cfg = QuantConfig(method="gptq", bits=4, group_size=128, dataset=data, num_samples=n, seq_len=seq,
                  spill_activations=mode == "spilled")
t = time.perf_counter()
if mode in ("streaming", "spilled"):
    hf_quant.quantize_checkpoint(src, dst, cfg, tokenizer=None)
else:
    from transformers import AutoModelForCausalLM
    kw = dict(device_map="auto", max_memory={"cpu": max_memory}) if mode == "offloaded" else {}
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, **kw).save_pretrained(dst, max_shard_size="1GB")
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": peak_memory_mb()}))
"""


def generate(path: Path, hidden: int, inter: int, layers: int, vocab: int) -> float:
    """A random bf16 Llama checkpoint, one shard per block; returns its size in GiB."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors.index.json").is_file():
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**30
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    shards: list[dict] = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(hidden, hidden),
                       p + "self_attn.v_proj.weight": rand(hidden, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                       p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                       p + "mlp.down_proj.weight": rand(hidden, inter),
                       p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
        save_file(shards[-1], str(tmp / f"model-{i + 2:05d}-of-{layers + 2:05d}.safetensors"), metadata={"format": "pt"})
        shards[-1] = {k: None for k in shards[-1]}  # released: only the names are kept
    shards.append({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rand(vocab, hidden)})
    n = len(shards)
    for i in (0, n - 1):
        save_file(shards[i], str(tmp / f"model-{i + 1:05d}-of-{n:05d}.safetensors"), metadata={"format": "pt"})
    weight_map = {k: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(shards) for k in s}
    size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                  "weight_map": weight_map}, indent=2))
    tmp.rename(path)
    return size / 2**30


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run(mode: str, src: Path, dst: Path, n: int, seq: int, limit_s: float | None = None, max_memory: str = "") -> dict:
    """One path in a fresh process. With `limit_s`, the process is stopped after that many seconds and the
    peak seen so far (VmHWM, polled every second) is reported as a lower bound (`stopped`: True)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(str(dst) + ".partial", ignore_errors=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(src), str(dst), str(n), str(seq), max_memory],
                                 stdout=out, stderr=err, text=True)
        peak = 0.0
        while child.poll() is None:
            peak = max(peak, _vm_hwm_mb(child.pid) or 0.0)
            if limit_s is not None and time.perf_counter() - t0 > limit_s:
                child.kill()
                child.wait()
                return {"seconds": time.perf_counter() - t0, "peak_mb": peak, "stopped": True}
            time.sleep(1.0)
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{err.read()[-3000:]}")
        return json.loads(out.read().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/hfq-streaming")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--skip-in-memory", action="store_true")
    ap.add_argument("--skip-streaming", action="store_true", help="only the other paths (no byte comparison)")
    ap.add_argument("--in-memory-limit-s", type=float, default=None,
                    help="stop the in-memory run after this many seconds and report its peak so far (a lower "
                         "bound: it holds the whole float model from the start)")
    ap.add_argument("--offload", metavar="MAX_MEMORY", default=None,
                    help="also run from_pretrained(..., device_map='auto', max_memory={'cpu': MAX_MEMORY}) (the "
                         "offloaded path: blocks calibrated one at a time from disk, the quantized model in memory)")
    ap.add_argument("--spill", action="store_true", help="also stream with QuantConfig(spill_activations=True): "
                    "the cached activations in a file, a window at a time in memory")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the outputs")
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / f"src-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    t = time.perf_counter()
    gib = generate(src, args.hidden, args.intermediate, args.layers, args.vocab)
    print(f"source: random Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} blocks, "
          f"vocab {args.vocab}, bf16: {gib:.2f} GiB on disk (generated in {time.perf_counter() - t:.0f} s)")
    print(f"GPTQ w4 g128, {args.num_samples} x {args.seq_len} calibration tokens; {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM\n")
    rows = {}
    if not args.skip_in_memory and args.in_memory_limit_s is not None:  # the short, stopped run first
        rows["in memory"] = run("in memory", src, root / "memory" / "out", args.num_samples, args.seq_len,
                                args.in_memory_limit_s)
    if not args.skip_streaming:
        rows["streaming"] = run("streaming", src, root / "stream" / "out", args.num_samples, args.seq_len)
    if args.spill:
        rows["streaming, activations spilled to disk"] = run("spilled", src, root / "spilled" / "out", args.num_samples,
                                                             args.seq_len)
    if args.offload:
        rows[f"from_pretrained, device_map='auto', max_memory {args.offload}"] = run(
            "offloaded", src, root / "offload" / "out", args.num_samples, args.seq_len, max_memory=args.offload)
    if not args.skip_in_memory and args.in_memory_limit_s is None:
        rows["in memory"] = run("in memory", src, root / "memory" / "out", args.num_samples, args.seq_len)
    print("| path | peak resident memory (VmHWM) | x model size | time |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        at_least = ">= " if r.get("stopped") else ""
        time_note = f"stopped after {r['seconds']:.0f} s" if r.get("stopped") else f"{r['seconds']:.0f} s"
        print(f"| {name} | {at_least}{r['peak_mb'] / 1024:.2f} GiB | {at_least}{r['peak_mb'] / 1024 / gib:.2f}x | "
              f"{time_note} |")
    out = next((root / d / "out" for d in ("stream", "offload", "spilled", "memory")
                if (root / d / "out" / "config.json").is_file()), root / "stream" / "out")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**30
    print(f"\nquantized checkpoint: {size:.2f} GiB in {len(list(out.glob('*.safetensors')))} shard(s)")
    others = {"in-memory": "memory", "offloaded": "offload", "spilled": "spilled"}
    for name, d in others.items():
        b = root / d / "out"
        if (b / "config.json").is_file() and b != out:
            same = sorted(os.listdir(out)) == sorted(os.listdir(b)) and all(
                filecmp.cmp(out / f, b / f, shallow=False) for f in os.listdir(out))
            print(f"streaming and {name} weights and config byte-identical: {same}")
    if not args.keep:
        for d in ("stream", *others.values()):
            shutil.rmtree(root / d, ignore_errors=True)


if __name__ == "__main__":
    main()
