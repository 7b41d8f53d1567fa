"""Model families end to end on tiny random models: what `tests/test_model_families.py` checks for six families,
here for every family listed (about 5 minutes on 2 cores; not part of the test suite).

    python benchmarks/check_model_families.py                       # every family, every method below
    python benchmarks/check_model_families.py qwen3 gemma2 --methods rtn,awq

Per family: a tiny random model of that `model_type` (2 blocks, hidden 128, the tiny-llama vocabulary, bf16,
eval mode) is saved; then per method it is loaded with `quantization_config` (calibration methods on 4 windows of
32 tokens of the shared corpus), runs greedy `generate`, is saved and reloaded (logits must be equal), and gets
one LoRA backward through PEFT (every `lora_B` must get a gradient). Printed: the logits' relative error against
the float model, the float parameters left (embeddings; MoE experts stay float), and the block stage's notes
(which AWQ / SmoothQuant folds happened). A family that fails prints FAIL with the error.
"""

from __future__ import annotations

import argparse
import re
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import hf_quant

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
TINY = SHARED / "models" / "tiny-llama"
FAMILIES = {
    "qwen3": dict(head_dim=128), "mistral": {}, "gemma": dict(head_dim=32), "gemma2": dict(head_dim=32),
    "gemma3_text": dict(head_dim=32), "phi3": {}, "phi": dict(num_key_value_heads=None),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1,
                        kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                        n_group=1, topk_group=1),
    "gpt_neox": dict(num_key_value_heads=None), "falcon": dict(num_key_value_heads=None), "stablelm": {}, "olmo2": {},
    "granite": {}, "cohere": {}, "smollm3": {}, "starcoder2": {}, "glm": {}, "glm4": {}, "exaone4": {},
    "ernie4_5": {}, "seed_oss": {}, "arcee": {},
    "bloom": dict(n_head=4, n_layer=2, num_key_value_heads=None, num_attention_heads=None, intermediate_size=None,
                  num_hidden_layers=None),
    "gptj": dict(n_embd=128, n_head=4, n_layer=2, rotary_dim=16, n_positions=128, num_key_value_heads=None),
    "codegen": dict(n_embd=128, n_head=4, n_layer=2, rotary_dim=16, n_positions=128, n_ctx=128,
                    num_key_value_heads=None),
    "mpt": dict(d_model=128, n_heads=4, n_layers=2, expansion_ratio=2, num_key_value_heads=None),
    "gpt_bigcode": dict(n_embd=128, n_head=4, n_layer=2, n_positions=128, num_key_value_heads=None),
}


def config_for(model_type: str):
    from transformers import AutoConfig

    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    kw = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=128,
              intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)
    kw.update(FAMILIES[model_type])
    return AutoConfig.for_model(model_type, **{k: v for k, v in kw.items() if v is not None})


def check(model_type: str, methods: list[str], texts: list[str]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp())
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config_for(model_type)).to(torch.bfloat16).eval()
        model.save_pretrained(work / "float")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY / f, work / "float")
        ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model.float()(ids).logits
        total = sum(p.numel() for p in model.parameters())
        for method in methods:
            t = time.perf_counter()
            kw = {} if method in ("rtn", "llm_int8") else dict(dataset=texts, num_samples=4, seq_len=32)
            kw.update(dict(bits=4, group_size=32) if method in ("rtn", "gptq", "awq") else {})
            kw.update(dict(smooth=0.5) if method == "w8a8" else {})
            q = AutoModelForCausalLM.from_pretrained(work / "float", dtype=torch.float32,
                                                     quantization_config=hf_quant.QuantConfig(method=method, **kw))
            with torch.no_grad():
                out = q(ids).logits
            assert q.generate(ids[:, :5], max_new_tokens=4, do_sample=False).shape[1] == 9
            q.save_pretrained(work / method)
            again = AutoModelForCausalLM.from_pretrained(work / method, dtype=torch.float32)
            with torch.no_grad():
                assert torch.equal(again(ids).logits, out), "the reloaded model computes other logits"
            peft_model = get_peft_model(again, LoraConfig(r=4, target_modules="all-linear"))
            peft_model(input_ids=ids, labels=ids).loss.backward()
            # an MoE expert no token of this batch is routed to gets no gradient, as in training
            grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
            dense = [g for n, g in grads.items() if not re.search(r"\.experts\.\d+\.", n)]
            experts = [g for n, g in grads.items() if re.search(r"\.experts\.\d+\.", n)]
            assert dense and all(g is not None for g in dense), "a LoRA adapter got no gradient"
            assert not experts or any(g is not None for g in experts), "no expert's LoRA adapter got a gradient"
            left = sum(p.numel() for p in q.parameters() if p.dtype.is_floating_point)
            notes = [n for r in getattr(q.hf_quantizer, "calibration_report", None) or [] for n in r.get("notes", [])]
            print(f"| {model_type} | {method} | ok | {((out - ref).norm() / ref.norm()).item():.3f} | "
                  f"{left / total:.0%} | {time.perf_counter() - t:.1f} | {'; '.join(notes[:3])} |", flush=True)
    except Exception as e:  # noqa: BLE001  (a report, family by family)
        print(f"| {model_type} | FAIL | {type(e).__name__}: {str(e)[:300]} | | | | |", flush=True)
        traceback.print_exc(limit=-3, file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("families", nargs="*", help=f"model types (default: all of {', '.join(FAMILIES)})")
    ap.add_argument("--methods", default="rtn,gptq,awq,llm_int8,w8a8")
    args = ap.parse_args()
    texts = [p.read_text(encoding="utf-8")[:4000] for p in sorted((SHARED / "data" / "corpus").glob("*.txt"))[:2]]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, hf_quant {hf_quant.__version__}")
    print("| family | method | result | logits rel. error | float params left | seconds | notes (first 3) |")
    print("|---|---|---|---:|---:|---:|---|")
    for model_type in args.families or FAMILIES:
        check(model_type, args.methods.split(","), texts)


if __name__ == "__main__":
    main()
