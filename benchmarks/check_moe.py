"""MoE experts quantized: ref-llama upcycled to a Mixtral with E experts, perplexity of the float MoE and of its
quantized experts (RTN / GPTQ / AWQ), the dense model quantized the same way beside it, all in one run.

    python benchmarks/check_moe.py [--experts 4] [--top-k 2] [--methods rtn gptq awq] [--config w4g128]
        [--num-samples 64] [--windows 40] [--dtype float32]

The upcycled model (built in a temporary directory, nothing downloaded): ref-llama's attention, norms and
embeddings; each expert is ref-llama's MLP with its intermediate neurons in an order of its own (the same
function, other weights per quantization group of down_proj); a random router picks top_k experts per token, and
Mixtral normalises their weights to sum to 1, so the float MoE computes ref-llama's function (its perplexity,
measured in the run, equals the dense one up to bf16 rounding) while each expert sees only the tokens routed to
it: per-expert calibration is what is measured. Prints the calibration tokens each expert of block 0 received,
the quantized sizes, the held-out perplexity (last 3% of each corpus book, 512-token windows) and greedy decode
speed (64 new tokens after 32, best of 3 runs; a 33M-parameter model decodes at Python's pace more than at the
kernels', so read it as overhead, not as the kernels' speed).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

import hf_quant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_summary, tokens_per_s  # noqa: E402
from ppl_ref_llama import SHARED, calibration_text, method_options  # noqa: E402


def upcycle(dense_dir: str | Path, out: str | Path, experts: int, top_k: int, seed: int = 0) -> Path:
    """Write a Mixtral checkpoint computing the dense Llama at `dense_dir`'s function (see the module docstring)."""
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, num_local_experts=experts,
                        num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(cfg)
    sd = dense.state_dict()
    own = moe.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v)
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            ex = layer.mlp.experts
            for e in range(experts):
                perm = torch.randperm(c.intermediate_size)
                ex.gate_up_proj[e].copy_(torch.cat([mlp.gate_proj.weight[perm], mlp.up_proj.weight[perm]]))
                ex.down_proj[e].copy_(mlp.down_proj.weight[:, perm])
            layer.mlp.gate.weight.normal_(0, c.hidden_size ** -0.5)
    moe.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(dense_dir).save_pretrained(out)
    return Path(out)


def expert_tokens(model, calib: list[str], tok, windows: int, seq_len: int = 512) -> list[int]:
    """Calibration tokens each expert of block 0 receives (top_k routing of the float model)."""
    counts = torch.zeros(model.config.num_local_experts, dtype=torch.long)

    def hook(module, args, out):
        counts.add_(torch.bincount(args[1].flatten(), minlength=counts.numel()))

    h = model.model.layers[0].mlp.experts.register_forward_hook(hook)
    ids = tok("\n\n".join(calib), return_tensors="pt").input_ids[0][: windows * seq_len].reshape(-1, seq_len)
    with torch.no_grad():
        for b in ids.split(8):
            model(b)
    h.remove()
    return counts.tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    ap.add_argument("--config", default="w4g128")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40, help="held-out 512-token windows scored")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the models' dtype (float32: CPUs without native bf16 run it several times faster)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    bits, gs = map(int, re.fullmatch(r"w(\d)g(-?\d+)", args.config).groups())
    torch.set_num_threads(torch.get_num_threads())
    tok = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_text(SHARED / "data" / "corpus")

    def ppl(model):
        return hf_quant.eval.perplexity(model, tok, max_windows=args.windows)

    with tempfile.TemporaryDirectory() as tmp:
        moe_dir = upcycle(args.model, Path(tmp) / "moe", args.experts, args.top_k)
        float_moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=dtype)
        prompt = tok(calib[0][:400], return_tensors="pt").input_ids[:, :32]

        def speed(model):
            return tokens_per_s(model, prompt, 64, runs=3)["tokens_per_s"]

        dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        rows = [("float", "dense", ppl(dense), 0, 0.0, speed(dense)),
                ("float", f"MoE {args.experts}x top-{args.top_k}", ppl(float_moe), 0, 0.0, speed(float_moe))]
        del dense
        counts = expert_tokens(float_moe, calib, tok, args.num_samples)
        print(f"calibration tokens per expert of block 0 ({args.num_samples} windows x 512, top-{args.top_k}):",
              counts, flush=True)
        del float_moe
        for method in args.methods:
            for name, src in (("dense", args.model), (f"MoE {args.experts}x top-{args.top_k}", moe_dir)):
                cfg = hf_quant.QuantConfig(bits=bits, group_size=gs, dataset=calib, num_samples=args.num_samples,
                                           seq_len=512, **method_options(method))
                start = time.perf_counter()
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, quantization_config=cfg)
                seconds = time.perf_counter() - start
                quantized = sum(m.qweight.numel() * m.qweight.element_size() for m in model.modules()
                                if isinstance(m, hf_quant.QuantLinear))
                rows.append((method, name, ppl(model), quantized, seconds, speed(model)))
                print(rows[-1], flush=True)
                del model
    base = {name: p for m, name, p, _, _, _ in rows if m == "float"}
    print(f"\n{args.dtype}, {cpu_summary()}")
    print(f"| method ({args.config}) | model | held-out ppl | vs its float | packed codes MiB | quantize s | "
          "decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, name, p, size, s, tps in rows:
        print(f"| {method} | {name} | {p:.3f} | {p / base[name] - 1:+.2%} | {size / 2**20:.1f} | {s:.1f} | {tps:.1f} |")


if __name__ == "__main__":
    main()
